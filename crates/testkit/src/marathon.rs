//! A fake of Mesosphere Marathon's REST API (1.x; the facts followed are those in
//! `shared/notes/nomad-marathon.md`, else Marathon 1.x's REST API documentation), served by
//! axum on 127.0.0.1 for the Marathon backend's tests. No Marathon can run on these machines: it
//! needs a Mesos master and agents, which are neither packaged nor downloadable here.
//!
//! **Modelled**: apps (create, read, partial update with `PUT`/`PATCH`, delete), ids normalised
//! as Marathon does (`a/b/` is `/a/b`); tasks launched on agents that each have room for a
//! number of tasks (*slots*), staged (`tasksStaged`) and then running after
//! [`MarathonOptions::start_delay`], killed newest first (staged before running); tasks that do
//! not fit wait (Marathon's launch queue: nothing is staged for them); the constraint
//! `["hostname", "UNIQUE"]` (one task of the app per agent); a deployment for every change,
//! which locks the app (409 with Marathon's body, `?force=true` replaces it) until the app runs
//! its `instances` and [`MarathonOptions::deployment_tail`] has passed; `GET`/`DELETE
//! /v2/deployments`; lost agents (their tasks vanish and are replaced where there is room); HTTP
//! basic auth (401 with `WWW-Authenticate`, body not JSON) or a DC/OS token (401/403 JSON);
//! `GET /v2/info`, `/v2/tasks`, `/ping`; errors as `{"message": ...}` with Marathon's codes.
//!
//! **Not modelled**: matching of cpus, mem, ports or disk (slots instead); constraints other
//! than `hostname UNIQUE`; health checks running (every running task counts as healthy when the
//! app has health checks); readiness checks; the launch queue endpoint (`/v2/queue`), groups
//! (`/v2/groups`), pods, the event stream (`/v2/events`), leader election and most fields of
//! Marathon's objects. A rollback of `DELETE /v2/deployments/{id}` is a new deployment of the
//! app as it is (its instances are not restored).

// A refusal is a whole HTTP response, passed back as an error where it is made.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Options of the fake.
#[derive(Debug, Clone)]
pub struct MarathonOptions {
    /// Time from a task launched (`TASK_STAGING`) to `TASK_RUNNING`. Default 50 ms.
    pub start_delay: Duration,
    /// Period of the launch/kill pass (Marathon's offer matching). Default 10 ms.
    pub pass_interval: Duration,
    /// Time a deployment stays after its app reached its target. Default 100 ms.
    pub deployment_tail: Duration,
    /// HTTP basic credentials (user, password) every `/v2` request needs, when set.
    pub basic_auth: Option<(String, String)>,
    /// A DC/OS token every `/v2` request needs (`Authorization: token=...`), when set.
    pub dcos_token: Option<String>,
}

impl Default for MarathonOptions {
    fn default() -> Self {
        MarathonOptions {
            start_delay: Duration::from_millis(50),
            pass_interval: Duration::from_millis(10),
            deployment_tail: Duration::from_millis(100),
            basic_auth: None,
            dcos_token: None,
        }
    }
}

struct Task {
    id: String,
    host: String,
    staged: Instant,
    staged_at: String,
    running: bool,
}

struct App {
    /// The app's own fields, as given (normalised id, defaults filled in).
    spec: Value,
    version: String,
    tasks: Vec<Task>,
}

impl App {
    fn instances(&self) -> usize {
        self.spec["instances"].as_u64().unwrap_or(0) as usize
    }

    fn unique(&self) -> bool {
        self.spec["constraints"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get(0).and_then(Value::as_str) == Some("hostname")
                    && c.get(1).and_then(Value::as_str) == Some("UNIQUE")
            })
        })
    }
}

struct Deployment {
    id: String,
    app: String,
    version: String,
    /// A hand-made lock ends at this instant; `None` for a change's deployment.
    until: Option<Instant>,
    /// When the app first ran its target.
    reached: Option<Instant>,
}

#[derive(Default)]
struct Fake {
    /// Agents by hostname: their slots.
    agents: BTreeMap<String, u32>,
    apps: BTreeMap<String, App>,
    deployments: Vec<Deployment>,
    updates: Vec<(String, bool, u16, Value)>,
    next: u64,
}

impl Fake {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!(
            "{prefix}-{:08x}-{:04x}",
            self.next * 2_654_435_761 % 0xffff_ffff,
            self.next
        )
    }

    /// A deployment of `app` for a change made now (replacing none: callers check the lock).
    fn deploy(&mut self, app: &str) -> String {
        let id = self.id("deployment");
        self.deployments.push(Deployment {
            id: id.clone(),
            app: app.to_string(),
            version: now_iso(),
            until: None,
            reached: None,
        });
        id
    }

    fn locks(&self, app: &str) -> Vec<&Deployment> {
        self.deployments.iter().filter(|d| d.app == app).collect()
    }

    fn view(&self, app: &App, with_tasks: bool) -> Value {
        let id = app.spec["id"].as_str().unwrap_or("");
        let staged = app.tasks.iter().filter(|t| !t.running).count();
        let running = app.tasks.len() - staged;
        let checked = app.spec["healthChecks"]
            .as_array()
            .is_some_and(|h| !h.is_empty());
        let mut v = app.spec.clone();
        v["version"] = json!(app.version);
        v["tasksStaged"] = json!(staged);
        v["tasksRunning"] = json!(running);
        v["tasksHealthy"] = json!(if checked { running } else { 0 });
        v["tasksUnhealthy"] = json!(0);
        v["deployments"] = self.locks(id).iter().map(|d| json!({"id": d.id})).collect();
        if with_tasks {
            v["tasks"] = app.tasks.iter().map(|t| task_view(id, t)).collect();
        }
        v
    }

    /// One pass: stage what fits, run what has staged long enough, kill the surplus, end
    /// deployments.
    fn pass(&mut self, opts: &MarathonOptions, now: Instant) {
        let mut used: BTreeMap<String, u32> = BTreeMap::new();
        for app in self.apps.values() {
            for t in &app.tasks {
                *used.entry(t.host.clone()).or_default() += 1;
            }
        }
        let ids: Vec<String> = self.apps.keys().cloned().collect();
        for id in ids {
            let next_ids: Vec<String> = (0..4).map(|_| self.id("task")).collect();
            let app = self.apps.get_mut(&id).expect("listed");
            for t in &mut app.tasks {
                if !t.running && now.duration_since(t.staged) >= opts.start_delay {
                    t.running = true;
                }
            }
            while app.tasks.len() > app.instances() {
                // Newest first, staged before running.
                let victim = app
                    .tasks
                    .iter()
                    .enumerate()
                    .max_by_key(|(i, t)| (!t.running, *i))
                    .map(|(i, _)| i)
                    .expect("a task");
                let t = app.tasks.remove(victim);
                if let Some(n) = used.get_mut(&t.host) {
                    *n = n.saturating_sub(1);
                }
            }
            let mut fresh = next_ids.into_iter();
            while app.tasks.len() < app.instances() {
                let unique = app.unique();
                let host = self
                    .agents
                    .iter()
                    .filter(|(h, slots)| used.get(*h).copied().unwrap_or(0) < **slots)
                    .filter(|(h, _)| !unique || !app.tasks.iter().any(|t| &t.host == *h))
                    .min_by_key(|(h, _)| used.get(*h).copied().unwrap_or(0))
                    .map(|(h, _)| h.clone());
                let (Some(host), Some(tid)) = (host, fresh.next()) else {
                    break; // Waits for an offer that fits.
                };
                *used.entry(host.clone()).or_default() += 1;
                app.tasks.push(Task {
                    id: format!("{}.{tid}", id.trim_start_matches('/').replace('/', "_")),
                    host,
                    staged: now,
                    staged_at: now_iso(),
                    running: false,
                });
            }
        }
        let apps = &self.apps;
        self.deployments.retain_mut(|d| {
            if let Some(until) = d.until {
                return now < until;
            }
            let Some(app) = apps.get(&d.app) else {
                return false;
            };
            let done = app.tasks.len() == app.instances() && app.tasks.iter().all(|t| t.running);
            if !done {
                d.reached = None;
                return true;
            }
            let reached = *d.reached.get_or_insert(now);
            now.duration_since(reached) < opts.deployment_tail
        });
    }
}

fn task_view(app: &str, t: &Task) -> Value {
    json!({
        "id": t.id, "appId": app, "host": t.host,
        "state": if t.running { "TASK_RUNNING" } else { "TASK_STAGING" },
        "stagedAt": t.staged_at, "startedAt": if t.running { json!(t.staged_at) } else { Value::Null },
        "healthCheckResults": [],
    })
}

fn now_iso() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Marathon's form of an app id: slashes trimmed, made absolute.
fn normalise(id: &str) -> String {
    format!("/{}", id.trim_matches('/'))
}

struct Shared {
    fake: Mutex<Fake>,
    opts: MarathonOptions,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.fake.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake Marathon; stops when the last clone is dropped or on [`MarathonFake::stop`].
#[derive(Clone)]
pub struct MarathonFake {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tasks: Arc<Tasks>,
}

struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn message(status: u16, text: impl Into<String>) -> Response {
    reply(status, json!({"message": text.into()}))
}

fn reply(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

fn locked(deployments: &[&Deployment]) -> Response {
    reply(
        409,
        json!({
            "message": "App is locked by one or more deployments. Override with the option '?force=true'. View details at '/v2/deployments/<DEPLOYMENT_ID>'.",
            "deployments": deployments.iter().map(|d| json!({"id": d.id})).collect::<Vec<_>>(),
        }),
    )
}

fn deployment_result(version: &str, id: &str, status: u16) -> Response {
    let mut r = reply(status, json!({"version": version, "deploymentId": id}));
    if let Ok(v) = header::HeaderValue::from_str(id) {
        r.headers_mut().insert("Marathon-Deployment-Id", v);
    }
    r
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                A[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

/// The refusal of a request without the credentials the options ask for.
fn refused(opts: &MarathonOptions, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some((user, password)) = &opts.basic_auth {
        let want = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        if given != Some(want.as_str()) {
            let mut r = (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"Mesosphere\""),
            );
            return Some(r);
        }
    }
    if let Some(token) = &opts.dcos_token {
        match given.and_then(|g| g.strip_prefix("token=")) {
            None => return Some(message(401, "Unauthorized: a token is required")),
            Some(t) if t != token => {
                return Some(message(403, "Forbidden: the token is not valid"))
            }
            Some(_) => {}
        }
    }
    None
}

/// The defaults Marathon fills in for an app given as `body`; `Err` with a 422 on an invalid one.
fn new_app(body: &Value) -> Result<Value, Response> {
    let Some(id) = body["id"]
        .as_str()
        .filter(|s| !s.trim_matches('/').is_empty())
    else {
        return Err(reply(
            422,
            json!({"message": "Object is not valid", "details": [{"path": "/id", "errors": ["error.path.missing"]}]}),
        ));
    };
    if body["instances"].as_i64().is_some_and(|n| n < 0) {
        return Err(reply(
            422,
            json!({"message": "Object is not valid", "details": [{"path": "/instances", "errors": ["error.min"]}]}),
        ));
    }
    let mut app = json!({
        "instances": 1, "cpus": 1.0, "mem": 128.0, "labels": {}, "env": {},
        "constraints": [], "healthChecks": [],
    });
    for (k, v) in body.as_object().into_iter().flatten() {
        app[k] = v.clone();
    }
    app["id"] = json!(normalise(id));
    Ok(app)
}

async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query: Vec<(String, String)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.replace("%3D", "=").replace("%2C", ","))
        })
        .collect();
    let q = |k: &str| {
        query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let force = q("force") == Some("true");
    if path == "/ping" {
        return "pong".into_response();
    }
    if let Some(r) = refused(&sh.opts, &headers) {
        return r;
    }
    let json_body = || -> Result<Value, Response> {
        serde_json::from_slice(&body).map_err(|e| message(400, format!("Invalid JSON: {e}")))
    };
    let mut fake = sh.lock();
    match (method.clone(), path.as_str()) {
        (Method::GET, "/v2/info") => reply(
            200,
            json!({"name": "marathon", "version": "1.11.0", "elected": true,
                "leader": "127.0.0.1:8080", "frameworkId": "fake-framework-0001",
                "marathon_config": {"master": "zk://127.0.0.1:2181/mesos"}}),
        ),
        (Method::GET, "/v2/apps") => {
            let with_tasks = query.iter().any(|(k, v)| k == "embed" && v == "apps.tasks");
            let labels: Vec<(String, Option<String>)> = q("label")
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| match s.split_once("==") {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (s.to_string(), None),
                })
                .collect();
            let apps: Vec<Value> = fake
                .apps
                .values()
                .filter(|a| q("id").is_none_or(|p| a.spec["id"].as_str().unwrap_or("").contains(p)))
                .filter(|a| {
                    labels
                        .iter()
                        .all(|(k, v)| match (a.spec["labels"].get(k), v) {
                            (Some(have), Some(want)) => have.as_str() == Some(want.as_str()),
                            (Some(_), None) => true,
                            (None, _) => false,
                        })
                })
                .map(|a| fake.view(a, with_tasks))
                .collect();
            reply(200, json!({"apps": apps}))
        }
        (Method::POST, "/v2/apps") => {
            let app = match json_body().and_then(|b| new_app(&b)) {
                Ok(a) => a,
                Err(r) => return r,
            };
            let id = app["id"].as_str().unwrap_or("").to_string();
            if fake.apps.contains_key(&id) {
                return message(409, format!("An app with id [{id}] already exists."));
            }
            let version = now_iso();
            let deployment = fake.deploy(&id);
            fake.apps.insert(
                id.clone(),
                App {
                    spec: app,
                    version,
                    tasks: Vec::new(),
                },
            );
            let view = fake.view(&fake.apps[&id], true);
            let mut r = reply(201, view);
            for (k, v) in [
                ("Location", format!("/v2/apps{id}")),
                ("Marathon-Deployment-Id", deployment),
            ] {
                if let Ok(v) = header::HeaderValue::from_str(&v) {
                    r.headers_mut().insert(k, v);
                }
            }
            r
        }
        (Method::GET, "/v2/deployments") => {
            let list: Vec<Value> = fake
                .deployments
                .iter()
                .map(|d| {
                    let action = json!({"action": "ScaleApplication", "app": d.app});
                    json!({"id": d.id, "version": d.version, "affectedApps": [d.app],
                        "steps": [{"actions": [action]}], "currentActions": [action],
                        "currentStep": 1, "totalSteps": 1})
                })
                .collect();
            reply(200, Value::Array(list))
        }
        (Method::GET, "/v2/tasks") => {
            let tasks: Vec<Value> = fake
                .apps
                .iter()
                .flat_map(|(id, a)| a.tasks.iter().map(move |t| task_view(id, t)))
                .collect();
            reply(200, json!({"tasks": tasks}))
        }
        (Method::DELETE, p) if p.starts_with("/v2/deployments/") => {
            let id = &p["/v2/deployments/".len()..];
            let Some(i) = fake.deployments.iter().position(|d| d.id == id) else {
                return message(404, format!("DeploymentPlan {id} does not exist"));
            };
            let gone = fake.deployments.remove(i);
            if force {
                return StatusCode::ACCEPTED.into_response();
            }
            let rollback = fake.deploy(&gone.app);
            deployment_result(&now_iso(), &rollback, 200)
        }
        (m, p) if p.starts_with("/v2/apps/") => {
            let id = normalise(&p["/v2/apps".len()..]);
            app_request(&mut fake, m, &id, force, json_body)
        }
        _ => message(404, format!("Not found: {method} {path}")),
    }
}

/// `GET`, `PUT`, `PATCH` and `DELETE` of `/v2/apps/{id}`.
fn app_request(
    fake: &mut Fake,
    method: Method,
    id: &str,
    force: bool,
    body: impl FnOnce() -> Result<Value, Response>,
) -> Response {
    let missing = || message(404, format!("App '{id}' does not exist"));
    match method {
        Method::GET => match fake.apps.get(id) {
            Some(a) => reply(200, json!({"app": fake.view(a, true)})),
            None => missing(),
        },
        Method::PUT | Method::PATCH => {
            let body = match body() {
                Ok(b) => b,
                Err(r) => return r,
            };
            let (status, response) = update(fake, &method, id, force, &body);
            fake.updates.push((id.to_string(), force, status, body));
            response
        }
        Method::DELETE => {
            if !fake.apps.contains_key(id) {
                return missing();
            }
            let locks = fake.locks(id);
            if !locks.is_empty() && !force {
                return locked(&locks);
            }
            fake.deployments.retain(|d| d.app != id);
            fake.apps.remove(id);
            let deployment = fake.id("deployment");
            deployment_result(&now_iso(), &deployment, 200)
        }
        _ => message(405, "Method not allowed"),
    }
}

/// A partial update; its status and response.
fn update(
    fake: &mut Fake,
    method: &Method,
    id: &str,
    force: bool,
    body: &Value,
) -> (u16, Response) {
    if !fake.apps.contains_key(id) {
        if *method == Method::PATCH {
            return (404, message(404, format!("App '{id}' does not exist")));
        }
        // A PUT of a missing app creates it, if the body is a whole app.
        let mut whole = body.clone();
        whole["id"] = json!(id);
        if body.get("container").is_none()
            && body.get("cmd").is_none()
            && body.get("args").is_none()
        {
            let r = reply(
                422,
                json!({"message": "Object is not valid", "details": [{"path": "/", "errors": ["AppDefinition must either contain one of 'cmd' or 'args', and/or a 'container'."]}]}),
            );
            return (422, r);
        }
        let app = match new_app(&whole) {
            Ok(a) => a,
            Err(r) => return (422, r),
        };
        let version = now_iso();
        let deployment = fake.deploy(id);
        fake.apps.insert(
            id.to_string(),
            App {
                spec: app,
                version: version.clone(),
                tasks: Vec::new(),
            },
        );
        return (201, deployment_result(&version, &deployment, 201));
    }
    let locks = fake.locks(id);
    if !locks.is_empty() {
        if !force {
            let r = locked(&locks);
            return (409, r);
        }
        fake.deployments.retain(|d| d.app != id);
    }
    if body["instances"].as_i64().is_some_and(|n| n < 0) {
        let r = reply(
            422,
            json!({"message": "Object is not valid", "details": [{"path": "/instances", "errors": ["error.min"]}]}),
        );
        return (422, r);
    }
    let version = now_iso();
    let app = fake.apps.get_mut(id).expect("checked");
    for (k, v) in body.as_object().into_iter().flatten() {
        if k != "id" {
            app.spec[k] = v.clone();
        }
    }
    app.version = version.clone();
    let deployment = fake.deploy(id);
    (200, deployment_result(&version, &deployment, 200))
}

impl MarathonFake {
    /// Binds 127.0.0.1:0, serves, and starts the launch/kill pass.
    pub async fn start(opts: MarathonOptions) -> MarathonFake {
        let shared = Arc::new(Shared {
            fake: Mutex::new(Fake::default()),
            opts: opts.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Marathon fake");
        let addr = listener.local_addr().expect("its address");
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let passing = Arc::clone(&shared);
        let pass = tokio::spawn(async move {
            let mut every = tokio::time::interval(passing.opts.pass_interval);
            loop {
                every.tick().await;
                passing.lock().pass(&passing.opts, Instant::now());
            }
        });
        MarathonFake {
            shared,
            addr,
            tasks: Arc::new(Tasks(vec![server, pass])),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A Mesos agent with room for `slots` tasks. Returns its hostname (`name`).
    pub fn add_agent(&self, name: &str, slots: u32) -> String {
        self.shared.lock().agents.insert(name.to_string(), slots);
        name.to_string()
    }

    /// The agent is lost: its tasks are gone, and replaced where there is room.
    pub fn remove_agent(&self, name: &str) {
        let mut f = self.shared.lock();
        f.agents.remove(name);
        for app in f.apps.values_mut() {
            app.tasks.retain(|t| t.host != name);
        }
    }

    /// Creates an app as `POST /v2/apps` would. Panics on an invalid one.
    pub fn create_app(&self, app: Value) {
        let spec = new_app(&app).unwrap_or_else(|_| panic!("an invalid app: {app}"));
        let id = spec["id"].as_str().expect("an id").to_string();
        let mut f = self.shared.lock();
        assert!(!f.apps.contains_key(&id), "app {id} exists");
        f.deploy(&id);
        f.apps.insert(
            id,
            App {
                spec,
                version: now_iso(),
                tasks: Vec::new(),
            },
        );
    }

    /// The app as `GET /v2/apps/{id}` shows it (the inner object); `None` if absent.
    pub fn app(&self, id: &str) -> Option<Value> {
        let f = self.shared.lock();
        f.apps.get(&normalise(id)).map(|a| f.view(a, true))
    }

    /// Tasks of the app in `TASK_RUNNING`.
    pub fn running(&self, id: &str) -> u32 {
        let f = self.shared.lock();
        f.apps
            .get(&normalise(id))
            .map_or(0, |a| a.tasks.iter().filter(|t| t.running).count() as u32)
    }

    /// Every `PUT`/`PATCH /v2/apps/{id}` received, refused ones too: (app id, `force`, the
    /// status answered, the body).
    pub fn updates(&self) -> Vec<(String, bool, u16, Value)> {
        self.shared.lock().updates.clone()
    }

    /// A deployment of the app that holds its lock for `hold` (as a restart would). Returns
    /// its id.
    pub fn lock(&self, id: &str, hold: Duration) -> String {
        let mut f = self.shared.lock();
        let id = normalise(id);
        assert!(f.apps.contains_key(&id), "no app {id}");
        let d = f.id("deployment");
        f.deployments.push(Deployment {
            id: d.clone(),
            app: id,
            version: now_iso(),
            until: Some(Instant::now() + hold),
            reached: None,
        });
        d
    }

    /// Stops serving and placing.
    pub fn stop(&self) {
        for t in &self.tasks.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}");
    }

    #[tokio::test]
    async fn tasks_wait_for_room_and_the_app_stays_locked_meanwhile() {
        let f = MarathonFake::start(MarathonOptions::default()).await;
        f.add_agent("a0", 2);
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/v2/apps", f.address()))
            .json(&json!({"id": "shop/web/", "instances": 1, "container": {"type": "DOCKER", "docker": {"image": "x"}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert!(r.headers().contains_key("Marathon-Deployment-Id"));
        wait("one running", || f.running("/shop/web") == 1).await;
        wait("the deployment ends", || {
            f.app("/shop/web").unwrap()["deployments"] == json!([])
        })
        .await;

        let put = |n: u32, force: bool| {
            http.put(format!("{}/v2/apps/shop/web?force={force}", f.address()))
                .json(&json!({"instances": n}))
                .send()
        };
        assert_eq!(put(3, false).await.unwrap().status(), 200);
        wait("two run, one waits", || f.running("/shop/web") == 2).await;
        let app = f.app("/shop/web").unwrap();
        assert_eq!(
            (app["tasksStaged"].as_u64(), app["instances"].as_u64()),
            (Some(0), Some(3))
        );
        let r = put(4, false).await.unwrap();
        assert_eq!(r.status(), 409);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["message"],
            "App is locked by one or more deployments. Override with the option '?force=true'. View details at '/v2/deployments/<DEPLOYMENT_ID>'."
        );
        assert_eq!(body["deployments"].as_array().unwrap().len(), 1);
        f.add_agent("a1", 2);
        wait("all run", || f.running("/shop/web") == 3).await;
        wait("the deployment ends", || {
            f.app("/shop/web").unwrap()["deployments"] == json!([])
        })
        .await;
        assert_eq!(put(1, false).await.unwrap().status(), 200);
        let forced = put(2, true).await.unwrap();
        assert_eq!(
            forced.status(),
            200,
            "force replaces the running deployment"
        );
        let u = f.updates();
        assert_eq!(
            u.iter()
                .map(|(_, force, s, _)| (*force, *s))
                .collect::<Vec<_>>(),
            vec![(false, 200), (false, 409), (false, 200), (true, 200)]
        );
        let missing = http
            .get(format!("{}/v2/apps/nope", f.address()))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        let body: Value = missing.json().await.unwrap();
        assert_eq!(body["message"], "App '/nope' does not exist");
    }

    #[tokio::test]
    async fn unique_apps_take_one_agent_each_and_lost_agents_are_replaced() {
        let f = MarathonFake::start(MarathonOptions::default()).await;
        for a in ["a0", "a1", "a2"] {
            f.add_agent(a, 3);
        }
        f.create_app(
            json!({"id": "/log", "instances": 5, "constraints": [["hostname", "UNIQUE"]]}),
        );
        wait("one per agent", || f.running("/log") == 3).await;
        f.create_app(json!({"id": "/web", "instances": 2}));
        wait("web runs", || f.running("/web") == 2).await;
        f.remove_agent("a0");
        wait("log on the two left", || f.running("/log") == 2).await;
        wait("web replaced", || f.running("/web") == 2).await;
        let tasks = f.app("/web").unwrap()["tasks"].clone();
        assert!(tasks.as_array().unwrap().iter().all(|t| t["host"] != "a0"));
    }

    #[tokio::test]
    async fn credentials_are_checked() {
        let f = MarathonFake::start(MarathonOptions {
            basic_auth: Some(("ops".into(), "pw".into())),
            ..MarathonOptions::default()
        })
        .await;
        let http = reqwest::Client::new();
        let url = format!("{}/v2/info", f.address());
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.headers()["www-authenticate"],
            "Basic realm=\"Mesosphere\""
        );
        let r = http
            .get(&url)
            .basic_auth("ops", Some("pw"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let t = MarathonFake::start(MarathonOptions {
            dcos_token: Some("jwt".into()),
            ..MarathonOptions::default()
        })
        .await;
        let url = format!("{}/v2/apps", t.address());
        assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
        let wrong = http
            .get(&url)
            .header("Authorization", "token=x")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 403);
        let right = http
            .get(&url)
            .header("Authorization", "token=jwt")
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), 200);
    }

    #[tokio::test]
    async fn a_lock_holds_for_its_time() {
        let f = MarathonFake::start(MarathonOptions::default()).await;
        f.add_agent("a0", 3);
        f.create_app(json!({"id": "/web", "instances": 1}));
        wait("unlocked", || {
            f.app("/web").unwrap()["deployments"] == json!([])
        })
        .await;
        let d = f.lock("web", Duration::from_millis(300));
        assert_eq!(f.app("/web").unwrap()["deployments"], json!([{"id": d}]));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            f.app("/web").unwrap()["deployments"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        wait("the lock ends", || {
            f.app("/web").unwrap()["deployments"] == json!([])
        })
        .await;
        assert!(
            now_iso().ends_with('Z') && now_iso().len() == 24,
            "{}",
            now_iso()
        );
    }
}
