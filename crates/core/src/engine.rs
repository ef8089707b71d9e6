//! The decision engine: one pure step from what is observed and sampled to a plan.
//!
//! ```text
//! decide(config, observed, samples, memory, now) -> (plan, memory')
//! ```
//!
//! Same inputs, same plan: no clock is read (time is `now`, a duration since the daemon
//! started), no I/O is done, and ties between equal priorities are broken by name.
//!
//! # How a tick is decided
//! 1. Every service gets a *current* target: what was committed last tick, or, on the first
//!    tick, what the backend reports (running + pending), so adopted replicas are kept.
//! 2. Every service gets a *want*: triggered services their demand (max over triggers, rounded
//!    up), per-host services the number of ready hosts, remainder services their `max`. Samples
//!    are matched to triggers by name; when one is missing (a missing metric never scales down)
//!    the want is the current target, unless the triggers that did answer ask for more. The want
//!    is clamped to `[min, max]`; it is held at *current* while the previous change has not
//!    converged (observed running != committed target, or replicas pending) and
//!    `converge_timeout` has not passed since it; and it moves by at most `max_step`. `min` and
//!    `max` win over `max_step`: a service outside them moves straight in.
//! 3. Every service gets a *floor*: how low growth of a higher priority may push it this tick,
//!    `max(min, current - max_step)` (never above the want), and a *keep*: what it keeps of what
//!    it has, `min(current, want)` (never below the floor).
//! 4. Mins are reserved first, then keeps, both in allocation order (triggered and per-host by
//!    priority then name, then remainder services by priority then name). When they do not fit
//!    (the cluster shrank under what is placed) the lowest priority gives way first, even beyond
//!    its `max_step`, and its floor is cut to what it keeps.
//! 5. Allocation walks services in allocation order. Each gets `min(want, capacity - used -
//!    floors of everyone after it)`, but at least its floor. So a higher priority takes capacity
//!    from the lowest priority first, a remainder service fills exactly what is left, and the
//!    sum never exceeds the capacity.
//! 6. Actions: stops first, lowest priority first (free capacity before using it); then starts,
//!    highest priority first.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::config::Config;
use crate::model::*;
use crate::plan::*;

/// What the engine remembers between ticks, per service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineState {
    /// Per service: the committed target and when it last changed.
    pub services: BTreeMap<ServiceName, Commitment>,
    /// Services an operator paused: held at their current target, neither scaled by demand nor
    /// preempted by higher priorities (only a cluster that shrinks under them can move them).
    /// Set by the control loop between ticks; `decide` carries it over unchanged.
    pub paused: BTreeSet<ServiceName>,
}

/// A committed target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commitment {
    /// The target asked of the backend.
    pub target: u32,
    /// When it was set (time since the daemon started).
    pub changed_at: Duration,
}

struct Work<'a> {
    svc: &'a Service,
    obs: ServiceObservation,
    current: u32,
    demand: Option<f64>,
    /// Triggers without a usable sample this tick.
    missing: Vec<&'a str>,
    want: u32,
    want_bound: Bound,
    /// Reserved before anyone keeps or grows: `min(min, want)`.
    min: u32,
    /// How low growth of a higher priority may push it: `max(min, min(want, current - max_step))`.
    floor: u32,
    /// What it keeps of what it has, before growth: `max(floor, min(want, current))`.
    keep: u32,
    target: u32,
}

/// Decides one tick. See the module documentation for the rules.
pub fn decide(
    cfg: &Config,
    observed: &Observed,
    samples: &Samples,
    memory: &EngineState,
    now: Duration,
) -> (Plan, EngineState) {
    let capacity = cfg.capacity.slots(&observed.hosts);
    let hosts = observed.ready_hosts();

    let mut order: Vec<&Service> = cfg.services.iter().collect();
    order.sort_by(|a, b| {
        (a.is_remainder(), a.priority, &a.name).cmp(&(b.is_remainder(), b.priority, &b.name))
    });

    let mut work: Vec<Work> = order
        .into_iter()
        .map(|svc| {
            want(
                svc,
                observed,
                samples,
                memory,
                hosts,
                now,
                cfg.converge_timeout,
            )
        })
        .collect();

    // Mins first, then what everyone keeps, both in allocation order: when they do not fit (the
    // cluster shrank under what is placed), the lowest priority gives way first, even beyond
    // its max_step. The floors that protect from growth are cut to what is kept.
    let mut left = capacity as u64;
    let mins: Vec<u64> = work
        .iter()
        .map(|w| {
            let m = (w.min as u64).min(left);
            left -= m;
            m
        })
        .collect();
    for (w, m) in work.iter_mut().zip(mins) {
        let extra = ((w.keep - w.min) as u64).min(left);
        left -= extra;
        w.keep = (m + extra) as u32;
        w.floor = w.floor.min(w.keep);
    }

    // Growth in allocation order, reserving the floors of everyone after: a higher priority
    // takes from the lowest priority first, but never below its floor; a remainder service
    // gets exactly what is left.
    let mut suffix: Vec<u64> = vec![0; work.len() + 1];
    for i in (0..work.len()).rev() {
        suffix[i] = suffix[i + 1] + work[i].floor as u64;
    }
    let mut used: u64 = 0;
    for (i, w) in work.iter_mut().enumerate() {
        let avail = (capacity as u64).saturating_sub(used + suffix[i + 1]);
        let t = (w.want as u64).min(avail).max(w.floor as u64) as u32;
        w.target = t;
        used += t as u64;
    }

    let plan = build_plan(&work, capacity, used);
    let mut next = EngineState {
        paused: memory.paused.clone(),
        ..EngineState::default()
    };
    for w in &work {
        let keep = memory
            .services
            .get(&w.svc.name)
            .filter(|m| m.target == w.target)
            .copied();
        next.services.insert(
            w.svc.name.clone(),
            keep.unwrap_or(Commitment {
                target: w.target,
                changed_at: now,
            }),
        );
    }
    (plan, next)
}

fn want<'a>(
    svc: &'a Service,
    observed: &Observed,
    samples: &Samples,
    memory: &EngineState,
    hosts: u32,
    now: Duration,
    converge_timeout: Duration,
) -> Work<'a> {
    let obs = observed.service(&svc.name);
    let committed = memory.services.get(&svc.name);
    let current = committed.map_or(obs.total(), |m| m.target);
    let converged = committed.is_none_or(|m| {
        (obs.running == m.target && obs.pending == 0)
            || now.saturating_sub(m.changed_at) >= converge_timeout
    });
    let step = svc.max_step.unwrap_or(u32::MAX);

    let mut missing = Vec::new();
    let (mut wish, mut bound, demand) = match &svc.kind {
        ServiceKind::Triggered(triggers) => {
            // Samples are matched to triggers by name; a trigger without a finite value is
            // missing. With one missing, the others may still scale up (whatever the missing
            // one says, they need that much) but never down.
            let got = samples.services.get(&svc.name);
            let mut value: Option<f64> = None;
            for t in triggers {
                let v = got
                    .and_then(|ss| ss.iter().find(|s| s.trigger == t.name))
                    .and_then(|s| s.value)
                    .filter(|v| v.is_finite());
                match v {
                    Some(v) => value = Some(value.map_or(v, |m| m.max(v))),
                    None => missing.push(t.name.as_str()),
                }
            }
            match value {
                Some(v) if missing.is_empty() || replicas_for(v) > current => {
                    (replicas_for(v), Bound::Demand, Some(v))
                }
                _ => (current, Bound::MissingDemand, value),
            }
        }
        ServiceKind::PerHost => (hosts, Bound::Hosts, Some(hosts as f64)),
        ServiceKind::Remainder => (svc.max, Bound::Remainder, None),
    };
    if wish < svc.min {
        wish = svc.min;
        bound = Bound::Min;
    } else if wish > svc.max {
        wish = svc.max;
        if bound != Bound::Remainder {
            bound = Bound::Max;
        }
    }
    // No new voluntary change while the previous one is under way (max still applies).
    let hold = current.min(svc.max);
    if !converged && wish != hold {
        wish = hold;
        bound = if hold < current {
            Bound::Max
        } else {
            Bound::Converging
        };
    }
    // max_step limits moves within [min, max]; a service outside them moves straight in.
    if wish > current.saturating_add(step) {
        let stepped = current + step;
        if svc.min > stepped {
            wish = svc.min;
            bound = Bound::Min;
        } else {
            wish = stepped;
            bound = Bound::MaxStep;
        }
    } else if wish.saturating_add(step) < current {
        let stepped = current - step;
        if svc.max < stepped {
            wish = svc.max;
            bound = Bound::Max;
        } else {
            wish = stepped;
            bound = Bound::MaxStep;
        }
    }
    if memory.paused.contains(&svc.name) {
        wish = current;
        bound = Bound::Paused;
    }
    let min = svc.min.min(wish);
    let mut floor = min.max(wish.min(current.saturating_sub(step)));
    if bound == Bound::Paused {
        floor = current;
    }
    let keep = floor.max(wish.min(current));
    Work {
        svc,
        obs,
        current,
        demand,
        missing,
        want: wish,
        want_bound: bound,
        min,
        floor,
        keep,
        target: 0,
    }
}

/// Replicas for a demand value: rounded up, negative as zero, saturating at `u32::MAX`.
fn replicas_for(v: f64) -> u32 {
    if v <= 0.0 {
        0
    } else if v >= u32::MAX as f64 {
        u32::MAX
    } else {
        v.ceil() as u32
    }
}

fn build_plan(work: &[Work], capacity: u32, allocated: u64) -> Plan {
    // Who gave slots to whom, for the reasons: growers draw first on free slots, then on slots
    // given up voluntarily, then on slots taken from others, lowest priority first. What a
    // service lost that no grower took was lost because the capacity shrank.
    let committed: u64 = work.iter().map(|w| w.current as u64).sum();
    let mut free = (capacity as u64).saturating_sub(committed);
    let mut voluntary: u64 = work
        .iter()
        .map(|w| w.current.saturating_sub(w.want.max(w.target)) as u64)
        .sum();
    let mut lost: Vec<u32> = work
        .iter()
        .map(|w| w.current.min(w.want).saturating_sub(w.target))
        .collect();
    let mut took: Vec<Vec<(usize, u32)>> = vec![Vec::new(); work.len()];
    let mut gave: Vec<Vec<(usize, u32)>> = vec![Vec::new(); work.len()];
    for (i, w) in work.iter().enumerate() {
        let mut need = w.target.saturating_sub(w.current) as u64;
        let from_free = need.min(free);
        free -= from_free;
        need -= from_free;
        let from_vol = need.min(voluntary);
        voluntary -= from_vol;
        need -= from_vol;
        for v in (0..work.len()).rev() {
            if need == 0 {
                break;
            }
            let n = (lost[v] as u64).min(need) as u32;
            if n > 0 {
                lost[v] -= n;
                need -= n as u64;
                took[i].push((v, n));
                gave[v].push((i, n));
            }
        }
    }

    let left = (capacity as u64).saturating_sub(allocated);
    let mut services = Vec::with_capacity(work.len());
    for (i, w) in work.iter().enumerate() {
        let bound = final_bound(w, !gave[i].is_empty(), left);
        let ctx = Ctx {
            capacity,
            committed,
            gave: &gave[i],
            shed: lost[i],
            index: i,
            work,
        };
        let reason = service_reason(w, bound, &ctx);
        services.push(ServicePlan {
            service: w.svc.name.clone(),
            priority: w.svc.priority,
            remainder: w.svc.is_remainder(),
            demand: w.demand,
            current: w.current,
            running: w.obs.running,
            pending: w.obs.pending,
            target: w.target,
            bound,
            reason,
        });
    }

    let mut actions = Vec::new();
    for (i, w) in work.iter().enumerate().rev() {
        if w.target < w.current {
            let sp = &services[i];
            actions.push(Action {
                kind: ActionKind::Stop,
                service: w.svc.name.clone(),
                count: w.current - w.target,
                from: w.current,
                to: w.target,
                bound: sp.bound,
                reason: format!(
                    "stopped {} of {}: {}",
                    w.current - w.target,
                    w.svc.name,
                    sp.reason
                ),
            });
        }
    }
    for (i, w) in work.iter().enumerate() {
        if w.target > w.current {
            let sp = &services[i];
            let mut reason = format!(
                "started {} of {}: {}",
                w.target - w.current,
                w.svc.name,
                sp.reason
            );
            for (v, n) in &took[i] {
                let victim = work[*v].svc;
                reason.push_str(&format!(
                    "; took {n} slot{} from {} (priority {})",
                    plural(*n),
                    victim.name,
                    victim.priority
                ));
            }
            actions.push(Action {
                kind: ActionKind::Start,
                service: w.svc.name.clone(),
                count: w.target - w.current,
                from: w.current,
                to: w.target,
                bound: sp.bound,
                reason,
            });
        }
    }

    Plan {
        capacity,
        allocated: allocated.min(u32::MAX as u64) as u32,
        services,
        actions,
    }
}

/// The rule with the last word on `w`'s target. `taken`: a grower took slots from it; `left`:
/// slots nobody was given.
fn final_bound(w: &Work, taken: bool, left: u64) -> Bound {
    if w.target == w.want {
        // A remainder service at its max while slots stay free was bound by its max.
        if w.want_bound == Bound::Remainder && w.want == w.svc.max && left > 0 {
            return Bound::Max;
        }
        return w.want_bound;
    }
    // The target is below the want: capacity had the last word.
    if w.target < w.current.min(w.want) {
        if taken {
            Bound::Preempted
        } else {
            Bound::OverCapacity
        }
    } else if w.svc.is_remainder() {
        Bound::Remainder
    } else {
        Bound::Capacity
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn fmt_demand(d: Option<f64>) -> String {
    match d {
        Some(v) => format!("{}", (v * 1000.0).round() / 1000.0),
        None => "none".into(),
    }
}

/// What a reason needs to know beyond the service itself.
struct Ctx<'a> {
    capacity: u32,
    committed: u64,
    /// To whom the service gave slots.
    gave: &'a [(usize, u32)],
    /// Slots it lost that no grower took (the capacity shrank).
    shed: u32,
    index: usize,
    work: &'a [Work<'a>],
}

fn service_reason(w: &Work, bound: Bound, ctx: &Ctx) -> String {
    let d = fmt_demand(w.demand);
    let capacity = ctx.capacity;
    let cmp = |a: u32, b: u32| match a.cmp(&b) {
        std::cmp::Ordering::Greater => ">",
        std::cmp::Ordering::Less => "<",
        std::cmp::Ordering::Equal => "=",
    };
    // What the service asked for, in words.
    let asks = match &w.svc.kind {
        ServiceKind::Triggered(_) if w.demand.is_none() => "no demand sample".to_string(),
        ServiceKind::Triggered(_) => format!("demand {d}"),
        ServiceKind::PerHost => format!("{d} ready hosts"),
        ServiceKind::Remainder => "free capacity".to_string(),
    };
    // The replicas it asked for, before limits.
    let asked = match &w.svc.kind {
        ServiceKind::Triggered(_) | ServiceKind::PerHost => w.demand.map(replicas_for),
        ServiceKind::Remainder => None,
    };
    let over_capacity = || {
        format!(
            "capacity {capacity} is below the {} slots placed; lowest priority shrinks first",
            ctx.committed
        )
    };
    match bound {
        Bound::Demand => {
            let want = replicas_for(w.demand.unwrap_or(0.0));
            format!("demand {d} {} {}", cmp(want, w.current), w.current)
        }
        Bound::Hosts => format!("one per ready host: {} hosts", w.target),
        Bound::Min => {
            let step = w.svc.max_step.unwrap_or(u32::MAX);
            if asked.is_some_and(|a| a < w.svc.min) {
                format!("{asks} is below min {}", w.svc.min)
            } else if w.want > w.current && w.want - w.current > step {
                format!(
                    "{asks}; raised to min {} (max_step {step} applies only within min and max)",
                    w.svc.min
                )
            } else {
                format!("{asks}; raised to min {}", w.svc.min)
            }
        }
        Bound::Max => match &w.svc.kind {
            ServiceKind::Remainder => format!(
                "fills free capacity up to max {}: {} of {capacity} slots",
                w.svc.max, w.target
            ),
            _ if asked.is_some_and(|a| a > w.svc.max) => {
                format!("{asks} is above max {}", w.svc.max)
            }
            _ => format!("{asks}; lowered to max {}", w.svc.max),
        },
        Bound::MaxStep => format!(
            "wants {asks}, change limited to max_step {}",
            w.svc.max_step.unwrap_or(u32::MAX)
        ),
        Bound::Capacity => format!(
            "{asks} but only {} fit in capacity {capacity} (higher priorities first)",
            w.target
        ),
        Bound::Remainder => format!("fills free capacity: {} of {capacity} slots", w.target),
        Bound::Preempted => {
            let mut s = String::from("preempted by");
            for (k, (g, n)) in ctx.gave.iter().enumerate() {
                let winner = ctx.work[*g].svc;
                s.push_str(&format!(
                    "{} {} (priority {}) needing {n} slot{}",
                    if k == 0 { "" } else { "," },
                    winner.name,
                    winner.priority,
                    plural(*n)
                ));
                // Only a min lets a later service in the order take from an earlier one.
                if *g > ctx.index {
                    s.push_str(&format!(" to reach its min {}", winner.min));
                }
            }
            if ctx.shed > 0 {
                s.push_str(&format!("; {} more because {}", ctx.shed, over_capacity()));
            }
            s
        }
        Bound::Converging => format!(
            "waiting for the previous change to converge: {} running, {} pending of {}",
            w.obs.running, w.obs.pending, w.current
        ),
        Bound::MissingDemand if w.missing.len() == trigger_count(w.svc) => {
            format!("no demand sample; holding at {}", w.current)
        }
        Bound::MissingDemand => format!(
            "no demand sample from {}; holding at {} ({asks} alone never scales down)",
            w.missing.join(", "),
            w.current
        ),
        Bound::OverCapacity => over_capacity(),
        Bound::Paused => format!("paused by the operator; holding at {}", w.current),
    }
}

fn trigger_count(svc: &Service) -> usize {
    match &svc.kind {
        ServiceKind::Triggered(t) => t.len(),
        _ => 0,
    }
}
