//! Marathon backend (service-level): microscaler sets an app's `instances` with
//! `PUT /v2/apps/{id}`, and Marathon launches or kills the tasks on Mesos agents.
//!
//! - A service references an existing app (`[services.reference] app = "/group/app"`, the id
//!   normalised as Marathon does), or, managed, is an app `/{instance}/{service}` that
//!   microscaler creates with 0 instances from the service's `image` (a Docker container, its
//!   `command` as the container's args) and `env`, labelled [`labels::INSTANCE`] and
//!   [`labels::SERVICE`], and deletes with `on_exit = "stop"`. An app of that id without both
//!   labels is never touched (that is an error).
//! - An app with a deployment in progress is locked: Marathon answers a change with 409 ("App
//!   is locked by one or more deployments"). microscaler waits up to a second for a lock to
//!   end, does not send a change to an app still locked, and treats a 409 as a
//!   [`BackendError::Conflict`], retried on the next tick; it never adds
//!   `?force=true` unless `[backend] force = true` (which cancels the running deployment).
//!   Only the deletion of its own managed apps at shutdown is forced.
//! - Observation is one `GET /v2/apps` per tick with tasks, counts and deployments embedded.
//!   Running = `tasksRunning` (`tasksHealthy` when the app has health checks: the Force12
//!   agent took `instances` as running, which it is not); pending = the instances not running
//!   (`tasksStaged` ones and those still waiting for an offer), of which unschedulable = those
//!   not even staged (no agent's offer fits them yet); `instances` is what the orchestrator
//!   wants; caught up when the app has no deployment.
//! - Hosts are `[backend] hosts` when given (all ready), else the agents that run tasks of any
//!   app (Marathon has no agent list; a cluster with none yet has no hosts, so use `[capacity]
//!   slots` or `hosts` then).
//! - A per-host service is an app constrained `["hostname", "UNIQUE"]`: Marathon does not keep
//!   it at one task per agent by itself, so microscaler sets its instances to the number of
//!   hosts, as for any orchestrator without native per-host services.
//! - HTTP basic auth (`username` and `password_file`) or a DC/OS token (`token_file`, sent as
//!   `Authorization: token=...`), never logged; TLS with `ca_file`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::RwLock;
use std::time::Duration;

use microscaler_core::plugin::{Capabilities, ServiceContext, StopCompletion};
use microscaler_core::validate::join;
use microscaler_core::{Host, HostId, ServiceKind, ServiceName, ServiceObservation, Validator};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{Reference, Workload};
use crate::http::{client, clip, encode, env, read_secret};
use crate::{
    labels, resolved, Apply, Backend, BackendError, Observation, Replica, ReplicaState,
    ScaleOutcome, Service,
};

/// What the marathon backend can do: per-host services are apps microscaler keeps at one task
/// per host, no pause, tasks stop after the update returns (a scale-down waits for them), and
/// services may reference existing apps.
pub const CAPABILITIES: Capabilities = Capabilities {
    native_per_host: false,
    pause: false,
    host_resources: false,
    stops: StopCompletion::Converges,
    references: true,
};

/// The constraint that makes an app one task per agent.
const UNIQUE: [&str; 2] = ["hostname", "UNIQUE"];

// ---------------------------------------------------------------------------------------------
// Configuration.

/// How microscaler proves who it is to Marathon.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// HTTP basic auth (Marathon's `--http_credentials`): the user, and the file holding the
    /// password.
    Basic {
        /// The user name.
        username: String,
        /// The file holding the password.
        password_file: String,
    },
    /// A DC/OS token, from a file, sent as `Authorization: token=...`.
    DcosToken {
        /// The file holding the token.
        token_file: String,
    },
}

/// `[backend] type = "marathon"`: a Marathon scheduler on Mesos (or DC/OS), through its REST API.
#[derive(Debug, Clone, PartialEq)]
pub struct MarathonConfig {
    /// The API's address; `None` means `$MARATHON_URL`, else `http://127.0.0.1:8080`.
    pub address: Option<String>,
    /// Credentials.
    pub auth: Auth,
    /// A PEM file of the CA that signed the API's certificate.
    pub ca_file: Option<String>,
    /// Whether a change to a locked app is forced (`?force=true`: Marathon cancels the
    /// running deployment). Default false.
    pub force: bool,
    /// The hosts (agents' hostnames) capacity counts; empty means the agents that run tasks.
    pub hosts: Vec<String>,
    /// CPUs of each task of a managed app. Default 0.1.
    pub cpus: f64,
    /// Memory (MiB) of each task of a managed app. Default 64.
    pub mem: f64,
}

impl Default for MarathonConfig {
    fn default() -> Self {
        MarathonConfig {
            address: None,
            auth: Auth::None,
            ca_file: None,
            force: false,
            hosts: Vec::new(),
            cpus: 0.1,
            mem: 64.0,
        }
    }
}

#[derive(Deserialize)]
struct RawMarathon {
    address: Option<String>,
    username: Option<String>,
    password_file: Option<String>,
    token_file: Option<String>,
    ca_file: Option<String>,
    force: Option<bool>,
    hosts: Option<Vec<String>>,
    cpus: Option<f64>,
    mem: Option<f64>,
}

/// Marathon's form of an app id: slashes trimmed at both ends, made absolute (`a/b` = `/a/b`).
pub fn normalise(id: &str) -> String {
    format!("/{}", id.trim_matches('/'))
}

/// Whether `id` (normalised) is an app id Marathon accepts: path segments of lowercase
/// letters, digits, '-' and '.', none empty, `.` and `..` only as whole segments excluded.
fn is_app_id(id: &str) -> bool {
    let body = &id[1..];
    !body.is_empty()
        && body.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !seg.starts_with('-')
                && !seg.ends_with('-')
        })
}

impl MarathonConfig {
    /// Validates the `[backend]` section (without `type`) at `path`. No file is read here.
    pub fn validate(options: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawMarathon = v.part(options, path)?;
        if let Some(a) = &r.address {
            if !(a.starts_with("http://") || a.starts_with("https://")) || a.len() < 9 {
                v.err(
                    join(path, "address"),
                    format!("{a:?} is not an http:// or https:// URL of Marathon"),
                );
            }
        }
        for (key, value) in [
            ("username", &r.username),
            ("password_file", &r.password_file),
            ("token_file", &r.token_file),
            ("ca_file", &r.ca_file),
        ] {
            if value.as_deref().is_some_and(|s| s.trim().is_empty()) {
                v.err(join(path, key), "must not be empty");
            }
        }
        let auth = match (r.username, r.password_file, r.token_file) {
            (None, None, None) => Auth::None,
            (Some(username), Some(password_file), None) => Auth::Basic {
                username,
                password_file,
            },
            (None, None, Some(token_file)) => Auth::DcosToken { token_file },
            (u, p, t) => {
                if t.is_some() && (u.is_some() || p.is_some()) {
                    v.err(
                        join(path, "token_file"),
                        "give either a DC/OS token_file or username and password_file, not both",
                    );
                } else if u.is_some() {
                    v.err(
                        join(path, "password_file"),
                        "missing: basic auth needs the file holding the password beside username",
                    );
                } else {
                    v.err(
                        join(path, "username"),
                        "missing: basic auth needs the user beside password_file",
                    );
                }
                Auth::None
            }
        };
        let hosts = r.hosts.unwrap_or_default();
        for h in &hosts {
            if h.trim().is_empty() || h.contains(char::is_whitespace) {
                v.err(join(path, "hosts"), format!("{h:?} is not a hostname"));
            }
        }
        let d = MarathonConfig::default();
        let cpus = r.cpus.unwrap_or(d.cpus);
        if !(cpus > 0.0 && cpus.is_finite()) {
            v.err(join(path, "cpus"), "must be a number of CPUs above 0");
        }
        let mem = r.mem.unwrap_or(d.mem);
        if !(mem >= 1.0 && mem.is_finite()) {
            v.err(join(path, "mem"), "must be MiB of memory, at least 1");
        }
        Some(MarathonConfig {
            address: r.address.map(|a| a.trim_end_matches('/').to_string()),
            auth,
            ca_file: r.ca_file,
            force: r.force.unwrap_or(false),
            hosts,
            cpus,
            mem,
        })
    }

    /// Validates a service's own keys for this backend: `image` (required), `command` (the
    /// container's args) and `env`; or a `[services.reference]` naming an existing app.
    pub fn workload(
        &self,
        options: toml::Table,
        _cx: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Workload> {
        let w = Workload::managed_or_reference(options, v, path, |table, v, path| {
            MarathonReference::validate(table, v, path).map(Reference::Marathon)
        })?;
        if let Workload::Managed(run) = &w {
            if run.image.is_none() {
                v.err(
                    join(path, "image"),
                    "missing: the Docker image the tasks run (there is no built-in one on a \
                     cluster), or reference an existing app with [services.reference]",
                );
            }
        }
        Some(w)
    }
}

/// `[services.reference]` on the marathon backend: an existing app.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MarathonReference {
    /// The app's id, normalised (`/group/app`).
    pub app: String,
}

impl std::fmt::Display for MarathonReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Marathon app {}", self.app)
    }
}

#[derive(Deserialize)]
struct RawReference {
    app: Option<String>,
}

impl MarathonReference {
    /// Validates the reference table at `path`.
    pub fn validate(table: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawReference = v.part(table, path)?;
        let Some(app) = r.app else {
            v.err(
                join(path, "app"),
                "missing: the id of an existing Marathon app (\"/group/app\")",
            );
            return None;
        };
        let id = normalise(&app);
        if !is_app_id(&id) {
            v.err(
                join(path, "app"),
                format!(
                    "{app:?} is not a Marathon app id (path segments of lowercase letters, \
                     digits, '-' and '.')"
                ),
            );
        }
        Some(MarathonReference { app: id })
    }
}

// ---------------------------------------------------------------------------------------------
// The live backend.

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a change waits for a locked app's deployment before it is a conflict.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// How long `prepare` waits for a new app's creation deployment.
const CREATE_WAIT: Duration = Duration::from_secs(10);

/// What a service is on Marathon, resolved at `prepare`.
#[derive(Debug, Clone)]
struct Target {
    app: String,
    managed: bool,
}

/// The Marathon backend.
pub struct MarathonBackend {
    http: reqwest::Client,
    address: String,
    /// The value of the `Authorization` header: sent, never logged or printed.
    authorization: Option<String>,
    instance: String,
    cfg: MarathonConfig,
    targets: RwLock<HashMap<ServiceName, Target>>,
}

impl MarathonBackend {
    /// Connects: reads the credentials' files and checks that the API answers (`GET /v2/info`).
    pub async fn connect(cfg: &MarathonConfig, instance: &str) -> Result<Self, BackendError> {
        let address = cfg
            .address
            .clone()
            .or_else(|| env("MARATHON_URL"))
            .unwrap_or_else(|| "http://127.0.0.1:8080".into())
            .trim_end_matches('/')
            .to_string();
        let what = format!("Marathon at {address}");
        let authorization = match &cfg.auth {
            Auth::None => None,
            Auth::Basic {
                username,
                password_file,
            } => {
                let password = read_secret(&what, "password file", password_file)?;
                Some(format!(
                    "Basic {}",
                    base64(format!("{username}:{password}").as_bytes())
                ))
            }
            Auth::DcosToken { token_file } => Some(format!(
                "token={}",
                read_secret(&what, "DC/OS token file", token_file)?
            )),
        };
        let backend = MarathonBackend {
            http: client(&what, cfg.ca_file.as_deref(), REQUEST_TIMEOUT)?,
            address,
            authorization,
            instance: instance.to_string(),
            cfg: cfg.clone(),
            targets: RwLock::new(HashMap::new()),
        };
        let info = backend
            .call(reqwest::Method::GET, "/v2/info", None, "GET /v2/info")
            .await?
            .unwrap_or(Value::Null);
        tracing::info!(
            address = %backend.address,
            version = %info["version"].as_str().unwrap_or("?"),
            leader = %info["leader"].as_str().unwrap_or("?"),
            credentials = backend.authorization.is_some(),
            "connected to Marathon"
        );
        Ok(backend)
    }

    /// The id of managed `service`'s app.
    pub fn app_id(instance: &str, service: &str) -> String {
        format!("/{instance}/{service}")
    }

    /// Sends a request; a 2xx answer's JSON body, a 404 as `None`, the rest as typed errors.
    async fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
        op: &str,
    ) -> Result<Option<Value>, BackendError> {
        let mut req = self
            .http
            .request(method, format!("{}{path_and_query}", self.address));
        if let Some(a) = &self.authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable = |e: reqwest::Error| BackendError::Unreachable {
            what: format!("Marathon at {}", self.address),
            hint: format!(
                "{op}: {e}; is Marathon up, and do [backend] address (or MARATHON_URL) and \
                 ca_file point at it?"
            ),
            source: Some(Box::new(e)),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(unreachable)?;
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = json["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| clip(text.trim()));
        let op = op.to_string();
        match status {
            200..=299 => Ok(Some(json)),
            404 => Ok(None),
            409 => Err(BackendError::Conflict { op, message }),
            401 | 403 => Err(BackendError::Unsupported(format!(
                "{op}: refused by Marathon at {} ({status} {message}): give microscaler \
                 credentials Marathon accepts ([backend] username and password_file for \
                 --http_credentials, or token_file for DC/OS) with the right to read and \
                 change the apps",
                self.address
            ))),
            400 | 422 => Err(BackendError::Invalid {
                op,
                message: match json.get("details") {
                    Some(d) => format!("{message}: {d}"),
                    None => message,
                },
            }),
            429 => Err(BackendError::Throttled { op, message }),
            _ => Err(BackendError::Api {
                op,
                message: format!("{status} {message}"),
            }),
        }
    }

    async fn get_app(&self, id: &str) -> Result<Option<Value>, BackendError> {
        let path = format!("/v2/apps{}?embed=app.tasks", encode_id(id));
        Ok(self
            .call(reqwest::Method::GET, &path, None, &format!("GET app {id}"))
            .await?
            .map(|v| v["app"].clone()))
    }

    /// `prepare`, or with [`Apply::No`] its checks only.
    async fn prepare_as(&self, services: &[Service], apply: Apply) -> Result<(), BackendError> {
        for s in services {
            let Some(t) = self.resolve(s, apply).await? else {
                continue;
            };
            tracing::info!(service = %s.name, app = %t.app, managed = t.managed, "following the Marathon app");
            self.targets
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(s.name.clone(), t);
        }
        Ok(())
    }

    /// Resolves what `service` is: its app exists (a managed one is created when it does not)
    /// and fits the service (a per-host service's app is `hostname UNIQUE`).
    /// With [`Apply::No`], a managed object that does not exist yet is not created: `None`.
    async fn resolve(
        &self,
        service: &Service,
        apply: Apply,
    ) -> Result<Option<Target>, BackendError> {
        let per_host = matches!(service.kind, ServiceKind::PerHost);
        let (app, managed) = match service.workload.reference() {
            Some(Reference::Marathon(r)) => (r.app.clone(), false),
            Some(other) => {
                return Err(BackendError::Unsupported(format!(
                    "service {}: the marathon backend cannot reference a {other}",
                    service.name
                )))
            }
            None => (Self::app_id(&self.instance, service.name.as_str()), true),
        };
        let found = self.get_app(&app).await?;
        let spec = match (found, managed) {
            (Some(spec), true) => {
                let l = &spec["labels"];
                if l[labels::INSTANCE].as_str() != Some(self.instance.as_str())
                    || l[labels::SERVICE].as_str() != Some(service.name.as_str())
                {
                    return Err(BackendError::Unsupported(format!(
                        "service {}: the Marathon app {app} exists and is not this \
                         microscaler's (its labels lack {} = {:?} and {} = {:?}); rename the \
                         service or the instance, or reference the app with \
                         [services.reference]",
                        service.name,
                        labels::INSTANCE,
                        self.instance,
                        labels::SERVICE,
                        service.name
                    )));
                }
                spec
            }
            (Some(spec), false) => spec,
            (None, true) if apply == Apply::No => {
                tracing::info!(service = %service.name, app = %app, "dry run: would create the Marathon app (0 instances)");
                return Ok(None);
            }
            (None, true) => {
                self.create(service, &app, per_host).await?;
                // Its creation is a deployment too: let it end before the first change.
                self.unlocked(&app, CREATE_WAIT).await?;
                return Ok(Some(Target { app, managed }));
            }
            (None, false) => {
                return Err(BackendError::NotFound {
                    what: format!("Marathon app {app}"),
                    hint: format!(
                        "service {} references it; check [services.reference] app",
                        service.name
                    ),
                })
            }
        };
        let unique = spec["constraints"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c.as_array()
                    .is_some_and(|c| c.len() >= 2 && c[0] == UNIQUE[0] && c[1] == UNIQUE[1])
            })
        });
        if per_host && !unique {
            return Err(BackendError::Unsupported(format!(
                "service {}: a per-host service's app runs one task per agent, and Marathon \
                 app {app} has no [\"hostname\", \"UNIQUE\"] constraint",
                service.name
            )));
        }
        Ok(Some(Target { app, managed }))
    }

    /// Creates managed `service`'s app, with 0 instances.
    async fn create(
        &self,
        service: &Service,
        app: &str,
        per_host: bool,
    ) -> Result<(), BackendError> {
        let run = crate::managed(service);
        let mut spec = json!({
            "id": app,
            "instances": 0,
            "cpus": self.cfg.cpus,
            "mem": self.cfg.mem,
            "env": run.env,
            "labels": {labels::INSTANCE: self.instance, labels::SERVICE: service.name.as_str()},
            "container": {"type": "DOCKER", "docker": {"image": run.image}},
            "taskKillGracePeriodSeconds": service.stop_grace.as_secs_f64().ceil() as u64,
        });
        if !run.command.is_empty() {
            spec["args"] = json!(run.command);
        }
        if per_host {
            spec["constraints"] = json!([UNIQUE]);
        }
        self.call(
            reqwest::Method::POST,
            "/v2/apps",
            Some(&spec),
            &format!("create Marathon app {app}"),
        )
        .await?;
        tracing::info!(service = %service.name, app, "created the Marathon app (0 instances)");
        Ok(())
    }

    fn target(&self, service: &Service) -> Option<Target> {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&service.name)
            .cloned()
    }

    /// Reads `app` until no deployment locks it or `limit` passes; its last reading.
    async fn unlocked(&self, app: &str, limit: Duration) -> Result<Option<Value>, BackendError> {
        let t0 = tokio::time::Instant::now();
        loop {
            let got = self.get_app(app).await?;
            match &got {
                Some(a) if !deployments(a).is_empty() && t0.elapsed() < limit => {}
                _ => return Ok(got),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until at most `target` tasks of `app` remain (or `limit` passes).
    async fn wait_stopped(&self, app: &str, target: u32, limit: Duration) {
        let t0 = tokio::time::Instant::now();
        while t0.elapsed() < limit {
            match self.get_app(app).await {
                Ok(Some(a)) if tasks_of(&a).len() as u32 <= target => return,
                Ok(None) => return,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(
            app,
            target,
            "tasks still stopping after {limit:?}; going on"
        );
    }
}

/// The ids of the deployments that lock `app`.
fn deployments(app: &Value) -> Vec<&str> {
    app["deployments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str())
        .collect()
}

fn tasks_of(app: &Value) -> &[Value] {
    app["tasks"].as_array().map_or(&[], Vec::as_slice)
}

/// An app id as a URL path (`/a/b` stays `/a/b`, each segment encoded).
fn encode_id(id: &str) -> String {
    id.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// Standard base64 with padding (basic auth).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The counts of one app.
fn observe_app(app: &Value) -> ServiceObservation {
    let n = |k: &str| app[k].as_u64().unwrap_or(0) as u32;
    let instances = n("instances");
    let health_checked = app["healthChecks"]
        .as_array()
        .is_some_and(|h| !h.is_empty());
    let running = if health_checked {
        n("tasksHealthy")
    } else {
        n("tasksRunning")
    };
    let staged = n("tasksStaged");
    ServiceObservation {
        running,
        pending: staged.max(instances.saturating_sub(running)),
        unschedulable: instances.saturating_sub(running + staged),
        failed: 0,
        orchestrator_wants: Some(instances),
        caught_up: app["deployments"].as_array().is_none_or(|d| d.is_empty()),
    }
}

impl Backend for MarathonBackend {
    fn kind(&self) -> &'static str {
        "marathon"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn prepare(&self, services: &[Service]) -> Result<(), BackendError> {
        self.prepare_as(services, Apply::Yes).await
    }

    async fn prepare_dry_run(&self, services: &[Service]) -> Result<(), BackendError> {
        self.prepare_as(services, Apply::No).await
    }

    async fn observe(&self) -> Result<Observation, BackendError> {
        let apps = self
            .call(
                reqwest::Method::GET,
                "/v2/apps?embed=apps.tasks&embed=apps.counts&embed=apps.deployments",
                None,
                "GET /v2/apps",
            )
            .await?
            .unwrap_or(Value::Null);
        let apps: BTreeMap<&str, &Value> = apps["apps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| Some((a["id"].as_str()?, a)))
            .collect();
        let mut out = Observation::default();
        let mut seen_hosts = BTreeSet::new();
        for app in apps.values() {
            for t in tasks_of(app) {
                if let Some(h) = t["host"].as_str() {
                    seen_hosts.insert(h.to_string());
                }
            }
        }
        let hosts = if self.cfg.hosts.is_empty() {
            seen_hosts.into_iter().collect()
        } else {
            self.cfg.hosts.clone()
        };
        out.hosts = hosts
            .into_iter()
            .map(|h| Host {
                id: HostId(h.clone()),
                name: h,
                ready: true,
                cpus: None,
                memory_bytes: None,
            })
            .collect();
        let targets: Vec<(ServiceName, Target)> = self
            .targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, t) in targets {
            let Some(app) = apps.get(t.app.as_str()) else {
                continue; // Gone (deleted by our shutdown, or by someone): nothing runs.
            };
            out.services.insert(name.clone(), observe_app(app));
            for task in tasks_of(app) {
                let state = match task["state"].as_str() {
                    Some("TASK_RUNNING") => ReplicaState::Running,
                    Some("TASK_KILLING") => ReplicaState::Stopping,
                    _ => ReplicaState::Pending,
                };
                out.replicas.push(Replica {
                    id: task["id"].as_str().unwrap_or("").to_string(),
                    service: name.clone(),
                    host: HostId(task["host"].as_str().unwrap_or("").to_string()),
                    state,
                });
            }
        }
        Ok(out)
    }

    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        let t = match self.target(service) {
            Some(t) => t,
            None => resolved(self.resolve(service, Apply::Yes).await?)?,
        };
        let op = format!("scale Marathon app {}", t.app);
        let Some(app) = self.get_app(&t.app).await? else {
            return Err(BackendError::NotFound {
                what: format!("Marathon app {}", t.app),
                hint: format!("service {} is that app; was it deleted?", service.name),
            });
        };
        let from = app["instances"].as_u64().unwrap_or(0) as u32;
        if from == target {
            return Ok(ScaleOutcome::default());
        }
        // A deployment about to end (its tasks run) is waited for briefly; a longer one is a
        // conflict, retried on a later tick with the demand of then.
        let app = if deployments(&app).is_empty() || self.cfg.force {
            app
        } else {
            self.unlocked(&t.app, LOCK_WAIT).await?.unwrap_or(app)
        };
        let locked = deployments(&app);
        if !locked.is_empty() && !self.cfg.force {
            return Err(BackendError::Conflict {
                op,
                message: format!(
                    "the app is locked by deployment {}; microscaler waits for it and never \
                     forces ([backend] force = true would cancel it)",
                    locked.join(", ")
                ),
            });
        }
        let path = format!("/v2/apps{}?force={}", encode_id(&t.app), self.cfg.force);
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(&json!({"instances": target})),
            &op,
        )
        .await?
        .ok_or_else(|| BackendError::NotFound {
            what: format!("Marathon app {}", t.app),
            hint: format!("service {} is that app; was it deleted?", service.name),
        })?;
        tracing::debug!(service = %service.name, app = %t.app, from, target, "set the Marathon app's instances");
        if target < from {
            // A scale-down returns when its tasks are gone (or after the grace), so the
            // capacity they held is free before the loop's scale-ups ask for it.
            self.wait_stopped(&t.app, target, service.stop_grace + Duration::from_secs(5))
                .await;
            return Ok(ScaleOutcome {
                stopped: from - target,
                ..ScaleOutcome::default()
            });
        }
        Ok(ScaleOutcome {
            started: target - from,
            ..ScaleOutcome::default()
        })
    }

    async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
        if !remove {
            return Ok(());
        }
        // A referenced app is never deleted.
        crate::remove_each(services, |s| {
            let t = self.target(s).filter(|t| t.managed)?;
            Some(async move {
                // Its own app: a deployment of microscaler's last change must not keep it.
                let path = format!("/v2/apps{}?force=true", encode_id(&t.app));
                let op = format!("delete Marathon app {}", t.app);
                let done = self
                    .call(reqwest::Method::DELETE, &path, None, &op)
                    .await
                    .map(|_| ());
                (format!("the Marathon app {}", t.app), done)
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::config;
    use crate::config::{Reference, Workload};

    use super::*;

    #[test]
    fn options_and_references_are_checked_with_paths() {
        let e = config(
            "type = \"marathon\"\naddress = \"mesos:8080\"\nusername = \"ops\"\ncpus = 0\nmem = 0.5",
            "image = \"nginx\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "backend.address: \"mesos:8080\" is not an http:// or https:// URL of Marathon",
                "backend.password_file: missing: basic auth needs the file holding the password beside username",
                "backend.cpus: must be a number of CPUs above 0",
                "backend.mem: must be MiB of memory, at least 1",
            ]
        );
        let e = config(
            "type = \"marathon\"\ntoken_file = \"t\"\nusername = \"u\"\npassword_file = \"p\"",
            "[services.reference]\napp = \"/Shop/Web\"",
        )
        .unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("backend.token_file: give either"), "{e:?}");
        assert!(
            e[1].starts_with("services[0].reference.app: \"/Shop/Web\" is not a Marathon app id"),
            "{e:?}"
        );
        let c = config(
            "type = \"marathon\"",
            "[services.reference]\napp = \"shop/web/\"",
        )
        .unwrap();
        let Workload::Reference(Reference::Marathon(r)) = &c.services[0].workload else {
            panic!("a reference")
        };
        assert_eq!(r.app, "/shop/web", "normalised as Marathon does");
        let e = config("type = \"marathon\"", "").unwrap_err();
        assert!(e[0].starts_with("services[0].image: missing"), "{e:?}");
    }

    #[test]
    fn counts_are_what_runs_not_what_is_asked() {
        let app = json!({"instances": 5, "tasksRunning": 2, "tasksStaged": 1, "tasksHealthy": 0,
            "healthChecks": [], "deployments": [{"id": "d1"}]});
        let o = observe_app(&app);
        assert_eq!(
            (
                o.running,
                o.pending,
                o.unschedulable,
                o.orchestrator_wants,
                o.caught_up
            ),
            (2, 3, 2, Some(5), false)
        );
        let checked = json!({"instances": 2, "tasksRunning": 2, "tasksHealthy": 1,
            "healthChecks": [{"protocol": "HTTP"}], "deployments": []});
        let o = observe_app(&checked);
        assert_eq!((o.running, o.pending, o.caught_up), (1, 1, true));
    }

    #[test]
    fn base64_and_ids() {
        assert_eq!(base64(b"ops:s3cret"), "b3BzOnMzY3JldA==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(encode_id("/a b/c"), "/a%20b/c");
        assert!(is_app_id("/shop/web-1") && !is_app_id("/") && !is_app_id("/a//b"));
    }
}
