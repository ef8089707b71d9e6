//! Nomad backend (service-level): microscaler sets the count of a job's task group through
//! Nomad's scale endpoint, and Nomad's scheduler places the allocations.
//!
//! - A service references an existing job's task group (`[services.reference] job = "web"`,
//!   `group`, `namespace`, `region`: Nomad forwards a call for another region to its servers;
//!   hosts are the nodes of the backend's region), or, managed, is a job `{instance}-{service}` (one task group and
//!   one task named after the service) that microscaler registers with count 0 from the
//!   service's `image` (docker driver) or `command` (`raw_exec`/`exec`), marked with the job
//!   meta [`META_INSTANCE`] and [`META_SERVICE`], and purges with `on_exit = "stop"`. A job of
//!   that name without both marks is never touched (that is an error). Managed jobs turn
//!   deployments off (`update { max_parallel = 0 }`), so a scale never waits for the previous
//!   one's deployment.
//! - Counts change only with `POST /v1/job/:job/scale` (a message naming microscaler, the
//!   previous count and the new one), after a fresh `GET` of the group's count. A scale-down
//!   returns when its allocations have stopped (at most `stop_grace` + 5 s), so the loop's
//!   stops-before-starts order holds for Nomad's scheduler too. A group whose
//!   job is in an active deployment is not scaled until it finishes (Nomad refuses it anyway,
//!   as the Nomad Autoscaler finds): that is a [`BackendError::Conflict`], retried on the next
//!   tick.
//! - Observation comes from blocking queries (`?index=`), one long poll per endpoint kept
//!   running in the background (the nodes, and per job its allocations, scale status,
//!   evaluations and latest deployment), not from requests per tick. Running = allocations
//!   with client status `running` (desired `run`); pending = `pending` ones plus the count
//!   asked for and not placed yet, of which unschedulable when a `blocked` evaluation names the
//!   group; the group's `Desired` is what the orchestrator wants (someone else's `nomad job
//!   scale` is seen); caught up when no deployment is active.
//! - Hosts are the nodes, ready when their status is `ready`, they are eligible and not
//!   draining.
//! - A per-host service is a `system` job: Nomad runs one allocation per eligible node, and
//!   microscaler counts it and never scales it.
//! - ACL token from `[backend] token_file`, else `$NOMAD_TOKEN` (sent as `X-Nomad-Token`, never
//!   logged); TLS with `[backend] ca_file`, else `$NOMAD_CACERT`; address from `[backend]
//!   address`, else `$NOMAD_ADDR`, else `http://127.0.0.1:4646`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use microscaler_core::plugin::{Capabilities, ServiceContext, StopCompletion};
use microscaler_core::validate::join;
use microscaler_core::{Host, HostId, ServiceName, ServiceObservation, Validator};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::{Reference, RunSpec, Workload};
use crate::http::{client, clip, encode, env, read_secret};
use crate::{
    resolved, Apply, Backend, BackendError, Change, Observation, Replica, ReplicaState,
    ScaleOutcome, Service,
};

/// Job meta key naming the owning microscaler instance of a managed job.
pub const META_INSTANCE: &str = "microscaler_instance";
/// Job meta key naming the service a managed job is.
pub const META_SERVICE: &str = "microscaler_service";

/// What the nomad backend can do: `system` jobs keep per-host services, no pause, allocations
/// stop after the scale returns, and services may reference existing jobs.
pub const CAPABILITIES: Capabilities = Capabilities {
    native_per_host: true,
    pause: false,
    host_resources: true,
    stops: StopCompletion::Converges,
    references: true,
};

// ---------------------------------------------------------------------------------------------
// Configuration: `[backend] type = "nomad"` and what a service gives it.

/// The task driver of managed jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Driver {
    /// `docker`: the service's `image`, with its `command` as command and args.
    #[default]
    Docker,
    /// `raw_exec`: the service's `command`, run as is on the node.
    RawExec,
    /// `exec`: the service's `command`, isolated by Nomad.
    Exec,
}

impl Driver {
    /// The driver's name, as Nomad writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Docker => "docker",
            Driver::RawExec => "raw_exec",
            Driver::Exec => "exec",
        }
    }
}

/// `[backend] type = "nomad"`: a Nomad cluster, through its HTTP API.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NomadConfig {
    /// The API's address; `None` means `$NOMAD_ADDR`, else `http://127.0.0.1:4646`.
    pub address: Option<String>,
    /// A file holding the ACL token; `None` means `$NOMAD_TOKEN`, else no token.
    pub token_file: Option<String>,
    /// A PEM file of the CA that signed the API's certificate; `None` means `$NOMAD_CACERT`,
    /// else the system's roots.
    pub ca_file: Option<String>,
    /// The namespace of managed jobs, and of references that name none; `None` means
    /// `$NOMAD_NAMESPACE`, else `default`.
    pub namespace: Option<String>,
    /// The region; `None` means `$NOMAD_REGION`, else the agent's own.
    pub region: Option<String>,
    /// Datacenters of managed jobs. Default `["*"]` (all).
    pub datacenters: Vec<String>,
    /// The task driver of managed jobs. Default `docker`.
    pub driver: Driver,
    /// Nomad counts CPU in MHz: how many make one CPU of a service's `resources` (and of a
    /// host's room). Default 1000.
    pub mhz_per_cpu: u64,
}

#[derive(Deserialize)]
struct RawNomad {
    address: Option<String>,
    token_file: Option<String>,
    ca_file: Option<String>,
    namespace: Option<String>,
    region: Option<String>,
    datacenters: Option<Vec<String>>,
    driver: Option<String>,
    mhz_per_cpu: Option<i64>,
}

/// Whether `s` is a Nomad name (a job, group, namespace or region): 1-128 characters, no
/// spaces, no slashes, no control characters.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '?' || c == '#')
}

impl NomadConfig {
    /// Validates the `[backend]` section (without `type`) at `path`. No file is read and no
    /// variable looked at here: that happens when the backend connects.
    pub fn validate(options: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawNomad = v.part(options, path)?;
        if let Some(a) = &r.address {
            if !(a.starts_with("http://") || a.starts_with("https://")) || a.len() < 9 {
                v.err(
                    join(path, "address"),
                    format!("{a:?} is not an http:// or https:// URL of a Nomad agent"),
                );
            }
        }
        for (key, value) in [("token_file", &r.token_file), ("ca_file", &r.ca_file)] {
            if value.as_deref().is_some_and(|s| s.trim().is_empty()) {
                v.err(join(path, key), "must not be empty");
            }
        }
        for (key, value) in [("namespace", &r.namespace), ("region", &r.region)] {
            if let Some(s) = value {
                if !is_name(s) {
                    v.err(join(path, key), format!("{s:?} is not a Nomad {key} name"));
                }
            }
        }
        let datacenters = r.datacenters.unwrap_or_else(|| vec!["*".into()]);
        if datacenters.is_empty() {
            v.err(
                join(path, "datacenters"),
                "must name at least one datacenter (\"*\" for all)",
            );
        }
        for dc in &datacenters {
            if !is_name(dc) {
                v.err(
                    join(path, "datacenters"),
                    format!("{dc:?} is not a datacenter name"),
                );
            }
        }
        let driver = match r.driver.as_deref() {
            None | Some("docker") => Driver::Docker,
            Some("raw_exec") => Driver::RawExec,
            Some("exec") => Driver::Exec,
            Some(other) => {
                v.err(
                    join(path, "driver"),
                    format!("must be docker, raw_exec or exec, got {other:?}"),
                );
                Driver::Docker
            }
        };
        let mhz_per_cpu = match r.mhz_per_cpu {
            None => 1000,
            Some(m @ 1..=1_000_000) => m as u64,
            Some(m) => {
                v.err(
                    join(path, "mhz_per_cpu"),
                    format!("must be between 1 and 1000000 (MHz of Nomad's CPU per CPU), got {m}"),
                );
                1000
            }
        };
        Some(NomadConfig {
            mhz_per_cpu,
            address: r.address.map(|a| a.trim_end_matches('/').to_string()),
            token_file: r.token_file,
            ca_file: r.ca_file,
            namespace: r.namespace,
            region: r.region,
            datacenters,
            driver,
        })
    }

    /// Validates a service's own keys for this backend: `image` (docker driver) or `command`
    /// (`raw_exec`, `exec`), and `env`; or a `[services.reference]` naming an existing job's
    /// task group.
    pub fn workload(
        &self,
        options: toml::Table,
        cx: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Workload> {
        let w = Workload::managed_or_reference(options, v, path, |table, v, path| {
            NomadReference::validate(table, v, path).map(Reference::Nomad)
        })?;
        if let Workload::Managed(run) = &w {
            self.managed_checks(run, cx, v, path);
        }
        Some(w)
    }

    fn managed_checks(
        &self,
        run: &RunSpec,
        cx: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) {
        if cx.per_host {
            v.err(
                join(path, "per_host"),
                "a per-host service on nomad is a system job that exists already: reference \
                 it with [services.reference] job = \"name\"",
            );
        }
        let driver = self.driver.as_str();
        if self.driver == Driver::Docker {
            if run.image.is_none() {
                v.err(
                    join(path, "image"),
                    "missing: the image the docker driver runs (there is no built-in one on a \
                     cluster), or reference an existing job with [services.reference]",
                );
            }
            return;
        }
        if run.image.is_some() {
            v.err(
                join(path, "image"),
                format!(
                    "the {driver} driver runs a command, not an image: give command, or set \
                     [backend] driver = \"docker\""
                ),
            );
        }
        if run.command.is_empty() {
            v.err(
                join(path, "command"),
                format!("missing: the program the {driver} driver runs, and its arguments"),
            );
        }
    }
}

/// `[services.reference]` on the nomad backend: an existing job's task group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NomadReference {
    /// The job's ID.
    pub job: String,
    /// The task group; `None` means the job's only group.
    pub group: Option<String>,
    /// The job's namespace; `None` means the backend's.
    pub namespace: Option<String>,
    /// The job's region; `None` means the backend's. Nomad forwards a request for another
    /// region to that region's servers.
    pub region: Option<String>,
}

impl std::fmt::Display for NomadReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nomad job {}", self.job)?;
        if let Some(g) = &self.group {
            write!(f, " group {g}")?;
        }
        if let Some(ns) = &self.namespace {
            write!(f, " in namespace {ns}")?;
        }
        if let Some(r) = &self.region {
            write!(f, " in region {r}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct RawReference {
    job: Option<String>,
    group: Option<String>,
    namespace: Option<String>,
    region: Option<String>,
}

impl NomadReference {
    /// Validates the reference table at `path`.
    pub fn validate(table: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawReference = v.part(table, path)?;
        let Some(job) = r.job else {
            v.err(
                join(path, "job"),
                "missing: the ID of an existing Nomad job",
            );
            return None;
        };
        for (key, value) in [
            ("job", Some(&job)),
            ("group", r.group.as_ref()),
            ("namespace", r.namespace.as_ref()),
            ("region", r.region.as_ref()),
        ] {
            if let Some(s) = value {
                if !is_name(s) {
                    v.err(join(path, key), format!("{s:?} is not a Nomad {key} name"));
                }
            }
        }
        Some(NomadReference {
            job,
            group: r.group,
            namespace: r.namespace,
            region: r.region,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The live backend.

/// How long one blocking query waits for a change before Nomad answers anyway.
const BLOCKING_WAIT: Duration = Duration::from_secs(60);
/// How long the first observation waits for every long poll's first answer.
const FIRST_ANSWER: Duration = Duration::from_secs(10);

/// What one long poll has seen last: nothing yet, a body (`Null` for a 404: the object is
/// gone), or the error of its last try.
type Seen = Option<Result<Value, Arc<BackendError>>>;

/// One blocking query kept running in the background; stopped when dropped.
struct Follow {
    rx: watch::Receiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a service is on Nomad, resolved at `prepare`.
#[derive(Debug, Clone)]
struct Target {
    job: String,
    group: String,
    namespace: String,
    /// The reference's region; `None` means the backend's.
    region: Option<String>,
    managed: bool,
    system: bool,
}

impl Target {
    fn at(&self) -> At<'_> {
        At {
            namespace: Some(&self.namespace),
            region: self.region.as_deref(),
        }
    }
}

/// Where a request goes: a namespace (`None`: none named, as for nodes) and a region (`None`:
/// the backend's).
#[derive(Debug, Clone, Copy, Default)]
struct At<'a> {
    namespace: Option<&'a str>,
    region: Option<&'a str>,
}

/// The HTTP side: address, credentials, and the error mapping every call shares.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    address: String,
    /// The ACL token: sent, never logged or printed.
    token: Option<String>,
    region: Option<String>,
}

impl Api {
    fn url(&self, path: &str, at: At<'_>, index: Option<u64>) -> String {
        let mut url = format!("{}{path}", self.address);
        let mut sep = if path.contains('?') { '&' } else { '?' };
        let mut push = |k: &str, v: &str| {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&encode(v));
            sep = '&';
        };
        if let Some(ns) = at.namespace {
            push("namespace", ns);
        }
        if let Some(r) = at.region.or(self.region.as_deref()) {
            push("region", r);
        }
        if let Some(i) = index {
            push("index", &i.to_string());
            push("wait", &format!("{}ms", BLOCKING_WAIT.as_millis()));
        }
        url
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.token {
            Some(t) => r.header("X-Nomad-Token", t),
            None => r,
        }
    }

    /// Sends `req`; a 2xx answer's body as JSON and its `X-Nomad-Index`, a 404 as `None`.
    async fn send(
        &self,
        op: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<(Value, u64)>, BackendError> {
        let resp = req.send().await.map_err(|e| self.unreachable(op, e))?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Nomad-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let body = resp.text().await.map_err(|e| self.unreachable(op, e))?;
        if status.is_success() {
            let v = if body.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&body).map_err(|e| BackendError::Api {
                    op: op.to_string(),
                    message: format!("the answer is not JSON ({e}): {}", clip(&body)),
                })?
            };
            return Ok(Some((v, index)));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Err(self.refused(op, status.as_u16(), body.trim()))
    }

    fn unreachable(&self, op: &str, e: reqwest::Error) -> BackendError {
        BackendError::Unreachable {
            what: format!("the Nomad API at {}", self.address),
            hint: format!(
                "{op}: {e}; is the agent up, and do [backend] address (or NOMAD_ADDR) and \
                 ca_file (or NOMAD_CACERT) point at it?"
            ),
            source: Some(Box::new(e)),
        }
    }

    fn refused(&self, op: &str, status: u16, message: &str) -> BackendError {
        let (op, message) = (op.to_string(), clip(message));
        match status {
            400 if message.contains("active deployment") => BackendError::Conflict { op, message },
            400 | 422 => BackendError::Invalid { op, message },
            401 | 403 => BackendError::Unsupported(format!(
                "{op}: refused by Nomad at {} ({status} {message}): give microscaler an ACL \
                 token (token_file or NOMAD_TOKEN) whose policy allows read-job, scale-job and \
                 list-jobs in the namespace (managed jobs: submit-job too) and node:read",
                self.address
            )),
            429 => BackendError::Throttled { op, message },
            _ => BackendError::Api {
                op,
                message: format!("{status} {message}"),
            },
        }
    }

    async fn get(&self, op: &str, url: &str) -> Result<Option<(Value, u64)>, BackendError> {
        self.send(op, self.request(reqwest::Method::GET, url)).await
    }
}

/// The Nomad backend.
pub struct NomadBackend {
    api: Api,
    instance: String,
    namespace: String,
    datacenters: Vec<String>,
    driver: Driver,
    targets: RwLock<HashMap<ServiceName, Target>>,
    /// Long polls by URL path (with its namespace): kept while the backend lives.
    follows: Mutex<HashMap<String, Arc<Follow>>>,
    /// MHz per CPU of `resources` (`[backend] mhz_per_cpu`).
    mhz_per_cpu: u64,
    /// Capacity is counted in CPU and memory ([`NomadBackend::count_resources`]).
    resources: bool,
}

/// Where the nodes are followed: with their resources when capacity is counted in them.
fn nodes_path(resources: bool) -> &'static str {
    if resources {
        "/v1/nodes?resources=true"
    } else {
        "/v1/nodes"
    }
}

/// Every allocation of every namespace, with what it was given.
const ALL_ALLOCATIONS: &str = "/v1/allocations?resources=true";

impl NomadBackend {
    /// Connects: reads the token and CA files, checks that the API answers
    /// (`GET /v1/status/leader`, which needs no token) and starts following the nodes.
    pub async fn connect(cfg: &NomadConfig, instance: &str) -> Result<Self, BackendError> {
        let address = cfg
            .address
            .clone()
            .or_else(|| env("NOMAD_ADDR"))
            .unwrap_or_else(|| "http://127.0.0.1:4646".into())
            .trim_end_matches('/')
            .to_string();
        let what = format!("the Nomad API at {address}");
        let token = match &cfg.token_file {
            Some(path) => Some(read_secret(&what, "ACL token file", path)?),
            None => env("NOMAD_TOKEN"),
        };
        let http = client(
            &what,
            cfg.ca_file
                .clone()
                .or_else(|| env("NOMAD_CACERT"))
                .as_deref(),
            BLOCKING_WAIT + BLOCKING_WAIT / 16 + Duration::from_secs(15),
        )?;
        let api = Api {
            http,
            address,
            token,
            region: cfg.region.clone().or_else(|| env("NOMAD_REGION")),
        };
        let leader = api
            .get(
                "GET /v1/status/leader",
                &api.url("/v1/status/leader", At::default(), None),
            )
            .await?;
        tracing::info!(
            address = %api.address,
            leader = %leader.map(|(v, _)| v.to_string()).unwrap_or_default(),
            token = api.token.is_some(),
            "connected to Nomad"
        );
        let backend = NomadBackend {
            api,
            instance: instance.to_string(),
            namespace: cfg
                .namespace
                .clone()
                .or_else(|| env("NOMAD_NAMESPACE"))
                .unwrap_or_else(|| "default".into()),
            datacenters: cfg.datacenters.clone(),
            driver: cfg.driver,
            targets: RwLock::new(HashMap::new()),
            follows: Mutex::new(HashMap::new()),
            mhz_per_cpu: cfg.mhz_per_cpu,
            resources: false,
        };
        backend.follow(nodes_path(false), At::default());
        Ok(backend)
    }

    /// Capacity is counted in CPU and memory (`[capacity] resources = true`): the nodes are
    /// followed with their resources, and every allocation of every namespace, so that a
    /// host's room is its node's CPU and memory less what Nomad reserves and what the
    /// allocations that are not the services' were given. Managed tasks ask for their
    /// service's resources.
    pub fn count_resources(&mut self) {
        self.resources = true;
        // The nodes without their resources are followed no more.
        self.follows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&format!("{}@@", nodes_path(false)));
        self.follow(nodes_path(true), At::default());
        self.follow(
            ALL_ALLOCATIONS,
            At {
                namespace: Some("*"),
                region: None,
            },
        );
    }

    /// `resources` as a Nomad task's `Resources` (CPU in MHz, memory in whole MB, rounded up).
    fn task_resources(&self, r: microscaler_core::Resources) -> Value {
        let cpu = (r.cpu_milli * self.mhz_per_cpu).div_ceil(1000).max(1);
        json!({"CPU": cpu, "MemoryMB": r.memory.div_ceil(1 << 20).max(1)})
    }

    /// With capacity in resources, the plan places each allocation by its service's
    /// `resources`: the group's tasks must ask for as much (CPU in MHz, memory in MB). A
    /// referenced job that asks for something else is refused; a managed one made by an
    /// earlier configuration is said to be out of date (microscaler never re-registers it, which
    /// would reset its count).
    fn check_resources(
        &self,
        service: &Service,
        spec: &Value,
        job: &str,
        group: &str,
        managed: bool,
        want: microscaler_core::Resources,
    ) -> Result<(), BackendError> {
        let want = self.task_resources(want);
        let tasks = spec["TaskGroups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| g["Name"].as_str() == Some(group))
            .flat_map(|g| g["Tasks"].as_array().into_iter().flatten());
        let (mut cpu, mut mem) = (0, 0);
        for t in tasks {
            let r = &t["Resources"];
            cpu += r["CPU"].as_u64().unwrap_or(100);
            mem += r["MemoryMB"].as_u64().unwrap_or(300);
        }
        if (Some(cpu), Some(mem)) == (want["CPU"].as_u64(), want["MemoryMB"].as_u64()) {
            return Ok(());
        }
        let message = format!(
            "service {}: the tasks of group {group} of Nomad job {job} ask for {cpu} MHz and \
             {mem} MB, but its resources are {} MHz and {} MB ([backend] mhz_per_cpu = {})",
            service.name, want["CPU"], want["MemoryMB"], self.mhz_per_cpu
        );
        if managed {
            tracing::warn!("{message}: the job was registered by an earlier configuration; stop and purge it (nomad job stop -purge {job}) to register it again");
            return Ok(());
        }
        Err(BackendError::Invalid {
            op: format!("reference Nomad job {job}"),
            message: format!("{message}: with [capacity] resources = true they must agree"),
        })
    }

    /// Takes off each host's room what Nomad reserves on its node and what the live
    /// allocations that are not the services' (`ours`: (namespace, job, group)) were given.
    fn take_others(
        &self,
        nodes: &Value,
        allocs: &Value,
        hosts: &mut [Host],
        ours: &[(String, String, String)],
    ) {
        let mut used: HashMap<&str, (u64, u64)> = HashMap::new();
        for a in allocs.as_array().into_iter().flatten() {
            let live = a["DesiredStatus"].as_str() == Some("run")
                && matches!(a["ClientStatus"].as_str(), Some("pending" | "running"));
            let mine = ours.iter().any(|(ns, job, group)| {
                a["Namespace"].as_str() == Some(ns)
                    && a["JobID"].as_str() == Some(job)
                    && a["TaskGroup"].as_str() == Some(group)
            });
            if !live || mine {
                continue;
            }
            let e = used.entry(a["NodeID"].as_str().unwrap_or("")).or_default();
            for t in a["AllocatedResources"]["Tasks"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|t| t.1)
            {
                e.0 += t["Cpu"]["CpuShares"].as_u64().unwrap_or(0);
                e.1 += t["Memory"]["MemoryMB"].as_u64().unwrap_or(0);
            }
        }
        for (h, n) in hosts.iter_mut().zip(nodes.as_array().into_iter().flatten()) {
            let total = |k: &str, v: &str| n["NodeResources"][k][v].as_u64();
            let reserved = |k: &str, v: &str| n["ReservedResources"][k][v].as_u64().unwrap_or(0);
            let (cpu, mem) = used.get(h.id.0.as_str()).copied().unwrap_or_default();
            h.cpus = total("Cpu", "CpuShares").map(|t| {
                t.saturating_sub(reserved("Cpu", "CpuShares") + cpu) as f64
                    / self.mhz_per_cpu as f64
            });
            h.memory_bytes = total("Memory", "MemoryMB")
                .map(|t| t.saturating_sub(reserved("Memory", "MemoryMB") + mem) << 20);
        }
    }

    /// The job ID of managed `service`.
    pub fn job_id(instance: &str, service: &str) -> String {
        format!("{instance}-{service}")
    }

    /// Starts (once) a long poll of `path` at `at`, and returns it.
    fn follow(&self, path: &str, at: At<'_>) -> Arc<Follow> {
        let key = format!(
            "{path}@{}@{}",
            at.namespace.unwrap_or(""),
            at.region.unwrap_or("")
        );
        let mut follows = self.follows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = follows.get(&key) {
            return Arc::clone(f);
        }
        let (tx, rx) = watch::channel(None);
        let api = self.api.clone();
        let (path, namespace, region) = (
            path.to_string(),
            at.namespace.map(str::to_string),
            at.region.map(str::to_string),
        );
        let task = tokio::spawn(async move {
            let op = format!("GET {path}");
            let mut index = 0;
            let mut wait = Duration::from_millis(250);
            loop {
                let at = At {
                    namespace: namespace.as_deref(),
                    region: region.as_deref(),
                };
                let url = api.url(&path, at, (index > 0).then_some(index));
                match api.get(&op, &url).await {
                    Ok(got) => {
                        wait = Duration::from_millis(250);
                        let (value, at) = got.unwrap_or((Value::Null, 0));
                        // An index that goes backwards (a restored cluster) starts over.
                        index = if at < index { 0 } else { at };
                        tx.send_replace(Some(Ok(value)));
                        if at == 0 {
                            // No index to block on (a 404): look again a little later.
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(path = %path, error = %e, "Nomad long poll failed; retrying");
                        tx.send_replace(Some(Err(Arc::new(e))));
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                        index = 0;
                    }
                }
            }
        });
        let f = Arc::new(Follow { rx, task });
        follows.insert(key, Arc::clone(&f));
        f
    }

    /// The latest answer of a long poll, waiting for its first one.
    async fn latest(&self, path: &str, at: At<'_>) -> Result<Value, BackendError> {
        let f = self.follow(path, at);
        let mut rx = f.rx.clone();
        let got = tokio::time::timeout(FIRST_ANSWER, rx.wait_for(|s| s.is_some())).await;
        let seen = match got {
            Ok(Ok(seen)) => seen.clone(),
            _ => {
                return Err(BackendError::Unreachable {
                    what: format!("the Nomad API at {}", self.api.address),
                    hint: format!("GET {path}: no answer within {FIRST_ANSWER:?}"),
                    source: None,
                })
            }
        };
        match seen {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(copy_error(&e)),
            None => unreachable!("waited for an answer"),
        }
    }

    fn target(&self, service: &Service) -> Option<Target> {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&service.name)
            .cloned()
    }

    /// `prepare`, or with [`Apply::No`] its checks and long polls only.
    async fn prepare_as(&self, services: &[Service], apply: Apply) -> Result<(), BackendError> {
        for s in services {
            let Some(t) = self.resolve(s, apply).await? else {
                continue;
            };
            for path in Self::paths(&t) {
                self.follow(&path, t.at());
            }
            tracing::info!(service = %s.name, job = %t.job, group = %t.group, namespace = %t.namespace,
                managed = t.managed, system = t.system, "following the Nomad job");
            self.targets
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(s.name.clone(), t);
        }
        Ok(())
    }

    /// Resolves what `service` is on Nomad: its job exists (a managed one is registered when
    /// it does not), the group is there, and the job's type fits the service.
    /// With [`Apply::No`], a managed object that does not exist yet is not created: `None`.
    async fn resolve(
        &self,
        service: &Service,
        apply: Apply,
    ) -> Result<Option<Target>, BackendError> {
        let (job, group, namespace, region, managed) = match service.workload.reference() {
            Some(Reference::Nomad(r)) => (
                r.job.clone(),
                r.group.clone(),
                r.namespace
                    .clone()
                    .unwrap_or_else(|| self.namespace.clone()),
                r.region.clone(),
                false,
            ),
            Some(other) => {
                return Err(BackendError::Unsupported(format!(
                    "service {}: the nomad backend cannot reference a {other}",
                    service.name
                )))
            }
            None => (
                Self::job_id(&self.instance, service.name.as_str()),
                Some(service.name.to_string()),
                self.namespace.clone(),
                None,
                true,
            ),
        };
        let at = At {
            namespace: Some(&namespace),
            region: region.as_deref(),
        };
        let op = format!("GET job {job}");
        let url = self.api.url(&format!("/v1/job/{}", encode(&job)), at, None);
        let found = self.api.get(&op, &url).await?;
        let spec = match (found, managed) {
            (Some((spec, _)), true) => {
                let meta = &spec["Meta"];
                if meta[META_INSTANCE].as_str() != Some(self.instance.as_str())
                    || meta[META_SERVICE].as_str() != Some(service.name.as_str())
                {
                    return Err(BackendError::Unsupported(format!(
                        "service {}: the Nomad job {job} in namespace {namespace} exists and is \
                         not this microscaler's (its meta lacks {META_INSTANCE} = {:?} and \
                         {META_SERVICE} = {:?}); rename the service or the instance, or \
                         reference the job with [services.reference]",
                        service.name, self.instance, service.name
                    )));
                }
                spec
            }
            (Some((spec, _)), false) => spec,
            (None, true) if apply == Apply::No => {
                tracing::info!(service = %service.name, job = %job, namespace = %namespace, "dry run: would register the Nomad job (count 0)");
                return Ok(None);
            }
            (None, true) => {
                self.register(service, &job, &namespace).await?;
                return Ok(Some(Target {
                    job,
                    group: service.name.to_string(),
                    namespace,
                    region: None,
                    managed: true,
                    system: false,
                }));
            }
            (None, false) => {
                return Err(BackendError::NotFound {
                    what: format!(
                        "Nomad job {job} in namespace {namespace}{}",
                        region
                            .as_deref()
                            .map(|r| format!(" of region {r}"))
                            .unwrap_or_default()
                    ),
                    hint: format!(
                        "service {} references it; check [services.reference] job, namespace \
                         and region",
                        service.name
                    ),
                })
            }
        };
        let groups: Vec<&str> = spec["TaskGroups"]
            .as_array()
            .map(|g| g.iter().filter_map(|g| g["Name"].as_str()).collect())
            .unwrap_or_default();
        let group = match group {
            Some(g) if groups.contains(&g.as_str()) => g,
            Some(g) => {
                return Err(BackendError::NotFound {
                    what: format!("task group {g} of Nomad job {job}"),
                    hint: format!("the job's groups are {}", groups.join(", ")),
                })
            }
            None if groups.len() == 1 => groups[0].to_string(),
            None => {
                return Err(BackendError::Invalid {
                    op: format!("reference Nomad job {job}"),
                    message: format!(
                        "the job has {} task groups ({}): name one with [services.reference] group",
                        groups.len(),
                        groups.join(", ")
                    ),
                })
            }
        };
        if let (true, Some(r)) = (self.resources, service.resources) {
            self.check_resources(service, &spec, &job, &group, managed, r)?;
        }
        let system = spec["Type"].as_str() == Some("system");
        let per_host = matches!(service.kind, microscaler_core::ServiceKind::PerHost);
        if system != per_host {
            return Err(BackendError::Unsupported(if system {
                format!(
                    "service {}: Nomad job {job} is a system job (one allocation per node): \
                     mark the service per_host = true",
                    service.name
                )
            } else {
                format!(
                    "service {}: a per-host service references a system job, and Nomad job \
                     {job} is a {} job",
                    service.name,
                    spec["Type"].as_str().unwrap_or("service")
                )
            }));
        }
        Ok(Some(Target {
            job,
            group,
            namespace,
            region,
            managed,
            system,
        }))
    }

    /// Registers managed `service`'s job, with count 0 and deployments off.
    async fn register(
        &self,
        service: &Service,
        job: &str,
        namespace: &str,
    ) -> Result<(), BackendError> {
        let run = crate::managed(service);
        let mut config = serde_json::Map::new();
        let (program, args) = match run.command.split_first() {
            Some((p, rest)) => (Some(p.clone()), rest.to_vec()),
            None => (None, Vec::new()),
        };
        if let Some(image) = &run.image {
            config.insert("image".into(), json!(image));
        }
        if let Some(p) = program {
            config.insert("command".into(), json!(p));
        }
        if !args.is_empty() {
            config.insert("args".into(), json!(args));
        }
        let name = service.name.as_str();
        let spec = json!({"Job": {
            "ID": job,
            "Name": job,
            "Namespace": namespace,
            "Type": "service",
            "Datacenters": self.datacenters,
            "Meta": {META_INSTANCE: self.instance, META_SERVICE: name},
            "TaskGroups": [{
                "Name": name,
                "Count": 0,
                "Update": {"MaxParallel": 0},
                "Tasks": [{
                    "Name": name,
                    "Driver": self.driver.as_str(),
                    "Config": config,
                    "Env": run.env,
                    "KillTimeout": service.stop_grace.as_nanos() as u64,
                    "Resources": service.resources.map(|r| self.task_resources(r)),
                }],
            }],
        }});
        let op = format!("register Nomad job {job}");
        let at = At {
            namespace: Some(namespace),
            region: None,
        };
        let url = self.api.url("/v1/jobs", at, None);
        self.api
            .send(
                &op,
                self.api.request(reqwest::Method::POST, &url).json(&spec),
            )
            .await?
            .ok_or_else(|| BackendError::Api {
                op,
                message: "404 from POST /v1/jobs".into(),
            })?;
        tracing::info!(service = %name, job, namespace, "registered the Nomad job (count 0)");
        Ok(())
    }

    fn paths(t: &Target) -> [String; 4] {
        let job = encode(&t.job);
        [
            format!("/v1/job/{job}/allocations"),
            format!("/v1/job/{job}/scale"),
            format!("/v1/job/{job}/evaluations"),
            format!("/v1/job/{job}/deployment"),
        ]
    }

    /// Waits until at most `target` allocations of the group hold a node (client status
    /// `pending` or `running`, whatever is desired of them), or `limit` passes.
    async fn wait_stopped(&self, t: &Target, target: u32, limit: Duration) {
        let [allocs, ..] = Self::paths(t);
        let mut rx = self.follow(&allocs, t.at()).rx.clone();
        let stopped = rx.wait_for(|seen| match seen {
            Some(Ok(v)) => holding(v, &t.group) <= target,
            _ => false,
        });
        if tokio::time::timeout(limit, stopped).await.is_err() {
            tracing::warn!(job = %t.job, group = %t.group, target, "allocations still stopping after {limit:?}; going on");
        }
    }

    async fn observe_service(
        &self,
        name: &ServiceName,
        t: &Target,
        out: &mut Observation,
    ) -> Result<(), BackendError> {
        let [allocs, scale, evals, deployment] = Self::paths(t);
        let at = t.at();
        let (allocs, scale, evals, deployment) = futures::try_join!(
            self.latest(&allocs, at),
            self.latest(&scale, at),
            self.latest(&evals, at),
            self.latest(&deployment, at),
        )?;
        if scale.is_null() {
            // The job is gone (purged by our shutdown, or by someone): nothing runs.
            return Ok(());
        }
        let group = &scale["TaskGroups"][&t.group];
        let desired = group["Desired"].as_u64().unwrap_or(0) as u32;
        let mut o = ServiceObservation {
            orchestrator_wants: (!t.system).then_some(desired),
            ..ServiceObservation::default()
        };
        let mut live = 0;
        for a in allocs.as_array().into_iter().flatten() {
            if a["TaskGroup"].as_str() != Some(t.group.as_str()) {
                continue;
            }
            let desired_run = a["DesiredStatus"].as_str() == Some("run");
            let state = match (a["ClientStatus"].as_str().unwrap_or(""), desired_run) {
                ("running", true) => {
                    o.running += 1;
                    ReplicaState::Running
                }
                ("pending", true) => {
                    o.pending += 1;
                    ReplicaState::Pending
                }
                ("running" | "pending", false) => ReplicaState::Stopping,
                ("failed", true) => {
                    if a["NextAllocation"].as_str().unwrap_or("").is_empty() {
                        o.failed += 1;
                    }
                    continue;
                }
                _ => continue,
            };
            if state != ReplicaState::Stopping {
                live += 1;
            }
            out.replicas.push(Replica {
                id: a["ID"].as_str().unwrap_or("").to_string(),
                service: name.clone(),
                host: HostId(a["NodeID"].as_str().unwrap_or("").to_string()),
                state,
            });
        }
        if !t.system {
            let unplaced = desired.saturating_sub(live);
            o.pending += unplaced;
            let blocked = evals.as_array().into_iter().flatten().any(|e| {
                e["Status"].as_str() == Some("blocked")
                    && (e["FailedTGAllocs"].get(&t.group).is_some()
                        || e["QueuedAllocations"].get(&t.group).is_some())
            });
            if blocked {
                o.unschedulable = unplaced;
            }
        }
        o.caught_up = !active_deployment(&deployment, &t.group);
        out.services.insert(name.clone(), o);
        Ok(())
    }
}

/// Allocations of `group` in `allocs` that hold a node: client status `pending` or `running`.
fn holding(allocs: &Value, group: &str) -> u32 {
    allocs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| {
            a["TaskGroup"].as_str() == Some(group)
                && matches!(a["ClientStatus"].as_str(), Some("pending" | "running"))
        })
        .count() as u32
}

/// Whether `deployment` (a job's latest, or `null`) is still going and covers `group`.
fn active_deployment(deployment: &Value, group: &str) -> bool {
    let status = deployment["Status"].as_str().unwrap_or("");
    matches!(
        status,
        "running" | "paused" | "pending" | "initializing" | "blocked" | "unblocking"
    ) && (deployment["TaskGroups"].get(group).is_some() || deployment["TaskGroups"].is_null())
}

/// A copy of a long poll's error (each observation returns its own).
fn copy_error(e: &BackendError) -> BackendError {
    match e {
        BackendError::Unreachable { what, hint, .. } => BackendError::Unreachable {
            what: what.clone(),
            hint: hint.clone(),
            source: None,
        },
        BackendError::NotFound { what, hint } => BackendError::NotFound {
            what: what.clone(),
            hint: hint.clone(),
        },
        BackendError::Conflict { op, message } => BackendError::Conflict {
            op: op.clone(),
            message: message.clone(),
        },
        BackendError::Throttled { op, message } => BackendError::Throttled {
            op: op.clone(),
            message: message.clone(),
        },
        BackendError::Invalid { op, message } => BackendError::Invalid {
            op: op.clone(),
            message: message.clone(),
        },
        BackendError::Api { op, message } => BackendError::Api {
            op: op.clone(),
            message: message.clone(),
        },
        BackendError::Unsupported(m) => BackendError::Unsupported(m.clone()),
    }
}

impl Backend for NomadBackend {
    fn kind(&self) -> &'static str {
        "nomad"
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
        let nodes = self
            .latest(nodes_path(self.resources), At::default())
            .await?;
        let mut out = Observation::default();
        for n in nodes.as_array().into_iter().flatten() {
            out.hosts.push(Host {
                id: HostId(n["ID"].as_str().unwrap_or("").to_string()),
                name: n["Name"].as_str().unwrap_or("").to_string(),
                ready: n["Status"].as_str() == Some("ready")
                    && n["SchedulingEligibility"].as_str() == Some("eligible")
                    && !n["Drain"].as_bool().unwrap_or(false),
                cpus: None,
                memory_bytes: None,
            });
        }
        let targets: Vec<(ServiceName, Target)> = self
            .targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, t) in &targets {
            self.observe_service(name, t, &mut out).await?;
        }
        if self.resources {
            let all = At {
                namespace: Some("*"),
                region: None,
            };
            let allocs = self.latest(ALL_ALLOCATIONS, all).await?;
            let ours: Vec<_> = targets
                .iter()
                .map(|(_, t)| (t.namespace.clone(), t.job.clone(), t.group.clone()))
                .collect();
            self.take_others(&nodes, &allocs, &mut out.hosts, &ours);
        }
        Ok(out)
    }

    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        self.scale_with(service, target, &Change::default()).await
    }

    async fn scale_with(
        &self,
        service: &Service,
        target: u32,
        change: &Change<'_>,
    ) -> Result<ScaleOutcome, BackendError> {
        let reason = change.reason.as_str();
        let t = match self.target(service) {
            Some(t) => t,
            None => resolved(self.resolve(service, Apply::Yes).await?)?,
        };
        if t.system {
            tracing::debug!(service = %service.name, "a system job keeps one allocation per node; nothing to scale");
            return Ok(ScaleOutcome::default());
        }
        let what = format!("Nomad job {} group {}", t.job, t.group);
        let [_, scale_path, _, deployment_path] = Self::paths(&t);
        let at = t.at();
        let op = format!("scale {what}");
        let (status_url, deployment_url) = (
            self.api.url(&scale_path, at, None),
            self.api.url(&deployment_path, at, None),
        );
        let (status, deployment) = futures::try_join!(
            self.api.get(&op, &status_url),
            self.api.get(&op, &deployment_url),
        )?;
        let Some((status, _)) = status else {
            return Err(BackendError::NotFound {
                what: format!("Nomad job {} in namespace {}", t.job, t.namespace),
                hint: format!(
                    "service {} is that job; was it stopped or purged?",
                    service.name
                ),
            });
        };
        let from = status["TaskGroups"][&t.group]["Desired"]
            .as_u64()
            .unwrap_or(0) as u32;
        if from == target {
            return Ok(ScaleOutcome::default());
        }
        if let Some((d, _)) = &deployment {
            if active_deployment(d, &t.group) {
                return Err(BackendError::Conflict {
                    op,
                    message: format!(
                        "deployment {} of the job is {}; Nomad scales a group only when its \
                         deployment has finished, so microscaler waits for it",
                        d["ID"].as_str().unwrap_or("?"),
                        d["Status"].as_str().unwrap_or("?")
                    ),
                });
            }
        }
        let body = json!({
            "Count": target,
            "Target": {"Group": t.group},
            "Message": if reason.is_empty() {
                format!("microscaler {}: {} {from} -> {target}", self.instance, service.name)
            } else {
                format!("microscaler {}: {} {from} -> {target}: {}", self.instance, service.name, clip(reason))
            },
            "Error": false,
            "Meta": {META_INSTANCE: self.instance},
        });
        let url = self.api.url(&scale_path, at, None);
        let answered = self
            .api
            .send(
                &op,
                self.api.request(reqwest::Method::POST, &url).json(&body),
            )
            .await?;
        if answered.is_none() {
            return Err(BackendError::NotFound {
                what: format!("Nomad job {} in namespace {}", t.job, t.namespace),
                hint: format!("service {} is that job; was it purged?", service.name),
            });
        }
        tracing::debug!(service = %service.name, job = %t.job, group = %t.group, from, target, "scaled the Nomad group");
        if target < from {
            // A scale-down returns when its allocations have stopped (or after the grace), so
            // the capacity they held is free before the loop's scale-ups ask for it.
            self.wait_stopped(&t, target, service.stop_grace + Duration::from_secs(5))
                .await;
        }
        Ok(if target > from {
            ScaleOutcome {
                started: target - from,
                ..ScaleOutcome::default()
            }
        } else {
            ScaleOutcome {
                stopped: from - target,
                ..ScaleOutcome::default()
            }
        })
    }

    async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
        if !remove {
            return Ok(());
        }
        // A referenced job is never removed.
        crate::remove_each(services, |s| {
            let t = self.target(s).filter(|t| t.managed)?;
            Some(async move {
                let op = format!("purge Nomad job {}", t.job);
                let url = self.api.url(
                    &format!("/v1/job/{}?purge=true", encode(&t.job)),
                    t.at(),
                    None,
                );
                let done = self
                    .api
                    .send(&op, self.api.request(reqwest::Method::DELETE, &url))
                    .await
                    .map(|_| ());
                (format!("the Nomad job {}", t.job), done)
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
            "type = \"nomad\"\naddress = \"nomad:4646\"\ndriver = \"java\"\ndatacenters = []\ncolour = 1",
            "image = \"nginx\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "backend.colour: unknown key",
                "backend.address: \"nomad:4646\" is not an http:// or https:// URL of a Nomad agent",
                "backend.datacenters: must name at least one datacenter (\"*\" for all)",
                "backend.driver: must be docker, raw_exec or exec, got \"java\"",
            ]
        );
        let e = config("type = \"nomad\"", "[services.reference]\ngroup = \"a b\"").unwrap_err();
        assert_eq!(
            e,
            vec!["services[0].reference.job: missing: the ID of an existing Nomad job"]
        );
        let c = config(
            "type = \"nomad\"",
            "[services.reference]\njob = \"shop\"\ngroup = \"web\"",
        )
        .unwrap();
        let Workload::Reference(Reference::Nomad(r)) = &c.services[0].workload else {
            panic!("a reference: {:?}", c.services[0].workload)
        };
        assert_eq!((r.job.as_str(), r.group.as_deref()), ("shop", Some("web")));
        assert_eq!(r.to_string(), "Nomad job shop group web");
        let c = config(
            "type = \"nomad\"",
            "[services.reference]\njob = \"shop\"\nnamespace = \"prod\"\nregion = \"eu\"",
        )
        .unwrap();
        let Workload::Reference(Reference::Nomad(r)) = &c.services[0].workload else {
            panic!("a reference: {:?}", c.services[0].workload)
        };
        assert_eq!(r.region.as_deref(), Some("eu"));
        assert_eq!(
            r.to_string(),
            "Nomad job shop in namespace prod in region eu"
        );
        let e = config(
            "type = \"nomad\"",
            "[services.reference]\njob = \"shop\"\nregion = \"eu west\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec!["services[0].reference.region: \"eu west\" is not a Nomad region name"]
        );
    }

    #[test]
    fn managed_services_need_what_their_driver_runs() {
        let e = config("type = \"nomad\"", "").unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("services[0].image: missing"), "{e:?}");
        let e = config("type = \"nomad\"\ndriver = \"raw_exec\"", "image = \"x\"").unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("services[0].image: the raw_exec driver runs a command"));
        assert!(e[1].starts_with("services[0].command: missing"));
        let c = config(
            "type = \"nomad\"\naddress = \"https://nomad.example:4646/\"",
            "image = \"busybox\"\ncommand = [\"sleep\", \"1d\"]",
        )
        .unwrap();
        let crate::BackendConfig::Nomad(n) = &c.backend else {
            panic!("nomad")
        };
        assert_eq!(n.address.as_deref(), Some("https://nomad.example:4646"));
        assert_eq!(n.datacenters, vec!["*"]);
    }

    #[test]
    fn active_deployments_hold_their_groups() {
        assert!(active_deployment(
            &json!({"Status": "running", "TaskGroups": {"web": {}}}),
            "web"
        ));
        assert!(!active_deployment(
            &json!({"Status": "running", "TaskGroups": {"api": {}}}),
            "web"
        ));
        assert!(!active_deployment(
            &json!({"Status": "successful", "TaskGroups": {"web": {}}}),
            "web"
        ));
        assert!(!active_deployment(&Value::Null, "web"));
    }

    #[test]
    fn urls_carry_namespace_region_and_blocking_index() {
        let api = Api {
            http: reqwest::Client::new(),
            address: "http://n:4646".into(),
            token: None,
            region: Some("eu west".into()),
        };
        let prod = At {
            namespace: Some("prod"),
            region: None,
        };
        assert_eq!(
            api.url("/v1/job/a%2Fb/scale", prod, Some(7)),
            "http://n:4646/v1/job/a%2Fb/scale?namespace=prod&region=eu%20west&index=7&wait=60000ms"
        );
        assert_eq!(
            api.url("/v1/job/x?purge=true", At::default(), None),
            "http://n:4646/v1/job/x?purge=true&region=eu%20west"
        );
        // A reference's region wins over the backend's.
        let us = At {
            namespace: Some("prod"),
            region: Some("us"),
        };
        assert_eq!(
            api.url("/v1/job/x", us, None),
            "http://n:4646/v1/job/x?namespace=prod&region=us"
        );
    }
}
