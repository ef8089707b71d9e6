//! The Docker Engine backend: a container-level backend that creates, starts, stops and removes
//! replica containers on one engine itself.
//!
//! Ownership is decided by labels only: a container belongs to this backend when it carries
//! [`labels::INSTANCE`] with this instance's name and a [`labels::SERVICE`] label. Nothing else
//! on the engine is ever listed, counted, stopped or removed, so several microscaler instances
//! (and anything else) can share one engine.
//!
//! Stopped containers are never left behind: a scale-down stops and then removes, a failed start
//! removes what it created, and `observe` removes replicas that exited on their own (the project
//! this replaces left 700 stopped containers per host after three hours) and ones created whose
//! start was lost (the engine stopped or restarted between the create and the start).
//!
//! # Warm pool
//! A service with `[services.pool] size = N` keeps N replicas created, started and paused ahead
//! of demand, so a scale-up is an unpause (~0.02 s) instead of a create + start (~0.3 s).
//! Labels are immutable, so pool membership is decided by state: **a paused container of ours
//! is pooled**, an unpaused one is a replica. Containers created for the pool also carry
//! [`labels::POOL`]` = warm`, for people reading `docker ps`; it says where a container came
//! from, not what it is now. A scale-up unpauses pooled replicas first (oldest first) and
//! creates the rest; a scale-down of a `preempt = "pause"` service pauses its running replicas
//! (their work is kept and resumed by the next scale-up) instead of stopping them. A background
//! refill (one task per service at a time, bounded by `start_parallelism`) tops the pool up to
//! its size after `scale` and whenever `observe` finds it short or over. Containers being filled
//! (created, not yet paused) are counted nowhere, so a refill never shows up as a running
//! replica. After a restart, paused containers of this instance are adopted as the pool.
//!
//! # Watching, not listing
//! The first `observe` starts following the engine's container events (filtered on this
//! instance's label); from then on `observe`, `scale` and the pool's refill read a view kept from
//! them and list nothing (observe pings the engine, so one that is gone still fails it),
//! listing only to resynchronise (at start, after a stream
//! error, and every minute as a safety net). See [`watch`] for how the view stays exact, also
//! for the changes this backend makes itself. `[backend] events = false` turns it off.
//!
//! While the view is not synced (before the first resync, or while the stream is down),
//! `observe` lists every container of ours; a `scale` right after it (the same tick) reuses that
//! listing for its service instead of listing again, if the listing is under 0.5 s old and this
//! backend began no change of the service's containers since it was requested (a scale, a
//! refill's fill or trim; each bumps a per-service generation when it begins and when it ends).
//! A listing serves one scale per service; anything else lists. The engine's host facts
//! (`GET /info`) are read by the first observe and refreshed in the background every 10 s.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use microscaler_core::plugin::{Capabilities, ServiceContext};
use microscaler_core::validate::join;
use microscaler_core::{Host, Preempt, Resources, ServiceName, ServiceObservation, Validator};
use serde::Deserialize;
use tokio::sync::OnceCell;

use crate::config::{Service, Workload};
use crate::docker_api;
mod watch;
pub use watch::WatchStats;
use watch::{Action, Effect, Watch};

use crate::{
    labels, managed, Apply, Backend, BackendError, Observation, Replica, ReplicaState,
    ScaleOutcome, StartFailure,
};

// ---------------------------------------------------------------------------------------------
// Configuration: `[backend] type = "docker"` and what a service gives it.

/// `[backend] type = "docker"`: a single Docker Engine.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    /// Engine address (`unix:///var/run/docker.sock`, `tcp://host:2375`); `None` means
    /// `DOCKER_HOST` or the default socket.
    pub host: Option<String>,
    /// How many containers are created and started at once (1 to 256, default 8).
    pub start_parallelism: usize,
    /// How many containers are stopped and removed at once, all services together (1 to 1024,
    /// default 64): Docker 20.10 loses track of some containers when about 1,000 are removed
    /// together.
    pub stop_parallelism: usize,
    /// Network mode of the replicas (`none`, the default, `host`, `bridge` or a network name).
    pub network: String,
    /// What the host gives to microscaler's replicas, instead of the engine's CPUs and memory
    /// (`allocatable = { cpu = "2", memory = "4Gi" }`), for `[capacity] resources = true` on a
    /// host shared with other work.
    pub allocatable: Option<Resources>,
    /// Whether to keep the replicas' states from the engine's event stream (the default)
    /// rather than listing every container on every tick.
    pub events: bool,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: None,
            start_parallelism: 8,
            stop_parallelism: DEFAULT_STOP_PARALLELISM,
            network: "none".into(),
            allocatable: None,
            events: true,
        }
    }
}

#[derive(Deserialize)]
struct RawDocker {
    host: Option<String>,
    start_parallelism: Option<u32>,
    stop_parallelism: Option<u32>,
    network: Option<String>,
    allocatable: Option<toml::Value>,
    events: Option<bool>,
}

/// What the docker backend can do: it pauses (warm pools), reports the engine's CPUs and
/// memory, and its stops are done when `scale` returns.
pub const CAPABILITIES: Capabilities = Capabilities {
    pause: true,
    host_resources: true,
    ..Capabilities::CONTAINER_LEVEL
};

impl DockerConfig {
    /// Validates the `[backend]` section (without `type`) at `path`.
    pub fn validate(options: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawDocker = v.part(options, path)?;
        let start_parallelism = match r.start_parallelism {
            None => 8,
            Some(n @ 1..=256) => n as usize,
            Some(n) => {
                v.err(
                    join(path, "start_parallelism"),
                    format!("must be between 1 and 256, got {n}"),
                );
                8
            }
        };
        let stop_parallelism = match r.stop_parallelism {
            None => DEFAULT_STOP_PARALLELISM,
            Some(n @ 1..=1024) => n as usize,
            Some(n) => {
                v.err(
                    join(path, "stop_parallelism"),
                    format!("must be between 1 and 1024, got {n}"),
                );
                DEFAULT_STOP_PARALLELISM
            }
        };
        let allocatable = match r.allocatable {
            None => None,
            Some(raw) => Some(v.resources(raw, &join(path, "allocatable"))?),
        };
        if r.host.as_deref().is_some_and(|h| h.trim().is_empty()) {
            v.err(join(path, "host"), "must not be empty");
        }
        // Docker reads the mode only when it creates a container: refused here, not then.
        let network = match r.network {
            None => "none".to_string(),
            Some(n)
                if n.is_empty() || n.contains(|c: char| c.is_whitespace() || c.is_control()) =>
            {
                v.err(
                    join(path, "network"),
                    format!(
                        "must be none (the default), host, bridge or a network's name, got {n:?}"
                    ),
                );
                "none".to_string()
            }
            Some(n) => n,
        };
        Some(DockerConfig {
            host: r.host,
            start_parallelism,
            stop_parallelism,
            network,
            allocatable,
            events: r.events.unwrap_or(true),
        })
    }

    /// Validates a service's own keys for this backend: `image`, `command`, `env` and `init`.
    pub fn workload(
        mut options: toml::Table,
        _: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Workload> {
        let init = crate::RunSpec::take_init(&mut options, v, path).unwrap_or(false);
        let mut run = Workload::managed_only("docker", options, v, path)?;
        run.init = init;
        Some(Workload::Managed(run))
    }
}

/// Stops and removals sent to the engine at once unless `stop_parallelism` says otherwise:
/// Debian's docker.io 20.10 left containerd tasks, containers and shims behind for about one
/// in seven of 1,000 containers stopped and removed together, and none at this bound
/// (docs/notes.md, "A CI run that could not start Docker").
pub const DEFAULT_STOP_PARALLELISM: usize = 64;

/// Environment variable telling a replica which service it belongs to.
pub const ENV_SERVICE: &str = "MICROSCALER_SERVICE";
/// Environment variable telling a replica which microscaler instance started it.
pub const ENV_INSTANCE: &str = "MICROSCALER_INSTANCE";

/// Extra time the client waits for a stop beyond the grace period, so a slow engine is not
/// mistaken for a hung one while it is still honouring the grace.
const STOP_SLACK: Duration = Duration::from_secs(30);

/// A single Docker Engine driven container by container.
///
/// Clones share the engine connection and the warm pool's state (the background refill runs
/// on a clone).
#[derive(Clone)]
pub struct DockerBackend {
    docker: Docker,
    /// The engine's address, for messages.
    address: String,
    instance: String,
    start_parallelism: usize,
    /// Stops and removals at once (see [`DockerConfig::stop_parallelism`]): permits shared
    /// by every call and clone, since the control loop changes many services at once.
    stops: Arc<tokio::sync::Semaphore>,
    network: String,
    /// `[backend] allocatable`, reported as the host's CPUs and memory when set.
    allocatable: Option<Resources>,
    /// The built-in replica image, imported once on first use.
    replica_image: Arc<OnceCell<String>>,
    /// The warm pool's state.
    pool: Arc<PoolState>,
    /// The last observe's listing (reused by the same tick's `scale`) and the engine's host.
    cache: Arc<Cache>,
    /// Whether this microscaler may change anything ([`Backend::set_acting`]): a follower's
    /// `prepare` and `observe` remove nothing and refill no pool (the containers are the
    /// leader's, and one it has just created is about to be started, not abandoned).
    acting: Arc<std::sync::atomic::AtomicBool>,
    /// The view of our containers kept from the engine's events.
    watch: Arc<Watch>,
}

/// How long an observe's listing may serve a `scale` of a service this backend did not change
/// since: long enough for one tick (observe, sample, decide, act). What changes behind our back
/// in between (a replica exiting, a container removed by hand) is not in it; like a change
/// just after a fresh listing, it is seen and acted on by the next tick.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(500);

/// How often the engine's host facts (name, id, CPUs, memory) are read again. They change only
/// when the engine is reconfigured; reading them (`GET /info`, ~10 ms) on every observe was
/// most of its cost. Refreshed in the background; the listing still fails if the engine is gone.
const HOST_REFRESH: Duration = Duration::from_secs(10);

/// Changes of one service's containers by this backend: a generation bumped when a change
/// begins and again when it ends, and how many are under way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Changes {
    generation: u64,
    under_way: u32,
}

/// One `observe`'s listing of our containers, with what had changed when it was requested.
struct Snapshot {
    /// When the listing was requested.
    at: std::time::Instant,
    /// [`Cache::changes`] when the listing was requested.
    changes: HashMap<ServiceName, Changes>,
    /// Our live containers (finished ones are swept by observe and left out).
    containers: Vec<Owned>,
}

/// What one tick's `observe` learned that its `scale` calls may reuse, and the host facts.
#[derive(Default)]
struct Cache {
    /// Per service, the changes this backend made to its containers (scale, refill, trim).
    changes: Mutex<HashMap<ServiceName, Changes>>,
    /// The last observe's listing.
    snapshot: Mutex<Option<Snapshot>>,
    /// The host, and when it was read.
    host: Mutex<Option<(Host, std::time::Instant)>>,
    /// A background host refresh is under way.
    host_refreshing: AtomicBool,
    /// Listings asked of the engine (for tests and profiling).
    lists: AtomicU64,
}

impl Cache {
    /// Marks a change of `service`'s containers as begun; it ends when the guard drops.
    fn begin(self: &Arc<Self>, service: &ServiceName) -> Changing {
        let mut changes = lock(&self.changes);
        let c = changes.entry(service.clone()).or_default();
        c.generation += 1;
        c.under_way += 1;
        Changing {
            cache: self.clone(),
            service: service.clone(),
        }
    }

    /// Begins a change of `service` (a scale) and returns the last observe's containers of
    /// `service` if that listing is still true for it: taken less than [`SNAPSHOT_MAX_AGE`]
    /// ago, with no change of the service begun, under way or ended since it was requested.
    /// A snapshot serves at most one scale: the change begun here makes it stale.
    fn begin_scale(self: &Arc<Self>, service: &ServiceName) -> (Changing, Option<Vec<Owned>>) {
        let changes = lock(&self.changes);
        let now = changes.get(service).copied().unwrap_or_default();
        let fresh = lock(&self.snapshot).as_ref().and_then(|snap| {
            let then = snap.changes.get(service).copied().unwrap_or_default();
            (now == then && now.under_way == 0 && snap.at.elapsed() <= SNAPSHOT_MAX_AGE).then(
                || {
                    snap.containers
                        .iter()
                        .filter(|c| &c.service == service)
                        .cloned()
                        .collect()
                },
            )
        });
        drop(changes);
        (self.begin(service), fresh)
    }
}

/// A change of one service's containers under way (see [`Cache::begin`]).
struct Changing {
    cache: Arc<Cache>,
    service: ServiceName,
}

impl Drop for Changing {
    fn drop(&mut self) {
        let mut changes = lock(&self.cache.changes);
        let c = changes.entry(self.service.clone()).or_default();
        c.generation += 1;
        c.under_way = c.under_way.saturating_sub(1);
    }
}

/// What the warm pool's background refill shares with the backend.
#[derive(Default)]
struct PoolState {
    /// The services with a pool or `preempt = "pause"`, as given to `prepare`.
    services: Mutex<BTreeMap<ServiceName, Service>>,
    /// Names of containers being filled (created, maybe started, not yet paused): neither
    /// replicas nor pooled yet, so `observe` and `scale` skip them.
    filling: Mutex<HashSet<String>>,
    /// When recent fills ended (their pause done), by name: a listing asked for before that
    /// may still show the container running, which it is not (see [`PoolState::hidden`]).
    filled: Mutex<HashMap<String, std::time::Instant>>,
    /// Names of paused containers being removed beyond the pool: counted nowhere.
    trimming: Mutex<HashSet<String>>,
    /// Services with a refill task running (at most one each).
    refilling: Mutex<HashSet<ServiceName>>,
    /// Set by `shutdown`: no refill starts or creates anything afterwards.
    closed: AtomicBool,
    /// Every refill task holds a read guard; `shutdown` takes the write guard to wait for them.
    gate: Arc<tokio::sync::RwLock<()>>,
}

impl PoolState {
    /// Whether a container listed as `c` by a listing asked for at `asked` is none of our
    /// replicas yet: it is being filled, or its fill ended after the listing was asked for and
    /// the listing shows it before its pause (running). Without the second case, a listing
    /// that raced a fill's pause counted the new pool container as running.
    fn hidden(&self, c: &Owned, asked: std::time::Instant) -> bool {
        if lock(&self.filling).contains(&*c.name) || lock(&self.trimming).contains(&*c.name) {
            return true;
        }
        !c.is_paused()
            && lock(&self.filled)
                .get(&*c.name)
                .is_some_and(|&done| done >= asked)
    }

    /// Records that the fill of `name` ended, and forgets fills older than a minute.
    fn filled(&self, name: String) {
        let now = std::time::Instant::now();
        let mut filled = lock(&self.filled);
        filled.retain(|_, done| now.duration_since(*done) < Duration::from_secs(60));
        filled.insert(name, now);
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain sets and maps).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many paused replicas of `service` to keep, given its running ones: the pool's size, and
/// for `preempt = "pause"` also the preempted ones up to its `max` (their work is kept).
fn paused_limit(service: &Service, running: u32) -> u32 {
    let pool = service.pool;
    match pool.preempt {
        Preempt::Stop => pool.size,
        Preempt::Pause => pool.size.max(service.max.saturating_sub(running)),
    }
}

/// One of our containers, as listed.
#[derive(Debug, Clone)]
struct Owned {
    /// Shared: the event view, the observation and the listing cache hold the same text (a
    /// clone per tick and container costs no allocation).
    id: std::sync::Arc<str>,
    name: std::sync::Arc<str>,
    service: ServiceName,
    state: ContainerSummaryStateEnum,
    created: i64,
}

impl Owned {
    /// Running replicas.
    fn is_running(&self) -> bool {
        self.state == ContainerSummaryStateEnum::RUNNING
    }
    /// Replicas that occupy capacity but do not run yet.
    fn is_pending(&self) -> bool {
        matches!(
            self.state,
            ContainerSummaryStateEnum::CREATED | ContainerSummaryStateEnum::RESTARTING
        )
    }
    /// Paused replicas: the warm pool (and preempted ones kept with `preempt = "pause"`).
    /// Neither running nor pending.
    fn is_paused(&self) -> bool {
        self.state == ContainerSummaryStateEnum::PAUSED
    }
    /// Replicas already on their way out: the engine is stopping or removing them.
    fn is_stopping(&self) -> bool {
        matches!(
            self.state,
            ContainerSummaryStateEnum::REMOVING | ContainerSummaryStateEnum::STOPPING
        )
    }
    /// Leftovers that only need removing.
    fn is_finished(&self) -> bool {
        matches!(
            self.state,
            ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD
        )
    }
}

/// Whole seconds for the engine, rounded up so a grace of 1.5 s is never cut to 1 s.
fn grace_secs(grace: Duration) -> i32 {
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// A short random suffix for container names. Names must be unique on the engine even across
/// restarts of microscaler (adopted containers keep their names), so a counter alone would not do.
fn name_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // `RandomState` is seeded randomly per process; hashing a counter with it gives distinct,
    // unpredictable values without another dependency.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let h = RandomState::new().hash_one(n);
    format!("{:08x}", h as u32)
}

impl DockerBackend {
    /// `prepare`, or with [`Apply::No`] its checks only: what it would import or remove is
    /// logged instead.
    fn acting(&self) -> bool {
        self.acting.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn prepare_as(&self, services: &[Service], apply: Apply) -> Result<(), BackendError> {
        *lock(&self.pool.services) = services
            .iter()
            .filter(|s| s.pool.pauses())
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        // Explicit images must already be on the engine: no registry is reachable, so pulling is
        // not an option. Report every missing image at once.
        let mut missing = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for image in services.iter().filter_map(|s| managed(s).image.as_deref()) {
            if !seen.insert(image) {
                continue;
            }
            match self.docker.inspect_image(image).await {
                Ok(_) => {}
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => missing.push(image),
                Err(e) => return Err(self.error(format!("inspect image {image}"), e)),
            }
        }
        if !missing.is_empty() {
            let list = missing.join(", ");
            let (noun, verb) = if missing.len() == 1 {
                ("image", "is")
            } else {
                ("images", "are")
            };
            return Err(BackendError::Api {
                op: "prepare the docker backend".into(),
                message: format!(
                    "{noun} {list} {verb} not on the engine at {}; no registry is reachable here: \
                     build or import it first (docker build / docker import)",
                    self.address
                ),
            });
        }
        if services.iter().any(|s| managed(s).image.is_none()) && apply == Apply::No {
            let image = docker_api::replica_image();
            if self.docker.inspect_image(&image).await.is_err() {
                tracing::info!(image = %image, "dry run: would import the built-in replica image");
            }
        } else if services.iter().any(|s| managed(s).image.is_none()) {
            let image = self
                .replica_image
                .get_or_try_init(|| docker_api::ensure_replica_image(&self.docker))
                .await?;
            tracing::debug!(image = %image, "built-in replica image is on the engine");
        }

        // Adoption: running replicas of an earlier run are kept and counted by `observe`. What
        // that run left half-done (created but never started) or stopped is removed, so it is
        // neither counted as pending forever nor left behind.
        let ours = self.list(None).await?;
        let leftovers: Vec<Owned> = ours
            .iter()
            .filter(|c| c.is_finished() || c.state == ContainerSummaryStateEnum::CREATED)
            .cloned()
            .collect();
        let adopted = ours.iter().filter(|c| c.is_running()).count();
        // Paused containers of ours are the warm pool (or preempted replicas kept paused).
        let pooled = ours.iter().filter(|c| c.is_paused()).count();
        if apply == Apply::Yes && self.acting() {
            self.sweep(&leftovers).await;
        } else if apply == Apply::Yes && !leftovers.is_empty() {
            tracing::info!(
                count = leftovers.len(),
                "not leading: leaving the replicas left created or stopped to the leader"
            );
        } else if !leftovers.is_empty() {
            tracing::info!(
                count = leftovers.len(),
                "dry run: would remove replicas an earlier run left created or stopped"
            );
        }
        tracing::info!(
            engine = %self.address, instance = %self.instance, adopted, pooled,
            removed = leftovers.len(), "docker backend prepared"
        );
        Ok(())
    }

    /// Connects to the engine named by `spec.host` (or `DOCKER_HOST`, or the default socket)
    /// and checks that it answers. `instance` is this microscaler's name: only containers
    /// labelled with it are ever touched.
    pub async fn connect(
        spec: &DockerConfig,
        instance: &str,
    ) -> Result<DockerBackend, BackendError> {
        if let Err(e) = ServiceName::try_new(instance) {
            return Err(BackendError::Unsupported(format!(
                "instance name {instance:?} cannot be used in container names and labels: it {e}"
            )));
        }
        let address = docker_api::engine_address(spec.host.as_deref());
        let docker = docker_api::connect(spec.host.as_deref()).await?;
        let network = if spec.network.trim().is_empty() {
            "none".to_string()
        } else {
            spec.network.clone()
        };
        tracing::debug!(engine = %address, instance, network = %network, "connected to the Docker engine");
        Ok(DockerBackend {
            allocatable: spec.allocatable,
            docker,
            address,
            instance: instance.to_string(),
            start_parallelism: spec.start_parallelism.max(1),
            stops: Arc::new(tokio::sync::Semaphore::new(spec.stop_parallelism.max(1))),
            network,
            replica_image: Arc::new(OnceCell::new()),
            pool: Arc::new(PoolState::default()),
            cache: Arc::new(Cache::default()),
            acting: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            watch: Arc::new(Watch::new(spec.events)),
        })
    }

    /// The engine's address this backend talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The instance name whose containers this backend owns.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// How many container listings this backend and its clones have asked the engine for
    /// (observe, a scale that could not reuse observe's listing, the pool's refill). For tests
    /// and profiling.
    pub fn listings(&self) -> u64 {
        self.cache.lists.load(Ordering::Relaxed)
    }

    /// Turns a bollard error into ours: an answer from the engine is an API error carrying the
    /// engine's message; anything else means the engine could not be reached.
    fn error(&self, op: impl Into<String>, e: bollard::errors::Error) -> BackendError {
        let op = op.into();
        if let Some(answered) = docker_api::answered(op.clone(), &e) {
            return answered;
        }
        BackendError::Unreachable {
            what: format!("the Docker engine at {} (to {op})", self.address),
            hint: format!("{e}; is dockerd running? set DOCKER_HOST or [backend] host"),
            source: Some(Box::new(e)),
        }
    }

    /// Lists our containers (all states), optionally of one service only, without those
    /// that are none of our replicas yet (being filled or trimmed).
    async fn list(&self, service: Option<&ServiceName>) -> Result<Vec<Owned>, BackendError> {
        let asked = std::time::Instant::now();
        let what = match service {
            Some(s) => format!("list containers of service {s}"),
            None => format!("list containers of instance {}", self.instance),
        };
        let listed = list_ours(&self.docker, &self.instance, service, &self.cache)
            .await
            .map_err(|e| self.error(what, e))?;
        Ok(listed
            .into_iter()
            .filter(|c| !self.pool.hidden(c, asked))
            .collect())
    }

    /// Our containers (of `service`, or all) as the event view has them, without those being
    /// filled or trimmed; `None` while the view is not synced (then list).
    fn watched(&self, service: Option<&ServiceName>) -> Option<Vec<Owned>> {
        let now = std::time::Instant::now();
        let mut ours = self.watch.containers(service)?;
        ours.retain(|c| !self.pool.hidden(c, now));
        Some(ours)
    }

    /// What the event view needs to follow the engine.
    fn start_watching(&self) {
        self.watch.start(|| watch::Engine {
            docker: self.docker.clone(),
            address: self.address.clone(),
            instance: self.instance.clone(),
            cache: Arc::clone(&self.cache),
        });
    }

    /// How the event-driven view has fared (for tests, the bench and the logs).
    pub fn watch_stats(&self) -> WatchStats {
        self.watch.stats()
    }

    /// The one host of this backend.
    async fn host(&self) -> Result<Host, BackendError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| self.error("read the engine's info", e))?;
        let name = info.name.clone().unwrap_or_else(|| self.address.clone());
        Ok(Host {
            id: info
                .id
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| name.clone())
                .into(),
            name,
            ready: true,
            cpus: match self.allocatable {
                Some(a) => Some(a.cpu_milli as f64 / 1000.0),
                None => info.ncpu.filter(|n| *n > 0).map(|n| n as f64),
            },
            memory_bytes: match self.allocatable {
                Some(a) => Some(a.memory),
                None => info.mem_total.and_then(|m| u64::try_from(m).ok()),
            },
        })
    }

    /// The host, read at most every [`HOST_REFRESH`]: the first call reads it, later ones
    /// return what was read and refresh it in the background when it is older.
    async fn cached_host(&self) -> Result<Host, BackendError> {
        let cached = lock(&self.cache.host).clone();
        match cached {
            Some((host, at)) => {
                if at.elapsed() >= HOST_REFRESH
                    && !self.cache.host_refreshing.swap(true, Ordering::SeqCst)
                {
                    let me = self.clone();
                    tokio::spawn(async move {
                        match me.host().await {
                            Ok(h) => *lock(&me.cache.host) = Some((h, std::time::Instant::now())),
                            Err(e) => {
                                tracing::debug!(error = %e, "cannot refresh the engine's info; keeping the last")
                            }
                        }
                        me.cache.host_refreshing.store(false, Ordering::SeqCst);
                    });
                }
                Ok(host)
            }
            None => {
                let host = self.host().await?;
                *lock(&self.cache.host) = Some((host.clone(), std::time::Instant::now()));
                Ok(host)
            }
        }
    }

    /// Removes (force) a container; one that is already gone or already being removed counts
    /// as removed.
    async fn remove(&self, c: &Owned) -> Result<(), BackendError> {
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        let expecting = self.watch.expect(c, Action::Destroy);
        match self.docker.remove_container(&c.id, Some(opts)).await {
            Ok(()) => {
                expecting.done(Effect::Gone);
                Ok(())
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            }) if status_code == 404 || (status_code == 409 && message.contains("in progress")) => {
                tracing::debug!(container = %c.name, %message, "container already gone");
                expecting.done(Effect::Gone);
                Ok(())
            }
            Err(e) => Err(self.error(
                format!("remove container {} of service {}", c.name, c.service),
                e,
            )),
        }
    }

    /// SIGTERM, up to `grace` for the replica to exit, SIGKILL (the engine does this), then
    /// remove. `grace` of `None` uses the container's own stop timeout, set from the service's
    /// stop_grace when it was created.
    async fn stop_and_remove(
        &self,
        c: &Owned,
        grace: Option<Duration>,
    ) -> Result<(), BackendError> {
        // Its `die` is ours, not a replica lost: the loop is not woken for it.
        let _removing = self.watch.expect(c, Action::Destroy);
        if c.is_paused() {
            // A frozen process cannot handle SIGTERM: thaw it first so it stops cleanly (a
            // preempted replica may have work to finish).
            if let Err(e) = self.docker.unpause_container(&c.id).await {
                tracing::debug!(container = %c.name, error = %e, "cannot unpause before stopping; stopping anyway");
            }
        }
        if c.is_running() || c.is_pending() || c.is_paused() {
            let mut opts = StopContainerOptionsBuilder::new();
            if let Some(g) = grace {
                opts = opts.t(grace_secs(g));
            }
            // The client's own timeout must outlast the grace, or a long grace would be cut
            // short by a client error and a forced removal.
            let wait = grace.unwrap_or(Duration::from_secs(30)) + STOP_SLACK;
            let docker = if wait > self.docker.timeout() {
                self.docker.clone().with_timeout(wait)
            } else {
                self.docker.clone()
            };
            match docker.stop_container(&c.id, Some(opts.build())).await {
                Ok(()) => {}
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code,
                    message,
                }) if status_code == 404 || status_code == 409 => {
                    tracing::debug!(container = %c.name, %message, "container already stopping or gone");
                }
                // Removal below forces it; say why it came to that.
                Err(e) => tracing::warn!(
                    container = %c.name, service = %c.service, error = %e,
                    "stopping a replica failed; removing it by force"
                ),
            }
        }
        self.remove(c).await?;
        tracing::info!(container = %c.name, id = %short(&c.id), service = %c.service, "stopped and removed replica");
        Ok(())
    }

    /// Runs `work` (stops and removals) with at most `stop_parallelism` of them in flight
    /// on the engine, counting every other service's at the same time; the results come in
    /// `work`'s order.
    async fn ending<F: std::future::Future>(&self, work: Vec<F>) -> Vec<F::Output> {
        futures::future::join_all(work.into_iter().map(|f| async {
            // The semaphore is never closed, so a permit always comes.
            let _permit = self.stops.acquire().await;
            f.await
        }))
        .await
    }

    /// Stops and removes `victims`, `stop_parallelism` at a time; returns how many are gone
    /// and the errors.
    async fn stop_all(
        &self,
        victims: &[Owned],
        grace: impl Fn(&Owned) -> Option<Duration>,
    ) -> (u32, Vec<BackendError>) {
        let results = self
            .ending(
                victims
                    .iter()
                    .map(|c| self.stop_and_remove(c, grace(c)))
                    .collect(),
            )
            .await;
        let mut stopped = 0;
        let mut errors = Vec::new();
        for r in results {
            match r {
                Ok(()) => stopped += 1,
                Err(e) => errors.push(e),
            }
        }
        (stopped, errors)
    }

    /// Removes containers that exited or died, `stop_parallelism` at a time. Failures are
    /// logged: the next observe tries again.
    async fn sweep(&self, finished: &[Owned]) {
        let results = self
            .ending(finished.iter().map(|c| self.remove(c)).collect())
            .await;
        for (c, r) in finished.iter().zip(results) {
            match r {
                Ok(()) => tracing::info!(
                    container = %c.name, id = %short(&c.id), service = %c.service, state = %c.state,
                    "removed a replica that had stopped"
                ),
                Err(e) => tracing::warn!(
                    container = %c.name, service = %c.service, error = %e,
                    "cannot remove a stopped replica; will retry"
                ),
            }
        }
    }

    /// The image a service's replicas run, importing the built-in one on first use.
    async fn image_for(&self, service: &Service) -> Result<String, BackendError> {
        match &managed(service).image {
            Some(image) => Ok(image.clone()),
            None => self
                .replica_image
                .get_or_try_init(|| docker_api::ensure_replica_image(&self.docker))
                .await
                .cloned(),
        }
    }

    /// The container spec of one replica of `service`.
    fn container_body(&self, service: &Service, image: &str, pooled: bool) -> ContainerCreateBody {
        // Exactly the service's environment plus ours: the daemon's own (credentials) never
        // reaches a replica. Ours win over a same-named service variable.
        let mut env: BTreeMap<&str, &str> = managed(service)
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.insert(ENV_SERVICE, service.name.as_str());
        env.insert(ENV_INSTANCE, &self.instance);
        let env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut labels = HashMap::from([
            (labels::INSTANCE.to_string(), self.instance.clone()),
            (labels::SERVICE.to_string(), service.name.to_string()),
        ]);
        if pooled {
            labels.insert(labels::POOL.to_string(), "warm".to_string());
        }
        ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(managed(service).command.clone()).filter(|c| !c.is_empty()),
            env: Some(env),
            labels: Some(labels),
            stop_timeout: Some(i64::from(grace_secs(service.stop_grace))),
            host_config: Some(HostConfig {
                // The service's resources are each replica's limits.
                nano_cpus: service
                    .resources
                    .map(|r| r.cpu_milli.saturating_mul(1_000_000) as i64)
                    .filter(|n| *n > 0),
                memory: service
                    .resources
                    .map(|r| r.memory as i64)
                    .filter(|m| *m > 0),
                network_mode: Some(self.network.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                auto_remove: Some(false),
                // Docker's own init as PID 1 (`init = true`): signals reach the command.
                init: Some(managed(service).init).filter(|i| *i),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Creates and starts one replica. A container that was created but did not start is
    /// removed, so a failure leaves nothing behind.
    async fn start_one(
        &self,
        service: &Service,
        body: ContainerCreateBody,
    ) -> Result<String, String> {
        let name = format!("ms-{}-{}-{}", self.instance, service.name, name_suffix());
        self.create_and_start(service, body, &name).await
    }

    /// Creates and starts the container `name`, removing it if it does not start.
    async fn create_and_start(
        &self,
        service: &Service,
        body: ContainerCreateBody,
        name: &str,
    ) -> Result<String, String> {
        let name = name.to_string();
        let image = body.image.clone().unwrap_or_default();
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(opts), body)
            .await
            .map_err(|e| {
                format!(
                    "create container {name} from image {image}: {}",
                    engine_message(&e)
                )
            })?;
        for w in &created.warnings {
            tracing::warn!(container = %name, warning = %w, "engine warning on create");
        }
        let this = Owned {
            id: created.id.clone().into(),
            name: name.clone().into(),
            service: service.name.clone(),
            state: ContainerSummaryStateEnum::CREATED,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        };
        let expecting = self.watch.expect(&this, Action::Start);
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            drop(expecting);
            let message = format!("start container {name}: {}", engine_message(&e));
            if let Err(re) = self.remove(&this).await {
                tracing::warn!(container = %name, error = %re, "cannot remove a container that failed to start; observe will retry");
            }
            return Err(message);
        }
        expecting.done(Effect::State(ContainerSummaryStateEnum::RUNNING));
        tracing::info!(container = %name, id = %short(&created.id), service = %service.name, "started replica");
        Ok(created.id)
    }

    /// Creates, starts and pauses one pooled replica. While it is being filled its name is in
    /// `filling`, so it is counted nowhere; on failure nothing is left behind.
    async fn fill_one(&self, service: &Service, body: ContainerCreateBody) -> Result<(), String> {
        let name = format!("ms-{}-{}-{}", self.instance, service.name, name_suffix());
        lock(&self.pool.filling).insert(name.clone());
        let result = async {
            let id = self.create_and_start(service, body, &name).await?;
            let this = Owned {
                id: id.clone().into(),
                name: name.clone().into(),
                service: service.name.clone(),
                state: ContainerSummaryStateEnum::RUNNING,
                created: 0,
            };
            let expecting = self.watch.expect(&this, Action::Pause);
            if let Err(e) = self.docker.pause_container(&id).await {
                drop(expecting);
                if let Err(re) = self.remove(&this).await {
                    tracing::warn!(container = %name, error = %re, "cannot remove a pool replica that failed to pause; observe will retry");
                }
                return Err(format!("pause container {name}: {}", engine_message(&e)));
            }
            expecting.done(Effect::State(ContainerSummaryStateEnum::PAUSED));
            tracing::info!(container = %name, id = %short(&id), service = %service.name, "added a paused replica to the warm pool");
            Ok(())
        }
        .await;
        // Recorded before the name leaves `filling`, so no listing sees it in neither.
        if result.is_ok() {
            self.pool.filled(name.clone());
        }
        lock(&self.pool.filling).remove(&name);
        result
    }

    /// Starts a background refill of `service`'s pool unless one is running or the backend is
    /// shut down. Never waits.
    fn spawn_refill(&self, service: &Service) {
        if !service.pool.pauses() || self.pool.closed.load(Ordering::SeqCst) {
            return;
        }
        if !lock(&self.pool.refilling).insert(service.name.clone()) {
            return;
        }
        let me = self.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _guard = me.pool.gate.clone().read_owned().await;
            if let Err(e) = me.refill(&service).await {
                tracing::warn!(service = %service.name, error = %e, "warm pool refill failed; will retry");
            }
            lock(&me.pool.refilling).remove(&service.name);
        });
    }

    /// Brings `service`'s paused replicas to the pool size: fills what is missing (bounded by
    /// `start_parallelism`, never above the size) and removes paused ones beyond what
    /// [`paused_limit`] keeps (newest first).
    async fn refill(&self, service: &Service) -> Result<(), BackendError> {
        if self.pool.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let ours = match self.watched(Some(&service.name)) {
            Some(ours) => ours,
            None => self.list(Some(&service.name)).await?,
        };
        let running = ours
            .iter()
            .filter(|c| c.is_running() || c.is_pending())
            .count() as u32;
        let mut paused: Vec<Owned> = ours.into_iter().filter(Owned::is_paused).collect();
        let limit = paused_limit(service, running) as usize;
        if paused.len() > limit {
            let _changing = self.cache.begin(&service.name);
            paused.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
            let extra = &paused[..paused.len() - limit];
            tracing::info!(service = %service.name, paused = paused.len(), keep = limit, "removing paused replicas beyond the pool");
            // Removed while frozen (the engine kills them without thawing them): a trimmed
            // replica never runs again, not even for the moment a clean stop would need, and
            // it is counted nowhere while it goes.
            let names: Vec<String> = extra.iter().map(|c| c.name.to_string()).collect();
            lock(&self.pool.trimming).extend(names.iter().cloned());
            let results = self
                .ending(extra.iter().map(|c| self.remove(c)).collect())
                .await;
            {
                let mut trimming = lock(&self.pool.trimming);
                for n in &names {
                    trimming.remove(n);
                }
            }
            let errors: Vec<BackendError> = results.into_iter().filter_map(Result::err).collect();
            if let Some(e) = combine(
                &format!("trim the pool of service {}", service.name),
                errors,
            ) {
                return Err(e);
            }
            return Ok(());
        }
        let missing = (service.pool.size as usize).saturating_sub(paused.len());
        if missing == 0 {
            return Ok(());
        }
        let image = self.image_for(service).await?;
        let body = self.container_body(service, &image, true);
        tracing::debug!(service = %service.name, have = paused.len(), size = service.pool.size, filling = missing, "refilling the warm pool");
        let _changing = self.cache.begin(&service.name);
        let results: Vec<Result<(), String>> = futures::stream::iter(0..missing)
            .map(|_| async {
                if self.pool.closed.load(Ordering::SeqCst) {
                    return Ok(());
                }
                self.fill_one(service, body.clone()).await
            })
            .buffer_unordered(self.start_parallelism)
            .collect()
            .await;
        let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Api {
                op: format!("fill the warm pool of service {}", service.name),
                message: errors.join("; "),
            })
        }
    }

    /// Pauses `victims` concurrently (kept, `preempt = "pause"`); returns how many are paused
    /// and the errors.
    async fn pause_all(&self, victims: &[Owned]) -> (u32, Vec<BackendError>) {
        let results = futures::future::join_all(victims.iter().map(|c| async move {
            let expecting = self.watch.expect(c, Action::Pause);
            self.docker
                .pause_container(&c.id)
                .await
                .map_err(|e| self.error(format!("pause container {} of service {}", c.name, c.service), e))?;
            expecting.done(Effect::State(ContainerSummaryStateEnum::PAUSED));
            tracing::info!(container = %c.name, id = %short(&c.id), service = %c.service, "paused replica (preempt = pause)");
            Ok::<(), BackendError>(())
        }))
        .await;
        let mut paused = 0;
        let mut errors = Vec::new();
        for r in results {
            match r {
                Ok(()) => paused += 1,
                Err(e) => errors.push(e),
            }
        }
        (paused, errors)
    }

    /// Unpauses `replicas` concurrently; returns the ones that failed, with the error.
    async fn unpause_all<'a>(&self, replicas: &'a [Owned]) -> Vec<(&'a Owned, String)> {
        let results = futures::future::join_all(replicas.iter().map(|c| async move {
            let expecting = self.watch.expect(c, Action::Unpause);
            match self.docker.unpause_container(&c.id).await {
                Ok(()) => {
                    expecting.done(Effect::State(ContainerSummaryStateEnum::RUNNING));
                    tracing::info!(container = %c.name, id = %short(&c.id), service = %c.service, "unpaused replica");
                    None
                }
                Err(e) => Some((c, engine_message(&e))),
            }
        }))
        .await;
        results.into_iter().flatten().collect()
    }
}

/// The service a container (or an event's actor) with these labels is a replica of, if it is
/// one of `instance`'s: it carries both of our labels, and is no Swarm task's container (those
/// carry their service's labels too and belong to Swarm, even when the instance names collide).
fn owner(instance: &str, labels: &HashMap<String, String>) -> Option<ServiceName> {
    if labels.get(labels::INSTANCE).map(String::as_str) != Some(instance) {
        return None;
    }
    if labels.contains_key("com.docker.swarm.task.id") {
        return None;
    }
    match ServiceName::try_new(labels.get(labels::SERVICE)?.as_str()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "ignoring a container with an invalid service label");
            None
        }
    }
}

/// Lists `instance`'s containers on the engine (all states), optionally of one service only,
/// counting the listing in `cache`. The engine's label filter does the selecting; [`owner`]
/// checks again, since a wrong filter must never make us stop someone else's container.
async fn list_ours(
    docker: &Docker,
    instance: &str,
    service: Option<&ServiceName>,
    cache: &Cache,
) -> Result<Vec<Owned>, bollard::errors::Error> {
    let mut label_filters = vec![format!("{}={}", labels::INSTANCE, instance)];
    match service {
        Some(s) => label_filters.push(format!("{}={}", labels::SERVICE, s)),
        None => label_filters.push(labels::SERVICE.to_string()),
    }
    let filters = HashMap::from([("label", label_filters)]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    cache.lists.fetch_add(1, Ordering::Relaxed);
    let summaries = docker.list_containers(Some(opts)).await?;
    Ok(summaries
        .into_iter()
        .filter_map(|c| {
            let service_of = owner(instance, c.labels.as_ref()?)?;
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_default();
            Some(Owned {
                id: c.id?.into(),
                name: name.into(),
                service: service_of,
                state: c.state.unwrap_or(ContainerSummaryStateEnum::EMPTY),
                created: c.created.unwrap_or(0),
            })
        })
        .filter(|c| service.is_none_or(|s| &c.service == s))
        .collect())
}

/// The engine's own message when it answered, else the client's.
fn engine_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The 12-character id `docker ps` shows.
fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Joins several errors of one operation into one, keeping the first's kind.
fn combine(op: &str, mut errors: Vec<BackendError>) -> Option<BackendError> {
    match errors.len() {
        0 => None,
        1 => errors.pop(),
        n => {
            let message = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            Some(BackendError::Api {
                op: format!("{op} ({n} failures)"),
                message,
            })
        }
    }
}

impl Backend for DockerBackend {
    fn kind(&self) -> &'static str {
        "docker"
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

    fn set_acting(&self, acting: bool) {
        self.acting
            .store(acting, std::sync::atomic::Ordering::Relaxed);
    }

    fn wake_on_change(&self, waker: Arc<tokio::sync::Notify>) {
        self.watch.set_waker(waker);
    }

    async fn observe(&self) -> Result<Observation, BackendError> {
        // What had changed when the listing was asked for: `scale` reuses the listing only
        // for services that have not changed since.
        self.start_watching();
        let changes = lock(&self.cache.changes).clone();
        let at = std::time::Instant::now();
        let (ours, host) = match self.watched(None) {
            // The view is as fresh as the stream, which may not have ended yet when the engine
            // just went away: one `GET /_ping` (no listing) makes an engine that does not
            // answer fail the observation, as a listing would, so nothing is decided on a view
            // of an engine that is gone.
            Some(ours) => {
                let ping = async {
                    self.docker
                        .ping()
                        .await
                        .map_err(|e| self.error("ping the engine", e))
                };
                let (_, host) = futures::try_join!(ping, self.cached_host())?;
                (ours, host)
            }
            None => futures::try_join!(self.list(None), self.cached_host())?,
        };
        // A container created but never started, of a service none of whose changes ran
        // while the listing was taken, was abandoned: its start was lost (the engine stopped
        // or restarted under it). It would be counted pending forever; it is removed instead.
        // A follower's are the leader's, whose start may be under way: counted pending.
        let acting = self.acting();
        let (abandoned, ours): (Vec<Owned>, Vec<Owned>) = {
            let after = lock(&self.cache.changes);
            ours.into_iter().partition(|c| {
                let (then, now) = (changes.get(&c.service), after.get(&c.service));
                acting
                    && c.state == ContainerSummaryStateEnum::CREATED
                    && then == now
                    && now.is_none_or(|n| n.under_way == 0)
            })
        };
        let live: Vec<Owned> = ours.iter().filter(|c| !c.is_finished()).cloned().collect();
        *lock(&self.cache.snapshot) = Some(Snapshot {
            at,
            changes,
            containers: live,
        });
        let mut obs = Observation::default();
        let mut finished = Vec::new();
        for c in ours {
            if c.is_paused() {
                *obs.paused.entry(c.service.clone()).or_default() += 1;
                continue;
            }
            let state = if c.is_running() {
                ReplicaState::Running
            } else if c.is_pending() {
                ReplicaState::Pending
            } else if c.is_stopping() {
                ReplicaState::Stopping
            } else {
                if c.is_finished() {
                    finished.push(c);
                }
                continue;
            };
            let counts: &mut ServiceObservation =
                obs.services.entry(c.service.clone()).or_default();
            match state {
                ReplicaState::Running => counts.running += 1,
                ReplicaState::Pending => counts.pending += 1,
                ReplicaState::Stopping => {}
            }
            obs.replicas.push(Replica {
                id: c.id.to_string(),
                service: c.service,
                host: host.id.clone(),
                state,
            });
        }
        if !acting {
            obs.hosts.push(host);
            return Ok(obs);
        }
        finished.extend(abandoned);
        self.sweep(&finished).await;
        // Top the pools up (or trim them) in the background; the tick never waits for it.
        let pools: Vec<Service> = lock(&self.pool.services).values().cloned().collect();
        for svc in &pools {
            let paused = obs.paused.get(&svc.name).copied().unwrap_or(0);
            let running = obs.services.get(&svc.name).map_or(0, |o| o.total());
            if paused < svc.pool.size || paused > paused_limit(svc, running) {
                self.spawn_refill(svc);
            }
        }
        obs.hosts.push(host);
        Ok(obs)
    }

    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        // The same tick's observe listed every container of ours a few ms ago: reuse that
        // listing if nothing of this service changed since, else list again.
        let (_changing, fresh) = self.cache.begin_scale(&service.name);
        let ours = match (self.watched(Some(&service.name)), fresh) {
            (Some(ours), _) | (None, Some(ours)) => ours,
            (None, None) => self.list(Some(&service.name)).await?,
        };
        let (finished, mut live): (Vec<Owned>, Vec<Owned>) =
            ours.into_iter().partition(|c| c.is_finished());
        self.sweep(&finished).await;
        // Paused replicas (the pool) are taken by a scale-up, oldest (warmest) first.
        let mut paused: Vec<Owned> = live.iter().filter(|c| c.is_paused()).cloned().collect();
        paused.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        live.retain(|c| c.is_running() || c.is_pending());
        let have = live.len();
        let target_n = target as usize;
        let mut outcome = ScaleOutcome::default();

        if have > target_n {
            // Pending before running, then the newest first: the oldest replicas are the
            // warmest. Within one second the engine's timestamps cannot tell; the id decides.
            live.sort_by(|a, b| {
                b.is_pending()
                    .cmp(&a.is_pending())
                    .then(b.created.cmp(&a.created))
                    .then(a.id.cmp(&b.id))
            });
            let victims = &live[..have - target_n];
            tracing::info!(service = %service.name, have, target, stopping = victims.len(), "scaling down");
            // preempt = "pause": running replicas are frozen and kept (a created one that never
            // ran has nothing to keep and is removed).
            let (to_pause, to_stop): (Vec<Owned>, Vec<Owned>) = victims
                .iter()
                .cloned()
                .partition(|c| service.pool.preempt == Preempt::Pause && c.is_running());
            let ((stopped, mut errors), (paused_n, pause_errors)) = futures::join!(
                self.stop_all(&to_stop, |_| Some(service.stop_grace)),
                self.pause_all(&to_pause)
            );
            errors.extend(pause_errors);
            outcome.stopped = stopped + paused_n;
            outcome.paused = paused_n;
            if let Some(e) = combine(
                &format!("stop replicas of service {}", service.name),
                errors,
            ) {
                return Err(e);
            }
        } else if have < target_n {
            let mut missing = target_n - have;
            // From the pool first: an unpause is an order of magnitude faster than a start.
            let take = missing.min(paused.len());
            if take > 0 {
                let taken = &paused[..take];
                let failed = self.unpause_all(taken).await;
                for (c, message) in &failed {
                    tracing::warn!(container = %c.name, service = %service.name, error = %message, "cannot unpause a pooled replica; starting a new one instead");
                }
                let resumed = (take - failed.len()) as u32;
                outcome.started += resumed;
                outcome.resumed = resumed;
                missing -= resumed as usize;
                tracing::info!(service = %service.name, have, target, resumed, "scaled up from the warm pool");
            }
            if missing == 0 {
                self.spawn_refill(service);
                return Ok(outcome);
            }
            tracing::info!(service = %service.name, have, target, starting = missing, "scaling up");
            let image = match self.image_for(service).await {
                Ok(image) => image,
                // An engine that does not answer is the caller's error, not a failed start.
                Err(e @ BackendError::Unreachable { .. }) => return Err(e),
                Err(e) => {
                    // Nothing can start without the image; every missing replica failed.
                    let message = e.to_string();
                    outcome.failures = (0..missing)
                        .map(|_| StartFailure {
                            service: service.name.clone(),
                            message: message.clone(),
                        })
                        .collect();
                    return Ok(outcome);
                }
            };
            let body = self.container_body(service, &image, false);
            let results: Vec<Result<String, String>> = futures::stream::iter(0..missing)
                .map(|_| self.start_one(service, body.clone()))
                .buffer_unordered(self.start_parallelism)
                .collect()
                .await;
            for r in results {
                match r {
                    Ok(_) => outcome.started += 1,
                    Err(message) => {
                        tracing::warn!(service = %service.name, error = %message, "replica failed to start");
                        outcome.failures.push(StartFailure {
                            service: service.name.clone(),
                            message,
                        });
                    }
                }
            }
        }
        self.spawn_refill(service);
        Ok(outcome)
    }

    async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
        // No refill may start or create anything from now on; wait for those under way, so
        // nothing is created after the listing below.
        self.pool.closed.store(true, Ordering::SeqCst);
        drop(self.pool.gate.write().await);
        if !remove {
            tracing::info!(instance = %self.instance, "leaving replicas running for the next start to adopt");
            return Ok(());
        }
        let ours = self.list(None).await?;
        let graces: HashMap<&ServiceName, Duration> =
            services.iter().map(|s| (&s.name, s.stop_grace)).collect();
        let (stopped, errors) = self
            .stop_all(&ours, |c| graces.get(&c.service).copied())
            .await;
        tracing::info!(instance = %self.instance, removed = stopped, "removed every replica of this instance");
        match combine(
            &format!("remove replicas of instance {}", self.instance),
            errors,
        ) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::config;
    use crate::BackendConfig;

    #[test]
    fn network_and_host_are_checked_with_paths() {
        let net = |n: &str| config(&format!("type = \"docker\"\nnetwork = {n:?}"), "");
        for bad in ["", " ", "my net", "bridge\n"] {
            assert_eq!(
                net(bad).unwrap_err(),
                vec![format!(
                    "backend.network: must be none (the default), host, bridge or a network's name, got {bad:?}"
                )]
            );
        }
        for good in ["none", "host", "bridge", "my-net_1.a", "container:db"] {
            let c = net(good).unwrap();
            let BackendConfig::Docker(d) = &c.backend else {
                panic!()
            };
            assert_eq!(d.network, good);
        }
        assert_eq!(
            config("type = \"docker\"\nhost = \"\"", "").unwrap_err(),
            vec!["backend.host: must not be empty"]
        );
    }

    #[test]
    fn parallelism_is_bounded_with_paths() {
        let docker = |extra: &str| match config(&format!("type = \"docker\"\n{extra}"), "") {
            Ok(c) => match c.backend {
                BackendConfig::Docker(d) => Ok((d.start_parallelism, d.stop_parallelism)),
                _ => panic!(),
            },
            Err(e) => Err(e),
        };
        assert_eq!(docker(""), Ok((8, super::DEFAULT_STOP_PARALLELISM)));
        assert_eq!(
            docker("start_parallelism = 256\nstop_parallelism = 1"),
            Ok((256, 1))
        );
        assert_eq!(docker("stop_parallelism = 1024"), Ok((8, 1024)));
        assert_eq!(
            docker("start_parallelism = 0\nstop_parallelism = 1025").unwrap_err(),
            vec![
                "backend.start_parallelism: must be between 1 and 256, got 0",
                "backend.stop_parallelism: must be between 1 and 1024, got 1025",
            ]
        );
    }

    #[test]
    fn init_is_a_docker_and_swarm_service_key() {
        let init = |backend: &str, extra: &str| {
            config(&format!("type = \"{backend}\""), extra).map(|c| {
                c.services[0]
                    .workload
                    .run()
                    .expect("a managed service")
                    .init
            })
        };
        assert_eq!(init("docker", ""), Ok(false));
        assert_eq!(init("docker", "init = true"), Ok(true));
        assert_eq!(init("swarm", "init = true"), Ok(true));
        assert_eq!(init("swarm", ""), Ok(false));
        assert_eq!(
            config(
                "type = \"swarm\"",
                "init = true\n[services.reference]\nservice = \"web\""
            )
            .unwrap_err(),
            vec!["services[0].init: a service with [services.reference] runs what the referenced object runs; remove this key"]
        );
        assert_eq!(
            init("docker", "init = \"yes\"").unwrap_err(),
            vec!["services[0].init: must be true or false, got \"yes\""]
        );
        let err = init("process", "init = true").unwrap_err();
        assert!(
            err.len() == 1 && err[0].starts_with("services[0]") && err[0].contains("init"),
            "{err:?}"
        );
    }

    #[test]
    fn events_are_on_unless_turned_off() {
        let events = |extra: &str| match config(&format!("type = \"docker\"\n{extra}"), "") {
            Ok(c) => match c.backend {
                BackendConfig::Docker(d) => Ok(d.events),
                _ => panic!(),
            },
            Err(e) => Err(e),
        };
        assert_eq!(events(""), Ok(true));
        assert_eq!(events("events = false"), Ok(false));
        let err = events("events = \"no\"").unwrap_err();
        assert!(
            err.len() == 1 && err[0].starts_with("backend.events: "),
            "{err:?}"
        );
    }
}
