//! Docker Swarm backend (service-level): microscaler sets each Swarm service's replica count
//! and Swarm places the tasks.
//!
//! - Each microscaler service is one Swarm service named `{instance}-{service}`, labelled with
//!   [`labels::INSTANCE`] and [`labels::SERVICE`]. Only Swarm services carrying both labels with
//!   this instance's value are ever listed, updated or removed; every other Swarm service is left
//!   alone, even one that happens to have the same name (that is reported as an error).
//! - Triggered and remainder services run in *replicated* mode (created with 0 replicas);
//!   per-host services run in *global* mode, so Swarm itself keeps one task on every node and
//!   [`Backend::scale`] is a no-op for them.
//! - Existing labelled Swarm services are adopted as they are: their replica count is kept and
//!   only the fields microscaler owns in the task template (image, command, environment,
//!   container labels, stop grace period, network) are brought back to the configuration.
//! - A service with `[services.reference] service = "name"` stands for an existing Swarm
//!   service (deployed by a stack, by hand, by another tool). microscaler sets only its replica
//!   count (reading the service and writing it back at its version, as `docker service scale`
//!   does), counts its tasks, and never creates it, changes anything else in it, or removes it,
//!   whatever `on_exit` says. A per-host service may reference a global-mode one (counted,
//!   never scaled); any other service needs a replicated one.
//! - No registry is assumed. The built-in replica image is imported on the manager's engine and
//!   tasks refer to it by image ID, which tells Swarm's executor not to try a pull. A configured
//!   image that exists on the manager but has no registry digest (built or imported locally) is
//!   pinned by ID for the same reason; any other image is passed as written (API >= 1.30 never
//!   resolves it on the manager; workers pull it and fall back to a local copy).
//!
//! Limits, said plainly: the built-in image is only imported on the engine microscaler talks to,
//! so on a multi-node swarm set `run.image` to an image every node has (or import the built-in
//! one on each node). Swarm keeps up to `task-history-limit` (default 5) exited tasks per slot,
//! with their stopped containers, when tasks fail and restart; that is a swarm-wide setting
//! (`docker swarm update --task-history-limit`) microscaler does not change. Scaling down removes
//! the tasks of removed slots together with their containers.
//!
//! In an [`Observation`], hosts are the swarm's nodes (`id` = node ID) and a [`Replica`]'s
//! `host` is the node ID of its task (empty while the task is not assigned yet). With capacity
//! counted in resources ([`SwarmBackend::count_resources`]) a host's CPUs and memory are its
//! node's less what the tasks of other Swarm services reserve there.
//!
//! Node events: once the control loop gives its waker ([`Backend::wake_on_change`]), a task
//! follows the manager's event stream filtered on `type=node` and rings the waker on every node
//! `create`, `update` (drained, activated, down, ready, ...) and `remove`, so a node that joins,
//! leaves or changes is acted on at once rather than at the next tick. After an error or the end
//! of the stream it waits (0.5 s, doubling to 30 s), checks the engine answers, rings the waker
//! once (what happened meanwhile is observed) and subscribes again from the last event it saw.
//! The per-tick observation stays the safety net. The task ends when the backend is dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::models::{
    EventMessage, EventMessageTypeEnum, Limit, LocalNodeState, NetworkAttachmentConfig, Node,
    NodeSpecAvailabilityEnum, NodeState, ResourceObject, Service as SwarmService, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, ServiceUpdateStatusStateEnum, SwarmInfo, Task,
    TaskSpec, TaskSpecContainerSpec, TaskSpecResources, TaskState,
};
use bollard::query_parameters::{
    EventsOptions, InspectNetworkOptions, InspectServiceOptions, ListNodesOptions,
    ListServicesOptions, ListTasksOptions, UpdateServiceOptions,
};
use bollard::Docker;
use futures::StreamExt;
use microscaler_core::plugin::{Capabilities, ServiceContext, StopCompletion};
use microscaler_core::validate::join;
use microscaler_core::{Host, ServiceKind, ServiceName, ServiceObservation, Validator};
use serde::Deserialize;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::{Reference, RunSpec, Service, Workload};
use crate::docker_api;
use crate::{
    labels, managed, Apply, Backend, BackendError, Observation, Replica, ReplicaState, ScaleOutcome,
};

// ---------------------------------------------------------------------------------------------
// Configuration: `[backend] type = "swarm"` and what a service gives it.

/// `[backend] type = "swarm"`: a Docker Swarm, through one of its managers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SwarmConfig {
    /// Address of a manager's engine; `None` means `DOCKER_HOST` or the default socket.
    pub host: Option<String>,
    /// Network the services' tasks attach to; `None` means Swarm's default (ingress-less, no
    /// published ports).
    pub network: Option<String>,
}

#[derive(Deserialize)]
struct RawSwarm {
    host: Option<String>,
    network: Option<String>,
}

/// What the swarm backend can do: Swarm keeps per-host services itself (global mode), has no
/// pause, reports its nodes' CPUs and memory, stops tasks after the update returns, and a
/// service may reference an existing Swarm service.
pub const CAPABILITIES: Capabilities = Capabilities {
    native_per_host: true,
    pause: false,
    host_resources: true,
    stops: StopCompletion::Converges,
    references: true,
};

impl SwarmConfig {
    /// Validates the `[backend]` section (without `type`) at `path`.
    pub fn validate(options: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawSwarm = v.part(options, path)?;
        Some(SwarmConfig {
            host: r.host,
            network: r.network,
        })
    }

    /// Validates a service's own keys for this backend: `image`, `command`, `env` and `init`,
    /// or a `[services.reference]` naming an existing Swarm service.
    pub fn workload(
        mut options: toml::Table,
        _: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Workload> {
        let init = RunSpec::take_init(&mut options, v, path);
        match Workload::managed_or_reference(options, v, path, |table, v, path| {
            SwarmReference::validate(table, v, path).map(Reference::Swarm)
        })? {
            Workload::Managed(mut run) => {
                run.init = init.unwrap_or(false);
                Some(Workload::Managed(run))
            }
            reference => {
                if init.is_some() {
                    v.err(
                        join(path, "init"),
                        "a service with [services.reference] runs what the referenced object \
                         runs; remove this key",
                    );
                }
                Some(reference)
            }
        }
    }
}

/// `[services.reference]` on the swarm backend: a Swarm service that exists already (created
/// by a stack, by hand, by another tool). microscaler sets its replica count (or, for a
/// per-host service, only counts its global tasks) and never creates, updates otherwise or
/// removes it, whatever `on_exit` says.
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmReference {
    /// The Swarm service's name (as `docker service ls` shows it).
    pub service: String,
}

#[derive(Deserialize)]
struct RawReference {
    service: Option<String>,
}

impl SwarmReference {
    /// Validates the reference table at `path` (`services[0].reference`).
    pub fn validate(table: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawReference = v.part(table, path)?;
        let service = v.need(
            r.service,
            path,
            "service",
            "the name of an existing Swarm service",
        );
        if !service.is_empty()
            && (service.len() > MAX_NAME
                || !service
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        {
            v.err(
                join(path, "service"),
                format!(
                    "{service:?} is not a Swarm service name (letters, digits, '-', '_' and '.', \
                     at most {MAX_NAME} characters)"
                ),
            );
        }
        Some(SwarmReference { service })
    }
}

/// Service label holding the image as configured (`built-in` for the built-in replica), since
/// the task template may refer to the image by its ID.
pub const IMAGE_LABEL: &str = "io.microscaler.image";

/// Value of [`IMAGE_LABEL`] for the built-in replica image.
const BUILT_IN: &str = "built-in";

/// Longest Swarm service name (a DNS label).
const MAX_NAME: usize = 63;

/// The Docker Swarm backend: one Swarm service per microscaler service.
pub struct SwarmBackend {
    docker: Docker,
    /// The engine address, for messages.
    address: String,
    instance: String,
    network: Option<String>,
    /// The Swarm services referenced with `[services.reference]`, by name, with the service
    /// each stands for. Set by `prepare`; never held across an await.
    references: std::sync::RwLock<BTreeMap<String, ServiceName>>,
    /// The manager's node events, followed once the control loop gives its waker.
    node_events: NodeEvents,
    /// Capacity is counted in CPU and memory ([`SwarmBackend::count_resources`]).
    resources: bool,
}

/// Following the manager's node events: the waker they ring, how many were seen, the task.
#[derive(Default)]
struct NodeEvents {
    /// The control loop's waker (the latest given).
    waker: Arc<Mutex<Option<Arc<Notify>>>>,
    /// Node changes read from the stream so far.
    seen: Arc<AtomicU64>,
    /// The task following the stream, started by the first `wake_on_change`.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for NodeEvents {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

/// The first wait before subscribing again after the event stream failed or ended.
const EVENTS_FIRST_WAIT: Duration = Duration::from_millis(500);
/// The longest wait between two attempts.
const EVENTS_MAX_WAIT: Duration = Duration::from_secs(30);

/// The wait after `wait`: twice as long, at most [`EVENTS_MAX_WAIT`].
fn next_wait(wait: Duration) -> Duration {
    (wait * 2).min(EVENTS_MAX_WAIT)
}

/// Whether `e` says a swarm node was created, updated (availability, state, role, labels) or
/// removed: what changes the hosts microscaler counts.
fn is_node_change(e: &EventMessage) -> bool {
    e.typ == Some(EventMessageTypeEnum::NODE)
        && matches!(e.action.as_deref(), Some("create" | "update" | "remove"))
}

/// Where to subscribe again after `e`: just after it (the engine's `since` takes
/// `seconds.nanoseconds`).
fn resume_after(e: &EventMessage) -> Option<String> {
    let nanos = e
        .time_nano
        .or_else(|| e.time.map(|t| t.saturating_mul(1_000_000_000)))?
        .checked_add(1)?;
    Some(format!(
        "{}.{:09}",
        nanos.div_euclid(1_000_000_000),
        nanos.rem_euclid(1_000_000_000)
    ))
}

fn ring(waker: &Mutex<Option<Arc<Notify>>>) {
    if let Some(w) = waker.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        w.notify_one();
    }
}

/// Follows the node events of the engine behind `docker` until aborted: each node change rings
/// `waker` and counts in `seen`. A failure is logged once (WARN), then counted until the engine
/// answers again (INFO says after how many attempts).
async fn follow_node_events(
    docker: Docker,
    address: String,
    waker: Arc<Mutex<Option<Arc<Notify>>>>,
    seen: Arc<AtomicU64>,
) {
    let filters = HashMap::from([("type".to_string(), vec!["node".to_string()])]);
    let mut since: Option<String> = None;
    let mut wait = EVENTS_FIRST_WAIT;
    // Attempts that failed in a row (0: following).
    let mut failed: u64 = 0;
    loop {
        let mut stream = docker.events(Some(EventsOptions {
            since: since.clone(),
            until: None,
            filters: Some(filters.clone()),
        }));
        let ended = loop {
            match stream.next().await {
                Some(Ok(e)) => {
                    if let Some(s) = resume_after(&e) {
                        since = Some(s);
                    }
                    wait = EVENTS_FIRST_WAIT;
                    if is_node_change(&e) {
                        seen.fetch_add(1, Ordering::Relaxed);
                        ring(&waker);
                        debug!(
                            address = %address,
                            action = e.action.as_deref().unwrap_or(""),
                            node = e.actor.as_ref().and_then(|a| a.id.as_deref()).unwrap_or(""),
                            "a swarm node changed; woke the loop"
                        );
                    }
                }
                Some(Err(e)) => break engine_message(&e),
                None => break "the engine ended the stream".to_string(),
            }
        };
        drop(stream);
        // Until the engine answers again: wait, longer each time.
        loop {
            failed += 1;
            if failed == 1 {
                warn!(address = %address, error = %ended,
                    "following the swarm's node events failed; retrying with backoff (the \
                     per-tick observation goes on; further failures are counted, not logged)");
            } else {
                debug!(address = %address, failed, "the swarm's node events: still failing");
            }
            tokio::time::sleep(wait).await;
            wait = next_wait(wait);
            if docker.ping().await.is_ok() {
                break;
            }
        }
        info!(address = %address, failed_attempts = failed,
            "following the swarm's node events again");
        failed = 0;
        // What changed while the stream was away: observed at once.
        ring(&waker);
    }
}

/// One Swarm service microscaler scales: owned by this instance (labelled, created by it), or
/// referenced by a service's `[services.reference]`.
#[derive(Debug, Clone)]
struct Owned {
    id: String,
    name: String,
    service: ServiceName,
    version: u64,
    spec: ServiceSpec,
    /// A rolling update of the service is running (or paused): Swarm has not caught up.
    updating: bool,
}

impl Owned {
    /// `s` as a service microscaler scales for `service`; `None` when Swarm's answer lacks
    /// its id, version or spec.
    fn of(s: SwarmService, service: ServiceName) -> Option<Owned> {
        let updating = s
            .update_status
            .as_ref()
            .and_then(|u| u.state)
            .is_some_and(|st| {
                matches!(
                    st,
                    ServiceUpdateStatusStateEnum::UPDATING
                        | ServiceUpdateStatusStateEnum::PAUSED
                        | ServiceUpdateStatusStateEnum::ROLLBACK_STARTED
                        | ServiceUpdateStatusStateEnum::ROLLBACK_PAUSED
                )
            });
        let spec = s.spec?;
        Some(Owned {
            id: s.id?,
            name: spec.name.clone().unwrap_or_default(),
            service,
            version: s.version.and_then(|v| v.index)?,
            spec,
            updating,
        })
    }
}

/// How an owned Swarm service places its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Replicated(u32),
    Global,
    /// A job mode (or none): microscaler never creates these.
    Other,
}

impl Owned {
    fn mode(&self) -> Mode {
        mode_of(&self.spec)
    }
}

fn mode_of(spec: &ServiceSpec) -> Mode {
    match spec.mode.as_ref() {
        Some(ServiceSpecMode {
            replicated: Some(r),
            ..
        }) => Mode::Replicated(r.replicas.unwrap_or(1).clamp(0, u32::MAX as i64) as u32),
        Some(ServiceSpecMode {
            global: Some(_), ..
        }) => Mode::Global,
        _ => Mode::Other,
    }
}

/// What microscaler owns in a task template; everything else in an adopted service's template
/// (placement, resources, mounts, ...) is left as the operator set it.
#[derive(Debug, Clone)]
struct Template {
    /// The image as the task refers to it (an ID when pinned).
    image: String,
    /// The image as configured, for the [`IMAGE_LABEL`].
    image_label: String,
    command: Option<Vec<String>>,
    env: Vec<String>,
    /// `init = true`: Docker's init as each task's PID 1.
    init: bool,
    labels: HashMap<String, String>,
    stop_grace_ns: i64,
    /// Network name and, when known, its ID (Swarm stores the ID).
    network: Option<(String, String)>,
    /// The service's `resources`: each task's reservation (what the scheduler places it by)
    /// and limits.
    resources: Option<TaskSpecResources>,
}

/// A service's `resources` as a task's reservation and limits (CPU and memory, as the docker
/// backend limits its containers).
fn task_resources(r: microscaler_core::Resources) -> TaskSpecResources {
    let nano_cpus = Some(r.cpu_milli.saturating_mul(1_000_000) as i64).filter(|n| *n > 0);
    let memory_bytes = Some(r.memory as i64).filter(|m| *m > 0);
    TaskSpecResources {
        limits: Some(Limit {
            nano_cpus,
            memory_bytes,
            ..Default::default()
        }),
        reservations: Some(ResourceObject {
            nano_cpus,
            memory_bytes,
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Template {
    fn apply(&self, t: &mut TaskSpec) {
        let c = t
            .container_spec
            .get_or_insert_with(TaskSpecContainerSpec::default);
        c.image = Some(self.image.clone());
        c.command = self.command.clone();
        c.env = Some(self.env.clone());
        c.init = self.init.then_some(true);
        let l = c.labels.get_or_insert_with(HashMap::new);
        l.extend(self.labels.clone());
        c.stop_grace_period = Some(self.stop_grace_ns);
        if let Some(r) = &self.resources {
            t.resources = Some(r.clone());
        }
        if let Some((name, _)) = &self.network {
            t.networks = Some(vec![NetworkAttachmentConfig {
                target: Some(name.clone()),
                ..Default::default()
            }]);
        }
    }

    /// The fields of `spec`'s template that differ from this one.
    fn differences(&self, spec: &ServiceSpec) -> Vec<&'static str> {
        let t = spec.task_template.clone().unwrap_or_default();
        let c = t.container_spec.clone().unwrap_or_default();
        let mut out = Vec::new();
        if c.image.as_deref() != Some(self.image.as_str()) {
            out.push("image");
        }
        if c.command.as_ref().filter(|v| !v.is_empty()) != self.command.as_ref() {
            out.push("command");
        }
        let mut env = c.env.clone().unwrap_or_default();
        env.sort();
        if env != self.env {
            out.push("env");
        }
        if c.init.unwrap_or(false) != self.init {
            out.push("init");
        }
        let have = c.labels.clone().unwrap_or_default();
        if self.labels.iter().any(|(k, v)| have.get(k) != Some(v)) {
            out.push("container labels");
        }
        if c.stop_grace_period != Some(self.stop_grace_ns) {
            out.push("stop grace period");
        }
        if let Some(want) = &self.resources {
            let have = t.resources.as_ref();
            let limits = |r: Option<&TaskSpecResources>| {
                r.and_then(|r| r.limits.as_ref())
                    .map(|l| (l.nano_cpus, l.memory_bytes))
            };
            let reservations = |r: Option<&TaskSpecResources>| {
                r.and_then(|r| r.reservations.as_ref())
                    .map(|l| (l.nano_cpus, l.memory_bytes))
            };
            if limits(have) != limits(Some(want)) || reservations(have) != reservations(Some(want))
            {
                out.push("resources");
            }
        }
        if let Some((name, id)) = &self.network {
            // Older services may carry their networks at the top level (deprecated field).
            let nets = t.networks.as_ref().or(spec.networks.as_ref());
            let targets: Vec<&str> = nets
                .map(|n| n.iter().filter_map(|a| a.target.as_deref()).collect())
                .unwrap_or_default();
            if !(targets.len() == 1 && (targets[0] == name || targets[0] == id)) {
                out.push("network");
            }
        }
        out
    }
}

/// Checks that the engine at `address` is an active swarm manager, from the `Swarm` part of its
/// system info (`None` when the engine reports none). The error says what the engine is and
/// what to run.
pub fn check_manager(address: &str, swarm: Option<&SwarmInfo>) -> Result<(), BackendError> {
    let state = swarm
        .and_then(|s| s.local_node_state)
        .unwrap_or(LocalNodeState::INACTIVE);
    let manager = swarm.and_then(|s| s.control_available).unwrap_or(false);
    let detail = swarm
        .and_then(|s| s.error.as_deref())
        .filter(|e| !e.is_empty())
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    let message = match state {
        LocalNodeState::ACTIVE if manager => return Ok(()),
        LocalNodeState::ACTIVE => format!(
            "the Docker engine at {address} is a Swarm worker, not a manager: the swarm backend \
             needs a manager's engine; point [backend] host (or DOCKER_HOST) at a manager, or \
             promote this node (run: docker node promote <this node> on a manager)"
        ),
        LocalNodeState::LOCKED => format!(
            "the Docker engine at {address} is a locked Swarm manager: run: docker swarm unlock"
        ),
        LocalNodeState::PENDING => format!(
            "the Docker engine at {address} is still joining a swarm (swarm state: pending): \
             wait until the join completes, or run: docker swarm init (or join as a manager)"
        ),
        LocalNodeState::ERROR => format!(
            "the Docker engine at {address} is in a failed swarm (swarm state: error{detail}): \
             repair it, or leave it and run: docker swarm init (or join as a manager)"
        ),
        LocalNodeState::INACTIVE | LocalNodeState::EMPTY => format!(
            "the Docker engine at {address} is not a Swarm manager (swarm state: inactive): \
             run: docker swarm init (or join it to a swarm as a manager), or point [backend] host \
             (or DOCKER_HOST) at a manager"
        ),
    };
    Err(BackendError::Unsupported(message))
}

/// The Swarm service name of `service` under `instance`.
pub fn swarm_service_name(instance: &str, service: &ServiceName) -> String {
    format!("{instance}-{service}")
}

/// The engine's own message, with its HTTP status.
fn engine_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => format!("{} (HTTP {status_code})", message.trim()),
        other => other.to_string(),
    }
}

fn api(op: impl Into<String>, e: &DockerError) -> BackendError {
    let op = op.into();
    docker_api::answered(op.clone(), e).unwrap_or_else(|| BackendError::Api {
        op,
        message: engine_message(e),
    })
}

/// Swarm's answer when an update was based on an outdated version of the service.
fn is_out_of_sequence(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. }
        if message.contains("update out of sequence"))
}

fn is_status(e: &DockerError, code: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// Whether a task in `state` has not been started yet (it will be, or is being, started).
fn before_running(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::NEW
            | TaskState::ALLOCATED
            | TaskState::PENDING
            | TaskState::ASSIGNED
            | TaskState::ACCEPTED
            | TaskState::PREPARING
            | TaskState::READY
            | TaskState::STARTING
    )
}

fn host_of(node: &Node) -> Host {
    let ready = node.status.as_ref().and_then(|s| s.state) == Some(NodeState::READY)
        && node.spec.as_ref().and_then(|s| s.availability)
            == Some(NodeSpecAvailabilityEnum::ACTIVE);
    let description = node.description.as_ref();
    let resources = description.and_then(|d| d.resources.as_ref());
    let name = node
        .spec
        .as_ref()
        .and_then(|s| s.name.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| description.and_then(|d| d.hostname.clone()))
        .unwrap_or_default();
    Host {
        id: node.id.clone().unwrap_or_default().into(),
        name,
        ready,
        cpus: resources.and_then(|r| r.nano_cpus).map(|n| n as f64 / 1e9),
        memory_bytes: resources
            .and_then(|r| r.memory_bytes)
            .and_then(|m| u64::try_from(m).ok()),
    }
}

/// With capacity counted in resources: takes off each host's CPUs and memory what the tasks
/// that are not the services' (`ours`: task IDs) reserve on its node, while they hold it
/// (assigned to a node, not yet in a final state). Swarm's scheduler places by the same
/// reservations (`Spec.Resources.Reservations`, the service's template when the task was made).
fn take_others(hosts: &mut [Host], tasks: &[Task], ours: &HashSet<&str>) {
    let mut used: HashMap<&str, (u64, u64)> = HashMap::new();
    for t in tasks {
        let Some(node) = t.node_id.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let holds = t
            .status
            .as_ref()
            .and_then(|s| s.state)
            .is_some_and(|s| s == TaskState::RUNNING || before_running(s));
        if !holds || ours.contains(t.id.as_deref().unwrap_or("")) {
            continue;
        }
        let r = t.spec.as_ref().and_then(|s| s.resources.as_ref());
        let Some(r) = r.and_then(|r| r.reservations.as_ref()) else {
            continue;
        };
        let positive = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        let e = used.entry(node).or_default();
        e.0 += positive(r.nano_cpus);
        e.1 += positive(r.memory_bytes);
    }
    for h in hosts {
        let Some((nano, memory)) = used.get(h.id.0.as_str()) else {
            continue;
        };
        h.cpus = h
            .cpus
            .map(|c| ((c * 1e9).round() as u64).saturating_sub(*nano) as f64 / 1e9);
        h.memory_bytes = h.memory_bytes.map(|m| m.saturating_sub(*memory));
    }
}

impl SwarmBackend {
    /// `prepare`, or with [`Apply::No`] its checks only: the Swarm services it would create
    /// or update are logged instead.
    async fn prepare_as(&self, services: &[Service], apply: Apply) -> Result<(), BackendError> {
        let mut references: BTreeMap<String, ServiceName> = BTreeMap::new();
        for s in services {
            let Some(Reference::Swarm(r)) = s.workload.reference() else {
                continue;
            };
            if let Some(other) = references.insert(r.service.clone(), s.name.clone()) {
                return Err(BackendError::Unsupported(format!(
                    "services {other} and {} both reference Swarm service {}: one Swarm \
                     service can stand for one microscaler service only",
                    s.name, r.service
                )));
            }
        }
        *self.references.write().expect("references lock") = references;
        for s in services {
            if s.workload.reference().is_some() {
                continue;
            }
            let name = swarm_service_name(&self.instance, &s.name);
            if name.len() > MAX_NAME {
                return Err(BackendError::Unsupported(format!(
                    "Swarm service name {name} is {} characters long, Swarm allows {MAX_NAME}: \
                     shorten the instance or the service name",
                    name.len()
                )));
            }
        }
        let network = self.network().await?;
        let mut owned = self.owned().await?;
        for s in services {
            if let Some(Reference::Swarm(r)) = s.workload.reference() {
                self.check_reference(s, &r.service).await?;
                if let Some(o) = owned.remove(&s.name) {
                    warn!(
                        instance = %self.instance,
                        service = %s.name,
                        swarm_service = %o.name,
                        "the Swarm service microscaler created for this service when it was \
                         managed remains; the service now references another one, so it is \
                         left as it is (remove it with docker service rm)"
                    );
                }
                continue;
            }
            if apply == Apply::No {
                let name = swarm_service_name(&self.instance, &s.name);
                match owned.remove(&s.name) {
                    Some(_) => {
                        info!(service = %s.name, swarm_service = %name, "dry run: would adopt the Swarm service (and update its template if it changed)")
                    }
                    None => {
                        info!(service = %s.name, swarm_service = %name, "dry run: would create the Swarm service")
                    }
                }
                continue;
            }
            let image = self.image_for(s).await?;
            let template = self.template(s, image, network.clone());
            match owned.remove(&s.name) {
                Some(o) => self.adopt(s, o, &template).await?,
                None => self.create(s, &template).await?,
            }
        }
        for o in owned.values() {
            warn!(
                instance = %self.instance,
                service = %o.service,
                swarm_service = %o.name,
                "a Swarm service carries this instance's labels but its service is not \
                 configured; it is left as it is (remove it with docker service rm)"
            );
        }
        Ok(())
    }

    /// Connects to the manager's engine named by `spec.host` (else `DOCKER_HOST`, else the
    /// default socket) and checks that it is an active swarm manager. `instance` is the owning
    /// microscaler instance (`Config::instance`).
    pub async fn connect(spec: &SwarmConfig, instance: &str) -> Result<SwarmBackend, BackendError> {
        let address = docker_api::engine_address(spec.host.as_deref());
        let docker = docker_api::connect(spec.host.as_deref()).await?;
        let system = docker.info().await.map_err(|e| BackendError::Unreachable {
            what: format!("the Docker engine at {address}"),
            hint: format!(
                "reading its system info failed: {}; is dockerd healthy?",
                engine_message(&e)
            ),
            source: Some(Box::new(e)),
        })?;
        check_manager(&address, system.swarm.as_ref())?;
        info!(
            address = %address,
            instance,
            nodes = system.swarm.as_ref().and_then(|s| s.nodes),
            "connected to a Docker Swarm manager"
        );
        Ok(SwarmBackend {
            docker,
            address,
            instance: instance.to_string(),
            network: spec.network.clone(),
            references: Default::default(),
            node_events: NodeEvents::default(),
            resources: false,
        })
    }

    /// Capacity is counted in CPU and memory (`[capacity] resources = true`): each observation
    /// also lists the tasks Swarm wants running on the whole swarm (`GET /tasks` filtered on
    /// `desired-state=running`), so that a host's room is its node's CPUs and memory less what
    /// the tasks that are not the services' reserve (other Swarm services, stacks, by hand).
    pub fn count_resources(&mut self) {
        self.resources = true;
    }

    /// The engine this backend talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// How many node changes (create, update, remove) the manager's event stream has reported
    /// so far: a counter shared with the task that follows it (0 until `wake_on_change`).
    pub fn node_events(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.node_events.seen)
    }

    /// The Swarm services matching `filters`; `what` names them in the error.
    async fn list_services(
        &self,
        filters: HashMap<String, Vec<String>>,
        what: &str,
    ) -> Result<Vec<SwarmService>, BackendError> {
        self.docker
            .list_services(Some(ListServicesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| api(format!("list {what} on {}", self.address), &e))
    }

    /// The Swarm services carrying both labels with this instance's value, by service.
    async fn owned(&self) -> Result<BTreeMap<ServiceName, Owned>, BackendError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}={}", labels::INSTANCE, self.instance)],
        )]);
        let what = format!("the Swarm services of instance {}", self.instance);
        let list = self.list_services(filters, &what).await?;
        let mut out: BTreeMap<ServiceName, Owned> = BTreeMap::new();
        for s in list {
            let Some(owned) = self.as_owned(s) else {
                continue;
            };
            let canonical = swarm_service_name(&self.instance, &owned.service);
            if let Some(prev) = out.get(&owned.service) {
                // Two labelled Swarm services for one service: keep the one microscaler would
                // have created, and say so, rather than scaling both.
                warn!(
                    instance = %self.instance,
                    service = %owned.service,
                    kept = if prev.name == canonical { &prev.name } else { &owned.name },
                    ignored = if prev.name == canonical { &owned.name } else { &prev.name },
                    "two Swarm services carry this instance's labels for one service; \
                     remove the one that is ignored"
                );
                if prev.name == canonical {
                    continue;
                }
            }
            out.insert(owned.service.clone(), owned);
        }
        Ok(out)
    }

    /// `s` as an owned service, if it carries both labels with this instance's value.
    fn as_owned(&self, s: SwarmService) -> Option<Owned> {
        let labels = s.spec.as_ref()?.labels.as_ref()?;
        if labels.get(labels::INSTANCE) != Some(&self.instance) {
            return None;
        }
        let raw = labels.get(labels::SERVICE)?;
        let service = match ServiceName::try_new(raw.clone()) {
            Ok(n) => n,
            Err(e) => {
                let name = s
                    .spec
                    .as_ref()
                    .and_then(|s| s.name.as_deref())
                    .unwrap_or("");
                warn!(swarm_service = %name, label = %raw, error = %e,
                    "ignoring a Swarm service whose service label is not a valid service name");
                return None;
            }
        };
        Owned::of(s, service)
    }

    /// The referenced Swarm services that exist, by the service each stands for.
    async fn referenced(&self) -> Result<BTreeMap<ServiceName, Owned>, BackendError> {
        let references = self.references.read().expect("references lock").clone();
        if references.is_empty() {
            return Ok(BTreeMap::new());
        }
        let filters = HashMap::from([("name".to_string(), references.keys().cloned().collect())]);
        let list = self
            .list_services(filters, "the referenced Swarm services")
            .await?;
        let mut out = BTreeMap::new();
        for s in list {
            // The name filter also matches prefixes: keep exact names only.
            let name = s.spec.as_ref().and_then(|s| s.name.as_deref());
            if let Some(service) = name.and_then(|n| references.get(n)) {
                if let Some(o) = Owned::of(s, service.clone()) {
                    out.insert(o.service.clone(), o);
                }
            }
        }
        Ok(out)
    }

    /// The referenced Swarm service `name` (of `service`), read now.
    async fn find_reference(
        &self,
        service: &ServiceName,
        name: &str,
    ) -> Result<Owned, BackendError> {
        let not_found = || BackendError::NotFound {
            what: format!(
                "Swarm service {name} (the [services.reference] of service {service}) on {}",
                self.address
            ),
            hint: "create it (docker service create / docker stack deploy), or fix the \
                   reference; microscaler never creates a referenced service"
                .into(),
        };
        let s = match self
            .docker
            .inspect_service(name, None::<InspectServiceOptions>)
            .await
        {
            Ok(s) => s,
            Err(e) if is_status(&e, 404) => return Err(not_found()),
            Err(e) => {
                return Err(api(
                    format!("inspect Swarm service {name} on {}", self.address),
                    &e,
                ))
            }
        };
        // Swarm also answers for an ID or an ID prefix: only the exact name is the reference.
        if s.spec.as_ref().and_then(|s| s.name.as_deref()) != Some(name) {
            return Err(not_found());
        }
        Owned::of(s, service.clone()).ok_or_else(|| BackendError::Api {
            op: format!("inspect Swarm service {name}"),
            message: "the engine reported no id, version or spec".into(),
        })
    }

    /// The Swarm service `service` is scaled through, read now.
    async fn find(&self, service: &Service) -> Result<Owned, BackendError> {
        if let Some(Reference::Swarm(r)) = service.workload.reference() {
            return self.find_reference(&service.name, &r.service).await;
        }
        let service = &service.name;
        self.owned()
            .await?
            .remove(service)
            .ok_or_else(|| BackendError::Api {
                op: format!("find the Swarm service of {service}"),
                message: format!(
                "no Swarm service on {} carries the labels {}={} and {}={service} (was it removed \
                 by hand?); microscaler recreates it at its next start (prepare)",
                self.address,
                labels::INSTANCE,
                self.instance,
                labels::SERVICE
            ),
            })
    }

    /// Writes `spec` over `owned` at `owned.version`.
    async fn update(&self, owned: &Owned, spec: ServiceSpec) -> Result<(), DockerError> {
        let version = i32::try_from(owned.version).unwrap_or(i32::MAX);
        let reply = self
            .docker
            .update_service(
                &owned.id,
                spec,
                UpdateServiceOptions {
                    version,
                    ..Default::default()
                },
                None,
            )
            .await?;
        for w in reply.warnings.unwrap_or_default() {
            warn!(swarm_service = %owned.name, warning = %w, "Swarm warned about a service update");
        }
        Ok(())
    }

    /// The image tasks of `service` refer to, and the [`IMAGE_LABEL`] value.
    async fn image_for(&self, service: &Service) -> Result<(String, String), BackendError> {
        let Some(image) = managed(service).image.as_deref() else {
            let reference = docker_api::ensure_replica_image(&self.docker).await?;
            let id = self
                .docker
                .inspect_image(&reference)
                .await
                .map_err(|e| {
                    api(
                        format!("inspect the built-in image {reference} on {}", self.address),
                        &e,
                    )
                })?
                .id
                .ok_or_else(|| BackendError::Api {
                    op: format!("inspect the built-in image {reference}"),
                    message: "the engine reported no image ID".into(),
                })?;
            return Ok((id, BUILT_IN.to_string()));
        };
        match self.docker.inspect_image(image).await {
            // Never pushed or pulled: no registry has it, so a pull could only fail (or hang
            // where DNS is black-holed). Pinning by ID makes Swarm's executor skip the pull.
            Ok(i) if i.repo_digests.as_ref().is_none_or(|d| d.is_empty()) && i.id.is_some() => {
                Ok((i.id.unwrap_or_default(), image.to_string()))
            }
            Ok(_) => Ok((image.to_string(), image.to_string())),
            Err(e) if is_status(&e, 404) => {
                warn!(
                    service = %service.name,
                    image,
                    address = %self.address,
                    "image is not on the manager's engine; Swarm's nodes will pull it from its \
                     registry, and tasks stay pending where they cannot"
                );
                Ok((image.to_string(), image.to_string()))
            }
            Err(e) => Err(api(
                format!("inspect image {image} on {}", self.address),
                &e,
            )),
        }
    }

    /// The network's (name, ID), checking that it exists on the swarm.
    async fn network(&self) -> Result<Option<(String, String)>, BackendError> {
        let Some(name) = self.network.as_deref() else {
            return Ok(None);
        };
        let net = self
            .docker
            .inspect_network(name, None::<InspectNetworkOptions>)
            .await
            .map_err(|e| {
                if is_status(&e, 404) {
                    BackendError::Unsupported(format!(
                        "network {name} ([backend] network) does not exist on the swarm at {}: \
                         run: docker network create --driver overlay --attachable {name}",
                        self.address
                    ))
                } else {
                    api(format!("inspect network {name} on {}", self.address), &e)
                }
            })?;
        Ok(Some((name.to_string(), net.id.unwrap_or_default())))
    }

    fn template(
        &self,
        service: &Service,
        image: (String, String),
        network: Option<(String, String)>,
    ) -> Template {
        let mut env = managed(service).env.clone();
        env.insert("MICROSCALER_SERVICE".into(), service.name.to_string());
        env.insert("MICROSCALER_INSTANCE".into(), self.instance.clone());
        let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        Template {
            image: image.0,
            image_label: image.1,
            command: Some(managed(service).command.clone()).filter(|c| !c.is_empty()),
            env,
            init: managed(service).init,
            labels: self.labels(&service.name),
            stop_grace_ns: i64::try_from(service.stop_grace.as_nanos()).unwrap_or(i64::MAX),
            network,
            resources: service.resources.map(task_resources),
        }
    }

    fn labels(&self, service: &ServiceName) -> HashMap<String, String> {
        HashMap::from([
            (labels::INSTANCE.to_string(), self.instance.clone()),
            (labels::SERVICE.to_string(), service.to_string()),
        ])
    }

    async fn create(&self, service: &Service, template: &Template) -> Result<(), BackendError> {
        let name = swarm_service_name(&self.instance, &service.name);
        let mut labels = self.labels(&service.name);
        labels.insert(IMAGE_LABEL.into(), template.image_label.clone());
        let mut task = TaskSpec::default();
        template.apply(&mut task);
        let global = matches!(service.kind, ServiceKind::PerHost);
        let mode = if global {
            ServiceSpecMode {
                global: Some(HashMap::new()),
                ..Default::default()
            }
        } else {
            ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
                ..Default::default()
            }
        };
        let spec = ServiceSpec {
            name: Some(name.clone()),
            labels: Some(labels),
            task_template: Some(task),
            mode: Some(mode),
            ..Default::default()
        };
        // No registry credentials: the engine (API >= 1.30) does not resolve the image on the
        // manager, which is what `docker service create --no-resolve-image` asks for.
        self.docker.create_service(spec, None).await.map_err(|e| {
            if is_status(&e, 409) {
                BackendError::Api {
                    op: format!("create Swarm service {name}"),
                    message: format!(
                        "{}; a Swarm service with this name exists but does not carry this \
                             instance's labels, so microscaler will not touch it: remove or \
                             rename it, or change the instance name",
                        engine_message(&e)
                    ),
                }
            } else {
                api(
                    format!("create Swarm service {name} on {}", self.address),
                    &e,
                )
            }
        })?;
        info!(
            instance = %self.instance,
            service = %service.name,
            swarm_service = %name,
            mode = if global { "global" } else { "replicated" },
            image = %template.image_label,
            "created Swarm service"
        );
        Ok(())
    }

    /// Checks that the Swarm service `name` referenced by `service` exists and that its mode
    /// fits the service: replicated for a triggered or remainder service (its count is set),
    /// global for a per-host one (Swarm keeps a task per node; microscaler only counts them).
    async fn check_reference(&self, service: &Service, name: &str) -> Result<(), BackendError> {
        let o = self.find_reference(&service.name, name).await?;
        let per_host = matches!(service.kind, ServiceKind::PerHost);
        let fits = match o.mode() {
            Mode::Replicated(_) => !per_host,
            Mode::Global => per_host,
            Mode::Other => false,
        };
        if !fits {
            let want = if per_host {
                "global mode (per_host = true: Swarm keeps one task per node)"
            } else {
                "replicated mode (microscaler sets its replica count)"
            };
            return Err(BackendError::Unsupported(format!(
                "Swarm service {name}, referenced by service {}, runs in {} mode but the \
                 service needs {want}; microscaler never changes a referenced service's mode",
                service.name,
                match o.mode() {
                    Mode::Replicated(_) => "replicated",
                    Mode::Global => "global",
                    Mode::Other => "a job",
                }
            )));
        }
        info!(
            instance = %self.instance,
            service = %service.name,
            swarm_service = %name,
            mode = ?o.mode(),
            "referencing an existing Swarm service: microscaler sets only its replica count, \
             and never updates its template or removes it"
        );
        Ok(())
    }

    /// Brings an adopted service's template back to `template`, keeping its replica count.
    async fn adopt(
        &self,
        service: &Service,
        mut owned: Owned,
        template: &Template,
    ) -> Result<(), BackendError> {
        let want_global = matches!(service.kind, ServiceKind::PerHost);
        match (owned.mode(), want_global) {
            (Mode::Global, true) | (Mode::Replicated(_), false) => {}
            (mode, _) => {
                let have = match mode {
                    Mode::Global => "global",
                    Mode::Replicated(_) => "replicated",
                    Mode::Other => "job",
                };
                let want = if want_global { "global" } else { "replicated" };
                return Err(BackendError::Unsupported(format!(
                    "Swarm service {} (service {}) runs in {have} mode but the configuration \
                     needs {want} mode, and Swarm cannot change a service's mode: remove it \
                     (run: docker service rm {}) and microscaler recreates it",
                    owned.name, service.name, owned.name
                )));
            }
        }
        let mut retried = false;
        loop {
            let differences = template.differences(&owned.spec);
            let label_ok = owned.spec.labels.as_ref().and_then(|l| l.get(IMAGE_LABEL))
                == Some(&template.image_label);
            if differences.is_empty() && label_ok {
                info!(
                    instance = %self.instance,
                    service = %service.name,
                    swarm_service = %owned.name,
                    mode = ?owned.mode(),
                    "adopted Swarm service as it is"
                );
                return Ok(());
            }
            let mut spec = owned.spec.clone();
            let task = spec.task_template.get_or_insert_with(TaskSpec::default);
            template.apply(task);
            if template.network.is_some() {
                // Swarm refuses networks in both places; the task template is the current one.
                spec.networks = None;
            }
            spec.labels
                .get_or_insert_with(HashMap::new)
                .insert(IMAGE_LABEL.into(), template.image_label.clone());
            match self.update(&owned, spec).await {
                Ok(()) => {
                    info!(
                        instance = %self.instance,
                        service = %service.name,
                        swarm_service = %owned.name,
                        changed = ?differences,
                        mode = ?owned.mode(),
                        "adopted Swarm service and updated its task template (replicas kept)"
                    );
                    return Ok(());
                }
                Err(e) if is_out_of_sequence(&e) && !retried => {
                    retried = true;
                    debug!(swarm_service = %owned.name, "service changed meanwhile; reading it again");
                    owned = self.find(service).await?;
                }
                Err(e) => {
                    return Err(api(
                        format!("update the task template of Swarm service {}", owned.name),
                        &e,
                    ))
                }
            }
        }
    }
}

impl Backend for SwarmBackend {
    fn kind(&self) -> &'static str {
        "swarm"
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
        let task_filters = HashMap::from([(
            "label".to_string(),
            // Matches the labels of the task's service.
            vec![format!("{}={}", labels::INSTANCE, self.instance)],
        )]);
        let tasks = async {
            self.docker
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(task_filters),
                }))
                .await
                .map_err(|e| {
                    api(
                        format!(
                            "list the Swarm tasks of instance {} on {}",
                            self.instance, self.address
                        ),
                        &e,
                    )
                })
        };
        let nodes = async {
            self.docker
                .list_nodes(None::<ListNodesOptions>)
                .await
                .map_err(|e| api(format!("list the swarm nodes on {}", self.address), &e))
        };
        // With capacity in resources: every task Swarm wants running, whoever's.
        let all_tasks = async {
            if !self.resources {
                return Ok(Vec::new());
            }
            let running = HashMap::from([("desired-state".to_string(), vec!["running".into()])]);
            self.docker
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(running),
                }))
                .await
                .map_err(|e| {
                    api(
                        format!("list the swarm's running tasks on {}", self.address),
                        &e,
                    )
                })
        };
        let (mut owned, referenced, tasks, nodes, all_tasks) =
            tokio::try_join!(self.owned(), self.referenced(), tasks, nodes, all_tasks)?;
        let referenced_tasks = if referenced.is_empty() {
            Vec::new()
        } else {
            let ids = referenced.values().map(|o| o.id.clone()).collect();
            self.docker
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(HashMap::from([("service".to_string(), ids)])),
                }))
                .await
                .map_err(|e| {
                    api(
                        format!(
                            "list the referenced Swarm services' tasks on {}",
                            self.address
                        ),
                        &e,
                    )
                })?
        };
        // A service that references a Swarm service is that one, even if a labelled one
        // remains from when it was managed.
        owned.extend(referenced);

        let mut obs = Observation {
            hosts: nodes.iter().map(host_of).collect(),
            ..Default::default()
        };
        let by_id: HashMap<&str, &ServiceName> = owned
            .values()
            .map(|o| (o.id.as_str(), &o.service))
            .collect();
        for o in owned.values() {
            obs.services.insert(
                o.service.clone(),
                ServiceObservation {
                    orchestrator_wants: match o.mode() {
                        Mode::Replicated(n) => Some(n),
                        Mode::Global | Mode::Other => None,
                    },
                    caught_up: !o.updating,
                    ..ServiceObservation::default()
                },
            );
        }
        for t in tasks.iter().chain(&referenced_tasks) {
            self.count_task(t, &by_id, &mut obs);
        }
        if self.resources {
            // The services' tasks are replicas, whose room the engine counts itself; a task
            // made after the services' own listing is known by its service.
            let ours: HashSet<&str> = obs
                .replicas
                .iter()
                .map(|r| r.id.as_str())
                .chain(all_tasks.iter().filter_map(|t| {
                    by_id
                        .contains_key(t.service_id.as_deref()?)
                        .then_some(t.id.as_deref()?)
                }))
                .collect();
            take_others(&mut obs.hosts, &all_tasks, &ours);
        }
        debug!(
            instance = %self.instance,
            services = obs.services.len(),
            tasks = obs.replicas.len(),
            nodes = obs.hosts.len(),
            "observed swarm"
        );
        Ok(obs)
    }

    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        if matches!(service.kind, ServiceKind::PerHost) {
            debug!(service = %service.name, target, "per-host service runs in global mode; Swarm places one task per node");
            return Ok(ScaleOutcome::default());
        }
        let mut retried = false;
        loop {
            let owned = self.find(service).await?;
            let previous = match owned.mode() {
                Mode::Replicated(n) => n,
                Mode::Global => {
                    debug!(service = %service.name, swarm_service = %owned.name, "global Swarm service; nothing to scale");
                    return Ok(ScaleOutcome::default());
                }
                Mode::Other => {
                    return Err(BackendError::Unsupported(format!(
                        "Swarm service {} runs in a job mode, which microscaler cannot scale: \
                         remove it (run: docker service rm {}) and restart microscaler",
                        owned.name, owned.name
                    )))
                }
            };
            if previous == target {
                return Ok(ScaleOutcome::default());
            }
            let mut spec = owned.spec.clone();
            spec.mode = Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated {
                    replicas: Some(i64::from(target)),
                }),
                ..Default::default()
            });
            match self.update(&owned, spec).await {
                Ok(()) => {
                    info!(
                        instance = %self.instance,
                        service = %service.name,
                        swarm_service = %owned.name,
                        previous,
                        target,
                        "scaled Swarm service"
                    );
                    return Ok(ScaleOutcome {
                        started: target.saturating_sub(previous),
                        stopped: previous.saturating_sub(target),
                        failures: Vec::new(),
                        ..ScaleOutcome::default()
                    });
                }
                Err(e) if is_out_of_sequence(&e) && !retried => {
                    retried = true;
                    debug!(swarm_service = %owned.name, "service changed meanwhile; reading it again");
                }
                Err(e) => {
                    return Err(api(
                        format!("scale Swarm service {} to {target}", owned.name),
                        &e,
                    ))
                }
            }
        }
    }

    /// Follows the manager's node events (see the module's doc): a node that joins, leaves,
    /// is drained or activated wakes the loop at once. The first call starts the task; a later
    /// one only replaces the waker.
    fn wake_on_change(&self, waker: Arc<Notify>) {
        *self
            .node_events
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(waker);
        let mut task = self
            .node_events
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if task.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!("no async runtime: not following the swarm's node events (polling only)");
            return;
        };
        *task = Some(runtime.spawn(follow_node_events(
            self.docker.clone(),
            self.address.clone(),
            Arc::clone(&self.node_events.waker),
            Arc::clone(&self.node_events.seen),
        )));
        debug!(address = %self.address, "following the swarm's node events");
    }

    async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
        if !remove {
            info!(
                instance = %self.instance,
                services = services.len(),
                "leaving the Swarm services running for the next start to adopt"
            );
            return Ok(());
        }
        let mut first_error = None;
        for o in self.owned().await?.values() {
            match self.docker.delete_service(&o.id).await {
                Ok(()) => info!(
                    instance = %self.instance,
                    service = %o.service,
                    swarm_service = %o.name,
                    "removed Swarm service"
                ),
                // Already gone: what we wanted.
                Err(e) if is_status(&e, 404) => {}
                Err(e) => {
                    warn!(swarm_service = %o.name, error = %engine_message(&e), "removing Swarm service failed");
                    first_error.get_or_insert_with(|| {
                        api(
                            format!("remove Swarm service {} on {}", o.name, self.address),
                            &e,
                        )
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl SwarmBackend {
    /// Adds task `t` to `obs`. Tasks of an owned service count as running or pending when Swarm
    /// wants them running; a task still alive that Swarm is stopping (scaled down, or its
    /// service removed) is listed as stopping.
    fn count_task(&self, t: &Task, by_id: &HashMap<&str, &ServiceName>, obs: &mut Observation) {
        let Some(state) = t.status.as_ref().and_then(|s| s.state) else {
            return;
        };
        let alive = state == TaskState::RUNNING || before_running(state);
        if !alive {
            return;
        }
        let owner = t
            .service_id
            .as_deref()
            .and_then(|id| by_id.get(id))
            .copied();
        // The service may have just been removed: its tasks still carry our container labels.
        let service = owner.cloned().or_else(|| {
            let l = t.spec.as_ref()?.container_spec.as_ref()?.labels.as_ref()?;
            (l.get(labels::INSTANCE) == Some(&self.instance))
                .then(|| ServiceName::try_new(l.get(labels::SERVICE)?.clone()).ok())
                .flatten()
        });
        let Some(service) = service else {
            return;
        };
        // A rolling update's replacement task waits in desired state `ready` until the task it
        // replaces has stopped; it is about to run, so it counts as pending.
        let desired_running = matches!(
            t.desired_state,
            Some(TaskState::RUNNING) | Some(TaskState::READY)
        );
        let replica_state = if owner.is_some() && desired_running {
            let counts = obs.services.entry(service.clone()).or_default();
            if state == TaskState::RUNNING {
                counts.running += 1;
                ReplicaState::Running
            } else {
                counts.pending += 1;
                // Swarm's `pending` state: the scheduler found no node that can take it.
                if state == TaskState::PENDING {
                    counts.unschedulable += 1;
                }
                ReplicaState::Pending
            }
        } else {
            ReplicaState::Stopping
        };
        obs.replicas.push(Replica {
            id: t.id.clone().unwrap_or_default(),
            service,
            host: t.node_id.clone().unwrap_or_default().into(),
            state: replica_state,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// What the fake engine answers to one `/events` request.
    struct Script {
        /// JSON lines, sent at once.
        events: Vec<String>,
        /// Keep the stream open (until the client goes away) rather than end it.
        hold: bool,
    }

    /// A fake Docker engine on loopback, just enough for the node events: `/_ping`, and
    /// `/events` answered by the next script. It records the request lines and counts the
    /// event streams the client closed.
    struct FakeEngine {
        address: String,
        requests: Arc<Mutex<Vec<String>>>,
        closed: Arc<AtomicUsize>,
    }

    impl FakeEngine {
        fn start(scripts: Vec<Script>) -> FakeEngine {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let address = format!("http://{}", listener.local_addr().expect("address"));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let closed = Arc::new(AtomicUsize::new(0));
            let scripts = Arc::new(Mutex::new(std::collections::VecDeque::from(scripts)));
            let (r, c) = (Arc::clone(&requests), Arc::clone(&closed));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { return };
                    let (r, c, s) = (Arc::clone(&r), Arc::clone(&c), Arc::clone(&scripts));
                    std::thread::spawn(move || serve(conn, &r, &c, &s));
                }
            });
            FakeEngine {
                address,
                requests,
                closed,
            }
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }

        fn events_requests(&self) -> Vec<String> {
            self.requests()
                .into_iter()
                .filter(|r| r.contains("/events"))
                .collect()
        }
    }

    fn serve(
        conn: TcpStream,
        requests: &Mutex<Vec<String>>,
        closed: &AtomicUsize,
        scripts: &Mutex<std::collections::VecDeque<Script>>,
    ) {
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let request = line.trim().to_string();
        // The rest of the head.
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        requests.lock().unwrap().push(request.clone());
        let mut conn = conn;
        if request.contains("/_ping") {
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK",
            );
            return;
        }
        let Some(script) = scripts.lock().unwrap().pop_front() else {
            let _ = conn.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 22\r\nConnection: close\r\n\r\n{\"message\":\"no more\"}\n",
            );
            return;
        };
        let _ = conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
        );
        for e in &script.events {
            let _ = conn.write_all(format!("{e}\n").as_bytes());
        }
        let _ = conn.flush();
        if script.hold {
            // Until the client closes the stream.
            let mut buf = [0u8; 64];
            while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
            closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn event(typ: &str, action: &str, time_nano: i64) -> String {
        format!(
            r#"{{"Type":"{typ}","Action":"{action}","Actor":{{"ID":"n1","Attributes":{{"name":"ms3"}}}},"scope":"swarm","time":{},"timeNano":{time_nano}}}"#,
            time_nano / 1_000_000_000
        )
    }

    fn backend_at(address: &str) -> SwarmBackend {
        SwarmBackend {
            docker: Docker::connect_with_http(address, 5, bollard::API_DEFAULT_VERSION)
                .expect("client"),
            address: address.to_string(),
            instance: "t".into(),
            network: None,
            references: Default::default(),
            node_events: NodeEvents::default(),
            resources: false,
        }
    }

    async fn rung(waker: &Notify, what: &str) {
        tokio::time::timeout(Duration::from_secs(5), waker.notified())
            .await
            .unwrap_or_else(|_| panic!("the waker did not ring: {what}"));
    }

    /// Polls `f` every 10 ms for up to 5 s until it holds.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 5 s: {what}");
    }

    /// A task as Swarm lists it: on `node` (none: not assigned), in `state`, reserving
    /// `nano` CPUs and `memory` bytes.
    fn task(id: &str, node: Option<&str>, state: &str, nano: i64, memory: i64) -> Task {
        serde_json::from_value(serde_json::json!({
            "ID": id,
            "ServiceID": "s",
            "NodeID": node,
            "DesiredState": "running",
            "Status": { "State": state },
            "Spec": { "Resources": { "Reservations": { "NanoCPUs": nano, "MemoryBytes": memory } } },
        }))
        .expect("a task")
    }

    fn host(id: &str, cpus: f64, memory_bytes: u64) -> Host {
        Host {
            id: id.to_string().into(),
            name: id.to_string(),
            ready: true,
            cpus: Some(cpus),
            memory_bytes: Some(memory_bytes),
        }
    }

    /// What others' tasks reserve comes off their node while they hold it: assigned and not
    /// yet finished; the services' own tasks, unassigned and finished ones hold nothing here.
    #[test]
    fn other_tasks_reservations_come_off_their_nodes() {
        let mib = 1 << 20;
        let tasks = [
            task("a", Some("n1"), "running", 500_000_000, 256 * mib),
            task("b", Some("n1"), "starting", 250_000_000, 64 * mib),
            task("mine", Some("n1"), "running", 1_000_000_000, 512 * mib),
            task("c", Some("n2"), "complete", 1_000_000_000, 512 * mib),
            task("d", Some("n2"), "failed", 1_000_000_000, 512 * mib),
            task("e", None, "pending", 1_000_000_000, 512 * mib),
            task("f", Some("n2"), "assigned", 2_000_000_000, 0),
            task("g", Some("gone"), "running", 1_000_000_000, 512 * mib),
        ];
        let mut hosts = [host("n1", 2.0, 1024 * mib as u64), host("n2", 1.5, 1024)];
        take_others(&mut hosts, &tasks, &HashSet::from(["mine"]));
        assert_eq!(hosts[0].cpus, Some(1.25));
        assert_eq!(hosts[0].memory_bytes, Some(704 * mib as u64));
        // More than the node has: none left, not less.
        assert_eq!(hosts[1].cpus, Some(0.0));
        assert_eq!(hosts[1].memory_bytes, Some(1024));
    }

    #[test]
    fn node_changes_are_creates_updates_and_removes_of_nodes() {
        let parse = |s: &str| serde_json::from_str::<EventMessage>(s).expect("an event");
        for action in ["create", "update", "remove"] {
            assert!(
                is_node_change(&parse(&event("node", action, 1))),
                "{action}"
            );
        }
        assert!(!is_node_change(&parse(&event("service", "update", 1))));
        assert!(!is_node_change(&parse(&event("container", "die", 1))));
        assert!(!is_node_change(&parse(&event("node", "exec_start", 1))));
    }

    #[test]
    fn the_stream_resumes_just_after_the_last_event() {
        let e = serde_json::from_str::<EventMessage>(&event(
            "node",
            "update",
            1_700_000_000_999_999_999,
        ))
        .unwrap();
        assert_eq!(resume_after(&e).as_deref(), Some("1700000001.000000000"));
        let only_seconds = EventMessage {
            time: Some(12),
            ..Default::default()
        };
        assert_eq!(resume_after(&only_seconds).as_deref(), Some("12.000000001"));
        assert_eq!(resume_after(&EventMessage::default()), None);
    }

    #[test]
    fn the_wait_between_attempts_doubles_up_to_30_s() {
        let mut w = EVENTS_FIRST_WAIT;
        let mut waits = vec![w];
        for _ in 0..8 {
            w = next_wait(w);
            waits.push(w);
        }
        let secs: Vec<f64> = waits.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(secs, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
    }

    /// A node event on the stream rings the loop's waker; other events do not count; the
    /// subscription asks the engine for node events only.
    #[tokio::test]
    async fn a_node_event_rings_the_waker() {
        let engine = FakeEngine::start(vec![Script {
            events: vec![
                event("container", "die", 1_700_000_000_000_000_000),
                event("node", "update", 1_700_000_000_000_000_001),
            ],
            hold: true,
        }]);
        let backend = backend_at(&engine.address);
        let waker = Arc::new(Notify::new());
        let seen = backend.node_events();
        backend.wake_on_change(Arc::clone(&waker));
        rung(&waker, "a node update").await;
        assert_eq!(
            seen.load(Ordering::Relaxed),
            1,
            "only the node event counts"
        );
        let subscribed = engine.events_requests();
        assert_eq!(subscribed.len(), 1, "{subscribed:?}");
        // filters={"type":["node"]}, URL-encoded.
        assert!(
            subscribed[0].contains("filters=%7B%22type%22%3A%5B%22node%22%5D%7D"),
            "{subscribed:?}"
        );
        // A second call replaces the waker and starts nothing more.
        let other = Arc::new(Notify::new());
        backend.wake_on_change(Arc::clone(&other));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(engine.events_requests().len(), 1);
    }

    /// The stream ended by the engine: after the backoff the task checks that the engine
    /// answers, rings the waker once (what happened meanwhile is observed), and subscribes
    /// again from just after the last event it saw; a failed subscription is retried too.
    #[tokio::test]
    async fn after_the_stream_ends_it_subscribes_again_from_the_last_event() {
        let engine = FakeEngine::start(vec![
            Script {
                events: vec![event("node", "update", 1_700_000_000_123_456_789)],
                hold: false,
            },
            Script {
                events: vec![],
                hold: true,
            },
        ]);
        let backend = backend_at(&engine.address);
        let waker = Arc::new(Notify::new());
        let seen = backend.node_events();
        backend.wake_on_change(Arc::clone(&waker));
        rung(&waker, "the node event").await;
        rung(&waker, "the stream back after it ended").await;
        eventually("a second subscription", || {
            engine.events_requests().len() == 2
        })
        .await;
        let r = engine.requests();
        let second = r.iter().rposition(|r| r.contains("/events")).unwrap();
        assert!(
            r[..second].iter().any(|r| r.contains("/_ping")),
            "the engine is checked before subscribing again: {r:?}"
        );
        assert!(
            r[second].contains("since=1700000000.123456790"),
            "resumes after the last event: {r:?}"
        );
        assert_eq!(seen.load(Ordering::Relaxed), 1);
    }

    /// Dropping the backend ends the task: the engine sees the stream closed and no new
    /// subscription follows.
    #[tokio::test]
    async fn dropping_the_backend_stops_following() {
        let engine = FakeEngine::start(vec![Script {
            events: vec![],
            hold: true,
        }]);
        let backend = backend_at(&engine.address);
        backend.wake_on_change(Arc::new(Notify::new()));
        eventually("the subscription", || engine.events_requests().len() == 1).await;
        assert_eq!(engine.closed.load(Ordering::SeqCst), 0);
        drop(backend);
        eventually("the stream closed", || {
            engine.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        tokio::time::sleep(EVENTS_FIRST_WAIT * 3).await;
        assert_eq!(engine.requests().len(), 1, "{:?}", engine.requests());
    }
}
