//! A simulated orchestrator: the backend contract in memory, with the faults real ones have.
//!
//! It is a fake on purpose, for the control loop's own behaviour (ordering, per-service
//! actuation, backoff, faults) in virtual time: every wait is a `tokio::time::sleep`, so under
//! tokio's paused clock a test runs hundreds of faults in milliseconds. The real backends are
//! tested against the real Docker engine, Swarm and processes.
//!
//! Two modes ([`Level`]):
//! - container-level (like docker and process): `scale` itself starts and stops replicas and
//!   returns when they are running or gone; a start takes `start_latency`, a stop
//!   `stop_latency`, or the service's `stop_grace` when its replicas ignore SIGTERM;
//! - service-level (like Swarm, Kubernetes, ECS): `scale` sets the count and returns at once;
//!   the simulated orchestrator converges afterwards.
//!
//! Replicas being stopped are still observed as running until they are gone, as a container
//! engine reports a container that has not exited yet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use microscaler_backends::{
    Backend, BackendError, Observation, Replica, ReplicaState, ScaleOutcome, Service, StartFailure,
};
use microscaler_core::{Capabilities, Host, ServiceName, ServiceObservation, StopCompletion};

/// How the simulated orchestrator takes orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// `scale` starts and stops the replicas itself and returns when they are done.
    Container,
    /// `scale` sets the count; the orchestrator converges after it returns.
    Service,
}

/// The simulated cluster's settings.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Container-level or service-level.
    pub level: Level,
    /// Time from a start to a running replica.
    pub start_latency: Duration,
    /// Time from a stop to a replica gone (for replicas that honour SIGTERM).
    pub stop_latency: Duration,
    /// Hosts at the start, all ready (`host-0`, `host-1`, ...).
    pub hosts: u32,
    /// Whether observations list every replica (the per-host view). Off for benchmarks of
    /// very many services, where building the list would dominate.
    pub list_replicas: bool,
    /// Whether every scale is logged for [`Sim::spans`] and [`Sim::calls`]. Off for
    /// benchmarks.
    pub log: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            level: Level::Container,
            start_latency: Duration::from_millis(200),
            stop_latency: Duration::from_millis(50),
            hosts: 3,
            list_replicas: true,
            log: true,
        }
    }
}

/// One simulated replica.
#[derive(Debug, Clone)]
struct SimReplica {
    id: u64,
    host: usize,
    state: ReplicaState,
}

#[derive(Debug, Default)]
struct SimService {
    replicas: Vec<SimReplica>,
    /// The count a service-level orchestrator converges to.
    desired: u32,
    /// Its replicas ignore SIGTERM: a stop takes the service's whole `stop_grace`.
    ignores_sigterm: bool,
    /// Starts that fail from now on (counted down).
    failing_starts: u32,
    /// A service that existed before microscaler and belongs to someone else: never touched.
    foreign: bool,
}

impl SimService {
    /// Whether the next start fails (the failures still to come are counted down).
    fn next_start_fails(&mut self) -> bool {
        let fails = self.failing_starts > 0;
        self.failing_starts -= u32::from(fails);
        fails
    }
}

fn start_failure(service: &ServiceName) -> StartFailure {
    StartFailure {
        service: service.clone(),
        message: "simulated start failure".into(),
    }
}

#[derive(Debug)]
struct State {
    services: BTreeMap<ServiceName, SimService>,
    /// (name, ready).
    hosts: Vec<(String, bool)>,
    next_id: u64,
    unreachable: bool,
    /// Whether this daemon may act (leader election); true unless a test says otherwise.
    following: bool,
    conflicts: u32,
    throttles: u32,
    /// `begin <service>` / `end <service>` of every scale, in order.
    spans: Vec<String>,
    /// (service, target) of every scale, in order.
    calls: Vec<(ServiceName, u32)>,
}

/// The simulated orchestrator. Clones share the cluster: a clone is another daemon's view of
/// the same cluster (adoption after a restart).
#[derive(Debug, Clone)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    opts: Arc<SimOptions>,
}

impl Default for Sim {
    fn default() -> Self {
        Sim::new(SimOptions::default())
    }
}

impl Sim {
    /// A cluster with `opts.hosts` ready hosts and nothing running.
    pub fn new(opts: SimOptions) -> Self {
        let hosts = (0..opts.hosts)
            .map(|i| (format!("host-{i}"), true))
            .collect();
        Sim {
            state: Arc::new(Mutex::new(State {
                services: BTreeMap::new(),
                hosts,
                next_id: 1,
                unreachable: false,
                following: false,
                conflicts: 0,
                throttles: 0,
                spans: Vec::new(),
                calls: Vec::new(),
            })),
            opts: Arc::new(opts),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // -- faults and the world outside microscaler ------------------------------------------

    /// Makes `service`'s replicas ignore SIGTERM: each stop takes its whole `stop_grace`.
    pub fn ignore_sigterm(&self, service: &str, ignores: bool) {
        self.lock()
            .services
            .entry(name(service))
            .or_default()
            .ignores_sigterm = ignores;
    }

    /// Makes the next `n` starts of `service` fail (each replica's start is one, reported as
    /// a [`StartFailure`] of its own). `u32::MAX` breaks the service's starts until it is
    /// called again; `0` mends them.
    pub fn fail_starts(&self, service: &str, n: u32) {
        self.lock()
            .services
            .entry(name(service))
            .or_default()
            .failing_starts = n;
    }

    /// While set, every call fails as unreachable.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    /// The next `n` scale calls fail with a conflict (the object changed under us).
    pub fn conflict_next(&self, n: u32) {
        self.lock().conflicts = n;
    }

    /// The next `n` scale calls are throttled.
    pub fn throttle_next(&self, n: u32) {
        self.lock().throttles = n;
    }

    /// Kills `n` running replicas of `service` behind microscaler's back.
    pub fn kill(&self, service: &str, n: u32) {
        let mut s = self.lock();
        if let Some(svc) = s.services.get_mut(&name(service)) {
            for _ in 0..n {
                if let Some(i) = svc
                    .replicas
                    .iter()
                    .rposition(|r| r.state == ReplicaState::Running)
                {
                    svc.replicas.remove(i);
                }
            }
        }
    }

    /// Adds a ready host; returns its name.
    pub fn add_host(&self) -> String {
        let mut s = self.lock();
        let name = format!("host-{}", s.hosts.len());
        s.hosts.push((name.clone(), true));
        name
    }

    /// Marks host `host` ready or not (drained, down); replicas on a host that is not ready are
    /// lost, as on a node that went away.
    pub fn set_host_ready(&self, host: &str, ready: bool) {
        let mut s = self.lock();
        let Some(i) = s.hosts.iter().position(|(h, _)| h == host) else {
            return;
        };
        s.hosts[i].1 = ready;
        if !ready {
            for svc in s.services.values_mut().filter(|v| !v.foreign) {
                svc.replicas.retain(|r| r.host != i);
            }
        }
    }

    /// Creates a service with `replicas` running that belongs to someone else: microscaler
    /// must never count, scale or remove it, even when one of its services has the same name.
    pub fn add_foreign(&self, service: &str, replicas: u32) {
        let mut s = self.lock();
        let ids: Vec<u64> = (0..replicas).map(|_| s.take_id()).collect();
        let svc = s
            .services
            .entry(name(&format!("foreign-{service}")))
            .or_default();
        svc.foreign = true;
        svc.replicas = ids
            .into_iter()
            .map(|id| SimReplica {
                id,
                host: 0,
                state: ReplicaState::Running,
            })
            .collect();
    }

    /// Running replicas of the foreign service `service` (see [`Sim::add_foreign`]).
    pub fn foreign_running(&self, service: &str) -> u32 {
        self.lock()
            .services
            .get(&name(&format!("foreign-{service}")))
            .map_or(0, |s| s.replicas.len() as u32)
    }

    // -- what happened ---------------------------------------------------------------------

    /// Replicas of `service` that exist (running, starting or stopping).
    pub fn replicas(&self, service: &str) -> u32 {
        self.lock()
            .services
            .get(&name(service))
            .map_or(0, |s| s.replicas.len() as u32)
    }

    /// Running replicas of `service` (including those being stopped).
    pub fn running(&self, service: &str) -> u32 {
        self.lock().services.get(&name(service)).map_or(0, |s| {
            s.replicas
                .iter()
                .filter(|r| r.state != ReplicaState::Pending)
                .count() as u32
        })
    }

    /// `begin <service>` and `end <service>` of every scale so far, in order.
    pub fn spans(&self) -> Vec<String> {
        self.lock().spans.clone()
    }

    /// Every scale call so far: (service, target).
    pub fn calls(&self) -> Vec<(String, u32)> {
        self.lock()
            .calls
            .iter()
            .map(|(s, t)| (s.to_string(), *t))
            .collect()
    }

    /// Makes this daemon a follower (`false`) or the leader again: see `Backend::leading`.
    pub fn set_leading(&self, leading: bool) {
        self.lock().following = !leading;
    }

    /// Someone else sets the count of a service-level service (an HPA, `kubectl scale`, a
    /// person): the orchestrator converges to it as to microscaler's own.
    pub fn scale_externally(&self, service: &str, target: u32) {
        assert_eq!(
            self.opts.level,
            Level::Service,
            "only a service-level orchestrator keeps a count"
        );
        let key = name(service);
        self.lock().services.entry(key.clone()).or_default().desired = target;
        let sim = self.clone();
        let grace = self.opts.stop_latency;
        tokio::spawn(async move { sim.converge(key, grace).await });
    }

    /// The count a service-level orchestrator keeps for `service`.
    pub fn desired(&self, service: &str) -> u32 {
        self.lock()
            .services
            .get(&name(service))
            .map_or(0, |v| v.desired)
    }

    /// Forgets the spans and calls so far.
    pub fn clear_log(&self) {
        let mut s = self.lock();
        s.spans.clear();
        s.calls.clear();
    }

    fn check_reachable(&self) -> Result<(), BackendError> {
        reachable(&self.lock())
    }

    async fn scale_container(&self, service: &Service, target: u32) -> ScaleOutcome {
        let key = &service.name;
        let mut out = ScaleOutcome::default();
        // Stops: pending first, then the newest running. A stop or start that takes no time
        // is done under the same lock as its request (nothing could see the state between).
        let (stopping, grace) = {
            let mut s = self.lock();
            let svc = s.services.entry(key.clone()).or_default();
            let have = svc.replicas.len() as u32;
            let grace = if svc.ignores_sigterm {
                service.stop_grace
            } else {
                self.opts.stop_latency.min(service.stop_grace)
            };
            let mut ids = Vec::new();
            let mut n = have.saturating_sub(target);
            let mut i = svc.replicas.len();
            while n > 0 && i > 0 {
                i -= 1;
                if svc.replicas[i].state == ReplicaState::Stopping {
                    continue;
                }
                n -= 1;
                if grace.is_zero() {
                    svc.replicas.remove(i); // gone at once
                    out.stopped += 1;
                } else {
                    svc.replicas[i].state = ReplicaState::Stopping;
                    ids.push(svc.replicas[i].id);
                }
            }
            if out.stopped > 0 {
                return out;
            }
            (ids, grace)
        };
        if !stopping.is_empty() {
            tokio::time::sleep(grace).await;
            let mut s = self.lock();
            if let Some(svc) = s.services.get_mut(key) {
                svc.replicas.retain(|r| !stopping.contains(&r.id));
            }
            out.stopped = stopping.len() as u32;
            return out;
        }
        // Starts.
        let ids = {
            let mut s = self.lock();
            let have = s.services.get(key).map_or(0, |v| v.replicas.len() as u32);
            if target <= have {
                return out;
            }
            let n = s.hosts.len();
            if !s.hosts.iter().any(|h| h.1) {
                out.failures.push(StartFailure {
                    service: key.clone(),
                    message: "no ready host".into(),
                });
                return out;
            }
            let mut starting = Vec::new();
            for k in have..target {
                // Round robin from the k-th host to the next ready one.
                let host = (0..n)
                    .map(|j| (k as usize + j) % n)
                    .find(|&i| s.hosts[i].1)
                    .unwrap_or(0);
                starting.push(SimReplica {
                    id: s.take_id(),
                    host,
                    state: ReplicaState::Pending,
                });
            }
            let svc = s.services.entry(key.clone()).or_default();
            if self.opts.start_latency.is_zero() {
                // Started at once.
                for mut r in starting {
                    if svc.next_start_fails() {
                        out.failures.push(start_failure(key));
                    } else {
                        r.state = ReplicaState::Running;
                        svc.replicas.push(r);
                        out.started += 1;
                    }
                }
                return out;
            }
            let ids: Vec<u64> = starting.iter().map(|r| r.id).collect();
            svc.replicas.extend(starting);
            ids
        };
        tokio::time::sleep(self.opts.start_latency).await;
        let mut s = self.lock();
        let Some(svc) = s.services.get_mut(key) else {
            return out;
        };
        for id in ids {
            let Some(i) = svc.replicas.iter().position(|r| r.id == id) else {
                continue; // lost with its host meanwhile
            };
            if svc.next_start_fails() {
                svc.replicas.remove(i);
                out.failures.push(start_failure(key));
            } else {
                svc.replicas[i].state = ReplicaState::Running;
                out.started += 1;
            }
        }
        out
    }

    fn scale_service(&self, service: &Service, target: u32) -> ScaleOutcome {
        let key = service.name.clone();
        let mut s = self.lock();
        let svc = s.services.entry(key.clone()).or_default();
        let before = svc.desired;
        svc.desired = target;
        drop(s);
        let sim = self.clone();
        let grace = service.stop_grace;
        // The orchestrator converges on its own after the call returns.
        tokio::spawn(async move { sim.converge(key, grace).await });
        ScaleOutcome {
            started: target.saturating_sub(before),
            stopped: before.saturating_sub(target),
            ..ScaleOutcome::default()
        }
    }

    /// A service-level orchestrator's convergence of `key` to its desired count.
    async fn converge(&self, key: ServiceName, grace: Duration) {
        let (starting, stopping, wait_stop) = {
            let mut s = self.lock();
            let hosts: Vec<usize> = (0..s.hosts.len()).filter(|&i| s.hosts[i].1).collect();
            let mut new_ids = Vec::new();
            let want = s.services.get(&key).map_or(0, |v| v.desired);
            let have = s.services.get(&key).map_or(0, |v| {
                v.replicas
                    .iter()
                    .filter(|r| r.state != ReplicaState::Stopping)
                    .count() as u32
            });
            if want > have && !hosts.is_empty() {
                for _ in have..want {
                    new_ids.push(s.take_id());
                }
            }
            let svc = s.services.entry(key.clone()).or_default();
            for (k, id) in new_ids.iter().enumerate() {
                svc.replicas.push(SimReplica {
                    id: *id,
                    host: hosts[k % hosts.len()],
                    state: ReplicaState::Pending,
                });
            }
            let mut stopping = Vec::new();
            if want < have {
                let mut n = have - want;
                for r in svc.replicas.iter_mut().rev() {
                    if n == 0 {
                        break;
                    }
                    if r.state != ReplicaState::Stopping {
                        r.state = ReplicaState::Stopping;
                        stopping.push(r.id);
                        n -= 1;
                    }
                }
            }
            let wait = if svc.ignores_sigterm {
                grace
            } else {
                self.opts.stop_latency.min(grace)
            };
            (new_ids, stopping, wait)
        };
        let sim = self.clone();
        let k = key.clone();
        if !stopping.is_empty() {
            tokio::spawn(async move {
                tokio::time::sleep(wait_stop).await;
                let mut s = sim.lock();
                if let Some(svc) = s.services.get_mut(&k) {
                    svc.replicas.retain(|r| !stopping.contains(&r.id));
                }
            });
        }
        if !starting.is_empty() {
            tokio::time::sleep(self.opts.start_latency).await;
            let mut s = self.lock();
            if let Some(svc) = s.services.get_mut(&key) {
                for r in svc.replicas.iter_mut().filter(|r| starting.contains(&r.id)) {
                    if svc.failing_starts > 0 {
                        svc.failing_starts -= 1;
                        r.state = ReplicaState::Stopping; // removed below
                    } else if r.state == ReplicaState::Pending {
                        r.state = ReplicaState::Running;
                    }
                }
                let failed: BTreeSet<u64> = starting.iter().copied().collect();
                svc.replicas
                    .retain(|r| !(failed.contains(&r.id) && r.state == ReplicaState::Stopping));
            }
        }
    }
}

impl State {
    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

fn reachable(s: &State) -> Result<(), BackendError> {
    if s.unreachable {
        return Err(BackendError::Unreachable {
            what: "the simulated orchestrator".into(),
            hint: "it was made unreachable by the test".into(),
            source: None,
        });
    }
    Ok(())
}

fn name(s: &str) -> ServiceName {
    ServiceName::try_new(s).expect("a valid service name")
}

impl Backend for Sim {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn capabilities(&self) -> Capabilities {
        match self.opts.level {
            Level::Container => Capabilities::CONTAINER_LEVEL,
            Level::Service => Capabilities {
                stops: StopCompletion::Converges,
                ..Capabilities::CONTAINER_LEVEL
            },
        }
    }

    async fn prepare(&self, _services: &[Service]) -> Result<(), BackendError> {
        self.check_reachable()
    }

    async fn prepare_dry_run(&self, _services: &[Service]) -> Result<(), BackendError> {
        self.check_reachable()
    }

    fn leading(&self) -> bool {
        !self.lock().following
    }

    async fn observe(&self) -> Result<Observation, BackendError> {
        self.check_reachable()?;
        let s = self.lock();
        let mut obs = Observation::default();
        for (i, (host, ready)) in s.hosts.iter().enumerate() {
            obs.hosts.push(Host {
                id: format!("id-{i}").into(),
                name: host.clone(),
                ready: *ready,
                ..Host::default()
            });
        }
        let mut services = Vec::with_capacity(s.services.len());
        for (key, svc) in s.services.iter().filter(|(_, v)| !v.foreign) {
            let mut o = ServiceObservation::default();
            for r in &svc.replicas {
                match r.state {
                    ReplicaState::Pending => o.pending += 1,
                    ReplicaState::Running | ReplicaState::Stopping => o.running += 1,
                }
                if self.opts.list_replicas {
                    obs.replicas.push(Replica {
                        id: r.id.to_string(),
                        service: key.clone(),
                        host: format!("id-{}", r.host).into(),
                        state: r.state,
                    });
                }
            }
            if self.opts.level == Level::Service {
                o.orchestrator_wants = Some(svc.desired);
            }
            if o.total() > 0 || o.orchestrator_wants.is_some_and(|n| n > 0) {
                services.push((key.clone(), o));
            }
        }
        // The names come sorted: one bulk build rather than an insert per service.
        obs.services = services.into_iter().collect();
        Ok(obs)
    }

    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        {
            let mut s = self.lock();
            reachable(&s)?;
            if s.services.get(&service.name).is_some_and(|v| v.foreign) {
                return Err(BackendError::Unsupported(format!(
                    "service {} belongs to someone else",
                    service.name
                )));
            }
            if s.conflicts > 0 {
                s.conflicts -= 1;
                return Err(BackendError::Conflict {
                    op: format!("scale {}", service.name),
                    message: "the object changed since it was read".into(),
                });
            }
            if s.throttles > 0 {
                s.throttles -= 1;
                return Err(BackendError::Throttled {
                    op: format!("scale {}", service.name),
                    message: "rate exceeded".into(),
                });
            }
            if self.opts.log {
                s.spans.push(format!("begin {}", service.name));
                s.calls.push((service.name.clone(), target));
            }
        }
        let out = match self.opts.level {
            Level::Container => self.scale_container(service, target).await,
            Level::Service => self.scale_service(service, target),
        };
        if self.opts.log {
            self.lock().spans.push(format!("end {}", service.name));
        }
        Ok(out)
    }

    async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
        self.check_reachable()?;
        if remove {
            let mut s = self.lock();
            for svc in services {
                if let Some(v) = s.services.get_mut(&svc.name).filter(|v| !v.foreign) {
                    v.replicas.clear();
                    v.desired = 0;
                }
            }
        }
        Ok(())
    }
}
