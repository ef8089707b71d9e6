//! Property tests of the decision engine: random configurations (1 to 8 services of every
//! kind, random priorities, min, max and max_step), random capacity, observations, memories and
//! samples. Each property is checked against a small reference model of the rules below, written
//! independently of the engine's code.
//!
//! The rules, per service, in allocation order (triggered and per-host services by priority then
//! name, then remainder services by priority then name):
//! - *current*: the committed target, or on the first tick running + pending.
//! - *want*: demand (max over triggers, rounded up; with a trigger missing, the current target
//!   unless the others ask for more), ready hosts, or `max` for a remainder service; clamped to
//!   `[min, max]`; held at `min(current, max)` while not converged; then moved by at most
//!   `max_step` (but min and max win).
//! - *floor*: `max(min(min, want), min(want, current - max_step))`: how low a higher priority's
//!   growth may push it. *keep*: `max(floor, min(want, current))`.
//! - mins, then keeps, are reserved in allocation order within the capacity; a service whose
//!   reserved keep ends below its floor is *forced* (the cluster cannot hold what it must keep).

use std::collections::BTreeMap;
use std::time::Duration;

use microscaler_core::config::OnExit;
use microscaler_core::engine::Commitment;
use microscaler_core::*;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use microscaler_core::plugin::opaque::{self, Opaque};

type Config = microscaler_core::Config<Opaque>;
type Service = microscaler_core::Service<Opaque>;
type ServiceKind = microscaler_core::ServiceKind<opaque::Source>;
type Trigger = microscaler_core::Trigger<opaque::Source>;

const NAMES: &[&str] = &["api", "batch", "cache", "db", "etl", "feed", "gc", "hub"];
const TRIGGERS: &[&str] = &["queue", "rps"];
const CONVERGE: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(500);

/// One tick's inputs.
#[derive(Debug, Clone)]
struct Scenario {
    cfg: Config,
    observed: Observed,
    samples: Samples,
    memory: EngineState,
    now: Duration,
}

impl Scenario {
    fn decide(&self) -> (Plan, EngineState) {
        decide(
            &self.cfg,
            &self.observed,
            &self.samples,
            &self.memory,
            self.now,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Generators.

#[derive(Debug, Clone, Copy)]
enum Kind {
    Triggered(usize),
    Remainder,
    PerHost,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => (1usize..=2).prop_map(Kind::Triggered),
        2 => Just(Kind::Remainder),
        1 => Just(Kind::PerHost),
    ]
}

fn service(i: usize) -> impl Strategy<Value = Service> {
    (
        1u32..=4,
        kind(),
        0u32..=3,
        prop_oneof![Just(None), (0u32..=10).prop_map(Some)],
        prop_oneof![Just(None), (1u32..=4).prop_map(Some)],
    )
        .prop_map(move |(priority, kind, min, extra, max_step)| Service {
            name: ServiceName::try_new(NAMES[i]).unwrap(),
            priority: Priority::try_new(priority).unwrap(),
            min,
            // max >= 1 and >= min, as validation guarantees.
            max: extra.map_or(u32::MAX, |e| (min + e).max(1)),
            max_step,
            kind: match kind {
                Kind::Triggered(n) => ServiceKind::Triggered(
                    TRIGGERS[..n]
                        .iter()
                        .map(|t| Trigger::new(*t, opaque::Source::of("manual")))
                        .collect(),
                ),
                Kind::Remainder => ServiceKind::Remainder,
                Kind::PerHost => ServiceKind::PerHost,
            },
            workload: Default::default(),
            stop_grace: Duration::from_secs(10),
            pool: Default::default(),
            resources: None,
        })
}

/// Capacity for `n` services: mostly room for about what they run (up to 8 each), sometimes
/// far less (the cluster shrank), sometimes per host.
fn capacity(n: usize) -> impl Strategy<Value = Capacity> {
    let n = n as u32;
    prop_oneof![
        6 => (2 * n..=9 * n).prop_map(Capacity::Slots),
        1 => (0..=2 * n).prop_map(Capacity::Slots),
        2 => (1u32..=2 * n).prop_map(Capacity::SlotsPerHost),
    ]
}

fn observation() -> impl Strategy<Value = Option<ServiceObservation>> {
    prop_oneof![
        1 => Just(None),
        4 => (0u32..=8, prop_oneof![3 => Just(0u32), 1 => 1u32..=3])
            .prop_map(|(running, pending)| Some(ServiceObservation::counts(running, pending))),
    ]
}

/// A commitment `age` before now, or none (first tick).
fn commitment() -> impl Strategy<Value = Option<(u32, Duration)>> {
    prop_oneof![
        1 => Just(None),
        4 => (0u32..=9, prop_oneof![Just(0u64), 0u64..=60_000])
            .prop_map(|(t, age)| Some((t, Duration::from_millis(age)))),
    ]
}

/// A trigger's sample: no entry at all, a failed one, a value (sometimes not finite).
fn sample() -> impl Strategy<Value = Option<Option<f64>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(None)),
        1 => Just(Some(Some(f64::NAN))),
        8 => (0u32..=100).prop_map(|v| Some(Some(v as f64 / 10.0))),
        2 => (0u32..=10).prop_map(|v| Some(Some(v as f64))),
    ]
}

/// A whole tick's inputs; the backend has often done what was asked (converged).
fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..=8)
        .prop_flat_map(|n| {
            let services: Vec<_> = (0..n).map(service).collect();
            (
                services,
                capacity(n),
                prop::collection::vec(any::<bool>(), 0..=5),
                prop::collection::vec(
                    (
                        observation(),
                        commitment(),
                        any::<bool>(),
                        prop::collection::vec(sample(), 2),
                    ),
                    n,
                ),
            )
        })
        .prop_map(|(services, capacity, hosts, per)| {
            let now = Duration::from_secs(100);
            let mut observed = Observed {
                placement: Default::default(),
                runs_on: Default::default(),
                services: BTreeMap::new(),
                hosts: hosts
                    .iter()
                    .enumerate()
                    .map(|(i, ready)| Host {
                        id: format!("h{i}").into(),
                        name: format!("host-{i}"),
                        ready: *ready,
                        ..Host::default()
                    })
                    .collect(),
            };
            let mut memory = EngineState::default();
            let mut samples = Samples::default();
            for (svc, (obs, commit, converged, values)) in services.iter().zip(per) {
                if let Some((target, age)) = commit {
                    memory.set_commitment(
                        svc.name.clone(),
                        Commitment {
                            target,
                            changed_at: now - age,
                        },
                    );
                }
                match (commit, converged, obs) {
                    // Half the time the backend has done what was asked.
                    (Some((target, _)), true, _) => {
                        observed
                            .services
                            .insert(svc.name.clone(), ServiceObservation::counts(target, 0));
                    }
                    (_, _, Some(o)) => {
                        observed.services.insert(svc.name.clone(), o);
                    }
                    _ => {}
                }
                if let ServiceKind::Triggered(ts) = &svc.kind {
                    let got: Vec<TriggerSample> = ts
                        .iter()
                        .zip(&values)
                        .filter_map(|(t, v)| {
                            v.map(|value| TriggerSample {
                                trigger: t.name.clone(),
                                value,
                            })
                        })
                        .collect();
                    if !got.is_empty() {
                        samples.insert(svc.name.clone(), got);
                    }
                }
            }
            Scenario {
                cfg: Config {
                    instance: "props".into(),
                    tick: TICK,
                    sample_timeout: TICK / 2,
                    converge_timeout: CONVERGE,
                    on_exit: OnExit::Leave,
                    capacity,
                    backend: opaque::Backend::of("process"),
                    services,
                    scaling: Default::default(),
                    server: Default::default(),
                    ha: None,
                },
                observed,
                samples,
                memory,
                now,
            }
        })
}

// ---------------------------------------------------------------------------------------------
// The reference model.

/// What the rules say about one service this tick.
#[derive(Debug, Clone)]
struct Expect {
    name: String,
    remainder: bool,
    triggered: bool,
    min: u32,
    max: u32,
    step: u32,
    current: u32,
    converged: bool,
    /// A trigger of the service had no usable sample.
    missing: bool,
    want: u32,
    /// `min(min, want)`: reserved first.
    min_reserved: u32,
    floor: u32,
    keep: u32,
    /// After reserving mins and keeps within the capacity.
    kept: u32,
    /// The floor that applies this tick (cut to what could be kept).
    floor_cut: u32,
    /// The cluster cannot hold what this service must keep.
    forced: bool,
}

fn ceil(v: f64) -> u32 {
    if v <= 0.0 {
        0
    } else if v >= u32::MAX as f64 {
        u32::MAX
    } else {
        v.ceil() as u32
    }
}

/// The services in allocation order, with what the rules say about each.
fn model(s: &Scenario) -> (u32, Vec<Expect>) {
    let capacity = s.cfg.capacity.slots(&s.observed.hosts);
    let ready = s.observed.hosts.iter().filter(|h| h.ready).count() as u32;
    let mut svcs: Vec<&Service> = s.cfg.services.iter().collect();
    svcs.sort_by_key(|s| (s.is_remainder(), s.priority, s.name.clone()));
    let mut out: Vec<Expect> = svcs
        .iter()
        .map(|svc| {
            let obs = s.observed.service(&svc.name);
            let memo = s.memory.commitment(&svc.name);
            let current = memo.map_or(obs.running + obs.pending, |m| m.target);
            let converged = match memo {
                None => true,
                Some(m) => {
                    (obs.running == m.target && obs.pending == 0)
                        || s.now - m.changed_at >= CONVERGE
                }
            };
            let step = svc.max_step.unwrap_or(u32::MAX);
            let mut missing = false;
            let mut want = match &svc.kind {
                ServiceKind::Remainder => svc.max,
                ServiceKind::PerHost => ready,
                ServiceKind::Triggered(ts) => {
                    let got = s.samples.get(&svc.name);
                    let mut best: Option<u32> = None;
                    for t in ts {
                        let v = got
                            .and_then(|g| g.iter().find(|x| x.trigger == t.name))
                            .and_then(|x| x.value)
                            .filter(|v| v.is_finite());
                        match v {
                            Some(v) => best = best.max(Some(ceil(v))),
                            None => missing = true,
                        }
                    }
                    match best {
                        Some(b) if !missing || b > current => b,
                        _ => current,
                    }
                }
            };
            want = want.clamp(svc.min, svc.max);
            if !converged {
                want = current.min(svc.max);
            }
            if want > current.saturating_add(step) {
                want = (current + step).max(svc.min);
            } else if want.saturating_add(step) < current {
                want = (current - step).min(svc.max);
            }
            let min_reserved = svc.min.min(want);
            let floor = min_reserved.max(want.min(current.saturating_sub(step)));
            let keep = floor.max(want.min(current));
            Expect {
                name: svc.name.to_string(),
                remainder: svc.is_remainder(),
                triggered: matches!(svc.kind, ServiceKind::Triggered(_)),
                min: svc.min,
                max: svc.max,
                step,
                current,
                converged,
                missing,
                want,
                min_reserved,
                floor,
                keep,
                kept: 0,
                floor_cut: 0,
                forced: false,
            }
        })
        .collect();
    let mut left = capacity as u64;
    for e in out.iter_mut() {
        let m = (e.min_reserved as u64).min(left);
        left -= m;
        e.kept = m as u32;
    }
    for e in out.iter_mut() {
        let extra = ((e.keep - e.min_reserved) as u64).min(left);
        left -= extra;
        e.kept += extra as u32;
        e.forced = e.kept < e.floor;
        e.floor_cut = e.floor.min(e.kept);
    }
    (capacity, out)
}

fn targets(plan: &Plan, exp: &[Expect]) -> Vec<u32> {
    exp.iter().map(|e| plan.target(&e.name)).collect()
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Never over capacity; every min honoured while the mins fit.
    #[test]
    fn within_capacity(s in scenario()) {
        let (plan, _) = s.decide();
        let (capacity, exp) = model(&s);
        let t = targets(&plan, &exp);
        let sum: u64 = t.iter().map(|x| *x as u64).sum();
        prop_assert_eq!(plan.capacity, capacity);
        prop_assert_eq!(plan.allocated as u64, sum);
        prop_assert!(sum <= capacity as u64, "sum {} > capacity {}", sum, capacity);
        let mins: u64 = exp.iter().map(|e| e.min_reserved as u64).sum();
        if mins <= capacity as u64 {
            for (e, t) in exp.iter().zip(&t) {
                prop_assert!(*t >= e.min_reserved, "{} below its min: {:?}", e.name, plan);
            }
        }
    }

    /// Targets within [min, max]: max always; min unless forced by over-capacity or held below
    /// it while converging.
    #[test]
    fn within_min_and_max(s in scenario()) {
        let (plan, _) = s.decide();
        let (capacity, exp) = model(&s);
        let mins: u64 = exp.iter().map(|e| e.min as u64).sum();
        for e in &exp {
            let t = plan.target(&e.name);
            prop_assert!(t <= e.max, "{} above max: {:?}", e.name, plan);
            let held = !e.converged && e.current < e.min;
            if !held && mins <= capacity as u64 {
                prop_assert!(t >= e.min, "{} below min: {:?}", e.name, plan);
            }
        }
    }

    /// A change is at most max_step, unless the service moves into [min, max] or is forced by
    /// over-capacity.
    #[test]
    fn max_step_honoured(s in scenario()) {
        let (plan, _) = s.decide();
        let (_, exp) = model(&s);
        for e in &exp {
            let t = plan.target(&e.name);
            let into_range = (e.current < e.min && t == e.min) || (e.current > e.max && t == e.max);
            if !e.forced && !into_range {
                prop_assert!(
                    t.abs_diff(e.current) <= e.step,
                    "{}: {} -> {} with max_step {}: {:?}", e.name, e.current, t, e.step, plan
                );
            }
        }
    }

    /// No voluntary change while the last one has not converged: never up, and down only when
    /// preempted (or over capacity, or to honour max).
    #[test]
    fn no_voluntary_change_while_converging(s in scenario()) {
        let (plan, _) = s.decide();
        let (_, exp) = model(&s);
        for e in exp.iter().filter(|e| !e.converged) {
            let sp = plan.service(&e.name).unwrap();
            prop_assert!(sp.target <= e.current, "{} grew while converging: {:?}", e.name, plan);
            if sp.target < e.current.min(e.max) {
                prop_assert!(
                    matches!(sp.bound, Bound::Preempted | Bound::OverCapacity),
                    "{} shrank while converging, bound {:?}: {:?}", e.name, sp.bound, plan
                );
            }
        }
    }

    /// A missing sample never scales a triggered service down, except by preemption.
    #[test]
    fn missing_sample_never_scales_down(s in scenario()) {
        let (plan, _) = s.decide();
        let (_, exp) = model(&s);
        for e in exp.iter().filter(|e| e.triggered && e.missing) {
            let sp = plan.service(&e.name).unwrap();
            if sp.target < e.current.min(e.max) {
                prop_assert!(
                    matches!(sp.bound, Bound::Preempted | Bound::OverCapacity),
                    "{} scaled down on a missing sample, bound {:?}: {:?}", e.name, sp.bound, plan
                );
            }
        }
    }

    /// Priority order: every target lies between its floor and its want; when a service is below
    /// its want, the capacity is used up and everyone after it in allocation order is at its
    /// floor. So a remainder service never makes a triggered or higher service get less.
    #[test]
    fn priority_order(s in scenario()) {
        let (plan, _) = s.decide();
        let (capacity, exp) = model(&s);
        let t = targets(&plan, &exp);
        for (i, e) in exp.iter().enumerate() {
            prop_assert!(
                e.floor_cut <= t[i] && t[i] <= e.want,
                "{}: target {} outside [{}, {}]: {:?}", e.name, t[i], e.floor_cut, e.want, plan
            );
            if t[i] < e.want {
                prop_assert_eq!(plan.allocated, capacity, "{} short with free slots: {:?}", e.name, plan);
                for (j, later) in exp.iter().enumerate().skip(i + 1) {
                    prop_assert_eq!(
                        t[j], later.floor_cut,
                        "{} above its floor while {} (earlier) is short: {:?}", later.name, e.name, plan
                    );
                }
                if !e.remainder {
                    for (j, r) in exp.iter().enumerate().filter(|(_, r)| r.remainder) {
                        prop_assert_eq!(t[j], r.floor_cut, "remainder {} took from {}", r.name, e.name);
                    }
                }
            }
        }
        // Plan entries are in allocation order.
        let names: Vec<&str> = plan.services.iter().map(|s| s.service.as_str()).collect();
        let order: Vec<&str> = exp.iter().map(|e| e.name.as_str()).collect();
        prop_assert_eq!(names, order);
    }

    /// Same inputs, same plan; the order of the services in the configuration does not matter.
    #[test]
    fn deterministic_and_order_free(
        (s, perm) in scenario().prop_flat_map(|s| {
            let idx: Vec<usize> = (0..s.cfg.services.len()).collect();
            (Just(s), Just(idx).prop_shuffle())
        })
    ) {
        let (plan, memory) = s.decide();
        prop_assert_eq!(&s.decide(), &(plan.clone(), memory.clone()));
        let mut shuffled = s.clone();
        shuffled.cfg.services = perm.iter().map(|i| s.cfg.services[*i].clone()).collect();
        prop_assert_eq!(shuffled.decide(), (plan, memory));
    }

    /// Samples and commitments are matched to services by position when they come in the
    /// configuration's order and by name otherwise: the order they come in does not matter,
    /// and of a service's samples added twice the last counts.
    #[test]
    fn samples_and_commitments_in_any_order(
        (s, perm) in scenario().prop_flat_map(|s| {
            let idx: Vec<usize> = (0..s.cfg.services.len()).collect();
            (Just(s), Just(idx).prop_shuffle())
        })
    ) {
        let expected = s.decide();
        let mut other = s.clone();
        let rows: Vec<(&ServiceName, &[TriggerSample])> = s.samples.iter().collect();
        let mut samples = Samples::default();
        if let Some((name, row)) = rows.last() {
            // A stale row first, which the one added later replaces.
            let stale = row.iter().map(|t| TriggerSample { value: Some(999.0), ..t.clone() });
            samples.push((*name).clone(), stale);
        }
        for &i in &perm {
            if let Some((name, row)) = rows.get(i) {
                samples.push((*name).clone(), row.iter().cloned());
            }
        }
        other.samples = samples;
        let commitments: Vec<(ServiceName, Commitment)> =
            s.memory.commitments().map(|(n, c)| (n.clone(), *c)).collect();
        other.memory.retain_commitments(|_| false);
        for &i in perm.iter().rev() {
            if let Some((name, c)) = commitments.get(i) {
                other.memory.set_commitment(name.clone(), *c);
            }
        }
        prop_assert_eq!(other.decide(), expected);
    }

    /// Actions: one per changed service, counts equal the target differences, all stops before
    /// all starts, stops in reverse allocation order, starts in allocation order. The memory
    /// holds the new targets, with the time of the change.
    #[test]
    fn actions_match_targets_and_are_ordered(s in scenario()) {
        let (plan, memory) = s.decide();
        let (_, exp) = model(&s);
        let pos = |n: &ServiceName| exp.iter().position(|e| e.name == n.as_str()).unwrap();
        let changed: Vec<&ServicePlan> = plan.services.iter().filter(|p| p.target != p.current).collect();
        prop_assert_eq!(plan.actions.len(), changed.len());
        let mut seen_start = false;
        let mut last_stop = usize::MAX;
        let mut last_start = None;
        for a in &plan.actions {
            let sp = plan.service(a.service.as_str()).unwrap();
            prop_assert_eq!((a.from, a.to), (sp.current, sp.target));
            prop_assert_eq!(a.count, sp.current.abs_diff(sp.target));
            prop_assert!(a.count > 0);
            prop_assert_eq!(a.bound, sp.bound);
            prop_assert!(a.reason.contains(sp.reason.as_str()));
            let i = pos(&a.service);
            match a.kind {
                ActionKind::Stop => {
                    prop_assert!(!seen_start, "stop after a start: {:?}", plan.actions);
                    prop_assert!(sp.target < sp.current);
                    prop_assert!(i < last_stop, "stops not lowest priority first: {:?}", plan.actions);
                    let head = format!("stopped {} of {}: ", a.count, a.service);
                    prop_assert!(a.reason.starts_with(&head), "{}", a.reason);
                    last_stop = i;
                }
                ActionKind::Start => {
                    seen_start = true;
                    prop_assert!(sp.target > sp.current);
                    prop_assert!(last_start < Some(i), "starts not highest priority first: {:?}", plan.actions);
                    let head = format!("started {} of {}: ", a.count, a.service);
                    prop_assert!(a.reason.starts_with(&head), "{}", a.reason);
                    last_start = Some(i);
                }
            }
        }
        for e in &exp {
            let c = *memory
                .commitment(&ServiceName::try_new(e.name.clone()).unwrap())
                .unwrap();
            prop_assert_eq!(c.target, plan.target(&e.name));
            match s.memory.commitment(&ServiceName::try_new(e.name.clone()).unwrap()) {
                Some(old) if old.target == c.target => prop_assert_eq!(c.changed_at, old.changed_at),
                _ => prop_assert_eq!(c.changed_at, s.now),
            }
        }
        prop_assert_eq!(memory.commitments().count(), s.cfg.services.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// Run ticks against a backend that does what it is asked at once: the plan reaches a fixed
    /// point, where everything is at what the demand asks and converged; there a decision has no
    /// actions and leaves the memory as it was.
    #[test]
    fn idempotent_at_target(s in scenario()) {
        let mut s = s;
        let mut settled = false;
        let converge = |s: &mut Scenario| {
            s.observed.services = s
                .memory
                .commitments()
                .map(|(n, c)| (n.clone(), ServiceObservation::counts(c.target, 0)))
                .collect();
        };
        for _ in 0..60 {
            converge(&mut s);
            let (plan, memory) = s.decide();
            s.memory = memory;
            s.now += TICK;
            if plan.actions.is_empty() && s.memory.commitments().count() == s.cfg.services.len() {
                settled = true;
                break;
            }
        }
        prop_assert!(settled, "no fixed point within 60 ticks: {:?}", s);
        converge(&mut s);
        let (plan, memory) = s.decide();
        prop_assert!(plan.actions.is_empty(), "{:?}", plan);
        prop_assert_eq!(&memory, &s.memory);
        // At the fixed point every service is where the rules want it, or capacity is used up.
        let (capacity, exp) = model(&s);
        for e in &exp {
            let t = plan.target(&e.name);
            prop_assert!(e.converged);
            prop_assert!(t == e.want || plan.allocated == capacity, "{} at {} wants {}: {:?}", e.name, t, e.want, plan);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scaling rules over runs: one triggered service with random rules, windows and rate limits,
// against a backend that does at once what it is asked, fed random values (some missing).

#[derive(Debug, Clone)]
struct RuleRun {
    cfg: Config,
    activation: f64,
    /// `(threshold, fallback replicas)` when the trigger has a fallback.
    fallback: Option<(u32, u32)>,
    /// `(replicas, period)` of the only up policy, if any.
    up_limit: Option<(u32, Duration)>,
    down_window: Duration,
    /// Per tick: the value (`None` = failed) and the time since the previous tick.
    ticks: Vec<(Option<f64>, Duration)>,
}

fn rule_run() -> impl Strategy<Value = RuleRun> {
    (
        prop_oneof![Just(""), Just("rule = \"average\"\ntarget = 2"), Just("rule = \"utilisation\"\ntarget = 3"), Just("rule = \"pd\"\ntarget = 4\nkp = 0.5\nkd = 0.2")],
        prop_oneof![Just(0.0), (0u32..=4).prop_map(|a| a as f64)],
        prop_oneof![Just(None), (0u32..=3, 0u32..=6).prop_map(Some)],
        (0u32..=2, 1u32..=12),
        prop_oneof![Just(None), (1u32..=3, 1u64..=4).prop_map(|(n, s)| Some((n, Duration::from_secs(s))))],
        prop_oneof![Just(Duration::ZERO), (1u64..=4).prop_map(Duration::from_secs)],
        prop::collection::vec(
            (
                prop_oneof![1 => Just(None), 4 => (0u32..=24).prop_map(|v| Some(v as f64 / 2.0))],
                prop_oneof![Just(500u64), 100u64..=3000].prop_map(Duration::from_millis),
            ),
            1..40,
        ),
    )
        .prop_map(|(rule, activation, fallback, (min, extra), up_limit, down_window, ticks)| {
            let mut t = format!("{rule}\nactivation = {activation}\n");
            if let Some((th, r)) = fallback {
                t.push_str(&format!("failure_threshold = {th}\nfallback = {{ replicas = {r} }}\n"));
            }
            let mut sc = String::from("[services.scaling]\n");
            if let Some((n, p)) = up_limit {
                sc.push_str(&format!(
                    "up = {{ policies = [{{ replicas = {n}, period = \"{}s\" }}] }}\n",
                    p.as_secs()
                ));
            }
            sc.push_str(&format!("down = {{ stabilisation = \"{}s\" }}\n", down_window.as_secs()));
            let text = format!(
                "[capacity]\nslots = 100\n[backend]\ntype = \"process\"\n[[services]]\nname = \"api\"\n\
                 min = {min}\nmax = {}\n{sc}[[services.triggers]]\ntype = \"manual\"\nname = \"q\"\n{t}",
                min + extra
            );
            RuleRun {
                cfg: Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}")),
                activation,
                fallback,
                up_limit,
                down_window,
                ticks,
            }
        })
}

/// One tick's outcome.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    now: Duration,
    current: u32,
    target: u32,
    bound: Bound,
    demand: Option<f64>,
    memory: EngineState,
}

fn run_rules(r: &RuleRun) -> Vec<Step> {
    let api = ServiceName::try_new("api").unwrap();
    let mut memory = EngineState::default();
    let mut now = Duration::from_secs(100);
    let mut out = Vec::new();
    for (value, dt) in &r.ticks {
        now += *dt;
        let current = memory.commitment(&api).map_or(0, |c| c.target);
        let mut observed = Observed::default();
        observed
            .services
            .insert(api.clone(), ServiceObservation::counts(current, 0));
        let mut samples = Samples::default();
        samples.set(&api, "q", *value);
        let (plan, next) = decide(&r.cfg, &observed, &samples, &memory, now);
        let sp = plan.service("api").unwrap();
        memory = next;
        out.push(Step {
            now,
            current,
            target: sp.target,
            bound: sp.bound,
            demand: sp.demand,
            memory: memory.clone(),
        });
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// Within [min, max] after the first tick (a service starts at 0, below its min, and moves
    /// straight in), and the same run gives the same steps.
    #[test]
    fn rules_within_min_max_and_deterministic(r in rule_run()) {
        let steps = run_rules(&r);
        prop_assert_eq!(&steps, &run_rules(&r));
        let svc = &r.cfg.services[0];
        for s in &steps {
            prop_assert!(s.target <= svc.max && s.target >= svc.min, "{:?}", s);
        }
    }

    /// Activation is strictly greater: from 0, with min 0, the service stays at 0 while the value
    /// is at or below the activation (and no fallback applies).
    #[test]
    fn rules_activation_strictly_greater(r in rule_run()) {
        let steps = run_rules(&r);
        let min = r.cfg.services[0].min;
        for (s, (v, _)) in steps.iter().zip(&r.ticks) {
            if let (0, 0, Some(v)) = (s.current, min, v) {
                if *v <= r.activation {
                    prop_assert_eq!(s.target, 0, "{:?} value {} activation {}", s, v, r.activation);
                }
            }
        }
    }

    /// A failing trigger keeps its last value for exactly `failure_threshold` failures, then the
    /// fallback: the failure count is remembered and the demand is the fallback from failure
    /// threshold + 1 on.
    #[test]
    fn rules_fallback_after_exactly_n_failures(r in rule_run()) {
        let Some((threshold, replicas)) = r.fallback else { return Ok(()) };
        let steps = run_rules(&r);
        let api = ServiceName::try_new("api").unwrap();
        let mut failures = 0u32;
        for (s, (v, _)) in steps.iter().zip(&r.ticks) {
            failures = if v.is_some() { 0 } else { failures + 1 };
            let m = s.memory.rules.get(&api).and_then(|m| m.triggers.get("q")).copied().unwrap_or_default();
            prop_assert_eq!(m.failures, failures);
            if failures > threshold {
                prop_assert_eq!(s.demand, Some(replicas as f64), "{:?}", s);
            }
        }
    }

    /// Without a fallback, a missing value never scales the service down.
    #[test]
    fn rules_missing_never_scales_down(r in rule_run()) {
        let mut r = r;
        if r.fallback.is_some() {
            let text = toml_without_fallback(&r.cfg);
            r.cfg = text;
            r.fallback = None;
        }
        let steps = run_rules(&r);
        for (s, (v, _)) in steps.iter().zip(&r.ticks) {
            if v.is_none() {
                let max = r.cfg.services[0].max;
                prop_assert!(s.target >= s.current.min(max), "{:?}", s);
            }
        }
    }

    /// The up rate limit holds over every period: what was added within the period ending at a
    /// tick (net of what was removed) is at most the policy's replicas, unless min forced it.
    #[test]
    fn rules_rate_limit_honoured(r in rule_run()) {
        let Some((n, period)) = r.up_limit else { return Ok(()) };
        let steps = run_rules(&r);
        let min = r.cfg.services[0].min;
        for (i, s) in steps.iter().enumerate() {
            if s.target <= s.current || s.target <= min {
                continue;
            }
            let mut net: i64 = s.target as i64 - s.current as i64;
            for e in &steps[..i] {
                if s.now - e.now < period {
                    net += e.target as i64 - e.current as i64;
                }
            }
            prop_assert!(net <= n as i64, "added {} within {:?} at {:?}: {:?}", net, period, s.now, steps);
        }
    }

    /// The down stabilisation window: going down never goes below a raw recommendation of the
    /// window (for the value rule: ceil(value), at least 1 when active).
    #[test]
    fn rules_down_window_honoured(r in rule_run()) {
        let svc = &r.cfg.services[0];
        let ServiceKind::Triggered(ts) = &svc.kind else { unreachable!() };
        if ts[0].rule != Rule::Value || r.down_window.is_zero() {
            return Ok(());
        }
        let steps = run_rules(&r);
        for (i, s) in steps.iter().enumerate() {
            if s.target >= s.current {
                continue;
            }
            for (e, (v, _)) in steps[..=i].iter().zip(&r.ticks) {
                if s.now - e.now < r.down_window && s.bound != Bound::Min {
                    if let Some(v) = v {
                        let rec = if *v > r.activation { (v.ceil() as u32).max(1) } else { 0 };
                        prop_assert!(s.target >= rec.min(svc.max), "{:?} below {} from {:?}", s, rec, e);
                    }
                }
            }
        }
    }
}

/// The same configuration without the trigger's fallback.
fn toml_without_fallback(cfg: &Config) -> Config {
    let mut cfg = cfg.clone();
    if let ServiceKind::Triggered(ts) = &mut cfg.services[0].kind {
        ts[0].failure = None;
    }
    cfg
}
