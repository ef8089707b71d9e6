//! Backends: the orchestrators microscaler drives.
//!
//! Two kinds, one trait:
//! - container-level ([`docker`], [`process`]): the backend itself creates, starts, stops and
//!   removes replicas, and chooses which replica to stop;
//! - service-level ([`swarm`]): the backend sets a replica count and the orchestrator places
//!   the replicas.
//!
//! Every backend answers the same questions (what runs, what is pending, which hosts) and takes
//! the same order (set service S to N replicas). Backends never sleep between ticks and never
//! decide: the engine decides, the control loop calls them.
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;

use microscaler_core::{Host, Service, ServiceName, ServiceObservation};

pub mod docker;
pub mod docker_api;
pub mod process;
pub mod swarm;

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
    /// The host it is on.
    pub host: String,
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

/// Errors of a backend. Messages say what failed, on what, and what to do.
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
    /// A call to the orchestrator failed.
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

impl BackendError {
    /// Short stable kind, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Unreachable { .. } => "unreachable",
            BackendError::Api { .. } => "api",
            BackendError::Unsupported(_) => "unsupported",
        }
    }
}

/// An orchestrator microscaler drives.
///
/// Implementations must only ever count, stop or remove objects carrying both of microscaler's
/// labels with this instance's value, and must leave no stopped replicas behind.
pub trait Backend: Send + Sync {
    /// Short name (`docker`, `swarm`, `process`).
    fn kind(&self) -> &'static str;

    /// Checks that the orchestrator answers and prepares what the services need (images, Swarm
    /// services). Replicas already running with this instance's labels are adopted, not
    /// duplicated.
    fn prepare(
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

    /// Called once on shutdown: with `remove`, stops and removes every managed replica (and
    /// Swarm service); without, leaves them for the next start to adopt.
    fn shutdown(
        &self,
        services: &[Service],
        remove: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// The backends as one closed enum: adding a backend means one module, one variant, one arm.
pub enum AnyBackend {
    /// A single Docker Engine.
    Docker(docker::DockerBackend),
    /// Docker Swarm.
    Swarm(swarm::SwarmBackend),
    /// Local processes.
    Process(process::ProcessBackend),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Docker($b) => $e,
            AnyBackend::Swarm($b) => $e,
            AnyBackend::Process($b) => $e,
        }
    };
}

impl Backend for AnyBackend {
    fn kind(&self) -> &'static str {
        dispatch!(self, b => b.kind())
    }
    async fn prepare(&self, services: &[Service]) -> Result<(), BackendError> {
        dispatch!(self, b => b.prepare(services).await)
    }
    async fn observe(&self) -> Result<Observation, BackendError> {
        dispatch!(self, b => b.observe().await)
    }
    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        dispatch!(self, b => b.scale(service, target).await)
    }
    async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
        dispatch!(self, b => b.shutdown(services, remove).await)
    }
}
