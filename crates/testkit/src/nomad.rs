//! A fake of HashiCorp Nomad's HTTP API (v1.x; the facts followed are those of Nomad v1.11 in
//! `shared/notes/nomad-marathon.md`, else Nomad's public API documentation), served by axum on
//! 127.0.0.1 for the Nomad backend's tests.
//!
//! **Modelled**: jobs (register, update, stop, purge) in namespaces; task groups and their counts;
//! the scale endpoints with Nomad's validation order and texts, scaling events and the
//! deployment lock; asynchronous placement by a scheduler pass every
//! [`NomadOptions::place_interval`] (allocations go `pending`, then `running` after
//! [`NomadOptions::start_delay`]); evaluations, including the `blocked` eval (`queued-allocs`)
//! left when there is no room and completed once room appears; deployments, which end
//! `successful` once every group has its count of allocations running for
//! [`NomadOptions::min_healthy`]; `system` jobs (one allocation per schedulable node); nodes
//! going down, drained, made eligible again or removed; one ACL token; blocking queries
//! (`?index=`, `?wait=`) over one global raft index; `?region=` and `?namespace=`; plain-text
//! errors with Nomad's codes and texts.
//!
//! **Resources**: a node has room for a number of allocations, its *slots*, and, when made with
//! [`NomadFake::add_node_sized`], CPU (MHz) and memory (MB) that its live allocations' tasks
//! (`Resources.CPU`, `Resources.MemoryMB`, Nomad's defaults 100 and 300 when absent) must fit
//! in; `/v1/nodes?resources=true` shows `NodeResources` and `ReservedResources` (nothing
//! reserved), `/v1/allocations?resources=true` each allocation's `AllocatedResources.Tasks`.
//!
//! **Not modelled**: ports, cores, devices; an eval's `DimensionExhausted` says `"slots"`;
//! constraints, affinities, spreads and datacenters (every node is in `dc1`); canaries,
//! rolling-update batches (`MaxParallel` only matters as `0`, which disables deployments),
//! progress deadlines and auto-revert; restart and reschedule policies, failed allocations,
//! disconnected clients (`unknown`); multi-region (only `global`); namespaces as objects (any
//! name is accepted); ACL policies (one token sees everything); job versions history, plans,
//! dispatch, periodic jobs; garbage collection (terminal allocations and evals stay listed);
//! the wait jitter of blocking queries; most fields of Nomad's objects. A job's `Status` is
//! derived as Nomad does: `dead` if stopped, `running` with any non-terminal allocation,
//! `pending` with a pending or blocked eval, otherwise `dead` (a job scaled to 0 reads `dead`
//! with `Stop: false`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;

/// Options of the fake.
#[derive(Debug, Clone)]
pub struct NomadOptions {
    /// Time from an allocation placed (ClientStatus "pending") to "running". Default 50 ms.
    pub start_delay: Duration,
    /// Time a placement pass runs (the scheduler's period). Default 10 ms.
    pub place_interval: Duration,
    /// When Some, every /v1 request but /v1/status/leader must carry this token in
    /// `X-Nomad-Token` or `Authorization: Bearer <t>`, else 403 text/plain "Permission denied"
    /// (a wrong token: 403 "ACL token not found"). Default None (ACLs off).
    pub acl_token: Option<String>,
    /// How long a deployment stays "running" after all its allocations run (min_healthy_time).
    /// Default 200 ms.
    pub min_healthy: Duration,
}

impl Default for NomadOptions {
    fn default() -> Self {
        NomadOptions {
            start_delay: Duration::from_millis(50),
            place_interval: Duration::from_millis(10),
            acl_token: None,
            min_healthy: Duration::from_millis(200),
        }
    }
}

/// A running fake Nomad (see the module's documentation). Clones share it; the server and the
/// placement loop stop when the last clone is dropped, or on [`NomadFake::stop`].
#[derive(Clone)]
pub struct NomadFake(Arc<Handle>);

struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

struct Shared {
    state: Mutex<St>,
    /// The raft index, for blocking queries.
    index: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    opts: NomadOptions,
}

impl Shared {
    /// Runs `f` on the state; if it changed anything, publishes the new index.
    fn with<R>(&self, f: impl FnOnce(&mut St) -> R) -> R {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut st);
        if st.dirty {
            st.dirty = false;
            self.index.send_replace(st.index);
        }
        r
    }
}

type Key = (String, String); // (namespace, job ID)

struct Node {
    id: String,
    name: String,
    slots: u32,
    /// CPU in MHz and memory in MB its allocations may use; 0: not counted.
    cpu_mhz: u64,
    memory_mb: u64,
    down: bool,
    drain: bool,
    eligible: bool,
    create_index: u64,
    modify_index: u64,
}

impl Node {
    fn schedulable(&self) -> bool {
        !self.down && !self.drain && self.eligible
    }
}

struct JobRec {
    /// The job as sent, with the server's fields (Version, indexes, Stop...) set.
    spec: Value,
    /// Scaling events per group, newest first.
    events: BTreeMap<String, Vec<Value>>,
}

struct Alloc {
    id: String,
    eval_id: String,
    ns: String,
    job: String,
    job_type: String,
    group: String,
    slot: u32,
    /// What its tasks ask for: (task, CPU MHz, memory MB).
    tasks: Vec<(String, u64, u64)>,
    node_id: String,
    node_name: String,
    job_version: u64,
    deployment_id: String,
    desired: &'static str,
    client: &'static str,
    healthy: Option<bool>,
    create_index: u64,
    modify_index: u64,
    create_time: i64,
    start_at: Instant,
    running_since: Option<Instant>,
}

impl Alloc {
    /// Non-terminal: wanted running and pending or running.
    fn live(&self) -> bool {
        self.desired == "run" && matches!(self.client, "pending" | "running")
    }
    fn of(&self, key: &Key) -> bool {
        self.ns == key.0 && self.job == key.1
    }
}

struct Eval {
    id: String,
    ns: String,
    job: String,
    job_type: String,
    triggered_by: &'static str,
    status: &'static str,
    description: &'static str,
    node_id: String,
    blocked_eval: String,
    previous_eval: String,
    failed: BTreeMap<String, Value>,
    queued: BTreeMap<String, u32>,
    job_modify_index: u64,
    create_index: u64,
    modify_index: u64,
    create_time: i64,
}

#[derive(Clone, Copy, PartialEq)]
struct DGroup {
    desired: u32,
    placed: u32,
    healthy: u32,
}

struct Deployment {
    id: String,
    ns: String,
    job: String,
    job_version: u64,
    job_modify_index: u64,
    job_create_index: u64,
    status: &'static str,
    description: &'static str,
    groups: BTreeMap<String, DGroup>,
    started: Instant,
    create_index: u64,
    modify_index: u64,
}

struct ApiErr(StatusCode, String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let ct = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
        (self.0, ct, self.1).into_response()
    }
}

fn err(code: u16, msg: impl Into<String>) -> ApiErr {
    ApiErr(
        StatusCode::from_u16(code).expect("a status code"),
        msg.into(),
    )
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or_default()
}

fn u64_of(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or_default()
}

fn task_groups(spec: &Value) -> Vec<(String, u32)> {
    let tgs = spec.get("TaskGroups").and_then(Value::as_array);
    tgs.into_iter()
        .flatten()
        .map(|g| (str_of(g, "Name").to_string(), u64_of(g, "Count") as u32))
        .collect()
}

/// What each task of `group` asks for: (name, CPU MHz, memory MB), Nomad's defaults (100 MHz,
/// 300 MB) where the job says nothing.
fn group_tasks(spec: &Value, group: &str) -> Vec<(String, u64, u64)> {
    let tgs = spec.get("TaskGroups").and_then(Value::as_array);
    let g = tgs
        .into_iter()
        .flatten()
        .find(|g| str_of(g, "Name") == group);
    let tasks = g.and_then(|g| g.get("Tasks")).and_then(Value::as_array);
    tasks
        .into_iter()
        .flatten()
        .map(|t| {
            let r = &t["Resources"];
            let of = |k: &str, default: u64| r.get(k).and_then(Value::as_u64).unwrap_or(default);
            (
                str_of(t, "Name").to_string(),
                of("CPU", 100),
                of("MemoryMB", 300),
            )
        })
        .collect()
}

fn is_stopped(spec: &Value) -> bool {
    spec.get("Stop").and_then(Value::as_bool).unwrap_or(false)
}

/// Whether an update of this job starts a deployment: service jobs, unless every group's
/// update block (or the job's) says `MaxParallel: 0`.
fn deploys(spec: &Value) -> bool {
    let job_update = spec.get("Update").filter(|u| u.is_object());
    let disabled = |g: &Value| {
        let u = g.get("Update").filter(|u| u.is_object()).or(job_update);
        u.and_then(|u| u.get("MaxParallel")).and_then(Value::as_u64) == Some(0)
    };
    let tgs = spec.get("TaskGroups").and_then(Value::as_array);
    str_of(spec, "Type") == "service" && !tgs.into_iter().flatten().all(disabled)
}

/// The fake's whole state, behind one mutex.
struct St {
    index: u64,
    /// Something changed in this transaction (the index was taken).
    dirty: bool,
    opts: NomadOptions,
    rng: u64,
    nodes: Vec<Node>,
    jobs: BTreeMap<Key, JobRec>,
    allocs: Vec<Alloc>,
    evals: Vec<Eval>,
    deployments: Vec<Deployment>,
    scale_requests: Vec<Value>,
    requests: BTreeMap<String, u64>,
}

impl St {
    /// The index of the current transaction: the first change of a transaction takes a new one.
    fn idx(&mut self) -> u64 {
        if !self.dirty {
            self.index += 1;
            self.dirty = true;
        }
        self.index
    }

    fn uuid(&mut self) -> String {
        let mut next = || {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        };
        let (a, b) = (next(), next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 52) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    /// A job ID as the Rust API names it: in "default" first, else in any namespace.
    fn find(&self, id: &str) -> Option<Key> {
        let default = ("default".to_string(), id.to_string());
        if self.jobs.contains_key(&default) {
            return Some(default);
        }
        self.jobs.keys().find(|k| k.1 == id).cloned()
    }

    fn new_eval(&mut self, key: &Key, trigger: &'static str, status: &'static str) -> usize {
        let idx = self.idx();
        let id = self.uuid();
        let spec = self.jobs.get(key).map(|r| &r.spec);
        self.evals.push(Eval {
            id,
            ns: key.0.clone(),
            job: key.1.clone(),
            job_type: spec.map_or("service", |s| str_of(s, "Type")).to_string(),
            triggered_by: trigger,
            status,
            description: "",
            node_id: String::new(),
            blocked_eval: String::new(),
            previous_eval: String::new(),
            failed: BTreeMap::new(),
            queued: BTreeMap::new(),
            job_modify_index: spec.map_or(0, |s| u64_of(s, "JobModifyIndex")),
            create_index: idx,
            modify_index: idx,
            create_time: now_ns(),
        });
        self.evals.len() - 1
    }

    /// POST /v1/jobs: registers a new job or updates one.
    fn register(&mut self, mut job: Value, query_ns: &str) -> Result<Value, ApiErr> {
        let Some(obj) = job.as_object_mut() else {
            return Err(err(400, "Job must be specified"));
        };
        let id = obj
            .get("ID")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if id.is_empty() {
            return Err(err(400, "Job ID hasn't been provided"));
        }
        let ns = match obj.get("Namespace").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => query_ns.to_string(),
        };
        let defaults = [
            ("Name", json!(id)),
            ("Type", json!("service")),
            ("Region", json!("global")),
            ("Priority", json!(50)),
            ("Datacenters", json!(["*"])),
            ("Meta", Value::Null),
        ];
        for (k, v) in defaults {
            if obj.get(k).is_none_or(Value::is_null) {
                obj.insert(k.to_string(), v);
            }
        }
        obj.insert("Namespace".into(), json!(ns));
        let Some(tgs) = obj.get_mut("TaskGroups").and_then(Value::as_array_mut) else {
            return Err(err(400, "Missing job task groups"));
        };
        if tgs.is_empty() {
            return Err(err(400, "Missing job task groups"));
        }
        for tg in tgs.iter_mut() {
            let Some(tg) = tg.as_object_mut() else {
                return Err(err(400, "Failed to decode request body: bad task group"));
            };
            if tg
                .get("Name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(err(400, "Missing task group name"));
            }
            match tg.get("Count").map(Value::as_i64) {
                None | Some(None) => _ = tg.insert("Count".into(), json!(1)),
                Some(Some(n)) if n < 0 => {
                    return Err(err(400, "Task group count can't be negative"))
                }
                Some(Some(_)) => {}
            }
        }
        let key = (ns, id);
        let idx = self.idx();
        let old = self.jobs.remove(&key);
        let version = old.as_ref().map_or(0, |o| u64_of(&o.spec, "Version") + 1);
        let create = old.as_ref().map_or(idx, |o| u64_of(&o.spec, "CreateIndex"));
        let fields = [
            ("Stop", json!(false)),
            ("Status", json!("pending")),
            ("Version", json!(version)),
            ("CreateIndex", json!(create)),
            ("ModifyIndex", json!(idx)),
            ("JobModifyIndex", json!(idx)),
            ("SubmitTime", json!(now_ns())),
        ];
        for (k, v) in fields {
            obj.insert(k.to_string(), v);
        }
        let first = old.is_none();
        let events = old.map(|o| o.events).unwrap_or_default();
        let total: u32 = task_groups(&job).iter().map(|g| g.1).sum();
        let deploy = deploys(&job) && !(first && total == 0);
        self.jobs.insert(key.clone(), JobRec { spec: job, events });
        self.set_alloc_versions(&key, version);
        let e = self.new_eval(&key, "job-register", "pending");
        if deploy {
            self.start_deployment(&key);
        }
        Ok(
            json!({"EvalID": self.evals[e].id, "EvalCreateIndex": idx, "JobModifyIndex": idx,
            "Warnings": "", "Index": idx, "LastContact": 0, "KnownLeader": false}),
        )
    }

    /// Live allocations are updated in place to a new job version.
    fn set_alloc_versions(&mut self, key: &Key, version: u64) {
        let idx = self.idx();
        for a in self.allocs.iter_mut().filter(|a| a.of(key) && a.live()) {
            a.job_version = version;
            a.modify_index = idx;
        }
    }

    /// Starts a deployment of the job's current version, cancelling a running one.
    fn start_deployment(&mut self, key: &Key) -> String {
        let idx = self.idx();
        let id = self.uuid();
        for d in &mut self.deployments {
            if d.ns == key.0 && d.job == key.1 && d.status == "running" {
                d.status = "cancelled";
                d.description = "Cancelled due to newer version of job";
                d.modify_index = idx;
            }
        }
        let spec = &self.jobs[key].spec;
        let group = |(g, n): (String, u32)| {
            let dg = DGroup {
                desired: n,
                placed: 0,
                healthy: 0,
            };
            (g, dg)
        };
        self.deployments.push(Deployment {
            id: id.clone(),
            ns: key.0.clone(),
            job: key.1.clone(),
            job_version: u64_of(spec, "Version"),
            job_modify_index: u64_of(spec, "JobModifyIndex"),
            job_create_index: u64_of(spec, "CreateIndex"),
            status: "running",
            description: "Deployment is running",
            groups: task_groups(spec).into_iter().map(group).collect(),
            started: Instant::now(),
            create_index: idx,
            modify_index: idx,
        });
        for a in self.allocs.iter_mut().filter(|a| a.of(key) && a.live()) {
            a.deployment_id = id.clone();
            a.healthy = None;
        }
        id
    }

    fn latest_deployment(&self, key: &Key) -> Option<&Deployment> {
        self.deployments
            .iter()
            .rev()
            .find(|d| d.ns == key.0 && d.job == key.1)
    }

    /// DELETE /v1/job/:id
    fn deregister(&mut self, key: &Key, purge: bool) -> Result<Value, ApiErr> {
        if !self.jobs.contains_key(key) {
            return Err(err(404, "job not found"));
        }
        let idx = self.idx();
        let spec = &mut self.jobs.get_mut(key).expect("present").spec;
        spec["Stop"] = json!(true);
        spec["ModifyIndex"] = json!(idx);
        spec["JobModifyIndex"] = json!(idx);
        let e = self.new_eval(key, "job-deregister", "pending");
        if purge {
            // The job is gone at once: stop what it had now, the scheduler won't see it.
            self.reconcile(key, Instant::now());
            self.jobs.remove(key);
        }
        Ok(
            json!({"EvalID": self.evals[e].id, "EvalCreateIndex": idx, "JobModifyIndex": idx,
            "Index": idx, "LastContact": 0, "KnownLeader": false}),
        )
    }

    /// POST /v1/job/:id/scale, checked in Nomad's order.
    fn scale(&mut self, ns: &str, id: &str, body: Value) -> Result<Value, ApiErr> {
        let target = body.get("Target").cloned().unwrap_or(Value::Null);
        let target_job = str_of(&target, "Job");
        if !target_job.is_empty() && target_job != id {
            return Err(err(400, "job ID in payload did not match URL"));
        }
        let count = match body.get("Count") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| {
                err(
                    400,
                    "Failed to decode request body: Count is not an integer",
                )
            })?),
        };
        if count.is_some_and(|c| c < 0) {
            return Err(err(400, "scaling action count can't be negative"));
        }
        let is_error = body.get("Error").and_then(Value::as_bool).unwrap_or(false);
        if is_error && count.is_some() {
            return Err(err(
                400,
                "scaling action should not contain count if error is true",
            ));
        }
        let group = str_of(&target, "Group").to_string();
        if group.is_empty() {
            return Err(err(400, "missing task group name for scaling action"));
        }
        let key = (ns.to_string(), id.to_string());
        let Some(rec) = self.jobs.get(&key) else {
            return Err(err(404, format!("job \"{id}\" not found")));
        };
        if let Some(c) = count {
            if str_of(&rec.spec, "Type") == "system" && c > 1 {
                return Err(err(
                    400,
                    "jobs of type \"system\" can only be scaled between 0 and 1",
                ));
            }
        }
        let tgs = rec.spec["TaskGroups"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(gi) = tgs.iter().position(|g| str_of(g, "Name") == group) else {
            let msg = format!("task group \"{group}\" specified for scaling does not exist in job");
            return Err(err(400, msg));
        };
        let prev = u64_of(&tgs[gi], "Count");
        if let Some(c) = count {
            if let Some(scaling) = tgs[gi].get("Scaling").filter(|s| s.is_object()) {
                if let Some(min) = scaling.get("Min").and_then(Value::as_i64) {
                    if c < min {
                        let msg = format!(
                            "group count was less than scaling policy minimum: {c} < {min}"
                        );
                        return Err(err(400, msg));
                    }
                }
                if let Some(max) = scaling.get("Max").and_then(Value::as_i64) {
                    if c > max {
                        let msg = format!(
                            "group count was greater than scaling policy maximum: {c} > {max}"
                        );
                        return Err(err(400, msg));
                    }
                }
            }
            let version = u64_of(&rec.spec, "Version");
            let active = |d: &Deployment| {
                matches!(d.status, "running" | "paused" | "pending") && d.job_version >= version
            };
            if self.latest_deployment(&key).is_some_and(active) {
                return Err(err(400, "job scaling blocked due to active deployment"));
            }
            let (want, have) = (
                u64_of(&body, "JobModifyIndex"),
                u64_of(&rec.spec, "JobModifyIndex"),
            );
            if want != 0 && want != have {
                let msg = format!("Enforcing job modify index {want}: job exists with conflicting job modify index: {have}");
                return Err(err(500, msg));
            }
        }
        let idx = self.idx();
        let mut eval_id = String::new();
        if let Some(c) = count {
            let spec = &mut self.jobs.get_mut(&key).expect("present").spec;
            spec["TaskGroups"][gi]["Count"] = json!(c);
            let version = u64_of(spec, "Version") + 1;
            spec["Version"] = json!(version);
            spec["ModifyIndex"] = json!(idx);
            spec["JobModifyIndex"] = json!(idx);
            let deploy = deploys(spec);
            self.set_alloc_versions(&key, version);
            let e = self.new_eval(&key, "job-scaling", "pending");
            eval_id = self.evals[e].id.clone();
            if deploy {
                self.start_deployment(&key);
            }
        }
        let event = json!({"Count": count, "PreviousCount": prev, "Error": is_error,
            "Message": str_of(&body, "Message"), "Meta": body.get("Meta").cloned().unwrap_or(Value::Null),
            "EvalID": if eval_id.is_empty() { Value::Null } else { json!(eval_id) },
            "Time": now_ns(), "CreateIndex": idx});
        let rec = self.jobs.get_mut(&key).expect("present");
        let events = rec.events.entry(group).or_default();
        events.insert(0, event);
        events.truncate(20);
        let jmi = u64_of(&rec.spec, "JobModifyIndex");
        self.scale_requests.push(body);
        Ok(
            json!({"EvalID": eval_id, "EvalCreateIndex": if count.is_some() { idx } else { 0 },
            "JobModifyIndex": jmi, "Warnings": "", "Index": idx, "LastContact": 0, "KnownLeader": false}),
        )
    }

    /// Live allocations on node `n` become lost (down, removed) or complete (drained), and
    /// the jobs they belonged to get an evaluation.
    fn evacuate(&mut self, n: usize, client: &'static str, trigger: &'static str) {
        let node_id = self.nodes[n].id.clone();
        let mut jobs: Vec<Key> = Vec::new();
        for i in 0..self.allocs.len() {
            if self.allocs[i].node_id == node_id && self.allocs[i].live() {
                let idx = self.idx();
                let a = &mut self.allocs[i];
                (a.desired, a.client, a.modify_index) = ("stop", client, idx);
                let key = (a.ns.clone(), a.job.clone());
                if !jobs.contains(&key) {
                    jobs.push(key);
                }
            }
        }
        for key in jobs {
            let e = self.new_eval(&key, trigger, "pending");
            self.evals[e].node_id = node_id.clone();
        }
    }

    fn node_pos(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    fn load(&self, node_id: &str) -> usize {
        let on = |a: &&Alloc| a.node_id == node_id && a.live();
        self.allocs.iter().filter(on).count()
    }

    /// CPU MHz and memory MB the live allocations on `node_id` use.
    fn used(&self, node_id: &str) -> (u64, u64) {
        let on = |a: &&Alloc| a.node_id == node_id && a.live();
        self.allocs
            .iter()
            .filter(on)
            .flat_map(|a| &a.tasks)
            .fold((0, 0), |(c, m), t| (c + t.1, m + t.2))
    }

    /// The schedulable node with room (a slot, and `need`'s CPU and memory where counted) and
    /// the fewest live allocations.
    fn pick_node(&self, need: (u64, u64)) -> Option<usize> {
        let room = |&n: &usize| {
            let node = &self.nodes[n];
            let (cpu, mem) = self.used(&node.id);
            node.schedulable()
                && self.load(&node.id) < node.slots as usize
                && (node.cpu_mhz == 0 || cpu + need.0 <= node.cpu_mhz)
                && (node.memory_mb == 0 || mem + need.1 <= node.memory_mb)
        };
        (0..self.nodes.len())
            .filter(room)
            .min_by_key(|&n| self.load(&self.nodes[n].id))
    }

    /// Why a group could not be placed, as an eval's FailedTGAllocs entry.
    fn failure(&self, unplaced: u32) -> Value {
        let ready = self.nodes.iter().filter(|n| !n.down).count();
        let usable = self.nodes.iter().filter(|n| n.schedulable()).count();
        let dims = if usable > 0 {
            json!({ "slots": usable })
        } else {
            json!({})
        };
        json!({"NodesEvaluated": ready, "NodesFiltered": ready - usable,
            "NodesAvailable": {"dc1": usable}, "NodesExhausted": usable, "DimensionExhausted": dims,
            "ClassFiltered": null, "ConstraintFiltered": null, "ClassExhausted": null,
            "QuotaExhausted": null, "Scores": null, "AllocationTime": 0,
            "CoalescedFailures": unplaced.saturating_sub(1)})
    }

    /// One scheduler pass.
    fn tick(&mut self, now: Instant) {
        for i in 0..self.allocs.len() {
            let a = &self.allocs[i];
            if a.desired == "run" && a.client == "pending" && a.start_at <= now {
                let idx = self.idx();
                let a = &mut self.allocs[i];
                (a.client, a.running_since, a.modify_index) = ("running", Some(now), idx);
            }
        }
        let keys: Vec<Key> = self.jobs.keys().cloned().collect();
        for key in &keys {
            self.reconcile(key, now);
        }
        self.watch_deployments(now);
    }

    /// Brings a job's allocations to its counts and settles its evaluations.
    fn reconcile(&mut self, key: &Key, now: Instant) {
        let Some(rec) = self.jobs.get(key) else {
            return;
        };
        let spec = &rec.spec;
        let stop_all = is_stopped(spec);
        let system = str_of(spec, "Type") == "system";
        let job_type = str_of(spec, "Type").to_string();
        let version = u64_of(spec, "Version");
        let groups = task_groups(spec);
        let live: Vec<usize> = (0..self.allocs.len())
            .filter(|&i| self.allocs[i].of(key) && self.allocs[i].live())
            .collect();
        let mut to_stop: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| stop_all || !groups.iter().any(|g| g.0 == self.allocs[i].group))
            .collect();
        // (group, node for system jobs)
        let mut to_place: Vec<(String, Option<usize>)> = Vec::new();
        for (g, count) in groups.iter().filter(|_| !stop_all) {
            let mut mine: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&i| self.allocs[i].group == *g)
                .collect();
            if system {
                // One per schedulable node; slots are not enforced for system jobs.
                if *count == 0 {
                    to_stop.extend(mine);
                    continue;
                }
                for (n, node) in self.nodes.iter().enumerate() {
                    if node.schedulable()
                        && !mine.iter().any(|&i| self.allocs[i].node_id == node.id)
                    {
                        to_place.push((g.clone(), Some(n)));
                    }
                }
            } else if mine.len() < *count as usize {
                to_place.extend((mine.len()..*count as usize).map(|_| (g.clone(), None)));
            } else {
                // Newest first, pending ones before running ones.
                mine.sort_by_key(|&i| {
                    (
                        self.allocs[i].client == "pending",
                        self.allocs[i].create_index,
                    )
                });
                to_stop.extend(mine.iter().rev().take(mine.len() - *count as usize));
            }
        }
        let for_job =
            |e: &Eval, status: &str| e.ns == key.0 && e.job == key.1 && e.status == status;
        let mut pending: Vec<usize> = (0..self.evals.len())
            .filter(|&e| for_job(&self.evals[e], "pending"))
            .collect();
        let blocked = (0..self.evals.len()).find(|&e| for_job(&self.evals[e], "blocked"));
        if to_stop.is_empty() && to_place.is_empty() && pending.is_empty() && blocked.is_none() {
            return;
        }
        if pending.is_empty() && blocked.is_none() {
            pending.push(self.new_eval(key, "node-update", "pending"));
        }
        let eval_id = pending
            .last()
            .or(blocked.as_ref())
            .map(|&e| self.evals[e].id.clone())
            .unwrap_or_default();
        for i in to_stop {
            let idx = self.idx();
            let a = &mut self.allocs[i];
            (a.desired, a.client, a.modify_index) = ("stop", "complete", idx);
        }
        let deployment = self
            .latest_deployment(key)
            .filter(|d| d.status == "running")
            .map(|d| d.id.clone())
            .unwrap_or_default();
        let mut unplaced: BTreeMap<String, u32> = groups.iter().map(|g| (g.0.clone(), 0)).collect();
        for (g, node) in to_place {
            let tasks = group_tasks(&self.jobs[key].spec, &g);
            let need = tasks.iter().fold((0, 0), |(c, m), t| (c + t.1, m + t.2));
            let Some(n) = node.or_else(|| self.pick_node(need)) else {
                *unplaced.entry(g).or_default() += 1;
                continue;
            };
            let idx = self.idx();
            let id = self.uuid();
            let used: Vec<u32> = self
                .allocs
                .iter()
                .filter(|a| a.of(key) && a.group == g && a.live())
                .map(|a| a.slot)
                .collect();
            let slot = (0..).find(|s| !used.contains(s)).unwrap_or_default();
            let node = &self.nodes[n];
            self.allocs.push(Alloc {
                id,
                eval_id: eval_id.clone(),
                ns: key.0.clone(),
                job: key.1.clone(),
                job_type: job_type.clone(),
                group: g,
                slot,
                tasks,
                node_id: node.id.clone(),
                node_name: node.name.clone(),
                job_version: version,
                deployment_id: deployment.clone(),
                desired: "run",
                client: "pending",
                healthy: None,
                create_index: idx,
                modify_index: idx,
                create_time: now_ns(),
                start_at: now + self.opts.start_delay,
                running_since: None,
            });
        }
        let total: u32 = unplaced.values().sum();
        let queued: BTreeMap<String, u32> = unplaced
            .iter()
            .filter(|e| *e.1 > 0)
            .map(|(g, n)| (g.clone(), *n))
            .collect();
        let settle = |st: &mut St, e: usize, status: &'static str| {
            let idx = st.idx();
            let ev = &mut st.evals[e];
            (ev.status, ev.description, ev.modify_index) = (status, "", idx);
        };
        let Some(&last) = pending.last() else {
            // Only the blocked eval: it completes once everything is placed.
            let b = blocked.expect("a blocked eval");
            if stop_all || total == 0 {
                settle(self, b, if stop_all { "canceled" } else { "complete" });
                self.evals[b].queued = unplaced;
            } else if self.evals[b].queued != queued {
                let idx = self.idx();
                (self.evals[b].queued, self.evals[b].modify_index) = (queued, idx);
            }
            return;
        };
        for &e in &pending {
            settle(self, e, "complete");
        }
        if let Some(b) = blocked {
            // Superseded by this evaluation (and by its own blocked eval, if any).
            settle(
                self,
                b,
                if total > 0 || stop_all {
                    "canceled"
                } else {
                    "complete"
                },
            );
        }
        let failed: BTreeMap<String, Value> = queued
            .iter()
            .map(|(g, n)| (g.clone(), self.failure(*n)))
            .collect();
        if total > 0 {
            let b = self.new_eval(key, "queued-allocs", "blocked");
            let prev = self.evals[last].id.clone();
            let ev = &mut self.evals[b];
            (ev.description, ev.previous_eval, ev.queued) =
                ("created to place remaining allocations", prev, queued);
            self.evals[last].blocked_eval = self.evals[b].id.clone();
        }
        (self.evals[last].failed, self.evals[last].queued) = (failed, unplaced);
    }

    /// Deployments follow their allocations' health and complete.
    fn watch_deployments(&mut self, now: Instant) {
        let min_healthy = self.opts.min_healthy;
        for d in 0..self.deployments.len() {
            let dep = &self.deployments[d];
            if dep.status != "running" {
                continue;
            }
            let key = (dep.ns.clone(), dep.job.clone());
            let counts: BTreeMap<String, u32> = match self.jobs.get(&key) {
                Some(rec) if !is_stopped(&rec.spec) => task_groups(&rec.spec).into_iter().collect(),
                _ => {
                    let idx = self.idx();
                    let dep = &mut self.deployments[d];
                    (dep.status, dep.modify_index) = ("cancelled", idx);
                    dep.description = "Cancelled because job is stopped";
                    continue;
                }
            };
            let mut groups = dep.groups.clone();
            let mut newly_healthy = Vec::new();
            let mut done = true;
            for (g, dg) in groups.iter_mut() {
                let (mut placed, mut healthy) = (0, 0);
                for (i, a) in self.allocs.iter().enumerate() {
                    if a.deployment_id != dep.id || a.group != *g || !a.live() {
                        continue;
                    }
                    placed += 1;
                    if a.running_since
                        .is_some_and(|t| now >= t.max(dep.started) + min_healthy)
                    {
                        healthy += 1;
                        if a.healthy != Some(true) {
                            newly_healthy.push(i);
                        }
                    }
                }
                *dg = DGroup {
                    desired: counts.get(g).copied().unwrap_or(0),
                    placed,
                    healthy,
                };
                done &= healthy >= dg.desired;
            }
            if groups == dep.groups && newly_healthy.is_empty() && !done {
                continue;
            }
            let idx = self.idx();
            for i in newly_healthy {
                (self.allocs[i].healthy, self.allocs[i].modify_index) = (Some(true), idx);
            }
            let dep = &mut self.deployments[d];
            (dep.groups, dep.modify_index) = (groups, idx);
            if done {
                (dep.status, dep.description) = ("successful", "Deployment completed successfully");
            }
        }
    }

    // ---- JSON views ----

    fn job_status(&self, key: &Key, spec: &Value) -> &'static str {
        if is_stopped(spec) {
            "dead"
        } else if self.allocs.iter().any(|a| a.of(key) && a.live()) {
            "running"
        } else if self
            .evals
            .iter()
            .any(|e| e.ns == key.0 && e.job == key.1 && matches!(e.status, "pending" | "blocked"))
        {
            "pending"
        } else {
            "dead"
        }
    }

    fn job_view(&self, key: &Key) -> Option<Value> {
        let mut spec = self.jobs.get(key)?.spec.clone();
        spec["Status"] = json!(self.job_status(key, &spec));
        Some(spec)
    }

    fn summary(&self, key: &Key, spec: &Value) -> Value {
        let blocked = self
            .evals
            .iter()
            .find(|e| e.ns == key.0 && e.job == key.1 && e.status == "blocked");
        let mut out = Map::new();
        for (g, _) in task_groups(spec) {
            let mut n: BTreeMap<&str, u32> = BTreeMap::new();
            for a in self.allocs.iter().filter(|a| a.of(key) && a.group == g) {
                let k = match a.client {
                    "pending" => "Starting",
                    "running" => "Running",
                    "complete" => "Complete",
                    "failed" => "Failed",
                    _ => "Lost",
                };
                *n.entry(k).or_default() += 1;
            }
            let queued = blocked.and_then(|e| e.queued.get(&g)).copied().unwrap_or(0);
            let c = |k| n.get(k).copied().unwrap_or(0);
            out.insert(g, json!({"Queued": queued, "Complete": c("Complete"), "Failed": c("Failed"),
                "Running": c("Running"), "Starting": c("Starting"), "Lost": c("Lost"), "Unknown": 0}));
        }
        json!({"JobID": key.1, "Namespace": key.0, "Summary": out,
            "Children": {"Pending": 0, "Running": 0, "Dead": 0},
            "CreateIndex": u64_of(spec, "CreateIndex"), "ModifyIndex": u64_of(spec, "ModifyIndex")})
    }

    fn job_stub(&self, key: &Key, spec: &Value, meta: bool) -> Value {
        let mut stub = json!({"ID": key.1, "ParentID": "", "Name": spec["Name"], "Namespace": key.0,
            "Datacenters": spec["Datacenters"], "Type": spec["Type"], "Priority": spec["Priority"],
            "Periodic": false, "ParameterizedJob": false, "Stop": is_stopped(spec),
            "Status": self.job_status(key, spec), "StatusDescription": "",
            "JobSummary": self.summary(key, spec), "CreateIndex": spec["CreateIndex"],
            "ModifyIndex": spec["ModifyIndex"], "JobModifyIndex": spec["JobModifyIndex"],
            "SubmitTime": spec["SubmitTime"]});
        if meta {
            stub["Meta"] = spec["Meta"].clone();
        }
        stub
    }

    fn scale_status(&self, key: &Key) -> Option<Value> {
        let rec = self.jobs.get(key)?;
        let now = Instant::now();
        let mut groups = Map::new();
        for (g, count) in task_groups(&rec.spec) {
            let mine = || {
                self.allocs
                    .iter()
                    .filter(|a| a.of(key) && a.group == g && a.live())
            };
            let running = || mine().filter(|a| a.client == "running");
            let healthy = running().filter(|a| {
                a.running_since
                    .is_some_and(|t| now >= t + self.opts.min_healthy)
            });
            let events = rec.events.get(&g).filter(|e| !e.is_empty());
            groups.insert(
                g.clone(),
                json!({"Desired": count, "Placed": mine().count(),
                "Running": running().count(), "Healthy": healthy.count(), "Unhealthy": 0,
                "Events": events}),
            );
        }
        Some(json!({"JobID": key.1, "Namespace": key.0,
            "JobCreateIndex": rec.spec["CreateIndex"], "JobModifyIndex": rec.spec["JobModifyIndex"],
            "JobStopped": is_stopped(&rec.spec), "TaskGroups": groups}))
    }

    fn node_stub(&self, n: &Node) -> Value {
        self.node_view(n, false)
    }

    /// A node as listed, with `NodeResources` and `ReservedResources` when `resources`.
    fn node_view(&self, n: &Node, resources: bool) -> Value {
        let mut v = json!({"ID": n.id, "Name": n.name, "Address": "127.0.0.1", "Datacenter": "dc1",
            "NodeClass": "", "NodePool": "default", "Version": "1.11.3", "Drain": n.drain,
            "SchedulingEligibility": if n.eligible { "eligible" } else { "ineligible" },
            "Status": if n.down { "down" } else { "ready" }, "StatusDescription": "",
            "CreateIndex": n.create_index, "ModifyIndex": n.modify_index});
        if resources {
            v["NodeResources"] =
                json!({"Cpu": {"CpuShares": n.cpu_mhz}, "Memory": {"MemoryMB": n.memory_mb}});
            v["ReservedResources"] = json!({"Cpu": {"CpuShares": 0}, "Memory": {"MemoryMB": 0}});
        }
        v
    }

    fn alloc_stub(&self, a: &Alloc) -> Value {
        let health = a.healthy.map(|h| json!({"Healthy": h, "Canary": false}));
        json!({"ID": a.id, "EvalID": a.eval_id, "Name": format!("{}.{}[{}]", a.job, a.group, a.slot),
            "Namespace": a.ns, "NodeID": a.node_id, "NodeName": a.node_name, "JobID": a.job,
            "JobType": a.job_type, "JobVersion": a.job_version, "TaskGroup": a.group,
            "DeploymentID": a.deployment_id, "DesiredStatus": a.desired, "DesiredDescription": "",
            "ClientStatus": a.client, "ClientDescription": "", "DeploymentStatus": health,
            "CreateIndex": a.create_index, "ModifyIndex": a.modify_index, "CreateTime": a.create_time})
    }

    fn eval_view(&self, e: &Eval) -> Value {
        let failed = (!e.failed.is_empty()).then_some(&e.failed);
        json!({"ID": e.id, "Namespace": e.ns, "Priority": 50, "Type": e.job_type,
            "TriggeredBy": e.triggered_by, "JobID": e.job, "JobModifyIndex": e.job_modify_index,
            "NodeID": e.node_id, "Status": e.status, "StatusDescription": e.description,
            "BlockedEval": e.blocked_eval, "PreviousEval": e.previous_eval,
            "FailedTGAllocs": failed, "QueuedAllocations": e.queued,
            "CreateIndex": e.create_index, "ModifyIndex": e.modify_index,
            "CreateTime": e.create_time})
    }

    fn deployment_view(&self, d: &Deployment) -> Value {
        let groups: Map<String, Value> = d
            .groups
            .iter()
            .map(|(g, dg)| {
                let v = json!({"AutoRevert": false, "AutoPromote": false, "Promoted": false,
                    "DesiredCanaries": 0, "PlacedCanaries": null, "ProgressDeadline": 600_000_000_000u64,
                    "DesiredTotal": dg.desired, "PlacedAllocs": dg.placed,
                    "HealthyAllocs": dg.healthy, "UnhealthyAllocs": 0});
                (g.clone(), v)
            })
            .collect();
        json!({"ID": d.id, "Namespace": d.ns, "JobID": d.job, "JobVersion": d.job_version,
            "JobModifyIndex": d.job_modify_index, "JobCreateIndex": d.job_create_index,
            "IsMultiregion": false, "Status": d.status, "StatusDescription": d.description,
            "TaskGroups": groups, "CreateIndex": d.create_index, "ModifyIndex": d.modify_index})
    }
}

// ---- HTTP ----

type Q = Query<HashMap<String, String>>;
type Sh = State<Arc<Shared>>;
type Res = Result<Response, ApiErr>;

fn namespace(q: &HashMap<String, String>) -> String {
    q.get("namespace")
        .filter(|n| !n.is_empty())
        .cloned()
        .unwrap_or_else(|| "default".into())
}

/// A Go duration (`300000ms`, `5s`, `1m30s`).
fn go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let (mut rest, mut secs) = (s, 0f64);
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        secs += n * match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(secs))
}

/// A read, blocking while `?index=` is not passed (up to `?wait=`).
async fn read(
    sh: &Shared,
    q: &HashMap<String, String>,
    f: impl FnOnce(&St) -> Result<Value, ApiErr>,
) -> Res {
    let min = match q.get("index") {
        Some(i) => i.parse::<u64>().map_err(|_| err(400, "Invalid index"))?,
        None => 0,
    };
    let wait = match q.get("wait") {
        Some(w) => go_duration(w).ok_or_else(|| err(400, "Invalid wait time"))?,
        None => Duration::from_secs(300),
    };
    if min > 0 {
        let (mut index, mut stop) = (sh.index.subscribe(), sh.shutdown.subscribe());
        tokio::select! {
            _ = index.wait_for(|i| *i > min) => {}
            _ = tokio::time::sleep(wait.min(Duration::from_secs(600))) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
    sh.with(|st| Ok(json_at(st.index, f(st)?)))
}

/// A JSON answer with the index of the state it shows (taken under the same lock).
fn json_at(index: u64, v: Value) -> Response {
    ([("X-Nomad-Index", HeaderValue::from(index))], Json(v)).into_response()
}

/// A write's answer: its index is the body's.
fn written(v: Value) -> Response {
    json_at(u64_of(&v, "Index"), v)
}

fn body_json(body: &Bytes) -> Result<Value, ApiErr> {
    serde_json::from_slice(body)
        .map_err(|e| err(400, format!("Failed to decode request body: {e}")))
}

/// Counts requests, checks the region and the ACL token, and sets Nomad's headers.
async fn gate(State(sh): Sh, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    // The route's pattern: /v1/job/web/scale counts as /v1/job/:id/scale.
    let mut parts: Vec<&str> = path.split('/').collect();
    if parts.len() > 3 && parts[1] == "v1" && matches!(parts[2], "job" | "node" | "evaluation") {
        parts[3] = ":id";
    }
    let key = format!("{} {}", req.method(), parts.join("/"));
    sh.with(|st| *st.requests.entry(key).or_default() += 1);
    let q = Query::<HashMap<String, String>>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default();
    let token = token(req.headers());
    let denied = match (&sh.opts.acl_token, token) {
        _ if q
            .get("region")
            .is_some_and(|r| !r.is_empty() && r != "global") =>
        {
            Some(err(500, "No path to region"))
        }
        (Some(_), _) if path == "/v1/status/leader" => None,
        (Some(_), None) => Some(err(403, "Permission denied")),
        (Some(want), Some(got)) if *want != got => Some(err(403, "ACL token not found")),
        _ => None,
    };
    let mut resp = match denied {
        Some(e) => e.into_response(),
        None => next.run(req).await,
    };
    if !resp.headers().contains_key("X-Nomad-Index") {
        let index = sh.with(|st| st.index);
        resp.headers_mut()
            .insert("X-Nomad-Index", HeaderValue::from(index));
    }
    let h = resp.headers_mut();
    h.insert("X-Nomad-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Nomad-LastContact", HeaderValue::from_static("0"));
    resp
}

fn token(h: &HeaderMap) -> Option<String> {
    let given = h
        .get("X-Nomad-Token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bearer = || {
        let auth = h.get(header::AUTHORIZATION)?.to_str().ok()?;
        auth.strip_prefix("Bearer ").map(|t| t.trim().to_string())
    };
    given.or_else(bearer).filter(|t| !t.is_empty())
}

async fn leader() -> Json<Value> {
    Json(json!("127.0.0.1:4647"))
}

async fn nodes(State(sh): Sh, Query(q): Q) -> Res {
    let resources = q.get("resources").is_some_and(|r| r == "true");
    read(&sh, &q, |st| {
        Ok(st
            .nodes
            .iter()
            .map(|n| st.node_view(n, resources))
            .collect())
    })
    .await
}

/// `GET /v1/allocations`: the allocations of the namespace (`*`: all), with
/// `AllocatedResources` when `resources=true`.
async fn all_allocations(State(sh): Sh, Query(q): Q) -> Res {
    let ns = namespace(&q);
    let resources = q.get("resources").is_some_and(|r| r == "true");
    read(&sh, &q, |st| {
        Ok(st
            .allocs
            .iter()
            .filter(|a| ns == "*" || a.ns == ns)
            .map(|a| {
                let mut v = st.alloc_stub(a);
                if resources {
                    let tasks: Map<String, Value> = a
                        .tasks
                        .iter()
                        .map(|t| {
                            (
                                t.0.clone(),
                                json!({"Cpu": {"CpuShares": t.1}, "Memory": {"MemoryMB": t.2}}),
                            )
                        })
                        .collect();
                    v["AllocatedResources"] = json!({"Tasks": tasks});
                }
                v
            })
            .collect())
    })
    .await
}

async fn node(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    read(&sh, &q, |st| {
        let n = st
            .nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| err(404, "node not found"))?;
        let mut v = st.node_stub(n);
        v["DrainStrategy"] = if n.drain {
            json!({"Deadline": 0, "IgnoreSystemJobs": false})
        } else {
            Value::Null
        };
        v["NodeResources"] = json!({"Slots": n.slots});
        Ok(v)
    })
    .await
}

async fn jobs(State(sh): Sh, Query(q): Q) -> Res {
    let (ns, meta) = (namespace(&q), q.get("meta").is_some_and(|m| m == "true"));
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    read(&sh, &q, |st| {
        let wanted = |k: &&Key| (ns == "*" || k.0 == ns) && k.1.starts_with(&prefix);
        let keys = st.jobs.keys().filter(wanted);
        Ok(keys
            .map(|k| st.job_stub(k, &st.jobs[k].spec, meta))
            .collect())
    })
    .await
}

async fn register(State(sh): Sh, Query(q): Q, body: Bytes) -> Res {
    let mut body = body_json(&body)?;
    let job = body
        .get_mut("Job")
        .map(Value::take)
        .filter(|j| !j.is_null());
    let job = job.ok_or_else(|| err(400, "Job must be specified"))?;
    sh.with(|st| st.register(job, &namespace(&q))).map(written)
}

async fn update(State(sh): Sh, Path(id): Path<String>, Query(q): Q, body: Bytes) -> Res {
    let mut body = body_json(&body)?;
    let job = body
        .get_mut("Job")
        .map(Value::take)
        .filter(|j| !j.is_null());
    let job = job.ok_or_else(|| err(400, "Job must be specified"))?;
    if str_of(&job, "ID") != id {
        return Err(err(400, "Job ID does not match name"));
    }
    sh.with(|st| st.register(job, &namespace(&q))).map(written)
}

async fn job(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    let key = (namespace(&q), id);
    read(&sh, &q, |st| {
        st.job_view(&key).ok_or_else(|| err(404, "job not found"))
    })
    .await
}

async fn deregister(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    let purge = q.get("purge").is_some_and(|p| p == "true");
    let key = (namespace(&q), id);
    sh.with(|st| st.deregister(&key, purge)).map(written)
}

async fn scale_status(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    let key = (namespace(&q), id);
    read(&sh, &q, |st| {
        st.scale_status(&key)
            .ok_or_else(|| err(404, "job not found"))
    })
    .await
}

async fn scale(State(sh): Sh, Path(id): Path<String>, Query(q): Q, body: Bytes) -> Res {
    let body = body_json(&body)?;
    sh.with(|st| st.scale(&namespace(&q), &id, body))
        .map(written)
}

async fn allocations(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    let key = (namespace(&q), id);
    read(&sh, &q, |st| {
        Ok(st
            .allocs
            .iter()
            .filter(|a| a.of(&key))
            .map(|a| st.alloc_stub(a))
            .collect())
    })
    .await
}

async fn evaluations(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    let key = (namespace(&q), id);
    read(&sh, &q, |st| {
        let mine = st.evals.iter().filter(|e| e.ns == key.0 && e.job == key.1);
        Ok(mine.map(|e| st.eval_view(e)).collect())
    })
    .await
}

async fn evaluation(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    read(&sh, &q, |st| {
        let e = st
            .evals
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| err(404, "eval not found"))?;
        Ok(st.eval_view(e))
    })
    .await
}

async fn deployment(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    let key = (namespace(&q), id);
    read(&sh, &q, |st| {
        Ok(st
            .latest_deployment(&key)
            .map_or(Value::Null, |d| st.deployment_view(d)))
    })
    .await
}

async fn deployments(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    let key = (namespace(&q), id);
    read(&sh, &q, |st| {
        let mine = st
            .deployments
            .iter()
            .rev()
            .filter(|d| d.ns == key.0 && d.job == key.1);
        Ok(mine.map(|d| st.deployment_view(d)).collect())
    })
    .await
}

async fn summary(State(sh): Sh, Path(id): Path<String>, Query(q): Q) -> Res {
    let key = (namespace(&q), id);
    read(&sh, &q, |st| {
        let rec = st.jobs.get(&key).ok_or_else(|| err(404, "job not found"))?;
        Ok(st.summary(&key, &rec.spec))
    })
    .await
}

fn router(sh: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/status/leader", get(leader))
        .route("/v1/nodes", get(nodes))
        .route("/v1/allocations", get(all_allocations))
        .route("/v1/node/{id}", get(node))
        .route("/v1/jobs", get(jobs).post(register).put(register))
        .route(
            "/v1/job/{id}",
            get(job).post(update).put(update).delete(deregister),
        )
        .route(
            "/v1/job/{id}/scale",
            get(scale_status).post(scale).put(scale),
        )
        .route("/v1/job/{id}/allocations", get(allocations))
        .route("/v1/job/{id}/evaluations", get(evaluations))
        .route("/v1/job/{id}/deployment", get(deployment))
        .route("/v1/job/{id}/deployments", get(deployments))
        .route("/v1/job/{id}/summary", get(summary))
        .route("/v1/evaluation/{id}", get(evaluation))
        .method_not_allowed_fallback(|| async { err(405, "Invalid method") })
        .fallback(|| async { err(404, "Invalid URL") })
        .layer(middleware::from_fn_with_state(sh.clone(), gate))
        .with_state(sh)
}

/// A job of someone else: no microscaler meta, a label-like meta and an env of its own that
/// every scale must leave alone. `deployments` false turns them off (`MaxParallel: 0`).
pub fn plain_job(id: &str, count: u32, deployments: bool) -> Value {
    let update = if deployments {
        json!({"MaxParallel": 1, "MinHealthyTime": 0})
    } else {
        json!({"MaxParallel": 0})
    };
    json!({
        "ID": id, "Name": id, "Type": "service", "Datacenters": ["dc1"],
        "Meta": {"team": "payments"},
        "TaskGroups": [{
            "Name": "web", "Count": count, "Update": update,
            "Tasks": [{"Name": "web", "Driver": "docker", "Config": {"image": "shop:1"}, "Env": {"OWNER": "someone-else"}}],
        }],
    })
}

impl NomadFake {
    /// Binds 127.0.0.1:0, serves, starts the placement loop; both stop when the last clone is
    /// dropped (or on [`NomadFake::stop`]).
    pub async fn start(opts: NomadOptions) -> NomadFake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("a local address");
        let seed = now_ns() as u64 | 1;
        let state = St {
            index: 1,
            dirty: false,
            opts: opts.clone(),
            rng: seed,
            nodes: Vec::new(),
            jobs: BTreeMap::new(),
            allocs: Vec::new(),
            evals: Vec::new(),
            deployments: Vec::new(),
            scale_requests: Vec::new(),
            requests: BTreeMap::new(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            index: watch::Sender::new(1),
            shutdown: watch::Sender::new(false),
            opts,
        });
        let mut stop = shared.shutdown.subscribe();
        let app = router(shared.clone());
        tokio::spawn(async move {
            let shutdown = async move { _ = stop.wait_for(|s| *s).await };
            _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await;
        });
        let (sh, mut stop) = (shared.clone(), shared.shutdown.subscribe());
        tokio::spawn(async move {
            let mut every =
                tokio::time::interval(sh.opts.place_interval.max(Duration::from_millis(1)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => sh.with(|st| st.tick(Instant::now())),
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        });
        NomadFake(Arc::new(Handle { shared, addr }))
    }

    fn with<R>(&self, f: impl FnOnce(&mut St) -> R) -> R {
        self.0.shared.with(f)
    }

    /// "http://127.0.0.1:PORT"
    pub fn address(&self) -> String {
        format!("http://{}", self.0.addr)
    }

    /// Adds a ready, eligible node in datacenter "dc1" with room for `slots` allocations. The
    /// fake models capacity as slots per node (allocations of any job), not CPU, memory or
    /// ports. Returns its ID (a UUID-like string, distinct from the name).
    pub fn add_node(&self, name: &str, slots: u32) -> String {
        self.add_node_sized(name, slots, 0, 0)
    }

    /// Adds a ready node with `slots`, `cpu_mhz` MHz and `memory_mb` MB (0: not counted).
    pub fn add_node_sized(&self, name: &str, slots: u32, cpu_mhz: u64, memory_mb: u64) -> String {
        self.with(|st| {
            let (idx, id) = (st.idx(), st.uuid());
            let (down, drain, eligible) = (false, false, true);
            let (name, create_index, modify_index) = (name.to_string(), idx, idx);
            st.nodes.push(Node {
                id: id.clone(),
                name,
                slots,
                cpu_mhz,
                memory_mb,
                down,
                drain,
                eligible,
                create_index,
                modify_index,
            });
            id
        })
    }

    /// Status "down": its live allocations become DesiredStatus "stop", ClientStatus "lost"
    /// and their jobs get a "node-update" evaluation (replacements elsewhere if there is room,
    /// else a blocked eval). `down: false` brings it back "ready", empty.
    pub fn set_node_down(&self, id: &str, down: bool) {
        self.with(|st| {
            let Some(n) = st.node_pos(id) else { return };
            let idx = st.idx();
            (st.nodes[n].down, st.nodes[n].modify_index) = (down, idx);
            if down {
                st.evacuate(n, "lost", "node-update");
            }
        })
    }

    /// Drain on: Drain=true, SchedulingEligibility "ineligible"; its allocations are stopped
    /// (DesiredStatus "stop", ClientStatus "complete") and replaced elsewhere ("node-drain"
    /// evals). Drain off: eligible again, Drain=false.
    pub fn drain_node(&self, id: &str, drain: bool) {
        self.with(|st| {
            let Some(n) = st.node_pos(id) else { return };
            let idx = st.idx();
            let node = &mut st.nodes[n];
            (node.drain, node.eligible, node.modify_index) = (drain, !drain, idx);
            if drain {
                st.evacuate(n, "complete", "node-drain");
            }
        })
    }

    /// Removes a node entirely (its allocations lost as for down).
    pub fn remove_node(&self, id: &str) {
        self.with(|st| {
            let Some(n) = st.node_pos(id) else { return };
            st.evacuate(n, "lost", "node-update");
            st.nodes.remove(n);
        })
    }

    /// Registers a job as POST /v1/jobs would (same code path), in its `Namespace` or
    /// "default". `job` is the Job object (not wrapped in {"Job":..}). Panics if Nomad would
    /// reject it.
    pub fn register(&self, job: Value) {
        if let Err(ApiErr(code, msg)) = self.with(|st| st.register(job, "default")) {
            panic!("register: {code} {msg}");
        }
    }

    /// The job as GET /v1/job/:id returns it; None if absent (or purged). Looks in namespace
    /// "default" first, then in any namespace.
    pub fn job(&self, id: &str) -> Option<Value> {
        self.with(|st| st.find(id).and_then(|k| st.job_view(&k)))
    }

    /// Stops and removes a job as DELETE /v1/job/:id?purge=true would (same code path); does
    /// nothing if there is no such job.
    pub fn purge(&self, id: &str) {
        self.with(|st| {
            if let Some(key) = st.find(id) {
                _ = st.deregister(&key, true);
            }
        })
    }

    /// The bodies of every accepted POST/PUT /v1/job/:id/scale, in order.
    pub fn scale_requests(&self) -> Vec<Value> {
        self.with(|st| st.scale_requests.clone())
    }

    /// Running allocations (ClientStatus running, DesiredStatus run) of job/group.
    pub fn running(&self, job: &str, group: &str) -> u32 {
        self.with(|st| {
            let Some(key) = st.find(job) else { return 0 };
            let running = |a: &&Alloc| {
                a.of(&key) && a.group == group && a.desired == "run" && a.client == "running"
            };
            st.allocs.iter().filter(running).count() as u32
        })
    }

    /// Starts a deployment of `job`'s current version by hand (as a job update would), status
    /// "running", which then completes as any other. Returns its ID. Panics if there is no
    /// such job.
    pub fn start_deployment(&self, job: &str) -> String {
        self.with(|st| {
            let key = st
                .find(job)
                .unwrap_or_else(|| panic!("start_deployment: no job {job:?}"));
            st.start_deployment(&key)
        })
    }

    /// Count of HTTP requests served so far per method and path pattern, e.g.
    /// "GET /v1/job/:id/allocations" (any path under /v1/job/, /v1/node/ or /v1/evaluation/ has
    /// its third segment counted as ":id").
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.with(|st| st.requests.clone())
    }

    /// Stops the server (once in-flight requests end; blocking queries return at once) and
    /// the placement loop.
    pub fn stop(&self) {
        self.0.shared.shutdown.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::Method;

    fn opts() -> NomadOptions {
        NomadOptions {
            start_delay: Duration::from_millis(20),
            min_healthy: Duration::from_millis(60),
            ..NomadOptions::default()
        }
    }

    /// A service job with one group "g"; `deploy: false` disables deployments.
    fn job(id: &str, count: u32, deploy: bool) -> Value {
        let update = if deploy {
            Value::Null
        } else {
            json!({"MaxParallel": 0})
        };
        json!({"ID": id, "TaskGroups": [{"Name": "g", "Count": count, "Update": update,
            "Tasks": [{"Name": "t", "Driver": "docker"}]}]})
    }

    struct Client {
        http: reqwest::Client,
        base: String,
        token: Option<String>,
    }

    struct Reply {
        code: u16,
        index: u64,
        text: String,
        content_type: String,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
        }
    }

    impl Client {
        fn new(fake: &NomadFake) -> Client {
            let (http, base) = (reqwest::Client::new(), fake.address());
            Client {
                http,
                base,
                token: None,
            }
        }

        async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
            let mut req = self.http.request(method, format!("{}{path}", self.base));
            if let Some(t) = &self.token {
                req = req.header("X-Nomad-Token", t);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.expect("the fake answers");
            let header = |h: &str| {
                resp.headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let (index, content_type) = (
                header("X-Nomad-Index").parse().unwrap_or(0),
                header("content-type"),
            );
            let code = resp.status().as_u16();
            Reply {
                code,
                index,
                content_type,
                text: resp.text().await.unwrap_or_default(),
            }
        }

        async fn get(&self, path: &str) -> Value {
            let r = self.call(Method::GET, path, None).await;
            assert_eq!(r.code, 200, "GET {path}: {}", r.text);
            r.json()
        }

        async fn scale(&self, job: &str, body: Value) -> Reply {
            self.call(Method::PUT, &format!("/v1/job/{job}/scale"), Some(body))
                .await
        }

        /// GETs `path` until `check` holds (5 s at most).
        async fn until(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let v = self.get(path).await;
                if check(&v) {
                    return v;
                }
                assert!(Instant::now() < deadline, "timed out on {path}: {v}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn error(r: &Reply, code: u16, text: &str) {
        assert_eq!((r.code, r.text.as_str()), (code, text));
        assert!(
            r.content_type.starts_with("text/plain"),
            "{}",
            r.content_type
        );
    }

    #[tokio::test]
    async fn register_places_and_runs() {
        let fake = NomadFake::start(opts()).await;
        let c = Client::new(&fake);
        assert_eq!(c.get("/v1/status/leader").await, json!("127.0.0.1:4647"));
        fake.add_node("n1", 4);
        let r = c
            .call(
                Method::POST,
                "/v1/jobs",
                Some(json!({"Job": job("web", 2, false)})),
            )
            .await;
        assert_eq!(r.code, 200, "{}", r.text);
        let eval = r.json()["EvalID"].as_str().unwrap().to_string();
        assert_eq!(fake.running("web", "g"), 0, "placement is asynchronous");
        until("2 running", || fake.running("web", "g") == 2).await;
        let j = c.get("/v1/job/web").await;
        assert_eq!(
            (&j["Status"], &j["Version"], &j["Type"]),
            (&json!("running"), &json!(0), &json!("service"))
        );
        assert_eq!(
            (&j["Namespace"], &j["TaskGroups"][0]["Count"]),
            (&json!("default"), &json!(2))
        );
        assert_eq!(fake.job("web").unwrap()["ID"], "web");
        let allocs = c.get("/v1/job/web/allocations").await;
        let names: Vec<&str> = allocs
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["Name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web.g[0]", "web.g[1]"]);
        assert!(allocs
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["ClientStatus"] == "running"));
        let e = c.get(&format!("/v1/evaluation/{eval}")).await;
        assert_eq!(
            (&e["Status"], &e["FailedTGAllocs"], &e["BlockedEval"]),
            (&json!("complete"), &Value::Null, &json!(""))
        );
        assert_eq!(
            c.get("/v1/job/web/summary").await["Summary"]["g"]["Running"],
            2
        );
        let stubs = c.get("/v1/jobs?meta=true").await;
        assert_eq!(
            (&stubs[0]["ID"], &stubs[0]["Meta"]),
            (&json!("web"), &Value::Null)
        );
        assert_eq!(c.get("/v1/nodes").await[0]["Status"], "ready");

        error(
            &c.call(Method::GET, "/v1/job/nope", None).await,
            404,
            "job not found",
        );
        error(
            &c.call(Method::GET, "/v1/job/web?namespace=other", None)
                .await,
            404,
            "job not found",
        );
        error(
            &c.call(Method::GET, "/v1/evaluation/nope", None).await,
            404,
            "eval not found",
        );
        error(
            &c.call(Method::GET, "/v1/jobs?region=eu", None).await,
            500,
            "No path to region",
        );
        error(
            &c.call(Method::GET, "/v1/bogus", None).await,
            404,
            "Invalid URL",
        );
        assert_eq!(c.get("/v1/job/nope/allocations").await, json!([]));
        assert_eq!(c.get("/v1/job/nope/deployment").await, Value::Null);
    }

    #[tokio::test]
    async fn no_room_blocks_until_a_node_joins() {
        let fake = NomadFake::start(opts()).await;
        let c = Client::new(&fake);
        fake.add_node("n1", 2);
        fake.register(job("api", 1, false));
        until("1 running", || fake.running("api", "g") == 1).await;
        let r = c
            .scale(
                "api",
                json!({"Count": 4, "Target": {"Group": "g"}, "Message": "up", "Error": false}),
            )
            .await;
        assert_eq!(r.code, 200, "{}", r.text);
        let eval = r.json()["EvalID"].as_str().unwrap().to_string();
        assert_eq!(
            c.get("/v1/job/api/scale").await["TaskGroups"]["g"]["Desired"],
            4,
            "Desired changes at once"
        );
        let e = c
            .until(&format!("/v1/evaluation/{eval}"), |e| {
                e["Status"] == "complete"
            })
            .await;
        assert_eq!(e["TriggeredBy"], "job-scaling");
        assert!(e["FailedTGAllocs"]["g"].is_object(), "{e}");
        let blocked = e["BlockedEval"].as_str().unwrap().to_string();
        let b = c.get(&format!("/v1/evaluation/{blocked}")).await;
        assert_eq!(
            (&b["Status"], &b["TriggeredBy"]),
            (&json!("blocked"), &json!("queued-allocs"))
        );
        assert_eq!(b["QueuedAllocations"], json!({"g": 2}));
        until("2 running", || fake.running("api", "g") == 2).await;
        let s = c.get("/v1/job/api/scale").await["TaskGroups"]["g"].clone();
        assert_eq!(
            (&s["Desired"], &s["Placed"], &s["Running"]),
            (&json!(4), &json!(2), &json!(2))
        );
        assert_eq!(
            c.get("/v1/job/api/summary").await["Summary"]["g"]["Queued"],
            2
        );

        fake.add_node("n2", 2);
        until("4 running", || fake.running("api", "g") == 4).await;
        c.until(&format!("/v1/evaluation/{blocked}"), |b| {
            b["Status"] == "complete"
        })
        .await;
        let s = c.get("/v1/job/api/scale").await["TaskGroups"]["g"].clone();
        assert_eq!(
            (&s["Events"][0]["Message"], &s["Events"][0]["PreviousCount"]),
            (&json!("up"), &json!(1))
        );
        assert_eq!(fake.scale_requests().len(), 1);
        assert_eq!(fake.job("api").unwrap()["Version"], 1);
    }

    #[tokio::test]
    async fn blocking_queries_wait_for_a_change_or_time_out() {
        let fake = NomadFake::start(opts()).await;
        let c = Client::new(&fake);
        fake.add_node("n1", 4);
        fake.register(job("b", 1, false));
        until("1 running", || fake.running("b", "g") == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let index = c
            .call(Method::GET, "/v1/job/b/allocations", None)
            .await
            .index;
        assert!(index > 1);

        let start = Instant::now();
        let r = c
            .call(
                Method::GET,
                &format!("/v1/job/b/allocations?index={index}&wait=300ms"),
                None,
            )
            .await;
        assert!(
            start.elapsed() >= Duration::from_millis(290),
            "{:?}",
            start.elapsed()
        );
        assert_eq!((r.code, r.index), (200, index));

        let path = format!(
            "{}/v1/job/b/allocations?index={index}&wait=1m",
            fake.address()
        );
        let waiting = tokio::spawn(async move {
            let resp = reqwest::get(path).await.unwrap();
            let index = resp.headers()["X-Nomad-Index"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap();
            (Instant::now(), index)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "returned before any change");
        let scaled = Instant::now();
        assert_eq!(
            c.scale("b", json!({"Count": 2, "Target": {"Group": "g"}}))
                .await
                .code,
            200
        );
        let (woke, new_index) = waiting.await.unwrap();
        assert!(woke.duration_since(scaled) < Duration::from_secs(2));
        assert!(new_index > index);

        error(
            &c.call(Method::GET, "/v1/job/b?index=1&wait=soon", None)
                .await,
            400,
            "Invalid wait time",
        );
        error(
            &c.call(Method::GET, "/v1/job/b?index=x", None).await,
            400,
            "Invalid index",
        );
        assert!(fake.requests()["GET /v1/job/:id/allocations"] >= 3);
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("300000ms"), Some(Duration::from_secs(300)));
        assert_eq!(go_duration("5"), None);
    }

    #[tokio::test]
    async fn acl_token_is_required() {
        let acl_token = Some("secret".to_string());
        let fake = NomadFake::start(NomadOptions {
            acl_token,
            ..opts()
        })
        .await;
        let mut c = Client::new(&fake);
        assert_eq!(c.get("/v1/status/leader").await, json!("127.0.0.1:4647"));
        error(
            &c.call(Method::GET, "/v1/jobs", None).await,
            403,
            "Permission denied",
        );
        c.token = Some("wrong".into());
        error(
            &c.call(Method::GET, "/v1/jobs", None).await,
            403,
            "ACL token not found",
        );
        c.token = Some("secret".into());
        assert_eq!(c.get("/v1/jobs").await, json!([]));
        let bearer = c
            .http
            .get(format!("{}/v1/nodes", c.base))
            .bearer_auth("secret")
            .send()
            .await
            .unwrap();
        assert_eq!(bearer.status().as_u16(), 200);
    }

    #[tokio::test]
    async fn deployments_lock_scaling_and_validation_texts() {
        let fake = NomadFake::start(opts()).await;
        let c = Client::new(&fake);
        fake.add_node("n1", 10);
        let mut j = job("d", 1, true);
        j["TaskGroups"][0]["Scaling"] = json!({"Min": 1, "Max": 5, "Enabled": true});
        fake.register(j);
        assert_eq!(c.get("/v1/job/d/deployment").await["Status"], "running");
        let up = |n: i64| json!({"Count": n, "Target": {"Group": "g"}, "Message": "m"});
        let locked = "job scaling blocked due to active deployment";
        error(&c.scale("d", up(2)).await, 400, locked);
        error(
            &c.scale("d", up(-1)).await,
            400,
            "scaling action count can't be negative",
        );
        let other = json!({"Count": 2, "Target": {"Group": "g", "Job": "x"}});
        error(
            &c.scale("d", other).await,
            400,
            "job ID in payload did not match URL",
        );
        error(&c.scale("nope", up(2)).await, 404, "job \"nope\" not found");
        let bad_group = json!({"Count": 2, "Target": {"Group": "h"}});
        error(
            &c.scale("d", bad_group).await,
            400,
            "task group \"h\" specified for scaling does not exist in job",
        );
        error(
            &c.scale("d", up(9)).await,
            400,
            "group count was greater than scaling policy maximum: 9 > 5",
        );
        error(
            &c.scale("d", up(0)).await,
            400,
            "group count was less than scaling policy minimum: 0 < 1",
        );

        c.until("/v1/job/d/deployment", |d| d["Status"] == "successful")
            .await;
        let allocs = c.get("/v1/job/d/allocations").await;
        assert_eq!(allocs[0]["DeploymentStatus"]["Healthy"], true);
        let r = c.scale("d", up(2)).await;
        assert_eq!(r.code, 200, "{}", r.text);
        let d = c.get("/v1/job/d/deployment").await;
        assert_eq!(
            (&d["Status"], &d["JobVersion"]),
            (&json!("running"), &json!(1))
        );
        assert_eq!(d["TaskGroups"]["g"]["DesiredTotal"], 2);
        error(&c.scale("d", up(3)).await, 400, locked);
        let d = c
            .until("/v1/job/d/deployment", |d| d["Status"] == "successful")
            .await;
        assert_eq!(d["TaskGroups"]["g"]["HealthyAllocs"], 2);
        assert_eq!(fake.running("d", "g"), 2);
        assert_eq!(
            c.get("/v1/job/d/scale").await["TaskGroups"]["g"]["Healthy"],
            2
        );

        let event_only = c
            .scale(
                "d",
                json!({"Count": null, "Target": {"Group": "g"}, "Message": "note"}),
            )
            .await;
        assert_eq!(event_only.json()["EvalID"], "");
        let events = c.get("/v1/job/d/scale").await["TaskGroups"]["g"]["Events"].clone();
        assert_eq!(
            events.as_array().unwrap().len(),
            2,
            "rejected requests record no event: {events}"
        );
        assert_eq!(
            (&events[0]["Message"], &events[0]["Count"]),
            (&json!("note"), &Value::Null)
        );
        assert_eq!(fake.scale_requests().len(), 2);

        let by_hand = fake.start_deployment("d");
        assert_eq!(c.get("/v1/job/d/deployment").await["ID"], json!(by_hand));
        error(&c.scale("d", up(3)).await, 400, locked);
        c.until("/v1/job/d/deployment", |d| d["Status"] == "successful")
            .await;
    }

    #[tokio::test]
    async fn drain_and_node_down_move_allocations() {
        let fake = NomadFake::start(opts()).await;
        let c = Client::new(&fake);
        let a = fake.add_node("a", 2);
        let b = fake.add_node("b", 2);
        assert_ne!(a, "a");
        fake.register(job("m", 2, false));
        until("2 running", || fake.running("m", "g") == 2).await;
        let on = |allocs: &Value, node: &str, status: &str| {
            let all = allocs.as_array().unwrap().iter();
            all.filter(|x| x["NodeID"] == node && x["ClientStatus"] == status)
                .count()
        };
        assert_eq!(
            on(&c.get("/v1/job/m/allocations").await, &a, "running"),
            1,
            "spread"
        );

        fake.drain_node(&a, true);
        let allocs = c.get("/v1/job/m/allocations").await;
        assert_eq!(on(&allocs, &a, "complete"), 1);
        let nodes = c.get("/v1/nodes").await;
        assert_eq!(
            (&nodes[0]["Drain"], &nodes[0]["SchedulingEligibility"]),
            (&json!(true), &json!("ineligible"))
        );
        c.until("/v1/job/m/allocations", |al| on(al, &b, "running") == 2)
            .await;

        fake.set_node_down(&b, true);
        assert_eq!(fake.running("m", "g"), 0);
        let allocs = c.get("/v1/job/m/allocations").await;
        assert_eq!(on(&allocs, &b, "lost"), 2);
        assert_eq!(c.get("/v1/nodes").await[1]["Status"], "down");
        let blocked = |evals: &Value| {
            let q = evals
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["Status"] == "blocked");
            q.map(|e| e["QueuedAllocations"]["g"].clone())
        };
        let evals = c
            .until("/v1/job/m/evaluations", |e| blocked(e).is_some())
            .await;
        assert_eq!(blocked(&evals), Some(json!(2)));

        fake.drain_node(&a, false);
        c.until("/v1/job/m/allocations", |al| on(al, &a, "running") == 2)
            .await;
        c.until("/v1/job/m/evaluations", |e| blocked(e).is_none())
            .await;
        fake.set_node_down(&b, false);
        fake.remove_node(&a);
        until("replaced on b", || fake.running("m", "g") == 2).await;
        assert_eq!(c.get("/v1/nodes").await.as_array().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn system_jobs_and_deregistration() {
        let fake = NomadFake::start(opts()).await;
        let c = Client::new(&fake);
        fake.add_node("a", 1);
        fake.add_node("b", 1);
        let mut sys = job("s", 1, true);
        sys["Type"] = json!("system");
        fake.register(sys);
        until("one per node", || fake.running("s", "g") == 2).await;
        fake.add_node("c", 1);
        until("one on the new node", || fake.running("s", "g") == 3).await;
        let r = c
            .scale("s", json!({"Count": 2, "Target": {"Group": "g"}}))
            .await;
        error(
            &r,
            400,
            "jobs of type \"system\" can only be scaled between 0 and 1",
        );

        let r = c.call(Method::DELETE, "/v1/job/s", None).await;
        assert_eq!(r.code, 200, "{}", r.text);
        assert_eq!(fake.job("s").unwrap()["Status"], "dead");
        assert_eq!(c.get("/v1/job/s/scale").await["JobStopped"], true);
        until("stopped", || fake.running("s", "g") == 0).await;
        assert_eq!(
            c.call(Method::DELETE, "/v1/job/s?purge=true", None)
                .await
                .code,
            200
        );
        assert!(fake.job("s").is_none());
        fake.register(job("p", 1, false));
        fake.purge("p");
        assert!(fake.job("p").is_none());
        error(
            &c.call(Method::DELETE, "/v1/job/s", None).await,
            404,
            "job not found",
        );
        error(
            &c.call(Method::PATCH, "/v1/job/s", None).await,
            405,
            "Invalid method",
        );
        fake.stop();
    }
}
