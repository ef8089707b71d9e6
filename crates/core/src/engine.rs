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
//!    up), per-host services the number of ready hosts, remainder services their `max`. The want
//!    is clamped to `[min, max]`; it is held at *current* while the previous change has not
//!    converged (observed running != committed target, or replicas pending) or when no demand
//!    sample arrived (a missing metric never scales down); and it moves by at most `max_step`.
//! 3. Every service gets a *floor*: how low it may be pushed this tick by higher priorities,
//!    `max(current - max_step, min(min, current))`. If the floors alone exceed the capacity (the
//!    cluster shrank), floors are cut from the lowest priority up until they fit.
//! 4. Allocation walks services in order (triggered and per-host by priority then name, then
//!    remainder services by priority then name). Each gets `min(want, capacity - used - floors of
//!    everyone after it)`. So a higher priority takes capacity from the lowest priority first, a
//!    remainder service fills exactly what is left, and the sum never exceeds the capacity.
//! 5. Actions: stops first, lowest priority first (free capacity before using it); then starts,
//!    highest priority first.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::Config;
use crate::model::*;
use crate::plan::*;

/// What the engine remembers between ticks, per service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineState {
    /// Per service: the committed target and when it last changed.
    pub services: BTreeMap<ServiceName, Commitment>,
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
    want: u32,
    want_bound: Bound,
    floor: u32,
    forced: bool,
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
        .map(|svc| want(svc, observed, samples, memory, hosts, now, cfg.converge_timeout))
        .collect();

    // Floors must fit; if the cluster shrank under them, the lowest priority gives way first.
    let floors: u64 = work.iter().map(|w| w.floor as u64).sum();
    let mut excess = floors.saturating_sub(capacity as u64);
    for w in work.iter_mut().rev() {
        if excess == 0 {
            break;
        }
        let cut = (w.floor as u64).min(excess) as u32;
        if cut > 0 {
            w.floor -= cut;
            w.forced = true;
            excess -= cut as u64;
        }
    }

    // Allocation in priority order, reserving the floors of everyone after.
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
    let mut next = EngineState::default();
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

    let (mut wish, mut bound, demand) = match &svc.kind {
        ServiceKind::Triggered(_) => {
            let value = samples
                .services
                .get(&svc.name)
                .into_iter()
                .flatten()
                .filter_map(|s| s.value)
                .filter(|v| v.is_finite())
                .reduce(f64::max);
            match value {
                Some(v) => (replicas_for(v), Bound::Demand, Some(v)),
                None => (current, Bound::MissingDemand, None),
            }
        }
        ServiceKind::PerHost => (hosts, Bound::Hosts, Some(hosts as f64)),
        ServiceKind::Remainder => (svc.max, Bound::Remainder, None),
    };
    if bound != Bound::MissingDemand {
        if wish < svc.min {
            wish = svc.min;
            bound = Bound::Min;
        } else if wish > svc.max {
            wish = svc.max;
            if bound != Bound::Remainder {
                bound = Bound::Max;
            }
        }
    }
    if !converged && wish != current {
        wish = current;
        bound = Bound::Converging;
    }
    if wish > current.saturating_add(step) {
        wish = current + step;
        bound = Bound::MaxStep;
    } else if wish.saturating_add(step) < current {
        wish = current - step;
        bound = Bound::MaxStep;
    }
    let floor = current.saturating_sub(step).max(svc.min.min(current));
    Work {
        svc,
        obs,
        current,
        demand,
        want: wish,
        want_bound: bound,
        floor: floor.min(wish),
        forced: false,
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
    // given up voluntarily, then on preempted slots, lowest priority first.
    let committed: u64 = work.iter().map(|w| w.current as u64).sum();
    let mut free = (capacity as u64).saturating_sub(committed);
    let mut voluntary: u64 = work
        .iter()
        .map(|w| w.current.saturating_sub(w.want.max(w.target)) as u64)
        .sum();
    let mut victims: Vec<(usize, u32)> = work
        .iter()
        .enumerate()
        .rev()
        .filter_map(|(i, w)| {
            let lost = w.current.min(w.want).saturating_sub(w.target);
            (lost > 0 && !w.forced).then_some((i, lost))
        })
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
        for (v, left) in victims.iter_mut() {
            if need == 0 {
                break;
            }
            let n = (*left as u64).min(need) as u32;
            if n > 0 {
                *left -= n;
                need -= n as u64;
                took[i].push((*v, n));
                gave[*v].push((i, n));
            }
        }
    }

    let mut services = Vec::with_capacity(work.len());
    for (i, w) in work.iter().enumerate() {
        let bound = final_bound(w);
        let reason = service_reason(w, bound, capacity, &gave[i], work);
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

fn final_bound(w: &Work) -> Bound {
    if w.target == w.want {
        return w.want_bound;
    }
    // The target is below the want: capacity had the last word.
    if w.target < w.current.min(w.want) {
        if w.forced {
            Bound::OverCapacity
        } else {
            Bound::Preempted
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

fn service_reason(
    w: &Work,
    bound: Bound,
    capacity: u32,
    gave: &[(usize, u32)],
    work: &[Work],
) -> String {
    let d = fmt_demand(w.demand);
    let cmp = |a: u32, b: u32| match a.cmp(&b) {
        std::cmp::Ordering::Greater => ">",
        std::cmp::Ordering::Less => "<",
        std::cmp::Ordering::Equal => "=",
    };
    match bound {
        Bound::Demand => {
            let want = replicas_for(w.demand.unwrap_or(0.0));
            format!("demand {d} {} {}", cmp(want, w.current), w.current)
        }
        Bound::Hosts => format!("one per ready host: {} hosts", w.target),
        Bound::Min => format!("demand {d} is below min {}", w.svc.min),
        Bound::Max => format!("demand {d} is above max {}", w.svc.max),
        Bound::MaxStep => format!(
            "wants {}, change limited to max_step {}",
            match &w.svc.kind {
                ServiceKind::Remainder => "free capacity".to_string(),
                _ => format!("demand {d}"),
            },
            w.svc.max_step.unwrap_or(u32::MAX)
        ),
        Bound::Capacity => format!(
            "demand {d} but only {} fit in capacity {capacity} (higher priorities first)",
            w.target
        ),
        Bound::Remainder => format!("fills free capacity: {} of {capacity} slots", w.target),
        Bound::Preempted => {
            let mut s = String::from("preempted by");
            for (k, (g, n)) in gave.iter().enumerate() {
                let winner = work[*g].svc;
                s.push_str(&format!(
                    "{} {} (priority {}) needing {n} slot{}",
                    if k == 0 { "" } else { "," },
                    winner.name,
                    winner.priority,
                    plural(*n)
                ));
            }
            if gave.is_empty() {
                s.push_str(" higher priorities");
            }
            s
        }
        Bound::Converging => format!(
            "waiting for the previous change to converge: {} running, {} pending of {}",
            w.obs.running, w.obs.pending, w.current
        ),
        Bound::MissingDemand => format!("no demand sample; holding at {}", w.current),
        Bound::OverCapacity => format!(
            "capacity {capacity} is below what is placed; lowest priority shrinks first"
        ),
    }
}
