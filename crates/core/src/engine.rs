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
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::model::*;
use crate::placement::Growth;
use crate::plan::*;
use crate::plugin::Plugins;
use crate::rules::{self, replicas_for, Recommendation};

/// What the engine remembers between ticks, per service.
#[derive(Debug, Clone, Default)]
pub struct EngineState {
    /// Per service: the committed target and when it last changed, in the order of the
    /// configuration `decide` was last given (so the next tick, on the same configuration,
    /// matches them to services by position instead of by name). Read them with
    /// [`commitment`](Self::commitment) and [`commitments`](Self::commitments).
    commitments: Vec<(ServiceName, Commitment)>,
    /// Services an operator paused: held at their current target, neither scaled by demand nor
    /// preempted by higher priorities (only a cluster that shrinks under them can move them).
    /// Set by the control loop between ticks; `decide` carries it over unchanged.
    pub paused: BTreeSet<ServiceName>,
    /// Per service, what the scaling rules remember (only for services whose rules need it:
    /// windows, rate limits, fallbacks, the PD controller).
    pub rules: BTreeMap<ServiceName, RuleMemory>,
    /// Per service, the replicas the backend observed paused (its warm pool, and replicas
    /// preempted with `preempt = "pause"`). They are neither running nor pending, so they never
    /// count for demand or convergence; they take capacity slots only for services whose pool
    /// sets `paused_takes_slot`. Set by the control loop from the observation before each tick
    /// (like `paused`); `decide` carries it over unchanged. It lives here rather than in
    /// [`Observed`] only because `Observed` is built with struct literals outside this crate.
    pub paused_replicas: BTreeMap<ServiceName, u32>,
    /// The services' order by name at the last tick, which the next tick checks and reuses
    /// instead of sorting again.
    name_order: NameOrder,
}

impl EngineState {
    /// The committed target of `service`, if it has one.
    pub fn commitment(&self, service: &ServiceName) -> Option<&Commitment> {
        self.commitments
            .iter()
            .find(|(n, _)| n == service)
            .map(|(_, c)| c)
    }

    /// Every service's committed target (in the order of the configuration last decided).
    pub fn commitments(&self) -> impl Iterator<Item = (&ServiceName, &Commitment)> {
        self.commitments.iter().map(|(n, c)| (n, c))
    }

    /// Sets the committed target of `service` (for tests and tools; `decide` writes them).
    pub fn set_commitment(&mut self, service: ServiceName, commitment: Commitment) {
        match self.commitments.iter_mut().find(|(n, _)| *n == service) {
            Some((_, c)) => *c = commitment,
            None => self.commitments.push((service, commitment)),
        }
    }

    /// Forgets the commitments of the services `keep` says no to (services a reload removed).
    pub fn retain_commitments(&mut self, mut keep: impl FnMut(&ServiceName) -> bool) {
        self.commitments.retain(|(n, _)| keep(n));
    }
}

/// Equal when they remember the same, whatever the order of the configuration they came from.
impl PartialEq for EngineState {
    fn eq(&self, other: &Self) -> bool {
        fn by_name(m: &EngineState) -> BTreeMap<&ServiceName, &Commitment> {
            m.commitments().collect()
        }
        by_name(self) == by_name(other)
            && self.paused == other.paused
            && self.rules == other.rules
            && self.paused_replicas == other.paused_replicas
    }
}

impl Eq for EngineState {}

/// The configured services' indices in the order of their names, as the last tick found it.
/// Only a hint: it takes no part in comparisons of memories, and a tick uses it only after
/// checking that it still sorts the configuration it is given.
#[derive(Clone, Default)]
struct NameOrder(Option<Arc<[u32]>>);

impl PartialEq for NameOrder {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for NameOrder {}

impl std::fmt::Debug for NameOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameOrder")
    }
}

/// The services (their keys, by index) sorted by name, with their indices: the last tick's
/// order when it still holds (every index once, names strictly increasing: the only sorted
/// order, since names are unique), else a sort.
fn name_order<'a>(keys: &[Key<'a>], hint: &NameOrder) -> Vec<(Key<'a>, usize)> {
    if let Some(order) = hint.0.as_deref().filter(|o| o.len() == keys.len()) {
        let mut seen = vec![false; keys.len()];
        let mut by_name = Vec::with_capacity(keys.len());
        let mut ok = true;
        for &i in order {
            let i = i as usize;
            let Some(k) = keys.get(i).filter(|_| !seen[i]) else {
                ok = false;
                break;
            };
            seen[i] = true;
            if by_name
                .last()
                .is_some_and(|(last, _): &(Key, usize)| last.cmp(k).is_ge())
            {
                ok = false;
                break;
            }
            by_name.push((*k, i));
        }
        if ok {
            return by_name;
        }
    }
    let mut by_name: Vec<(Key, usize)> = keys.iter().copied().zip(0..).collect();
    by_name.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    by_name
}

/// What the scaling rules of one service remember between ticks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleMemory {
    /// Per trigger with a fallback or a PD rule.
    pub triggers: BTreeMap<String, TriggerMemory>,
    /// Raw recommendations within the longest stabilisation window, oldest first.
    pub recommendations: Vec<(Duration, u32)>,
    /// Changes of the committed target within the longest rate-limit period, oldest first.
    pub events: Vec<(Duration, i64)>,
}

/// What one trigger's rules remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TriggerMemory {
    /// Consecutive failed samples.
    pub failures: u32,
    /// The last good value (as `f64` bits, so the memory stays `Eq`).
    last: Option<u64>,
    /// The PD controller's last sample time and error (bits).
    pd: Option<(Duration, u64)>,
}

impl TriggerMemory {
    /// The last good value.
    pub fn last_value(&self) -> Option<f64> {
        self.last.map(f64::from_bits)
    }
}

/// A committed target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commitment {
    /// The target asked of the backend.
    pub target: u32,
    /// When it was set (time since the daemon started).
    pub changed_at: Duration,
}

/// What this tick's inputs hold for one service, resolved once per tick by walking the sorted
/// maps side by side with the sorted service names (no per-service lookup by name).
#[derive(Clone, Copy)]
struct Inputs<'a> {
    obs: ServiceObservation,
    committed: Option<&'a Commitment>,
    prev: Option<&'a RuleMemory>,
    samples: Option<&'a [TriggerSample]>,
    scaling: &'a Scaling,
    paused: bool,
    paused_replicas: u32,
}

/// A name with its first 32 bytes as two numbers kept beside the index, so sorting and merging
/// compare numbers and read the name itself only when both are equal and one of the names is
/// longer than 32 bytes.
#[derive(Clone, Copy)]
struct Key<'a> {
    head: u128,
    second: u128,
    /// The name fits in the two numbers (at most 32 bytes).
    short: bool,
    name: &'a ServiceName,
}

impl<'a> Key<'a> {
    fn new(name: &'a ServiceName) -> Self {
        let [head, second, _, _] = name.words();
        Key {
            head,
            second,
            short: name.len() <= 32,
            name,
        }
    }

    /// A copy of the name (inline: no allocation), from the two numbers when they hold all of
    /// it, without reading the name (by then usually out of cache).
    fn to_name(self) -> ServiceName {
        if self.short {
            ServiceName::from_short([self.head, self.second])
        } else {
            self.name.clone()
        }
    }

    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        self.head
            .cmp(&other.head)
            .then(self.second.cmp(&other.second))
            .then_with(|| {
                if self.short && other.short {
                    // Equal first 32 bytes and both names within them: names hold no NUL, so
                    // both end at the same zero byte (or both fill all 32): the same name.
                    std::cmp::Ordering::Equal
                } else {
                    self.name.cmp(other.name)
                }
            })
    }
}

/// Calls `f(position, value)` for every service name of `names` (sorted by name, with the
/// service's index) that `entries` (sorted by key, as a `BTreeMap` iterates) holds, with the
/// name's position in `names`: a merge walk, or a binary search per entry when there are few
/// entries.
fn resolve<'m, V: Copy>(
    names: &[(Key, usize)],
    len: usize,
    entries: impl Iterator<Item = (&'m ServiceName, V)>,
    mut f: impl FnMut(usize, V),
) {
    if len == 0 {
        return;
    }
    if len.saturating_mul(16) < names.len() {
        for (k, v) in entries {
            let k = Key::new(k);
            let from = names.partition_point(|(n, _)| n.cmp(&k).is_lt());
            let equal = names[from..].iter().take_while(|(n, _)| n.cmp(&k).is_eq());
            for p in from..from + equal.count() {
                f(p, v);
            }
        }
        return;
    }
    let mut it = entries.map(|(k, v)| (Key::new(k), v)).peekable();
    for (p, (name, _)) in names.iter().enumerate() {
        while let Some((k, v)) = it.peek() {
            match k.cmp(name) {
                std::cmp::Ordering::Less => {
                    it.next();
                }
                std::cmp::Ordering::Equal => {
                    f(p, *v);
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        if it.peek().is_none() {
            break;
        }
    }
}

/// The entries of `rows` with the services' positions in the name order (`position`, by
/// configuration index), matched by position against the services' `keys` (in configuration
/// order): when the names of `rows` follow the
/// configuration's order (services without an entry left out), as the control loop adds
/// samples and as `decide` leaves its commitments, no name is looked up. `None` when they do
/// not.
fn by_position<'r, V>(
    keys: &[Key],
    position: &[u32],
    len: usize,
    rows: impl Iterator<Item = (&'r ServiceName, V)>,
) -> Option<Vec<(usize, V)>> {
    let mut rows = rows.peekable();
    let mut found = Vec::with_capacity(len);
    // Compared by key (the configuration's names are not read again: `keys` holds their first
    // 32 bytes, all of a short name).
    for (key, &p) in keys.iter().zip(position) {
        match rows.peek() {
            Some((name, _)) if Key::new(name).cmp(key).is_eq() => {
                let (_, v) = rows.next()?;
                found.push((p as usize, v));
            }
            Some(_) => {}
            None => break,
        }
    }
    rows.next().is_none().then_some(found)
}

/// Calls `f(position in the name order, value)` for every entry of `rows()` (which lists each
/// service with its value, in any order): [`by_position`] when they follow the configuration's
/// order, else by name, where of a service listed twice the last counts.
fn match_rows<'r, V: Copy, I: Iterator<Item = (&'r ServiceName, V)>>(
    keys: &[Key],
    position: &[u32],
    by_name: &[(Key, usize)],
    len: usize,
    rows: impl Fn() -> I,
    mut f: impl FnMut(usize, V),
) {
    if let Some(found) = by_position(keys, position, len, rows()) {
        found.into_iter().for_each(|(p, v)| f(p, v));
        return;
    }
    let mut sorted: Vec<(&ServiceName, V)> = rows().collect();
    // A stable sort keeps equal names in the order they were listed.
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    sorted.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            *earlier = *later;
        }
        same
    });
    resolve(by_name, sorted.len(), sorted.into_iter(), f);
}

/// How many services ahead `decide` asks for a service's data.
const AHEAD: usize = 8;

/// Asks the CPU to bring the cache line of `p` closer (a hint: on x86_64 a prefetch, which
/// never faults; elsewhere nothing).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache; it reads nothing and never faults.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The entries of a map as `iter` yields them, with the cache lines of the entry `AHEAD`
/// places on asked for before it is reached: a `BTreeMap`'s entries lie in nodes of their own,
/// which the CPU cannot guess.
fn prefetching<'m, V>(
    iter: std::collections::btree_map::Iter<'m, ServiceName, V>,
) -> impl Iterator<Item = (&'m ServiceName, &'m V)> {
    let mut scout = iter.clone();
    for _ in 0..AHEAD {
        scout.next();
    }
    iter.inspect(move |_| {
        if let Some((k, v)) = scout.next() {
            prefetch(k);
            prefetch(v);
        }
    })
}

/// Prefetches what [`want`] reads of a service beyond its configuration: its first triggers,
/// its samples, its commitment and its rules' memory.
#[inline(always)]
fn prefetch_inputs<P: Plugins>(svc: &Service<P>, inputs: &Inputs) {
    if let ServiceKind::Triggered(triggers) = &svc.kind {
        for t in triggers.iter().take(2) {
            prefetch(&t.name);
            prefetch(&t.rule);
            prefetch(&t.failure);
        }
    }
    if let Some(c) = inputs.committed {
        prefetch(c);
    }
    if let Some(s) = inputs.samples.and_then(|s| s.first()) {
        prefetch(s);
    }
    if let Some(r) = inputs.prev {
        prefetch(r);
    }
}

/// The scaling of services that set none.
static DEFAULT_SCALING: Scaling = Scaling::DEFAULT;

/// Buffers reused from service to service within one tick.
struct Scratch<'a, S> {
    parts: Vec<Part<'a, S>>,
    values: Vec<f64>,
    /// Triggers at or below their activation, with their values.
    inactive: Vec<(&'a Trigger<S>, f64)>,
}

impl<S> Default for Scratch<'_, S> {
    fn default() -> Self {
        Scratch {
            parts: Vec::new(),
            values: Vec::new(),
            inactive: Vec::new(),
        }
    }
}

struct Work<'a, P: Plugins> {
    svc: &'a Service<P>,
    /// What the plan and the placement read of the service, copied here so they do not visit
    /// its configuration again (by then out of cache): its priority, how it grows, what one
    /// replica asks for.
    priority: Priority,
    growth: Growth,
    need: Resources,
    /// The service's index in the configuration.
    index: usize,
    /// The service's scaling behaviour.
    scaling: &'a Scaling,
    /// Replicas observed paused.
    paused_replicas: u32,
    obs: ServiceObservation,
    current: u32,
    demand: Option<f64>,
    /// Triggers without a usable sample this tick.
    missing: Vec<&'a str>,
    /// Replicas the triggers (or the hosts) asked for, before limits.
    asked: Option<u32>,
    /// What the triggers asked, in words ("demand 4", "queue 120 for target 10 per replica
    /// asks 12").
    asks: Asks,
    /// The words of the rule that bound the want, for the rules' own bounds.
    detail: String,
    /// What the rules remember after this tick: only when there is something, or rate limits
    /// that will record this tick's change (boxed: most services have none, and `Work` is
    /// written and read once per service per tick).
    rules: Option<Box<RuleMemory>>,
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
pub fn decide<P: Plugins>(
    cfg: &Config<P>,
    observed: &Observed,
    samples: &Samples,
    memory: &EngineState,
    now: Duration,
) -> (Plan, EngineState) {
    // One index per tick: the services sorted by name once (or the last tick's order, checked),
    // and every name-keyed input resolved by one walk over its (sorted) map into `inputs`, kept
    // in the same name order (so every walk writes front to back).
    let n = cfg.services.len();
    let keys: Vec<Key> = cfg.services.iter().map(|s| Key::new(&s.name)).collect();
    let by_name = name_order(&keys, &memory.name_order);
    let mut inputs: Vec<Inputs> = vec![
        Inputs {
            obs: ServiceObservation::default(),
            committed: None,
            prev: None,
            samples: None,
            scaling: &DEFAULT_SCALING,
            paused: false,
            paused_replicas: 0,
        };
        n
    ];
    // Each service's position in the name order, by configuration index.
    let mut position = vec![0u32; n];
    for (p, &(_, i)) in by_name.iter().enumerate() {
        position[i] = p as u32;
    }
    let o = &observed.services;
    resolve(&by_name, o.len(), prefetching(o.iter()), |p, v| {
        inputs[p].obs = *v
    });
    match_rows(
        &keys,
        &position,
        &by_name,
        memory.commitments.len(),
        || memory.commitments(),
        |p, v| inputs[p].committed = Some(v),
    );
    let r = &memory.rules;
    resolve(&by_name, r.len(), prefetching(r.iter()), |p, v| {
        inputs[p].prev = Some(v)
    });
    match_rows(
        &keys,
        &position,
        &by_name,
        samples.len(),
        || samples.iter(),
        |p, v| inputs[p].samples = Some(v),
    );
    let sc = &cfg.scaling;
    resolve(&by_name, sc.len(), prefetching(sc.iter()), |p, v| {
        inputs[p].scaling = v
    });
    let pa = &memory.paused;
    resolve(&by_name, pa.len(), pa.iter().map(|k| (k, ())), |p, _| {
        inputs[p].paused = true
    });
    let pr = &memory.paused_replicas;
    resolve(&by_name, pr.len(), prefetching(pr.iter()), |p, v| {
        inputs[p].paused_replicas = *v
    });

    // Paused replicas that take a slot (only where the service's pool says so) are capacity
    // nobody can be given.
    let held: u64 = by_name
        .iter()
        .zip(&inputs)
        .filter(|(&(_, i), inp)| inp.paused_replicas > 0 && cfg.services[i].pool.paused_takes_slot)
        .map(|(_, inp)| inp.paused_replicas as u64)
        .sum();
    let capacity = (cfg.capacity.slots(&observed.hosts) as u64).saturating_sub(held) as u32;
    let hosts = observed.ready_hosts();

    // Allocation order: remainder last, then priority, then name (a stable sort of the
    // name order by the first two is the order by all three).
    let class: Vec<u64> = cfg
        .services
        .iter()
        .map(|s| (u64::from(s.is_remainder()) << 32) | u64::from(s.priority.get()))
        .collect();
    // By position in the name order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&p| class[by_name[p].1]);

    let facts = TickFacts {
        now,
        converge_timeout: cfg.converge_timeout,
        native_per_host: cfg.capabilities().native_per_host,
    };
    let mut scratch = Scratch::default();
    // Each service's configuration, triggers, samples and memory live in allocations of their
    // own, visited here in allocation order: ask for them a few services ahead, so the misses
    // overlap instead of stalling one after another.
    let ahead = |k: usize, d: usize| {
        order
            .get(k + d)
            .map(|&p| (&cfg.services[by_name[p].1], &inputs[p]))
    };
    let mut work: Vec<Work<P>> = Vec::with_capacity(n);
    for (k, &p) in order.iter().enumerate() {
        let i = by_name[p].1;
        if let Some((svc, _)) = ahead(k, 2 * AHEAD) {
            prefetch(&svc.kind);
            prefetch(&svc.pool);
        }
        if let Some((svc, inp)) = ahead(k, AHEAD) {
            prefetch_inputs(svc, inp);
        }
        let svc = &cfg.services[i];
        work.push(want(
            svc,
            i,
            inputs[p],
            &mut scratch,
            hosts_of(svc, observed, hosts),
            facts,
        ));
    }

    let placed = match cfg.capacity {
        Capacity::Resources { reserve } => {
            Some(place_resources(&mut work, &by_name, observed, reserve))
        }
        _ => None,
    };
    let (capacity, used) = match &placed {
        Some(p) => {
            let used: u64 = p.services.iter().map(|p| p.target as u64).sum();
            (used.min(u32::MAX as u64) as u32, used)
        }
        None => (capacity, allocate_slots(&mut work, capacity)),
    };

    let mut plan = build_plan(&work, &keys, capacity, used);
    if let Some(p) = &placed {
        explain_placement(&mut plan, &work, &p.services, &observed.hosts);
        for &(a, h, n) in &p.removed {
            if let Some(host) = observed.hosts.get(h) {
                plan.services[a].remove_from.push((host.id.clone(), n));
            }
        }
    }
    // The next memory. First what each service ends with, gathered in allocation order (the
    // order of `work`, read front to back), then the commitments in configuration order.
    let mut targets = vec![0u32; n];
    let mut rules = Vec::new();
    for w in &mut work {
        targets[w.index] = w.target;
        if let Some(r) = w.rules.take() {
            let mut r = *r;
            let scaling = w.scaling;
            if scaling.has_rate_limits() {
                if w.target != w.current {
                    r.events.push((now, w.target as i64 - w.current as i64));
                }
                let keep = scaling.longest_period();
                r.events.retain(|(t, _)| now.saturating_sub(*t) < keep);
            }
            if r != RuleMemory::default() {
                rules.push((keys[w.index].to_name(), r));
            }
        }
    }
    let mut commitments = Vec::with_capacity(n);
    for ((key, &target), &p) in keys.iter().zip(&targets).zip(&position) {
        let keep = inputs[p as usize]
            .committed
            .filter(|m| m.target == target)
            .copied();
        commitments.push((
            key.to_name(),
            keep.unwrap_or(Commitment {
                target,
                changed_at: now,
            }),
        ));
    }
    let next = EngineState {
        commitments,
        paused: memory.paused.clone(),
        rules: rules.into_iter().collect(),
        paused_replicas: memory.paused_replicas.clone(),
        name_order: NameOrder(Some(by_name.iter().map(|&(_, i)| i as u32).collect())),
    };
    (plan, next)
}

/// Slots: mins first, then what everyone keeps, then growth in allocation order (see the
/// module documentation); returns the slots allocated.
fn allocate_slots<P: Plugins>(work: &mut [Work<P>], capacity: u32) -> u64 {
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
    used
}

/// CPU and memory: the placement simulation of [`crate::placement`] from where the replicas
/// are, with each service's want and floor; sets every target and returns the placement.
fn place_resources<P: Plugins>(
    work: &mut [Work<P>],
    by_name: &[(Key, usize)],
    observed: &Observed,
    reserve: Resources,
) -> crate::placement::Placement {
    use crate::placement::{simulate, Ask, Room};
    let rooms: Vec<Room> = observed
        .hosts
        .iter()
        .map(|h| {
            let allocatable = Resources::of_host(h, reserve);
            Room {
                allocatable: allocatable.unwrap_or(Resources::ZERO),
                ready: h.ready && allocatable.is_some(),
            }
        })
        .collect();
    let asks: Vec<Ask> = work
        .iter()
        .map(|w| Ask {
            need: w.need,
            want: w.want,
            floor: w.floor,
            min: w.min,
            growth: w.growth,
            waiting: w.obs.unschedulable,
        })
        .collect();
    // Where the replicas are, sparse: (position in `work`, host index, count).
    // The hosts by id (the last of equal ids wins), walked beside the placement's ids, which
    // come sorted.
    let mut ids: Vec<(&HostId, usize)> = observed
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (&h.id, i))
        .collect();
    ids.sort_unstable();
    let mut position = vec![0u32; work.len()];
    for (a, w) in work.iter().enumerate() {
        position[w.index] = a as u32;
    }
    let names = NameTable::new(by_name);
    let mut start: Vec<(usize, usize, u32)> = Vec::with_capacity(work.len() * 2);
    let mut at = 0;
    for (id, services) in &observed.placement {
        while ids.get(at).is_some_and(|&(x, _)| x < id) {
            at += 1;
        }
        let mut host = None;
        while let Some(&(_, h)) = ids.get(at).filter(|&&(x, _)| x == id) {
            host = Some(h);
            at += 1;
        }
        let Some(h) = host else {
            continue;
        };
        for (name, &n) in services {
            if let Some(i) = names.get(name) {
                start.push((position[i] as usize, h, n));
            }
        }
    }
    // Per-host services limited to some hosts: on which, by host index.
    let only: Vec<Option<Vec<bool>>> = if observed.runs_on.is_empty() {
        Vec::new()
    } else {
        work.iter()
            .map(|w| {
                let ids = observed.runs_on.get(&w.svc.name)?;
                (w.growth == Growth::PerHost)
                    .then(|| observed.hosts.iter().map(|h| ids.contains(&h.id)).collect())
            })
            .collect()
    };
    let placed = simulate(&asks, &rooms, &start, &only);
    for (w, p) in work.iter_mut().zip(&placed.services) {
        w.target = p.target;
    }
    placed
}

/// The services' names to their indices in the configuration: an open-addressing table over
/// the names' first 32 bytes (already in their keys), so a lookup reads no name of the
/// configuration (a name longer than 32 bytes is compared in full).
struct NameTable<'k, 'a> {
    /// Positions in `by_name`, plus one (0: empty).
    slots: Vec<u32>,
    by_name: &'k [(Key<'a>, usize)],
}

impl<'k, 'a> NameTable<'k, 'a> {
    fn new(by_name: &'k [(Key<'a>, usize)]) -> Self {
        let size = (by_name.len() * 2).next_power_of_two().max(8);
        let mut slots = vec![0u32; size];
        for (j, (k, _)) in by_name.iter().enumerate() {
            let mut s = Self::slot(k, size);
            while slots[s] != 0 {
                s = (s + 1) & (size - 1);
            }
            slots[s] = j as u32 + 1;
        }
        NameTable { slots, by_name }
    }

    fn slot(k: &Key, size: usize) -> usize {
        let h = (k.head as u64)
            ^ ((k.head >> 64) as u64).rotate_left(23)
            ^ (k.second as u64).rotate_left(41)
            ^ ((k.second >> 64) as u64);
        (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & (size - 1)
    }

    /// The configuration index of the service named `name`.
    fn get(&self, name: &ServiceName) -> Option<usize> {
        let k = Key::new(name);
        let size = self.slots.len();
        let mut s = Self::slot(&k, size);
        loop {
            let j = self.slots[s];
            if j == 0 {
                return None;
            }
            let (key, i) = &self.by_name[j as usize - 1];
            if key.cmp(&k).is_eq() {
                return Some(*i);
            }
            s = (s + 1) & (size - 1);
        }
    }
}

/// The reasons of a placement: a service short of its want names what no host had free, and
/// what it took from whom on which host; a service that gave room says to whom.
fn explain_placement<P: Plugins>(
    plan: &mut Plan,
    work: &[Work<P>],
    placed: &[crate::placement::Placed],
    hosts: &[Host],
) {
    let host = |h: usize| hosts.get(h).map_or("?", |h| h.name.as_str());
    let mut gave: Vec<Vec<String>> = vec![Vec::new(); work.len()];
    for (a, p) in placed.iter().enumerate() {
        for &(b, h, n) in &p.took {
            gave[b].push(format!("gave {n} to {} on {}", work[a].svc.name, host(h)));
        }
    }
    for (i, (w, p)) in work.iter().zip(placed).enumerate() {
        let sp = &mut plan.services[i];
        let need = w.need;
        let mut parts = Vec::new();
        if p.blocked && p.target < w.want {
            sp.bound = Bound::Capacity;
            parts.push(format!(
                "wants {}, runs {}: no host has {need} free, even from lower priorities",
                w.want, p.target
            ));
        }
        for &(b, h, n) in &p.took {
            parts.push(format!(
                "took {n} of {} on {} for room",
                work[b].svc.name,
                host(h)
            ));
        }
        if !gave[i].is_empty() {
            sp.bound = Bound::Preempted;
            parts.extend(gave[i].iter().cloned());
        }
        if p.held {
            parts.push(
                "does not grow elsewhere this tick: a replica waiting for room takes it".into(),
            );
        }
        if !parts.is_empty() {
            sp.reason = format!("{}; {}", sp.reason, parts.join("; ")).into();
        }
    }
}

/// The hosts a service may run on: all `ready` ones, but for a per-host service the
/// orchestrator runs on some hosts only (`Observed::runs_on`), the ready ones among those.
fn hosts_of<P: Plugins>(svc: &Service<P>, observed: &Observed, ready: u32) -> u32 {
    if observed.runs_on.is_empty() || !matches!(svc.kind, ServiceKind::PerHost) {
        return ready;
    }
    match observed.runs_on.get(&svc.name) {
        Some(ids) => observed
            .hosts
            .iter()
            .filter(|h| h.ready && ids.contains(&h.id))
            .count() as u32,
        None => ready,
    }
}

/// What every service's [`want`] reads of the tick.
#[derive(Clone, Copy)]
struct TickFacts {
    now: Duration,
    converge_timeout: Duration,
    /// The orchestrator keeps one replica per host of a per-host service by itself.
    native_per_host: bool,
}

/// The want of service `svc` (at `index` in the configuration), with what the allocation and
/// the plan read of it.
fn want<'a, P: Plugins>(
    svc: &'a Service<P>,
    index: usize,
    inputs: Inputs<'a>,
    scratch: &mut Scratch<'a, P::Source>,
    hosts: u32,
    facts: TickFacts,
) -> Work<'a, P> {
    let TickFacts {
        now,
        converge_timeout,
        native_per_host,
    } = facts;
    let obs = inputs.obs;
    let scaling = inputs.scaling;
    let committed = inputs.committed;
    let current = committed.map_or(obs.total(), |m| m.target);
    let converged = committed.is_none_or(|m| {
        (obs.running == m.target && obs.pending == 0)
            || now.saturating_sub(m.changed_at) >= converge_timeout
    });
    let step = svc.max_step.unwrap_or(u32::MAX);
    let prev = inputs.prev;

    let mut missing = Vec::new();
    let mut asks = Asks::NoSample;
    let mut detail = String::new();
    let mut rule_memory = None;
    let plain = match &svc.kind {
        ServiceKind::Triggered(triggers) => plain_demand(triggers, scaling, inputs.samples),
        _ => None,
    };
    let (mut wish, mut bound, demand, asked) = match (&svc.kind, plain) {
        (ServiceKind::Triggered(_), Some((v, r))) => {
            asks = Asks::Demand(Some(v));
            (r, Bound::Demand, Some(v), Some(r))
        }
        (ServiceKind::Triggered(triggers), None) => {
            let t = triggered(
                triggers,
                scaling,
                inputs.samples,
                scratch,
                prev,
                current,
                now,
            );
            missing = t.missing;
            asks = t.asks;
            detail = t.detail;
            let mut r = RuleMemory {
                triggers: t.memory,
                ..RuleMemory::default()
            };
            let mut wish = t.wish;
            let mut bound = t.bound;
            if scaling.has_windows() {
                let history = prev.map_or(&[][..], |m| &m.recommendations[..]);
                let raw = wish;
                if bound != Bound::MissingDemand {
                    let s = rules::stabilise(
                        wish,
                        current,
                        history,
                        now,
                        scaling.up.stabilisation,
                        scaling.down.stabilisation,
                    );
                    if s != wish {
                        wish = s;
                        detail = if s > raw {
                            format!(
                                "{asks} ({raw} replicas), but the highest recommendation in the {} scale-down stabilisation window is {s}",
                                humantime::format_duration(scaling.down.stabilisation)
                            )
                        } else {
                            format!(
                                "{asks} ({raw} replicas), but the lowest recommendation in the {} scale-up stabilisation window is {s}",
                                humantime::format_duration(scaling.up.stabilisation)
                            )
                        };
                        bound = Bound::Stabilisation;
                    }
                }
                let window = scaling.longest_window();
                r.recommendations = history
                    .iter()
                    .filter(|(t, _)| now.saturating_sub(*t) < window)
                    .copied()
                    .collect();
                if bound != Bound::MissingDemand {
                    r.recommendations.push((now, raw));
                }
            }
            if scaling.has_rate_limits() {
                r.events = prev.map_or_else(Vec::new, |m| m.events.clone());
            }
            rule_memory = Some(r);
            (wish, bound, t.demand, t.asked)
        }
        (ServiceKind::PerHost, _) => (hosts, Bound::Hosts, Some(hosts as f64), Some(hosts)),
        (ServiceKind::Remainder, _) => (svc.max, Bound::Remainder, None, None),
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
    // No new voluntary change while the previous one is under way (max still applies). On
    // an orchestrator that keeps one per host itself (Swarm's global mode), a per-host
    // service's count is no one's choice: it has already followed the hosts, and so does the
    // plan, at once.
    let hold = current.min(svc.max);
    let follows_hosts = native_per_host && matches!(svc.kind, ServiceKind::PerHost);
    if !converged && wish != hold && !follows_hosts {
        wish = hold;
        bound = if hold < current {
            Bound::Max
        } else {
            Bound::Converging
        };
    }
    // Rate limits, like max_step, limit moves within [min, max] only.
    if let Some(r) = rule_memory.as_ref().filter(|_| scaling.has_rate_limits()) {
        if wish > current {
            if let Some((limit, policy)) = rules::up_limit(current, &r.events, now, &scaling.up) {
                let limit = limit.max(current);
                if wish > limit {
                    if svc.min > limit {
                        wish = svc.min;
                        bound = Bound::Min;
                    } else {
                        detail = format!(
                            "wants {wish}: {asks}; scale-up limited to {limit} by policy {policy}"
                        );
                        wish = limit;
                        bound = Bound::RateLimit;
                    }
                }
            }
        } else if wish < current {
            if let Some((limit, policy)) = rules::down_limit(current, &r.events, now, &scaling.down)
            {
                let limit = limit.min(current);
                if wish < limit {
                    if svc.max < limit {
                        wish = svc.max;
                        bound = Bound::Max;
                    } else {
                        detail = format!(
                            "wants {wish}: {asks}; scale-down limited to {limit} by policy {policy}"
                        );
                        wish = limit;
                        bound = Bound::RateLimit;
                    }
                }
            }
        }
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
    if inputs.paused {
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
        priority: svc.priority,
        growth: match svc.kind {
            ServiceKind::PerHost => Growth::PerHost,
            ServiceKind::Remainder => Growth::Remainder,
            ServiceKind::Triggered(_) => Growth::Priority,
        },
        need: svc.resources.unwrap_or(Resources::ZERO),
        index,
        scaling,
        paused_replicas: inputs.paused_replicas,
        obs,
        current,
        demand,
        missing,
        asked,
        asks,
        detail,
        rules: rule_memory
            .filter(|r| scaling.has_rate_limits() || *r != RuleMemory::default())
            .map(Box::new),
        want: wish,
        want_bound: bound,
        min,
        floor,
        keep,
        target: 0,
    }
}

/// The common case of [`triggered`] without its bookkeeping: one trigger with the default rule
/// and no failure policy, the default scaling, and a usable sample whose side of the
/// activation agrees with the replicas it asks for (above it and at least one, or at most it
/// and none). Then the value is the demand and its replicas the wish, bound by demand, with
/// nothing to remember and no words beyond "demand {v}": `(value, replicas)`. `None`
/// otherwise, for [`triggered`] to work out.
fn plain_demand<S>(
    triggers: &[Trigger<S>],
    scaling: &Scaling,
    got: Option<&[TriggerSample]>,
) -> Option<(f64, u32)> {
    let [t] = triggers else {
        return None;
    };
    if t.rule != Rule::Value
        || t.failure.is_some()
        || scaling.formula.is_some()
        || scaling.has_windows()
        || scaling.has_rate_limits()
    {
        return None;
    }
    let v = got?
        .iter()
        .find(|s| same_name(&s.trigger, &t.name))?
        .value
        .filter(|v| v.is_finite())?;
    let r = replicas_for(v);
    ((v > t.activation) == (r > 0)).then_some((v, r))
}

/// What a triggered service's triggers ask for this tick.
struct TriggeredWish<'a> {
    wish: u32,
    bound: Bound,
    demand: Option<f64>,
    asked: Option<u32>,
    missing: Vec<&'a str>,
    asks: Asks,
    detail: String,
    memory: BTreeMap<String, TriggerMemory>,
}

/// How one trigger is used this tick.
enum Use {
    /// A value: live, or the last good one kept after `n` failures.
    Value(f64, Option<u32>),
    /// The fallback, after `n` failures.
    Fallback(Fallback, u32),
    /// No usable value and no fallback yet.
    Missing,
}

fn num(v: f64) -> String {
    let mut s = String::new();
    push_num(&mut s, v);
    s
}

/// The triggers' rules: each trigger's value (live, kept or fallback) becomes replicas by its
/// rule; they combine by max or the formula; activation gates zero.
fn triggered<'a, S>(
    triggers: &'a [Trigger<S>],
    scaling: &Scaling,
    got: Option<&[TriggerSample]>,
    scratch: &mut Scratch<'a, S>,
    prev: Option<&RuleMemory>,
    current: u32,
    now: Duration,
) -> TriggeredWish<'a> {
    let mut memory = BTreeMap::new();
    let mut missing = Vec::new();
    // Worded only when the reason needs them (not on the default rules' path).
    let parts = &mut scratch.parts;
    parts.clear();
    // Plain: the default rules only, worded as before ("demand 4").
    let mut plain = scaling.formula.is_none();
    let values = &mut scratch.values;
    values.clear();
    let mut active = false;
    let inactive = &mut scratch.inactive;
    inactive.clear();
    // The max over the triggers: (replicas, raw, bound).
    let mut best: Option<(u32, f64, Bound)> = None;
    // A fallback with replicas or current, which a formula cannot use.
    let mut forced: Option<u32> = None;
    let mut max_value: Option<f64> = None;
    for t in triggers {
        let sample = got
            .and_then(|ss| ss.iter().find(|s| same_name(&s.trigger, &t.name)))
            .and_then(|s| s.value)
            .filter(|v| v.is_finite());
        let old = prev
            .and_then(|m| m.triggers.get(&*t.name))
            .copied()
            .unwrap_or_default();
        let mut m = old;
        let using = match sample {
            Some(v) => {
                m.failures = 0;
                if t.failure.is_some() {
                    m.last = Some(v.to_bits());
                }
                Use::Value(v, None)
            }
            None => {
                m.failures = m.failures.saturating_add(1);
                match t.failure {
                    Some(p) if m.failures > p.threshold => Use::Fallback(p.fallback, m.failures),
                    Some(_) => match m.last {
                        Some(b) => Use::Value(f64::from_bits(b), Some(m.failures)),
                        None => Use::Missing,
                    },
                    None => Use::Missing,
                }
            }
        };
        let mut offer = |r: u32, raw: f64, b: Bound| {
            if best.is_none_or(|(x, _, _)| r > x) {
                best = Some((r, raw, b));
            }
        };
        match using {
            Use::Value(v, kept) => {
                max_value = Some(max_value.map_or(v, |x: f64| x.max(v)));
                if v > t.activation {
                    active = true;
                } else {
                    inactive.push((t, v));
                }
                let pd_prev = m.pd.map(|(at, e)| (at, f64::from_bits(e)));
                let rec = rules::recommend(&t.rule, v, current, t.tolerance, pd_prev, now);
                if let (Rule::Pd(p), None) = (&t.rule, kept) {
                    m.pd = Some((now, (v - p.target).to_bits()));
                }
                values.push(v);
                plain &= t.rule == Rule::Value && kept.is_none();
                parts.push(Part::Value(t, v, rec, kept));
                let b = if rec.within_tolerance {
                    Bound::Tolerance
                } else {
                    Bound::Demand
                };
                offer(rec.replicas, rec.raw, b);
            }
            Use::Fallback(f, n) => {
                plain = false;
                let head = format!(
                    "{} failed {n} times (more than failure_threshold {})",
                    t.name,
                    t.failure.map_or(0, |p| p.threshold)
                );
                values.push(0.0);
                match f {
                    Fallback::Replicas(r) => {
                        active |= r > 0;
                        parts.push(Part::Words(format!(
                            "{head}: fallback {r} replica{}",
                            plural(r)
                        )));
                        forced = Some(forced.unwrap_or(0).max(r));
                        offer(r, r as f64, Bound::Fallback);
                    }
                    Fallback::Current => {
                        active |= current > 0;
                        parts.push(Part::Words(format!(
                            "{head}: fallback keeps current {current}"
                        )));
                        forced = Some(forced.unwrap_or(0).max(current));
                        offer(current, current as f64, Bound::Fallback);
                    }
                    Fallback::Ignore => {
                        parts.push(Part::Words(format!("{head}: ignored")));
                    }
                }
            }
            Use::Missing => {
                missing.push(&*t.name);
                values.push(f64::NAN);
            }
        }
        if t.failure.is_some() || matches!(t.rule, Rule::Pd(_)) {
            memory.insert(t.name.to_string(), m);
        }
    }

    // Combine: max over the triggers, or the formula over their values.
    let combined: Option<(u32, f64, Bound)> = match &scaling.formula {
        None => best,
        Some(_) if !missing.is_empty() => None,
        Some(_) if forced.is_some() => forced.map(|r| (r, r as f64, Bound::Fallback)),
        Some(f) => {
            values.push(current as f64);
            let raw = f.eval(values);
            if raw.is_nan() {
                missing.push("formula");
                None
            } else {
                Some((replicas_for(raw), raw, Bound::Demand))
            }
        }
    };
    let asks = if plain && !missing.is_empty() && parts.is_empty() {
        Asks::NoSample
    } else if plain && triggers.iter().all(|t| t.rule == Rule::Value) {
        Asks::Demand(max_value)
    } else {
        let mut a = parts
            .iter()
            .map(|p| p.words(current))
            .collect::<Vec<_>>()
            .join("; ");
        match (&scaling.formula, combined) {
            (Some(f), Some((r, raw, Bound::Demand))) => {
                a = format!("formula {:?} = {} asks {r} ({a})", f.text(), num(raw))
            }
            (None, Some((r, _, _))) if parts.len() > 1 => a.push_str(&format!("; max {r}")),
            _ => {}
        }
        if a.is_empty() {
            Asks::NoSample
        } else {
            Asks::Words(a)
        }
    };
    let demand = if plain {
        max_value
    } else {
        combined.map(|(_, raw, _)| raw)
    };

    let mut detail = String::new();
    let (mut wish, mut bound, asked) = match combined {
        // Nothing to go by: every trigger is missing or ignored. Hold.
        None if missing.is_empty() => {
            detail = format!("{asks}; holding at {current}");
            (current, Bound::Fallback, None)
        }
        None => (current, Bound::MissingDemand, None),
        Some((r, _, b)) => {
            if !active && missing.is_empty() {
                // KEDA's activation: no trigger above its activation, the service goes to zero.
                if r > 0 {
                    let inactive = inactive
                        .iter()
                        .map(|(t, v)| {
                            format!("{} {} <= activation {}", t.name, num(*v), num(t.activation))
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    detail = format!(
                        "{asks}, but no trigger is above its activation ({inactive}): scales to 0"
                    );
                    (0, Bound::Activation, Some(r))
                } else {
                    (0, b, Some(r))
                }
            } else if active && r == 0 {
                detail = format!("{asks}; a trigger is above its activation: at least 1 replica");
                (1, Bound::Activation, Some(r))
            } else {
                if b == Bound::Tolerance && r == current {
                    detail = format!("{asks}: within the tolerance band; holding at {current}");
                } else if b == Bound::Fallback {
                    detail = asks.to_string();
                }
                (r, b, Some(r))
            }
        }
    };
    // A missing metric never scales down: the others may still ask for more.
    if !missing.is_empty() && wish <= current && bound != Bound::MissingDemand {
        wish = current;
        bound = Bound::MissingDemand;
    }
    TriggeredWish {
        wish,
        bound,
        demand,
        asked,
        missing,
        asks,
        detail,
        memory,
    }
}

/// One trigger's part of the reason, worded only when needed.
enum Part<'a, S> {
    /// A value (kept after `n` failures, or live) and what its rule made of it.
    Value(&'a Trigger<S>, f64, Recommendation, Option<u32>),
    /// Already in words.
    Words(String),
}

impl<S> Part<'_, S> {
    fn words(&self, current: u32) -> String {
        match self {
            Part::Words(w) => w.clone(),
            Part::Value(t, v, rec, kept) => {
                let mut w = trigger_words(t, *v, current, rec);
                if let (Some(n), Some(p)) = (kept, t.failure) {
                    w.push_str(&format!(
                        " (its last value: {n} failure{} so far, fallback after {})",
                        plural(*n),
                        p.threshold
                    ));
                }
                w
            }
        }
    }
}

/// One trigger's recommendation in words.
fn trigger_words<S>(t: &Trigger<S>, v: f64, current: u32, rec: &Recommendation) -> String {
    let n = &t.name;
    let r = rec.replicas;
    if rec.within_tolerance {
        return format!(
            "{n} {} within tolerance {} of target {}: keeps {current}",
            num(v),
            num(t.tolerance),
            num(t.rule.target().unwrap_or(0.0))
        );
    }
    match &t.rule {
        Rule::Value => format!("{n} {} asks {r}", num(v)),
        Rule::Average { target } => format!(
            "{n} {} for target {} per replica asks {r}",
            num(v),
            num(*target)
        ),
        Rule::Utilisation { target } => format!(
            "{n} {} at {current} replicas for target {} asks {r}",
            num(v),
            num(*target)
        ),
        Rule::Pd(p) => format!(
            "{n} {} for target {} (pd kp {}, kd {}) asks {r}",
            num(v),
            num(p.target),
            num(p.kp),
            num(p.kd)
        ),
    }
}

fn build_plan<P: Plugins>(work: &[Work<P>], keys: &[Key], capacity: u32, allocated: u64) -> Plan {
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
    // Growers take from the last service that still has lost slots; what is left of `lost`
    // only shrinks, so everything after `last` stays empty and is never scanned again.
    let mut last = work.len();
    for (i, w) in work.iter().enumerate() {
        let mut need = w.target.saturating_sub(w.current) as u64;
        let from_free = need.min(free);
        free -= from_free;
        need -= from_free;
        let from_vol = need.min(voluntary);
        voluntary -= from_vol;
        need -= from_vol;
        while need > 0 && last > 0 {
            let v = last - 1;
            if lost[v] == 0 {
                last -= 1;
                continue;
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
        let reason = Reason::new(service_reason(w, bound, &ctx));
        services.push(ServicePlan {
            service: keys[w.index].to_name(),
            priority: w.priority,
            remainder: w.growth == Growth::Remainder,
            demand: w.demand,
            current: w.current,
            running: w.obs.running,
            pending: w.obs.pending,
            paused: w.paused_replicas,
            target: w.target,
            bound,
            reason,
            remove_from: Vec::new(),
        });
    }

    let mut actions = Vec::new();
    for (i, w) in work.iter().enumerate().rev() {
        if w.target < w.current {
            let sp = &services[i];
            let count = w.current - w.target;
            actions.push(Action {
                kind: ActionKind::Stop,
                service: sp.service.clone(),
                count,
                from: w.current,
                to: w.target,
                bound: sp.bound,
                reason: Reason::new(Words::Action(Box::new(ActionWords {
                    kind: ActionKind::Stop,
                    count,
                    service: sp.service.clone(),
                    reason: sp.reason.words().clone(),
                    took: Vec::new(),
                }))),
            });
        }
    }
    for (i, w) in work.iter().enumerate() {
        if w.target > w.current {
            let sp = &services[i];
            let count = w.target - w.current;
            let took = took[i]
                .iter()
                .map(|&(v, n)| (keys[work[v].index].to_name(), work[v].priority, n))
                .collect();
            actions.push(Action {
                kind: ActionKind::Start,
                service: sp.service.clone(),
                count,
                from: w.current,
                to: w.target,
                bound: sp.bound,
                reason: Reason::new(Words::Action(Box::new(ActionWords {
                    kind: ActionKind::Start,
                    count,
                    service: sp.service.clone(),
                    reason: sp.reason.words().clone(),
                    took,
                }))),
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
fn final_bound<P: Plugins>(w: &Work<P>, taken: bool, left: u64) -> Bound {
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
    } else if w.growth == Growth::Remainder {
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

/// What a reason needs to know beyond the service itself.
struct Ctx<'a, P: Plugins> {
    capacity: u32,
    committed: u64,
    /// To whom the service gave slots.
    gave: &'a [(usize, u32)],
    /// Slots it lost that no grower took (the capacity shrank).
    shed: u32,
    index: usize,
    work: &'a [Work<'a, P>],
}

/// What the service asked for, in words.
fn push_asks<P: Plugins>(s: &mut String, w: &Work<P>) {
    match &w.svc.kind {
        ServiceKind::Triggered(_) => w.asks.push_to(s),
        ServiceKind::PerHost => {
            match w.demand {
                Some(v) => push_num(s, v),
                None => s.push_str("none"),
            }
            s.push_str(" ready hosts");
        }
        ServiceKind::Remainder => s.push_str("free capacity"),
    }
}

fn service_reason<P: Plugins>(w: &Work<P>, bound: Bound, ctx: &Ctx<P>) -> Words {
    if bound == Bound::Demand && w.growth == Growth::Priority {
        // The common case, written when read: "{asks} {cmp} {current}".
        return Words::Demand {
            asks: w.asks.clone(),
            cmp: w.asked.unwrap_or(0).cmp(&w.current),
            current: w.current,
        };
    }
    Words::Text(service_text(w, bound, ctx))
}

/// A service's reason in words (every bound but the common demand's).
fn service_text<P: Plugins>(w: &Work<P>, bound: Bound, ctx: &Ctx<P>) -> String {
    let cmp = |a: u32, b: u32| match a.cmp(&b) {
        std::cmp::Ordering::Greater => ">",
        std::cmp::Ordering::Less => "<",
        std::cmp::Ordering::Equal => "=",
    };
    let capacity = ctx.capacity;
    let asks = {
        let mut s = String::new();
        push_asks(&mut s, w);
        s
    };
    // The replicas it asked for, before limits.
    let asked = w.asked;
    let over_capacity = || {
        format!(
            "capacity {capacity} is below the {} slots placed; lowest priority shrinks first",
            ctx.committed
        )
    };
    match bound {
        Bound::Demand => {
            format!(
                "{asks} {} {}",
                cmp(w.asked.unwrap_or(0), w.current),
                w.current
            )
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
        Bound::Stabilisation
        | Bound::RateLimit
        | Bound::Activation
        | Bound::Tolerance
        | Bound::Fallback => {
            if w.detail.is_empty() {
                asks
            } else {
                w.detail.clone()
            }
        }
    }
}

fn trigger_count<P: Plugins>(svc: &Service<P>) -> usize {
    match &svc.kind {
        ServiceKind::Triggered(t) => t.len(),
        _ => 0,
    }
}

/// True when a sample's trigger name is `name`: by pointer when the sample carries a clone of
/// the trigger's own name (as the control loop's samples do), so the string is read only
/// when the pointers differ.
fn same_name(sample: &Arc<str>, name: &Arc<str>) -> bool {
    Arc::ptr_eq(sample, name) || **sample == **name
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`plain_demand`] says what [`triggered`] says wherever it answers, for values on both
    /// sides of the activation (and missing, infinite or not a number), and answers for the
    /// common case.
    #[test]
    fn plain_demand_agrees_with_the_triggers_rules() {
        let name: Arc<str> = "demand".into();
        let values = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -2.0,
            0.0,
            0.2,
            1.0,
            2.5,
            3.0,
            1e12,
        ];
        let mut answered = 0;
        for activation in [0.0, -1.0, 1.0, 5.0] {
            for v in values {
                for value in [None, Some(v)] {
                    for current in [0, 3] {
                        let mut t = Trigger::new(name.clone(), ());
                        t.activation = activation;
                        let triggers = vec![t];
                        let samples = [TriggerSample {
                            trigger: name.clone(),
                            value,
                        }];
                        let got = Some(&samples[..]);
                        let mut scratch = Scratch::default();
                        let now = Duration::from_secs(1);
                        let g = triggered(
                            &triggers,
                            &Scaling::DEFAULT,
                            got,
                            &mut scratch,
                            None,
                            current,
                            now,
                        );
                        let Some((d, r)) = plain_demand(&triggers, &Scaling::DEFAULT, got) else {
                            continue;
                        };
                        answered += 1;
                        let case = format!("value {value:?}, activation {activation}");
                        assert_eq!(
                            (g.wish, g.bound, g.asked, g.demand),
                            (r, Bound::Demand, Some(r), Some(d)),
                            "{case}"
                        );
                        assert_eq!(g.asks, Asks::Demand(Some(d)), "{case}");
                        assert!(g.missing.is_empty() && g.detail.is_empty(), "{case}");
                        assert!(g.memory.is_empty(), "{case}");
                    }
                }
            }
        }
        assert!(answered >= 20, "answered only {answered} cases");
    }

    /// Anything beyond one default trigger and the default scaling goes through the rules.
    #[test]
    fn plain_demand_leaves_everything_else_to_the_rules() {
        let name: Arc<str> = "demand".into();
        let samples = [TriggerSample {
            trigger: name.clone(),
            value: Some(2.0),
        }];
        let got = Some(&samples[..]);
        let one = || Trigger::new(name.clone(), ());
        let plain = |t: Vec<Trigger<()>>, s: &Scaling| plain_demand(&t, s, got);
        assert_eq!(plain(vec![one()], &Scaling::DEFAULT), Some((2.0, 2)));
        assert_eq!(plain(vec![one(), one()], &Scaling::DEFAULT), None);
        assert_eq!(plain(vec![], &Scaling::DEFAULT), None);
        let mut average = one();
        average.rule = Rule::Average { target: 1.0 };
        assert_eq!(plain(vec![average], &Scaling::DEFAULT), None);
        let mut failing = one();
        failing.failure = Some(FailurePolicy {
            threshold: 1,
            fallback: Fallback::Current,
        });
        assert_eq!(plain(vec![failing], &Scaling::DEFAULT), None);
        let mut windows = Scaling::DEFAULT;
        windows.down.stabilisation = Duration::from_secs(60);
        assert_eq!(plain(vec![one()], &windows), None);
        let mut formula = Scaling::DEFAULT;
        formula.formula = Some(Formula::parse("a * 2", &["a"]).expect("a valid formula"));
        assert_eq!(plain(vec![one()], &formula), None);
        let mut rate = Scaling::DEFAULT;
        rate.up.policies.push(RatePolicy {
            amount: Amount::Replicas(1),
            period: Duration::from_secs(60),
        });
        assert_eq!(plain(vec![one()], &rate), None);
        // A sample for another trigger, or none at all.
        let other = [TriggerSample {
            trigger: "other".into(),
            value: Some(2.0),
        }];
        assert_eq!(
            plain_demand(&[one()], &Scaling::DEFAULT, Some(&other)),
            None
        );
        assert_eq!(plain_demand(&[one()], &Scaling::DEFAULT, None), None);
    }
}
