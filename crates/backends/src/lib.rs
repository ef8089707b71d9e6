//! Backends: the orchestrators microscaler drives.
//!
//! Two kinds, one trait:
//! - container-level ([`docker`], [`process`]): the backend itself creates, starts, stops and
//!   removes replicas, and chooses which replica to stop;
//! - service-level ([`swarm`], [`kubernetes`], [`nomad`], [`marathon`], [`ecs`]): the backend sets a replica count and the orchestrator places
//!   the replicas.
//!
//! Every backend answers the same questions (what runs, what is pending, which hosts) and takes
//! the same order (set service S to N replicas). Backends never sleep between ticks and never
//! decide: the engine decides, the control loop calls them.
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;

use microscaler_core::{Capabilities, Host, HostId, Reason, ServiceName, ServiceObservation};

pub mod config;
pub mod docker;
pub mod docker_api;
pub mod ecs;
mod http;
#[cfg(feature = "kubernetes")]
pub mod kube_lease;
pub mod kubernetes;
pub mod marathon;
pub mod nomad;
pub mod process;
pub mod swarm;

pub use config::{BackendConfig, Config, Plugins, Reference, RunSpec, Service, Workload};

/// What the plan says of one change beside its target ([`Backend::scale_with`]).
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// Why, in words (the plan's reason for the service), written only when a backend reads
    /// it (`&*change.reason`): most never do.
    pub reason: &'a Reason,
    /// On a scale-down with capacity counted in CPU and memory: the hosts the plan takes the
    /// replicas from, `(host, count)` (where a higher priority's room is made). A backend that
    /// can choose which replicas go removes these first; others place the count and let the
    /// orchestrator choose. Empty: no preference.
    pub remove_from: &'a [(HostId, u32)],
}

impl Default for Change<'_> {
    fn default() -> Self {
        Change {
            reason: Reason::empty(),
            remove_from: &[],
        }
    }
}

/// What a managed service's replicas run. The container-level backends accept no
/// `[services.reference]` at load time (their workload validation does not know the key), so
/// every service they are given is managed; a service that is not gets the built-in replica's
/// empty spec rather than a panic.
pub(crate) fn managed(service: &Service) -> &RunSpec {
    static BUILT_IN: RunSpec = RunSpec {
        image: None,
        command: Vec::new(),
        env: std::collections::BTreeMap::new(),
        init: false,
    };
    service.workload.run().unwrap_or(&BUILT_IN)
}

/// Removes what microscaler created for each service, one after the other (the shutdown of the
/// service-level backends): `remove` gives the removal of a service's object, with what it is
/// for the log, or `None` for a service with nothing of ours (a reference, one never
/// prepared). A failure is logged and the others still go; the first failure is returned.
pub(crate) async fn remove_each<'a, F, Fut>(
    services: &'a [Service],
    mut remove: F,
) -> Result<(), BackendError>
where
    F: FnMut(&'a Service) -> Option<Fut>,
    Fut: Future<Output = (String, Result<(), BackendError>)>,
{
    let mut first_error = None;
    for s in services {
        let Some(removal) = remove(s) else { continue };
        let (what, result) = removal.await;
        match result {
            Ok(()) => tracing::info!(service = %s.name, "removed {what}"),
            Err(e) => {
                tracing::warn!(service = %s.name, error = %e, "removing {what} failed; going on with the others");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Label keys put on everything microscaler creates. Only objects carrying both the instance
/// and the service label are ever counted, stopped or removed.
pub mod labels {
    /// The owning microscaler instance (`Config::instance`).
    pub const INSTANCE: &str = "io.microscaler.instance";
    /// The service a replica belongs to.
    pub const SERVICE: &str = "io.microscaler.service";
    /// `warm` on containers created for a warm pool. Informational: labels cannot change, so
    /// a container taken from the pool keeps it; whether a container is pooled now is decided
    /// by its state (paused).
    pub const POOL: &str = "io.microscaler.pool";
}

/// What a backend observed in one tick.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// Per managed service. Services with no replicas may be absent.
    pub services: BTreeMap<ServiceName, ServiceObservation>,
    /// The hosts, with whether they are ready.
    pub hosts: Vec<Host>,
    /// Every managed replica, for the per-host view.
    pub replicas: Vec<Replica>,
    /// Per service, replicas that are paused: the warm pool and replicas preempted with
    /// `preempt = "pause"`. They are in neither `running` nor `pending` of `services` (and not
    /// in `replicas`). Services with none may be absent.
    pub paused: BTreeMap<ServiceName, u32>,
    /// Per-host services the orchestrator runs on some hosts only: the hosts each may run on
    /// ([`microscaler_core::Observed::runs_on`]). Absent: every ready host.
    pub runs_on: BTreeMap<ServiceName, Vec<HostId>>,
}

/// State of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Created or being scheduled, not running yet.
    Pending,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
}

/// One managed replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// Backend id (container id, task id, pid).
    pub id: String,
    /// Its service.
    pub service: ServiceName,
    /// The host it is on ([`Host::id`](microscaler_core::Host::id); empty while the
    /// orchestrator has not placed it yet).
    pub host: HostId,
    /// Its state.
    pub state: ReplicaState,
}

/// A replica that failed to start.
#[derive(Debug, Clone, PartialEq)]
pub struct StartFailure {
    /// The service.
    pub service: ServiceName,
    /// What went wrong, with the engine's own message.
    pub message: String,
}

/// What one `scale` call did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScaleOutcome {
    /// Replicas started (or, for service-level backends, added to the requested count).
    pub started: u32,
    /// Replicas stopped and removed.
    pub stopped: u32,
    /// Starts that failed; the caller retries them with backoff on a later tick.
    pub failures: Vec<StartFailure>,
    /// Of `started`, replicas that were paused (taken from the warm pool or resumed after a
    /// preemption) and only unpaused.
    pub resumed: u32,
    /// Of `stopped`, replicas that were paused (kept, `preempt = "pause"`) instead of removed.
    pub paused: u32,
}

/// Errors of a backend. Messages say what failed, on what, and what to do. Each has a
/// [`ErrorClass`] that decides how it is retried; nothing downstream reads the text.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The orchestrator cannot be reached at all.
    #[error("cannot reach {what}: {hint}")]
    Unreachable {
        /// What was tried, with its address.
        what: String,
        /// What to do about it.
        hint: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// An object the configuration names does not exist (a referenced service, an image).
    #[error("{what} not found: {hint}")]
    NotFound {
        /// The object, with where it was looked for.
        what: String,
        /// What to do about it.
        hint: String,
    },
    /// The orchestrator refused a change because the object changed or is busy (Kubernetes'
    /// resourceVersion conflict, Marathon's deployment lock, Swarm's "update out of
    /// sequence"). Retried on a later tick with what is observed then, never forced.
    #[error("{op}: conflict: {message}")]
    Conflict {
        /// The operation, with its object.
        op: String,
        /// The orchestrator's message.
        message: String,
    },
    /// The orchestrator asked us to slow down (AWS' ThrottlingException, HTTP 429).
    #[error("{op}: throttled: {message}")]
    Throttled {
        /// The operation, with its object.
        op: String,
        /// The orchestrator's message.
        message: String,
    },
    /// The orchestrator refused the request as invalid (a bad image name, a spec it rejects).
    #[error("{op}: refused as invalid: {message}")]
    Invalid {
        /// The operation, with its object.
        op: String,
        /// The orchestrator's message.
        message: String,
    },
    /// A call to the orchestrator failed otherwise.
    #[error("{op} failed: {message}")]
    Api {
        /// The operation, with its object (`start container web-3`).
        op: String,
        /// The orchestrator's message.
        message: String,
    },
    /// The backend cannot run this configuration.
    #[error("{0}")]
    Unsupported(String),
}

/// How a failed backend call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorClass {
    /// The orchestrator is away: retried with backoff, reported until it answers.
    Unreachable,
    /// Something the configuration names is missing: a person must act; retried slowly.
    NotFound,
    /// The object changed under us: retried at the next tick, on a fresh observation.
    Conflict,
    /// Slow down: retried with a longer backoff and jitter.
    Throttled,
    /// The request was refused as invalid: a person must act; retried slowly.
    Invalid,
    /// The backend cannot do this at all: retried slowly.
    Unsupported,
    /// Any other failure (a start that failed, an API error): retried with backoff.
    Failed,
}

impl ErrorClass {
    /// Short stable name, for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Unreachable => "unreachable",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Conflict => "conflict",
            ErrorClass::Throttled => "throttled",
            ErrorClass::Invalid => "invalid",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::Failed => "failed",
        }
    }

    /// The wait before retrying after the `failures`-th failure in a row (1 for the first),
    /// before any jitter: a conflict is retried at once (the next tick), a throttle from 1 s
    /// doubling to 60 s, what needs a person from 5 s doubling to 5 min, the rest from 0.5 s
    /// doubling to 30 s.
    pub fn backoff(self, failures: u32) -> std::time::Duration {
        use std::time::Duration;
        let (first, max) = match self {
            ErrorClass::Conflict => return Duration::ZERO,
            ErrorClass::Throttled => (Duration::from_secs(1), Duration::from_secs(60)),
            ErrorClass::NotFound | ErrorClass::Invalid | ErrorClass::Unsupported => {
                (Duration::from_secs(5), Duration::from_secs(300))
            }
            ErrorClass::Unreachable | ErrorClass::Failed => {
                (Duration::from_millis(500), Duration::from_secs(30))
            }
        };
        first
            .saturating_mul(1 << failures.saturating_sub(1).min(10))
            .min(max)
    }

    /// Whether the retry wait is spread by jitter, so many services throttled together do not
    /// come back together.
    pub fn jitter(self) -> bool {
        matches!(self, ErrorClass::Throttled)
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl BackendError {
    /// How this error is retried.
    pub fn class(&self) -> ErrorClass {
        match self {
            BackendError::Unreachable { .. } => ErrorClass::Unreachable,
            BackendError::NotFound { .. } => ErrorClass::NotFound,
            BackendError::Conflict { .. } => ErrorClass::Conflict,
            BackendError::Throttled { .. } => ErrorClass::Throttled,
            BackendError::Invalid { .. } => ErrorClass::Invalid,
            BackendError::Api { .. } => ErrorClass::Failed,
            BackendError::Unsupported(_) => ErrorClass::Unsupported,
        }
    }

    /// Short stable kind, for metrics and logs (the class's name).
    pub fn kind(&self) -> &'static str {
        self.class().as_str()
    }
}

/// An orchestrator microscaler drives.
///
/// Implementations must only ever count, stop or remove objects carrying both of microscaler's
/// labels with this instance's value, and must leave no stopped replicas behind.
pub trait Backend: Send + Sync {
    /// Short name (`docker`, `swarm`, `process`), for logs and the dashboard. Never compared:
    /// what a backend can do is in [`Backend::capabilities`].
    fn kind(&self) -> &'static str;

    /// What this backend can do; the control loop acts on these.
    fn capabilities(&self) -> Capabilities;

    /// Checks that the orchestrator answers and prepares what the services need (images, Swarm
    /// services). Replicas already running with this instance's labels are adopted, not
    /// duplicated.
    fn prepare(
        &self,
        services: &[Service],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// `run --dry-run`: what [`Backend::prepare`] checks (the orchestrator answers, references
    /// exist, images are there) and what observing needs (watches), changing nothing in the
    /// orchestrator: what `prepare` would create, import, update or remove is logged instead.
    /// After it only `observe` is called. A managed object a service-level orchestrator does
    /// not have yet is observed as running nothing.
    fn prepare_dry_run(
        &self,
        services: &[Service],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// What runs now.
    fn observe(&self) -> impl Future<Output = Result<Observation, BackendError>> + Send;

    /// Makes `service` run `target` replicas. Container-level backends stop the newest replicas
    /// first (pending before running) and start new ones with bounded parallelism; a failed start
    /// is reported in the outcome, not as an error, so the rest of the plan goes on.
    fn scale(
        &self,
        service: &Service,
        target: u32,
    ) -> impl Future<Output = Result<ScaleOutcome, BackendError>> + Send;

    /// [`Backend::scale`], with what the plan says of the change: its reason, for
    /// orchestrators that keep one with the change (Nomad's scaling events), and on a
    /// scale-down the hosts the plan takes the replicas from, for orchestrators that can be
    /// told which replicas to remove (Kubernetes' pod deletion cost). Default: `scale`, the
    /// rest unused.
    fn scale_with(
        &self,
        service: &Service,
        target: u32,
        change: &Change<'_>,
    ) -> impl Future<Output = Result<ScaleOutcome, BackendError>> + Send {
        let _ = change;
        self.scale(service, target)
    }

    /// Whether this microscaler may change anything now. A backend with leader election (a
    /// Kubernetes Lease) answers whether it holds the lease; the control loop of one that does
    /// not observes, decides and reports, and changes nothing. Default: always.
    fn leading(&self) -> bool {
        true
    }

    /// Tells the backend whether this microscaler may change anything now (with `[ha]`, only
    /// the holder of the etcd lease may). A backend whose `prepare` or `observe` tidies up on
    /// its own (removes containers left half-done, refills a warm pool) does so only while
    /// acting, so a follower's observation never touches the leader's replicas. The control
    /// loop calls it before `prepare` and before every observation. Default: unused.
    fn set_acting(&self, acting: bool) {
        let _ = acting;
    }

    /// Gives the backend the control loop's waker: a backend told of a change by its
    /// orchestrator (an event queue) rings it so the loop ticks at once instead of at its next
    /// period. Default: unused.
    fn wake_on_change(&self, waker: std::sync::Arc<tokio::sync::Notify>) {
        let _ = waker;
    }

    /// Called once on shutdown: with `remove`, stops and removes every managed replica (and
    /// Swarm service); without, leaves them for the next start to adopt.
    fn shutdown(
        &self,
        services: &[Service],
        remove: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// Whether `prepare` may change the orchestrator, or only check it (`run --dry-run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Create, import, update and remove what the services need.
    Yes,
    /// Check and log what would be done.
    No,
}

/// The target of a service-level backend's `resolve` with [`Apply::Yes`], which creates what
/// is missing and so always has one.
pub(crate) fn resolved<T>(target: Option<T>) -> Result<T, BackendError> {
    target.ok_or_else(|| BackendError::Api {
        op: "resolve a service".into(),
        message: "no target after creating it".into(),
    })
}

/// The backends as one closed enum: adding a backend means one module, one variant, one arm.
pub enum AnyBackend {
    /// A single Docker Engine.
    Docker(docker::DockerBackend),
    /// Docker Swarm.
    Swarm(swarm::SwarmBackend),
    /// Local processes.
    Process(process::ProcessBackend),
    /// Kubernetes.
    #[cfg(feature = "kubernetes")]
    Kubernetes(kubernetes::KubernetesBackend),
    /// Nomad.
    Nomad(nomad::NomadBackend),
    /// Marathon.
    Marathon(marathon::MarathonBackend),
    /// AWS ECS.
    #[cfg(feature = "ecs")]
    Ecs(ecs::EcsBackend),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Docker($b) => $e,
            AnyBackend::Swarm($b) => $e,
            AnyBackend::Process($b) => $e,
            #[cfg(feature = "kubernetes")]
            AnyBackend::Kubernetes($b) => $e,
            AnyBackend::Nomad($b) => $e,
            AnyBackend::Marathon($b) => $e,
            #[cfg(feature = "ecs")]
            AnyBackend::Ecs($b) => $e,
        }
    };
}

impl Backend for AnyBackend {
    fn kind(&self) -> &'static str {
        dispatch!(self, b => b.kind())
    }
    fn capabilities(&self) -> Capabilities {
        dispatch!(self, b => b.capabilities())
    }
    async fn prepare(&self, services: &[Service]) -> Result<(), BackendError> {
        dispatch!(self, b => b.prepare(services).await)
    }
    async fn prepare_dry_run(&self, services: &[Service]) -> Result<(), BackendError> {
        dispatch!(self, b => b.prepare_dry_run(services).await)
    }
    async fn observe(&self) -> Result<Observation, BackendError> {
        dispatch!(self, b => b.observe().await)
    }
    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        dispatch!(self, b => b.scale(service, target).await)
    }
    async fn scale_with(
        &self,
        service: &Service,
        target: u32,
        change: &Change<'_>,
    ) -> Result<ScaleOutcome, BackendError> {
        dispatch!(self, b => b.scale_with(service, target, change).await)
    }
    fn leading(&self) -> bool {
        dispatch!(self, b => b.leading())
    }
    fn set_acting(&self, acting: bool) {
        dispatch!(self, b => b.set_acting(acting))
    }
    fn wake_on_change(&self, waker: std::sync::Arc<tokio::sync::Notify>) {
        dispatch!(self, b => b.wake_on_change(waker))
    }
    async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
        dispatch!(self, b => b.shutdown(services, remove).await)
    }
}
