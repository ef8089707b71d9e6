//! The control loop: every tick, observe -> sample -> decide -> dispatch -> record.
//!
//! The engine decides; this module only executes. Each service's change runs in a task of its
//! own (at most [`MAX_CONCURRENT_CHANGES`] at once, never two for one service), in the seeds'
//! order: the scale-downs that stop replicas are dispatched first, and the scale-ups (with the
//! scale-downs of `preempt = "pause"` services, which free no memory) follow once those are
//! done, or after half a tick period at the latest, so a replica that takes its whole
//! `stop_grace` to stop never delays another service by more than half a tick. A tick waits for its changes until
//! its period is over; a change still running then goes on in the background, its service is
//! left alone until it finishes, and its result is reported by the tick that sees it end. A
//! failed change is retried with a backoff that follows its error's class (see
//! [`ErrorClass::backoff`]); it never holds up the other services.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use microscaler_backends::{
    Backend, BackendError, Change, Config, ErrorClass, Observation, ScaleOutcome,
};
use microscaler_core::config::OnExit;
use microscaler_core::{
    decide, EngineState, HostId, Observed, Plan, Preempt, Samples, ServiceKind, ServiceName,
    TriggerSample,
};
use microscaler_sources::{AnySource, ManualHandle, RandomControl, Source, SourceError};

use crate::repeat::{Repeats, Say};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

mod reload;
pub use reload::{refusals, ReloadError, Reloaded};

/// One trigger's sample: the value, or why there is none.
type SampleResult = Result<f64, String>;

/// How many services' changes run at once.
pub const MAX_CONCURRENT_CHANGES: usize = 64;

/// How long an observation may still show a service-level orchestrator's count from before
/// microscaler's own change (its watch lagging the write) before a difference is taken as
/// someone else's change.
pub const WRITE_SETTLE: Duration = Duration::from_secs(5);

/// Someone else changing one service's count this often within this window is a fight.
pub const FIGHT_WINDOW: Duration = Duration::from_secs(60);

/// How many changes by someone else within [`FIGHT_WINDOW`] make a fight.
pub const FIGHT_CHANGES: u32 = 2;

/// A live trigger of a service.
struct LiveTrigger {
    /// The configured trigger's name (shared: every sample carries a clone).
    name: std::sync::Arc<str>,
    source: AnySource,
    /// Whether its server must answer the start-up check.
    required: bool,
}

/// Why the controller could not start.
#[derive(Debug)]
pub enum PrepareError {
    /// A required trigger's server failed its start-up check.
    Source {
        /// The service.
        service: String,
        /// The trigger.
        trigger: String,
        /// What is wrong, naming the server.
        error: SourceError,
    },
    /// The backend could not be prepared.
    Backend(BackendError),
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrepareError::Source {
                service,
                trigger,
                error,
            } => write!(
                f,
                "trigger {trigger:?} of service {service:?} failed its start-up check: {error} (set required = false on the trigger to start anyway and report it as failing)"
            ),
            PrepareError::Backend(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PrepareError {
    // Each message already holds its error's text, so only deeper causes are chained.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PrepareError::Source { .. } => None,
            PrepareError::Backend(e) => std::error::Error::source(e),
        }
    }
}

/// Handles to change sources while the loop runs (CLI now, API later).
#[derive(Default, Clone)]
pub struct Controls {
    /// Manual sources by (service, trigger).
    pub manual: BTreeMap<(String, String), ManualHandle>,
    /// Random walks by (service, trigger).
    pub random: BTreeMap<(String, String), RandomControl>,
    /// Push triggers by (service, trigger): what producers push over the API.
    pub push: BTreeMap<(String, String), microscaler_sources::PushHandle>,
    /// Paused services: held at their count, neither scaled by demand nor preempted.
    pub paused: Arc<Mutex<BTreeSet<ServiceName>>>,
    /// Woken when a pushed value changes (a manual source, through the CLI or the API), so the
    /// loop ticks at once instead of at its next period.
    pub wake: Arc<tokio::sync::Notify>,
}

impl Controls {
    /// Pauses (`true`) or resumes `service`; takes effect at the next tick.
    pub fn set_paused(&self, service: &ServiceName, paused: bool) {
        let mut set = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if paused {
            set.insert(service.clone());
        } else {
            set.remove(service);
        }
    }

    /// The manual handle of `service` (its first manual trigger).
    pub fn manual_of(&self, service: &str) -> Option<&ManualHandle> {
        self.manual
            .iter()
            .find(|((s, _), _)| s == service)
            .map(|(_, h)| h)
    }

    /// The random walks of `service`.
    fn random_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a RandomControl> {
        self.random
            .iter()
            .filter(move |((s, _), _)| s == service)
            .map(|(_, r)| r)
    }

    /// An operator's demand for `service` (the dashboard's manual demand): its manual trigger
    /// is set to `value` and its random walks are held there, so its demand is `value`, lower
    /// or higher than the walk, until [`Controls::clear_demand`]. Wakes the loop.
    pub fn override_demand(&self, service: &str, value: f64) -> Result<(), String> {
        let h = self.manual_of(service).ok_or("no manual trigger")?;
        for r in self.random_of(service) {
            r.hold(Some(value.round().max(0.0) as u32));
        }
        h.set(value).map_err(|e| e.to_string())
    }

    /// Ends an operator's demand for `service`: its random walks walk on from where they were
    /// held, and its manual trigger is back to 0. Wakes the loop.
    pub fn clear_demand(&self, service: &str) -> Result<(), String> {
        let h = self.manual_of(service).ok_or("no manual trigger")?;
        for r in self.random_of(service) {
            r.hold(None);
        }
        h.set(0.0).map_err(|e| e.to_string())
    }

    /// Whether an operator's demand overrides `service`'s random walk.
    pub fn overriding(&self, service: &str) -> bool {
        self.random_of(service).any(|r| r.held().is_some())
    }
}

/// The count microscaler set for a service on a service-level orchestrator.
#[derive(Debug, Clone, Copy)]
struct Written {
    target: u32,
    /// Whether an observation has shown it since it was set.
    seen: bool,
    /// When it was set.
    at: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    until: Duration,
}

/// Which part of a tick's dispatch a change belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A scale-down that stops replicas: dispatched first.
    Stop,
    /// A scale-up, or a scale-down that only pauses: dispatched once the stops are done.
    Start,
}

/// A change that finished, sent back by its task.
struct Done {
    execution: Execution,
    phase: Phase,
    /// The tick that dispatched it.
    tick: u64,
}

/// One service's execution result in a tick.
#[derive(Debug)]
pub struct Execution {
    /// The service.
    pub service: ServiceName,
    /// The target it was scaled to.
    pub target: u32,
    /// What the backend did, or why it could not.
    pub result: Result<ScaleOutcome, ScaleError>,
}

/// Why a scale failed, kept with how it is retried.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleError {
    /// How it is retried.
    pub class: ErrorClass,
    /// The backend's message.
    pub message: String,
}

impl std::fmt::Display for ScaleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<BackendError> for ScaleError {
    fn from(e: BackendError) -> Self {
        ScaleError {
            class: e.class(),
            message: e.to_string(),
        }
    }
}

/// An error of a tick outside the scaling of a service.
#[derive(Debug, Clone, PartialEq)]
pub enum TickError {
    /// The backend could not be observed; the tick was skipped.
    Observe {
        /// How it is retried.
        class: ErrorClass,
        /// The backend's message.
        message: String,
    },
    /// A trigger gave no sample (failed, timed out or rejected).
    Sample {
        /// The service.
        service: ServiceName,
        /// The trigger.
        trigger: Arc<str>,
        /// What went wrong.
        message: String,
    },
    /// Someone else (an HPA, `kubectl scale`, a person, a script) changed the count a
    /// service-level orchestrator keeps for a service. The rule: microscaler's plan decides,
    /// so the count is set back to the plan's; each such change is reported, and
    /// [`FIGHT_CHANGES`] of them within [`FIGHT_WINDOW`] are reported as a fight.
    External {
        /// The service.
        service: ServiceName,
        /// The count microscaler had set.
        ours: u32,
        /// The count found.
        theirs: u32,
        /// Changes by someone else within the last [`FIGHT_WINDOW`], this one included.
        recent: u32,
    },
}

impl TickError {
    /// `observe` or `sample`, for metrics and the dashboard.
    pub fn kind(&self) -> &'static str {
        match self {
            TickError::Observe { .. } => "observe",
            TickError::Sample { .. } => "sample",
            TickError::External { .. } => "external",
        }
    }

    /// Whether this is a fight: a service's count changed by someone else again and again.
    pub fn is_fight(&self) -> bool {
        matches!(self, TickError::External { recent, .. } if *recent >= FIGHT_CHANGES)
    }
}

impl std::fmt::Display for TickError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TickError::Observe { message, .. } => write!(f, "observe: {message}"),
            TickError::Sample {
                service,
                trigger,
                message,
            } => write!(f, "{service}/{trigger}: {message}"),
            TickError::External {
                service,
                ours,
                theirs,
                recent,
            } if *recent >= FIGHT_CHANGES => write!(
                f,
                "{service}: fighting another controller: its count was changed by someone else \
                 {recent} times in the last {}s (now {theirs}, microscaler had set {ours}); \
                 microscaler sets its own count again each time. Remove the other controller \
                 (an HPA, a KEDA ScaledObject, a script) or take the service out of \
                 microscaler's configuration",
                FIGHT_WINDOW.as_secs()
            ),
            TickError::External {
                service,
                ours,
                theirs,
                ..
            } => write!(
                f,
                "{service}: its count was changed to {theirs} by someone else (microscaler had \
                 set {ours}); microscaler's plan decides and sets its own count again"
            ),
        }
    }
}

/// Everything that happened in one tick.
#[derive(Debug)]
pub struct TickReport {
    /// Time since the loop started.
    pub now: Duration,
    /// What was observed (None if the backend could not be observed).
    pub observed: Option<Observation>,
    /// The samples.
    pub samples: Samples,
    /// The plan (None if the tick could not decide).
    pub plan: Option<Plan>,
    /// What was executed.
    pub executions: Vec<Execution>,
    /// Errors of the tick outside scaling (observe and sample failures).
    pub errors: Vec<TickError>,
    /// How long the tick took.
    pub took: Duration,
    /// Where the tick's time went.
    pub phases: TickPhases,
    /// Whether this microscaler may act (see `Backend::leading`): a follower's tick observes,
    /// samples and decides, and dispatches nothing.
    pub leading: bool,
}

impl TickReport {
    /// What was observed of `service` (all zero when it was not observed).
    pub fn observed_of(&self, service: &str) -> microscaler_core::ServiceObservation {
        self.observed
            .as_ref()
            .and_then(|o| o.services.iter().find(|(k, _)| k.as_str() == service))
            .map(|(_, v)| *v)
            .unwrap_or_default()
    }

    /// The count the plan gave `service`, if the tick decided.
    pub fn target_of(&self, service: &str) -> Option<u32> {
        self.plan.as_ref().and_then(|p| {
            p.services
                .iter()
                .find(|s| s.service.as_str() == service)
                .map(|s| s.target)
        })
    }
}

/// How long each phase of a tick took (zero for phases the tick did not reach).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickPhases {
    /// The backend's observe.
    pub observe: Duration,
    /// Sampling every trigger.
    pub sample: Duration,
    /// The engine's decide.
    pub decide: Duration,
    /// The scale-downs that stop replicas, all of them, before the scale-ups.
    pub stops: Duration,
    /// The scale-ups (starts and unpauses), all of them, with the scale-downs of
    /// `preempt = "pause"` services running alongside.
    pub starts: Duration,
}

/// The controller: configuration, backend, live sources, the engine's memory and the changes
/// in flight.
pub struct Controller<B: Backend + 'static> {
    cfg: Arc<Config>,
    /// Each service's position in `cfg.services`, built once.
    index: HashMap<ServiceName, usize>,
    backend: Arc<B>,
    triggers: Vec<(ServiceName, Vec<LiveTrigger>)>,
    memory: EngineState,
    backoff: BTreeMap<ServiceName, Backoff>,
    started: Instant,
    controls: Controls,
    /// Services with a change running, and the target it was asked for.
    in_flight: HashMap<ServiceName, u32>,
    /// Service-level orchestrators: the count microscaler last set for each service.
    written: HashMap<ServiceName, Written>,
    /// When someone else changed each service's count, within the last [`FIGHT_WINDOW`].
    external: HashMap<ServiceName, Vec<Duration>>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    permits: Arc<Semaphore>,
    /// True while the tick itself waits for its changes; a change that ends outside that wait
    /// wakes the loop instead, so what it did is observed (and the service may change again)
    /// at once rather than at the next period.
    collecting: Arc<std::sync::atomic::AtomicBool>,
    ticks: u64,
    /// Whether the last tick could act (for the transitions' log lines).
    leading: bool,
    /// `run --dry-run`: the backend is prepared read-only and nothing is ever dispatched.
    dry_run: bool,
    /// Failures that go on tick after tick, logged once and then counted.
    repeats: Repeats<Failing>,
    /// `[ha]`: the etcd election this microscaler must lead to act.
    elector: Option<Arc<crate::ha::EtcdElector>>,
    /// Seeds the random sources that have no seed (kept for the sources a reload builds).
    clock_seed: u64,
    /// Managed services a reload removed: the shutdown removes what is left of them.
    retired: Vec<microscaler_backends::Service>,
}

/// Runs the start-up check of every trigger's source at once. A required source that fails
/// is the error; one with `required = false` is logged and its trigger reported as failing by
/// the ticks until its server answers.
async fn check_sources<'a>(
    triggers: impl Iterator<Item = (&'a ServiceName, &'a mut Vec<LiveTrigger>)>,
    going_on: &str,
) -> Result<(), PrepareError> {
    let checks = triggers.flat_map(|(svc, ts)| {
        ts.iter_mut().map(move |t| async move {
            (
                svc.to_string(),
                t.name.to_string(),
                t.required,
                t.source.check().await,
            )
        })
    });
    for (service, trigger, required, result) in join_all(checks).await {
        match result {
            Ok(()) => {}
            Err(error) if required => {
                return Err(PrepareError::Source {
                    service,
                    trigger,
                    error,
                })
            }
            Err(error) => {
                tracing::warn!(%service, %trigger, "start-up check failed; {going_on} anyway (required = false): {error}");
            }
        }
    }
    Ok(())
}

/// The live sources of `svc`'s triggers; their manual and random handles go to `controls`.
fn live_triggers(
    cfg: &Config,
    svc: &microscaler_backends::Service,
    clock_seed: u64,
    controls: &mut Controls,
) -> Vec<LiveTrigger> {
    let capacity = match cfg.capacity {
        microscaler_core::Capacity::Slots(n) => n,
        microscaler_core::Capacity::SlotsPerHost(n) => n,
        // Sources that need a bound (a random walk) have their own max then.
        microscaler_core::Capacity::Resources { .. } => 0,
    };
    let ServiceKind::Triggered(ts) = &svc.kind else {
        return Vec::new();
    };
    ts.iter()
        .enumerate()
        .map(|(i, t)| {
            let source = AnySource::build_or_broken(
                &t.source,
                capacity,
                clock_seed ^ i as u64,
                &cfg.instance,
                svc.name.as_str(),
            );
            let key = (svc.name.to_string(), t.name.to_string());
            match &source {
                AnySource::Manual(m) => {
                    m.wake_on_change(controls.wake.clone());
                    controls.manual.insert(key, m.handle());
                }
                AnySource::Random(r) => {
                    controls.random.insert(key, r.control());
                }
                AnySource::Push(p) => {
                    p.wake_on_change(controls.wake.clone());
                    controls.push.insert(key, p.handle());
                }
                AnySource::RedisList(r) => r.wake_on_change(controls.wake.clone()),
                _ => {}
            }
            LiveTrigger {
                name: t.name.clone(),
                source,
                required: t.source.net().is_none_or(|n| n.required),
            }
        })
        .collect()
}

/// What can fail tick after tick.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Failing {
    Observe,
    /// A trigger: its service's index in `triggers`, and its name.
    Sample(usize, Arc<str>),
}

impl<B: Backend + 'static> Controller<B> {
    /// Builds the live sources of `cfg`. `clock_seed` seeds random sources that have no seed.
    pub fn new(mut cfg: Config, backend: B, clock_seed: u64) -> Self {
        cfg.share_trigger_names();
        let mut controls = Controls::default();
        let triggers = cfg
            .services
            .iter()
            .map(|svc| {
                let live = live_triggers(&cfg, svc, clock_seed, &mut controls);
                (svc.name.clone(), live)
            })
            .collect();
        let index = cfg
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            cfg: Arc::new(cfg),
            index,
            backend: Arc::new(backend),
            triggers,
            memory: EngineState::default(),
            backoff: BTreeMap::new(),
            started: Instant::now(),
            controls,
            in_flight: HashMap::new(),
            written: HashMap::new(),
            external: HashMap::new(),
            done_tx,
            done_rx,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_CHANGES)),
            collecting: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            ticks: 0,
            leading: true,
            dry_run: false,
            repeats: Repeats::default(),
            elector: None,
            clock_seed,
            retired: Vec::new(),
        }
    }

    /// `[ha]`: from now on this microscaler acts only while `elector` leads (and the backend's
    /// own election, if it has one, too).
    pub fn elect(&mut self, elector: Arc<crate::ha::EtcdElector>) {
        self.elector = Some(elector);
    }

    /// Whether this microscaler may change anything now.
    fn may_act(&self) -> bool {
        !self.dry_run && self.backend.leading() && self.elector.as_ref().is_none_or(|e| e.leading())
    }

    /// `run --dry-run`: from now on [`Controller::prepare`] only checks the backend, the
    /// ticks observe, sample, decide and report (logging every change as one they would make)
    /// and dispatch nothing, and [`Controller::shutdown`] leaves everything as it is.
    pub fn dry_run(&mut self) {
        self.dry_run = true;
        self.leading = false;
    }

    /// Services whose change is still running (dispatched by an earlier tick or this one).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Handles to change manual and random sources.
    pub fn controls(&self) -> &Controls {
        &self.controls
    }

    /// Descriptions of the triggers, for the start-up banner.
    pub fn describe_triggers(&self) -> Vec<(String, String, String)> {
        self.triggers
            .iter()
            .flat_map(|(s, ts)| {
                ts.iter()
                    .map(move |t| (s.to_string(), t.name.to_string(), t.source.describe()))
            })
            .collect()
    }

    /// Checks every trigger's source (its server answers, the queue/stream/... exists), then
    /// prepares the backend (images, services, adoption). A required source that fails stops
    /// the start before anything is created; one with `required = false` is logged and its
    /// trigger reported as failing by the ticks until its server answers.
    pub async fn prepare(&mut self) -> Result<(), PrepareError> {
        check_sources(
            self.triggers.iter_mut().map(|(s, ts)| (&*s, ts)),
            "starting",
        )
        .await?;
        // With [ha] the election has not been won yet: prepare as a follower (what the last
        // run left half-done is tidied by the leader's observations).
        if self.elector.is_some() {
            self.backend.set_acting(self.may_act());
        }
        let prepared = if self.dry_run {
            self.backend.prepare_dry_run(&self.cfg.services).await
        } else {
            self.backend.prepare(&self.cfg.services).await
        };
        prepared.map_err(PrepareError::Backend)?;
        self.backend.wake_on_change(self.controls.wake.clone());
        Ok(())
    }

    /// When the next scheduled demand change is due (a random walk's next move), as an
    /// instant, so the loop can tick then instead of up to a period later.
    pub fn next_scheduled_change(&self) -> Option<Instant> {
        self.triggers
            .iter()
            .flat_map(|(_, ts)| ts.iter())
            .filter_map(|t| match &t.source {
                AnySource::Random(r) => Some(self.started + r.next_move()),
                _ => None,
            })
            .min()
    }

    /// One tick: observe and sample (at the same time), decide, dispatch.
    ///
    /// Dispatching, scale-downs that stop replicas go first, so the capacity they free is free
    /// before a scale-up uses it; the scale-ups follow when they are done, or half a tick
    /// period after the tick began at the latest (a replica that ignores SIGTERM holds its
    /// capacity for its `stop_grace`; no one else waits that long). A stop gives up its slots
    /// when it is requested; a scale-up gets no more slots than are free by that count, so one
    /// whose capacity a failed stop did not free waits for a later tick. Scale-downs of services with
    /// `preempt = "pause"` only freeze their replicas (the memory stays taken either way), so
    /// they go with the scale-ups: a higher priority's unpause or start does not wait for a
    /// remainder's pause, and for the few milliseconds both take, the replicas running may
    /// exceed the slots by what is being paused. The tick then waits for its changes until its
    /// period is over; those still running go on in the background.
    pub async fn tick(&mut self) -> TickReport {
        let t0 = Instant::now();
        let now = t0.duration_since(self.started);
        self.ticks += 1;
        let mut errors = Vec::new();
        let mut executions = Vec::new();
        // Changes of earlier ticks that ended meanwhile (a yield first lets a task that has
        // just been woken send its result).
        if !self.in_flight.is_empty() {
            tokio::task::yield_now().await;
        }
        while let Ok(done) = self.done_rx.try_recv() {
            executions.push(self.finished(done, now));
        }

        let mut phases = TickPhases::default();
        // A follower's observation tidies nothing up (the replicas are the leader's).
        if self.elector.is_some() {
            self.backend.set_acting(self.may_act());
        }
        // Observe and sample at once: the observation runs in a task of its own (on another
        // worker of a multi-threaded runtime, or while the samples wait for their servers),
        // so the tick takes the longer of the two rather than their sum.
        let backend = Arc::clone(&self.backend);
        let observing = tokio::spawn(async move {
            let observed = backend.observe().await;
            (observed, t0.elapsed())
        });
        let t = Instant::now();
        let samples = self.sample(now, &mut errors).await;
        phases.sample = t.elapsed();
        let observed = match observing.await {
            Ok((observed, took)) => {
                phases.observe = took;
                observed
            }
            Err(e) => Err(BackendError::Api {
                op: "observe".into(),
                message: format!("the observation's task ended: {e}"),
            }),
        };
        let observed = match observed {
            Ok(o) => {
                if let Some((times, over)) = self
                    .repeats
                    .recovered(&Failing::Observe, std::time::Instant::now())
                {
                    tracing::info!(failures = times, after = ?over, "observe works again");
                }
                o
            }
            Err(e) => {
                match self.repeats.failed(
                    Failing::Observe,
                    &e.to_string(),
                    std::time::Instant::now(),
                ) {
                    Say::Anew => {
                        tracing::warn!(error = %e, kind = e.kind(), "observe failed; skipping this tick (while it goes on, logged once a minute)")
                    }
                    Say::StillFailing { times, over } => {
                        tracing::warn!(error = %e, kind = e.kind(), failures = times, over = ?over, "observe still failing; skipping ticks")
                    }
                    Say::Quiet => {
                        tracing::debug!(error = %e, kind = e.kind(), "observe failed; skipping this tick")
                    }
                }
                errors.push(TickError::Observe {
                    class: e.class(),
                    message: e.to_string(),
                });
                return TickReport {
                    now,
                    observed: None,
                    samples,
                    plan: None,
                    executions,
                    errors,
                    took: t0.elapsed(),
                    phases,
                    leading: self.leading,
                };
            }
        };

        let leading = self.may_act();
        if leading != self.leading {
            if leading {
                tracing::info!("leading: this microscaler changes replicas from now on");
            } else {
                tracing::warn!("not leading: this microscaler observes, decides and reports, and changes nothing");
            }
            self.leading = leading;
        }
        if leading {
            self.check_external(&observed, now, &mut errors);
        } else {
            // The leader's changes are not someone else's; a new leader starts from what
            // it sees then.
            self.written.clear();
        }
        let t = Instant::now();
        self.memory.paused = self
            .controls
            .paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.memory.paused_replicas = observed.paused.clone();
        // The engine's view is the observation's own maps, lent and given back (no copy).
        let mut observed = observed;
        // Where the replicas are, when capacity is counted in resources: each one on a host
        // (running, pending there, or stopping) holds its resources until it is gone.
        let placement = match self.cfg.capacity {
            microscaler_core::Capacity::Resources { .. } => {
                let mut p: BTreeMap<HostId, BTreeMap<ServiceName, u32>> = BTreeMap::new();
                for r in observed.replicas.iter().filter(|r| !r.host.0.is_empty()) {
                    *p.entry(r.host.clone())
                        .or_default()
                        .entry(r.service.clone())
                        .or_default() += 1;
                }
                p
            }
            _ => BTreeMap::new(),
        };
        let engine_view = Observed {
            placement,
            services: std::mem::take(&mut observed.services),
            hosts: std::mem::take(&mut observed.hosts),
            runs_on: std::mem::take(&mut observed.runs_on),
        };
        let (plan, memory) = decide(&self.cfg, &engine_view, &samples, &self.memory, now);
        observed.services = engine_view.services;
        observed.hosts = engine_view.hosts;
        self.memory = memory;
        for a in &plan.actions {
            if self.dry_run {
                tracing::info!(service = %a.service, bound = %a.bound, from = a.from, to = a.to, "dry run: would scale: {}", a.reason);
            } else {
                tracing::info!(service = %a.service, bound = %a.bound, from = a.from, to = a.to, "{}", a.reason);
            }
        }
        phases.decide = t.elapsed();
        // Leadership again, right before acting: a leader frozen (or cut off from its
        // election) while it observed and decided must not act on what it held then.
        let leading = leading && self.may_act();
        if leading {
            self.dispatch(&plan, now, t0, &mut phases, &mut executions)
                .await;
        }

        TickReport {
            now,
            observed: Some(observed),
            samples,
            plan: Some(plan),
            executions,
            errors,
            took: t0.elapsed(),
            phases,
            leading,
        }
    }

    /// Compares the counts a service-level orchestrator wants with the ones microscaler set:
    /// a difference that is not the orchestrator's watch lagging microscaler's own write is
    /// someone else's change, reported (see [`TickError::External`]). The plan then sets the
    /// service's count as it would any other.
    fn check_external(
        &mut self,
        observed: &Observation,
        now: Duration,
        errors: &mut Vec<TickError>,
    ) {
        for (service, o) in &observed.services {
            let Some(theirs) = o.orchestrator_wants else {
                continue;
            };
            if self.in_flight.contains_key(service) {
                continue;
            }
            let Some(w) = self.written.get_mut(service) else {
                // First sight (start, adoption): what is there is the starting point.
                self.written.insert(
                    service.clone(),
                    Written {
                        target: theirs,
                        seen: true,
                        at: now,
                    },
                );
                continue;
            };
            if theirs == w.target {
                w.seen = true;
                continue;
            }
            if !w.seen && now.saturating_sub(w.at) < WRITE_SETTLE {
                continue; // The watch has not shown microscaler's own write yet.
            }
            let ours = w.target;
            *w = Written {
                target: theirs,
                seen: true,
                at: now,
            };
            let times = self.external.entry(service.clone()).or_default();
            times.retain(|&t| now.saturating_sub(t) < FIGHT_WINDOW);
            times.push(now);
            let e = TickError::External {
                service: service.clone(),
                ours,
                theirs,
                recent: times.len() as u32,
            };
            if e.is_fight() {
                tracing::error!(service = %service, ours, theirs, "{e}");
            } else {
                tracing::warn!(service = %service, ours, theirs, "{e}");
            }
            errors.push(e);
        }
    }

    async fn sample(&mut self, now: Duration, errors: &mut Vec<TickError>) -> Samples {
        let timeout = self.cfg.sample_timeout;
        // Every trigger of every service at once. A source that answers at once (manual,
        // random, schedule) is read in one poll and needs no timer; only the ones still pending
        // after it are awaited together, each bounded by the timeout.
        let mut got: Vec<(usize, Arc<str>, Option<SampleResult>)> = Vec::new();
        let mut waits = Vec::new();
        for (i, (_, ts)) in self.triggers.iter_mut().enumerate() {
            for t in ts.iter_mut() {
                let slot = got.len();
                if let Some(v) = t.source.sample_now(now) {
                    got.push((i, t.name.clone(), Some(v.map_err(|e| e.to_string()))));
                    continue;
                }
                let mut sample = Box::pin(t.source.sample(now));
                match futures::FutureExt::now_or_never(sample.as_mut()) {
                    Some(v) => got.push((i, t.name.clone(), Some(v.map_err(|e| e.to_string())))),
                    None => {
                        got.push((i, t.name.clone(), None));
                        waits.push(async move {
                            let v = match tokio::time::timeout(timeout, sample).await {
                                Ok(v) => v.map_err(|e| e.to_string()),
                                Err(_) => Err(format!(
                                    "no sample within {}",
                                    humantime::format_duration(timeout)
                                )),
                            };
                            (slot, v)
                        });
                    }
                }
            }
        }
        for (slot, v) in join_all(waits).await {
            got[slot].2 = Some(v);
        }
        // In configuration order, all in one buffer, then one row per service (the order the
        // engine matches by position).
        let mut flat: Vec<(usize, TriggerSample)> = Vec::with_capacity(got.len());
        for (i, name, value) in got {
            let value = match value.unwrap_or_else(|| Err("not sampled".into())) {
                Ok(v) => {
                    if !self.repeats.is_empty() {
                        let key = Failing::Sample(i, Arc::clone(&name));
                        if let Some((times, over)) =
                            self.repeats.recovered(&key, std::time::Instant::now())
                        {
                            tracing::info!(service = %self.triggers[i].0, trigger = %name, failures = times, after = ?over, "sample works again");
                        }
                    }
                    Some(v)
                }
                Err(message) => {
                    let service = self.triggers[i].0.clone();
                    let key = Failing::Sample(i, Arc::clone(&name));
                    let say = self
                        .repeats
                        .failed(key, &message, std::time::Instant::now());
                    let e = TickError::Sample {
                        service,
                        trigger: name.clone(),
                        message,
                    };
                    match say {
                        Say::Anew => {
                            tracing::warn!(service = %self.triggers[i].0, "sample failed: {e} (while it goes on, logged once a minute)")
                        }
                        Say::StillFailing { times, over } => {
                            tracing::warn!(service = %self.triggers[i].0, failures = times, over = ?over, "sample still failing: {e}")
                        }
                        Say::Quiet => {
                            tracing::debug!(service = %self.triggers[i].0, "sample failed: {e}")
                        }
                    }
                    errors.push(e);
                    None
                }
            };
            flat.push((
                i,
                TriggerSample {
                    trigger: name,
                    value,
                },
            ));
        }
        let mut samples = Samples::with_capacity(self.triggers.len(), flat.len());
        let mut flat = flat.into_iter().peekable();
        while let Some(&(i, _)) = flat.peek() {
            let row = std::iter::from_fn(|| flat.next_if(|(j, _)| *j == i).map(|(_, s)| s));
            samples.push(self.triggers[i].0.clone(), row);
        }
        samples
    }

    /// Dispatches the plan: one task per service that must change (see [`Controller::tick`]),
    /// then waits for them until the tick's period is over. Results that arrive go to
    /// `executions`.
    async fn dispatch(
        &mut self,
        plan: &Plan,
        now: Duration,
        t0: Instant,
        phases: &mut TickPhases,
        executions: &mut Vec<Execution>,
    ) {
        let native_per_host = self.backend.capabilities().native_per_host;
        let mut stops = Vec::new();
        let mut starts = Vec::new();
        // Slots free now; what the stops give up is added as they are requested.
        let mut available = i64::from(plan.capacity);
        for (pos, sp) in plan.services.iter().enumerate() {
            // What the engine saw observed, which is this tick's observation.
            let have = sp.running + sp.pending;
            // A service whose change runs counts as what it was asked: a stop in flight gave
            // its slots up when it was requested, a start in flight is taking its own.
            let in_flight = if self.in_flight.is_empty() {
                None
            } else {
                self.in_flight.get(&sp.service).copied()
            };
            available -= i64::from(in_flight.unwrap_or(have));
            if sp.target == have {
                continue;
            }
            let Some(&index) = self.index.get(&sp.service) else {
                continue;
            };
            let svc = &self.cfg.services[index];
            if matches!(svc.kind, ServiceKind::PerHost) && native_per_host {
                continue; // The orchestrator keeps one per host by itself.
            }
            if self.in_flight.contains_key(&sp.service) {
                tracing::debug!(service = %sp.service, "a change is still running; not dispatching another");
                continue;
            }
            if let Some(b) = self.backoff.get(&sp.service) {
                if b.until > now {
                    tracing::debug!(service = %sp.service, "change held back by backoff");
                    continue;
                }
            }
            // With where the service's plan is, for what the backend is told of the change.
            if sp.target < have && svc.pool.preempt != Preempt::Pause {
                stops.push((index, sp.target, have, pos));
            } else {
                starts.push((index, sp.target, have, pos));
            }
        }
        // Pauses free their slots as they are requested (a paused replica takes none unless
        // its pool says so, and then the plan's capacity already left it out).
        for &(index, target, have, _) in &starts {
            if target < have && !self.cfg.services[index].pool.paused_takes_slot {
                available += i64::from(have - target);
            }
        }

        let tick = self.ticks;
        self.collecting
            .store(true, std::sync::atomic::Ordering::Release);
        let period_end = t0 + self.cfg.tick;
        // The scale-ups wait for the stops half a period at most, so they have the other half.
        let stops_end = t0 + self.cfg.tick / 2;
        // Free capacity before using it: the stops first, then the rest once they are done
        // (or the tick's period is over).
        let t = Instant::now();
        let batch: Vec<(usize, u32, usize)> = stops.iter().map(|&(i, t, _, p)| (i, t, p)).collect();
        let giving_up: HashMap<ServiceName, i64> = stops
            .iter()
            .map(|&(i, t, h, _)| (self.cfg.services[i].name.clone(), i64::from(h - t)))
            .collect();
        // A stop gives up its slots when it is requested: one still running after the wait
        // (a replica that ignores SIGTERM) has been told to go. One that failed gives up none.
        available += stops
            .iter()
            .map(|&(_, t, h, _)| i64::from(h - t))
            .sum::<i64>();
        let not_freed = |done: &Done| {
            let Some(&asked) = giving_up.get(&done.execution.service) else {
                return 0;
            };
            let stopped = match &done.execution.result {
                Ok(o) => i64::from(o.stopped),
                Err(_) => 0,
            };
            asked - stopped.min(asked)
        };
        let (mut waiting, ready) = self.spawn_all(&batch, Phase::Stop, plan);
        for done in ready {
            available -= not_freed(&done);
            executions.push(self.finished(done, now));
        }
        while waiting > 0 {
            match tokio::time::timeout_at(stops_end, self.done_rx.recv()).await {
                Ok(Some(done)) => {
                    if done.tick == tick && done.phase == Phase::Stop {
                        waiting -= 1;
                        available -= not_freed(&done);
                    }
                    executions.push(self.finished(done, now));
                }
                Ok(None) | Err(_) => break,
            }
        }
        phases.stops = if stops.is_empty() {
            Duration::ZERO
        } else {
            t.elapsed()
        };
        if waiting > 0 {
            tracing::info!(
                stopping = waiting,
                "stops still running after half a tick period; the scale-ups go ahead"
            );
        }

        // The scale-ups, highest priority first (the plan's order), within the slots free:
        // a scale-up whose capacity a failed stop did not free waits for the next tick.
        // Pauses go first: they free the CPU the scale-ups are about to use.
        let mut batch: Vec<(usize, u32, usize)> = starts
            .iter()
            .filter(|&&(_, target, have, _)| target < have)
            .map(|&(index, target, _, pos)| (index, target, pos))
            .collect();
        for &(index, target, have, pos) in &starts {
            if target < have {
                continue;
            }
            let grant = i64::from(target - have).min(available.max(0));
            if grant < i64::from(target - have) {
                tracing::info!(service = %self.cfg.services[index].name, target, granted = have as i64 + grant, "scale-up limited to the slots free: a stop did not free its capacity");
            }
            if grant > 0 {
                available -= grant;
                batch.push((index, have + grant as u32, pos));
            }
        }
        let t = Instant::now();
        let (started, ready) = self.spawn_all(&batch, Phase::Start, plan);
        for done in ready {
            executions.push(self.finished(done, now));
        }
        let mut waiting = started + waiting;
        while waiting > 0 {
            match tokio::time::timeout_at(period_end, self.done_rx.recv()).await {
                Ok(Some(done)) => {
                    if done.tick == tick {
                        waiting -= 1;
                    }
                    executions.push(self.finished(done, now));
                }
                Ok(None) | Err(_) => break,
            }
        }
        phases.starts = if starts.is_empty() {
            Duration::ZERO
        } else {
            t.elapsed()
        };
        self.collecting
            .store(false, std::sync::atomic::Ordering::Release);
        // A change that ended between the last receive and the flag (rare) is picked up by
        // the next tick; one still running wakes the loop when it ends.
    }

    /// Starts one change per `(service index, target, position in the plan)`. A change whose
    /// backend answers at its first poll (a simulated orchestrator, an unchanged count) is done
    /// at once and returned; every other one goes on in a task of its own. Returns how many
    /// tasks run, and the changes already done.
    fn spawn_all(
        &mut self,
        batch: &[(usize, u32, usize)],
        phase: Phase,
        plan: &Plan,
    ) -> (usize, Vec<Done>) {
        let mut ready = Vec::new();
        let mut spawned = 0;
        for &(index, target, pos) in batch {
            let sp = &plan.services[pos];
            let (reason, remove_from) = (sp.reason.clone(), sp.remove_from.clone());
            let cfg = Arc::clone(&self.cfg);
            let backend = Arc::clone(&self.backend);
            // A free permit is taken here, without a future: awaiting one counts against the
            // task's cooperative budget, which a tick of hundreds of changes would use up,
            // sending every change after the first hundred or so to a task of its own.
            let held = Arc::clone(&self.permits).try_acquire_owned().ok();
            let permits = held.is_none().then(|| Arc::clone(&self.permits));
            let tick = self.ticks;
            self.in_flight
                .insert(cfg.services[index].name.clone(), target);
            let mut change = Box::pin(async move {
                let svc = &cfg.services[index];
                // The semaphore is never closed; a failed acquire would only skip the bound.
                let _permit = match permits {
                    None => held,
                    Some(p) => p.acquire_owned().await.ok(),
                };
                let result = backend
                    .scale_with(
                        svc,
                        target,
                        &Change {
                            reason: &reason,
                            remove_from: &remove_from,
                        },
                    )
                    .await
                    .map_err(ScaleError::from);
                Done {
                    execution: Execution {
                        service: svc.name.clone(),
                        target,
                        result,
                    },
                    phase,
                    tick,
                }
            });
            if let Some(done) = futures::FutureExt::now_or_never(change.as_mut()) {
                ready.push(done);
                continue;
            }
            spawned += 1;
            let tx = self.done_tx.clone();
            let wake = Arc::clone(&self.controls.wake);
            let collecting = Arc::clone(&self.collecting);
            tokio::spawn(async move {
                let done = change.await;
                // The receiver lives as long as the controller; after it, no one listens.
                let _ = tx.send(done);
                if !collecting.load(std::sync::atomic::Ordering::Acquire) {
                    wake.notify_one();
                }
            });
        }
        (spawned, ready)
    }

    /// Records a finished change: the service may change again, and a failure backs off by
    /// its class.
    fn finished(&mut self, done: Done, now: Duration) -> Execution {
        let ex = done.execution;
        self.in_flight.remove(&ex.service);
        let failed = match &ex.result {
            Ok(o) if o.failures.is_empty() => None,
            Ok(_) => Some(ErrorClass::Failed),
            Err(e) => Some(e.class),
        };
        // A service-level orchestrator's count (known from its first observation) is now
        // what was set, once the watch shows it.
        if ex.result.is_ok() {
            if let Some(w) = self.written.get_mut(&ex.service) {
                *w = Written {
                    target: ex.target,
                    seen: false,
                    at: now,
                };
            }
        }
        match failed {
            None => {
                self.backoff.remove(&ex.service);
            }
            Some(class) => {
                let b = self.backoff.entry(ex.service.clone()).or_insert(Backoff {
                    failures: 0,
                    until: now,
                });
                b.failures += 1;
                let mut wait = class.backoff(b.failures);
                if class.jitter() {
                    // Up to a quarter more, spread by the service's name and the attempt.
                    let h = ex
                        .service
                        .as_str()
                        .bytes()
                        .fold(u64::from(b.failures), |h, c| {
                            h.wrapping_mul(31).wrapping_add(u64::from(c))
                        });
                    wait += wait.mul_f64((h % 1000) as f64 / 4000.0);
                }
                b.until = now + wait;
                match &ex.result {
                    Ok(o) => {
                        for f in &o.failures {
                            tracing::error!(service = %ex.service, failures = b.failures, retry_in = ?wait, "replica failed to start: {}", f.message);
                        }
                    }
                    Err(e) => {
                        tracing::error!(service = %ex.service, class = %e.class, failures = b.failures, retry_in = ?wait, "scale failed: {e}");
                    }
                }
            }
        }
        ex
    }

    /// Waits for every change in flight to finish (at most `limit`), recording the results.
    pub async fn drain(&mut self, limit: Duration) -> Vec<Execution> {
        let mut out = Vec::new();
        let deadline = Instant::now() + limit;
        let now = self.started.elapsed();
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some(done)) => out.push(self.finished(done, now)),
                Ok(None) | Err(_) => break,
            }
        }
        out
    }

    /// Stops the controller: removes the replicas if `on_exit = "stop"`, else leaves them for
    /// the next start to adopt.
    pub async fn shutdown(mut self) -> Result<OnExit, BackendError> {
        let on_exit = self.cfg.on_exit;
        // Let the changes in flight end first (a stop within its grace), so none races the
        // shutdown.
        let grace = self
            .cfg
            .services
            .iter()
            .map(|s| s.stop_grace)
            .max()
            .unwrap_or_default();
        if !self.in_flight.is_empty() {
            tracing::info!(
                changes = self.in_flight.len(),
                "waiting for the changes in flight"
            );
            self.drain(grace + Duration::from_secs(30)).await;
        }
        if self.dry_run {
            tracing::info!("dry run: nothing was changed, nothing to remove");
            return Ok(OnExit::Leave);
        }
        // A follower removes nothing: the replicas are the leader's.
        let remove = on_exit == OnExit::Stop && self.may_act();
        if on_exit == OnExit::Stop && !remove {
            tracing::info!("not leading: leaving the replicas to the leader");
        }
        let done = if self.retired.is_empty() {
            self.backend.shutdown(&self.cfg.services, remove).await
        } else {
            let all = [self.cfg.services.as_slice(), &self.retired].concat();
            self.backend.shutdown(&all, remove).await
        };
        // The lease goes last, once nothing of this microscaler's changes is left running.
        if let Some(e) = &self.elector {
            e.release().await;
        }
        done?;
        Ok(on_exit)
    }
}

/// Runs ticks until `stop` resolves, calling `record` after each tick. A tick in progress is
/// always finished (never cancelled half-way through starting replicas).
pub async fn run_loop<B: Backend + 'static>(
    ctl: &mut Controller<B>,
    stop: impl std::future::Future<Output = ()>,
    mut record: impl FnMut(&TickReport),
) {
    let mut interval = tokio::time::interval(ctl.cfg.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wake = ctl.controls.wake.clone();
    tokio::pin!(stop);
    loop {
        // A random walk's move is acted on when it happens, not up to a period later.
        let scheduled = ctl.next_scheduled_change();
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = interval.tick() => {}
            // A pushed demand change is acted on at once; the period restarts from here.
            _ = wake.notified() => interval.reset(),
            _ = tokio::time::sleep_until(scheduled.unwrap_or_else(|| Instant::now() + ctl.cfg.tick * 2)), if scheduled.is_some() => {
                interval.reset();
            }
        }
        let report = ctl.tick().await;
        if report.took > ctl.cfg.tick {
            tracing::warn!(took = ?report.took, tick = ?ctl.cfg.tick, "tick took longer than the tick period");
        }
        record(&report);
    }
}
