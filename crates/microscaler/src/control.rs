//! The control loop: every tick, observe -> sample -> decide -> act -> record.
//!
//! The engine decides; this module only executes. Execution reconciles each service to its
//! target against what was observed: all scale-downs that stop replicas first (concurrently) so
//! capacity is free before it is used, then all scale-ups (concurrently), together with the
//! scale-downs of `preempt = "pause"` services (a pause frees no memory, only CPU, so waiting
//! for it would only delay the scale-up; see [`Controller::tick`]). A service whose last start
//! failed is retried with exponential backoff; its failure never holds up the other services.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use microscaler_backends::{Backend, BackendError, Observation, ScaleOutcome};
use microscaler_core::config::OnExit;
use microscaler_core::{
    decide, Config, EngineState, Observed, Plan, Preempt, Samples, Service, ServiceKind,
    ServiceName, TriggerSample,
};
use microscaler_sources::{AnySource, ManualHandle, RandomControl, Source, SourceError};
use tokio::time::Instant;

/// Backoff after failed starts: 0.5 s, doubling, at most 30 s.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

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
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    until: Duration,
}

/// One service's execution result in a tick.
#[derive(Debug)]
pub struct Execution {
    /// The service.
    pub service: ServiceName,
    /// The target it was scaled to.
    pub target: u32,
    /// What the backend did, or why it could not.
    pub result: Result<ScaleOutcome, String>,
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
    /// Errors of the tick (observe failures, sample failures), human-readable.
    pub errors: Vec<String>,
    /// How long the tick took.
    pub took: Duration,
    /// Where the tick's time went.
    pub phases: TickPhases,
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

/// The controller: configuration, backend, live sources and the engine's memory.
pub struct Controller<B: Backend> {
    cfg: Config,
    backend: B,
    triggers: Vec<(ServiceName, Vec<LiveTrigger>)>,
    memory: EngineState,
    backoff: BTreeMap<ServiceName, Backoff>,
    started: Instant,
    controls: Controls,
}

impl<B: Backend> Controller<B> {
    /// Builds the live sources of `cfg`. `clock_seed` seeds random sources that have no seed.
    pub fn new(cfg: Config, backend: B, clock_seed: u64) -> Self {
        let capacity = match cfg.capacity {
            microscaler_core::Capacity::Slots(n) => n,
            microscaler_core::Capacity::SlotsPerHost(n) => n,
        };
        let mut controls = Controls::default();
        let mut triggers = Vec::new();
        for svc in &cfg.services {
            let mut live = Vec::new();
            if let ServiceKind::Triggered(ts) = &svc.kind {
                for (i, t) in ts.iter().enumerate() {
                    let source = AnySource::build_or_broken(
                        &t.source,
                        capacity,
                        clock_seed ^ i as u64,
                        &cfg.instance,
                        &svc.name.to_string(),
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
                        _ => {}
                    }
                    live.push(LiveTrigger {
                        name: t.name.clone(),
                        source,
                        required: t.source.net().is_none_or(|n| n.required),
                    });
                }
            }
            triggers.push((svc.name.clone(), live));
        }
        Self {
            cfg,
            backend,
            triggers,
            memory: EngineState::default(),
            backoff: BTreeMap::new(),
            started: Instant::now(),
            controls,
        }
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
        let checks = self.triggers.iter_mut().flat_map(|(svc, ts)| {
            let svc = &*svc;
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
                    tracing::warn!(%service, %trigger, "start-up check failed; starting anyway (required = false): {error}");
                }
            }
        }
        self.backend
            .prepare(&self.cfg.services)
            .await
            .map_err(PrepareError::Backend)
    }

    /// One tick: observe, sample, decide, act.
    ///
    /// Acting, scale-downs that stop replicas run first and are waited for, so the capacity
    /// they free is free before a scale-up uses it. Scale-downs of services with
    /// `preempt = "pause"` only freeze their replicas (the memory stays taken either way), so
    /// they run concurrently with the scale-ups: a higher priority's unpause or start does not
    /// wait for a remainder's pause, and for the few milliseconds both take, the replicas
    /// running may exceed the slots by what is being paused.
    pub async fn tick(&mut self) -> TickReport {
        let t0 = Instant::now();
        let now = t0.duration_since(self.started);
        let mut errors = Vec::new();

        let mut phases = TickPhases::default();
        let observed = self.backend.observe().await;
        phases.observe = t0.elapsed();
        let observed = match observed {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, kind = e.kind(), "observe failed; skipping this tick");
                errors.push(format!("observe: {e}"));
                return TickReport {
                    now,
                    observed: None,
                    samples: Samples::default(),
                    plan: None,
                    executions: Vec::new(),
                    errors,
                    took: t0.elapsed(),
                    phases,
                };
            }
        };

        let t = Instant::now();
        let samples = self.sample(now, &mut errors).await;
        phases.sample = t.elapsed();
        let t = Instant::now();
        self.memory.paused = self
            .controls
            .paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.memory.paused_replicas = observed.paused.clone();
        let engine_view = Observed {
            services: observed.services.clone(),
            hosts: observed.hosts.clone(),
        };
        let (plan, memory) = decide(&self.cfg, &engine_view, &samples, &self.memory, now);
        self.memory = memory;
        for a in &plan.actions {
            tracing::info!(service = %a.service, bound = %a.bound, from = a.from, to = a.to, "{}", a.reason);
        }
        phases.decide = t.elapsed();
        let executions = self.execute(&plan, &observed, now, &mut phases).await;

        TickReport {
            now,
            observed: Some(observed),
            samples,
            plan: Some(plan),
            executions,
            errors,
            took: t0.elapsed(),
            phases,
        }
    }

    async fn sample(&mut self, now: Duration, errors: &mut Vec<String>) -> Samples {
        let timeout = self.cfg.sample_timeout;
        let mut samples = Samples::default();
        let futs = self.triggers.iter_mut().map(|(svc, ts)| async move {
            let mut out = Vec::new();
            let mut errs = Vec::new();
            for t in ts.iter_mut() {
                let value = match tokio::time::timeout(timeout, t.source.sample(now)).await {
                    Ok(Ok(v)) => Some(v),
                    Ok(Err(e)) => {
                        errs.push(format!("{svc}/{}: {e}", t.name));
                        None
                    }
                    Err(_) => {
                        errs.push(format!(
                            "{svc}/{}: no sample within {}",
                            t.name,
                            humantime::format_duration(timeout)
                        ));
                        None
                    }
                };
                out.push(TriggerSample {
                    trigger: t.name.clone(),
                    value,
                });
            }
            (svc.clone(), out, errs)
        });
        for (svc, out, errs) in join_all(futs).await {
            for e in &errs {
                tracing::warn!(service = %svc, "sample failed: {e}");
            }
            errors.extend(errs);
            if !out.is_empty() {
                samples.services.insert(svc, out);
            }
        }
        samples
    }

    async fn execute(
        &mut self,
        plan: &Plan,
        observed: &Observation,
        now: Duration,
        phases: &mut TickPhases,
    ) -> Vec<Execution> {
        let mut downs = Vec::new();
        let mut pauses = Vec::new();
        let mut ups = Vec::new();
        for sp in &plan.services {
            let have = observed
                .services
                .get(&sp.service)
                .map_or(0, |o| o.running + o.pending);
            let Some(svc) = self.cfg.services.iter().find(|s| s.name == sp.service) else {
                continue;
            };
            if matches!(svc.kind, ServiceKind::PerHost) && self.backend.kind() == "swarm" {
                continue; // Swarm's global mode keeps one per node by itself.
            }
            if sp.target < have && svc.pool.preempt == Preempt::Pause {
                pauses.push((svc, sp.target));
            } else if sp.target < have {
                downs.push((svc, sp.target));
            } else if sp.target > have {
                match self.backoff.get(&sp.service) {
                    Some(b) if b.until > now => {
                        tracing::debug!(service = %sp.service, "start held back by backoff");
                    }
                    _ => ups.push((svc, sp.target)),
                }
            }
        }

        // Free capacity before using it; pauses go along with the scale-ups (see `tick`).
        let t = Instant::now();
        let mut executions = scale_all(&self.backend, downs).await;
        phases.stops = t.elapsed();
        let t = Instant::now();
        let (paused, started) = futures::join!(
            scale_all(&self.backend, pauses),
            scale_all(&self.backend, ups)
        );
        executions.extend(paused);
        executions.extend(started);
        phases.starts = t.elapsed();

        for ex in &executions {
            let failed = match &ex.result {
                Ok(o) => !o.failures.is_empty(),
                Err(_) => true,
            };
            if failed {
                let b = self.backoff.entry(ex.service.clone()).or_insert(Backoff {
                    failures: 0,
                    until: now,
                });
                b.failures += 1;
                let wait = BACKOFF_FIRST
                    .saturating_mul(1 << (b.failures - 1).min(10))
                    .min(BACKOFF_MAX);
                b.until = now + wait;
                match &ex.result {
                    Ok(o) => {
                        for f in &o.failures {
                            tracing::error!(service = %ex.service, failures = b.failures, retry_in = ?wait, "replica failed to start: {}", f.message);
                        }
                    }
                    Err(e) => {
                        tracing::error!(service = %ex.service, failures = b.failures, retry_in = ?wait, "scale failed: {e}");
                    }
                }
            } else {
                self.backoff.remove(&ex.service);
            }
        }
        executions
    }

    /// Stops the controller: removes the replicas if `on_exit = "stop"`, else leaves them for
    /// the next start to adopt.
    pub async fn shutdown(self) -> Result<OnExit, BackendError> {
        let on_exit = self.cfg.on_exit;
        self.backend
            .shutdown(&self.cfg.services, on_exit == OnExit::Stop)
            .await?;
        Ok(on_exit)
    }
}

/// Scales every `(service, target)` of `batch` concurrently.
async fn scale_all<B: Backend>(backend: &B, batch: Vec<(&Service, u32)>) -> Vec<Execution> {
    join_all(batch.into_iter().map(|(svc, target)| async move {
        let result = backend.scale(svc, target).await.map_err(|e| e.to_string());
        Execution {
            service: svc.name.clone(),
            target,
            result,
        }
    }))
    .await
}

/// Runs ticks until `stop` resolves, calling `record` after each tick. A tick in progress is
/// always finished (never cancelled half-way through starting replicas).
pub async fn run_loop<B: Backend>(
    ctl: &mut Controller<B>,
    stop: impl std::future::Future<Output = ()>,
    mut record: impl FnMut(&TickReport),
) {
    let mut interval = tokio::time::interval(ctl.cfg.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wake = ctl.controls.wake.clone();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = interval.tick() => {}
            // A pushed demand change is acted on at once; the period restarts from here.
            _ = wake.notified() => interval.reset(),
        }
        let report = ctl.tick().await;
        if report.took > ctl.cfg.tick {
            tracing::warn!(took = ?report.took, tick = ?ctl.cfg.tick, "tick took longer than the tick period");
        }
        record(&report);
    }
}
