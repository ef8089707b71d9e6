//! The vocabulary of microscaler as typed values.
//!
//! Constructors check their invariants (`try_new`), so a value of these types that reaches the
//! engine is always valid: the engine never re-checks configuration.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::plugin::{Plugins, WorkloadOf};
pub use crate::rules::{
    Amount, Direction, FailurePolicy, Fallback, Formula, PdSpec, RatePolicy, Rule, Scaling, Select,
};

/// The name of a service: a DNS label (1 to 63 characters of `a-z`, `0-9` and `-`, starting and
/// ending with a letter or digit), so it is valid as a Docker label value, a Swarm service name, a
/// Kubernetes object name and a file name.
///
/// Held inline (64 bytes, no heap): the engine copies every name into its plan and memory each
/// tick, and a copy of an inline name is a move of one cache line instead of an allocation.
/// Names order as their strings do.
#[derive(Clone, Eq)]
pub struct ServiceName {
    /// The name's bytes, zero-padded; the last byte holds the length. Names hold no NUL, so
    /// comparing the whole array compares the strings (a shorter name's padding sorts first),
    /// and two equal arrays are equal names.
    bytes: [u8; 64],
}

impl ServiceName {
    /// Checks `name` and wraps it.
    pub fn try_new(name: impl AsRef<str>) -> Result<Self, String> {
        let name = name.as_ref();
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if name.is_empty() || name.len() > 63 {
            return Err(format!(
                "must be 1 to 63 characters long, got {}",
                name.len()
            ));
        }
        if !name.chars().all(ok_char) || name.starts_with('-') || name.ends_with('-') {
            return Err(format!(
                "must contain only a-z, 0-9 and '-' and start and end with a letter or digit, got {name:?}"
            ));
        }
        let mut bytes = [0u8; 64];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        bytes[63] = name.len() as u8;
        Ok(Self { bytes })
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        let len = self.bytes[63] as usize;
        // SAFETY: only `try_new` builds a name, from a checked ASCII string of `len` <= 63
        // bytes copied to the start of the array, so those bytes are valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.bytes[..len]) }
    }

    /// The name's 64 bytes as four numbers that order as the names do: the first 16 bytes,
    /// the next 16, and so on (the last byte is the length).
    pub(crate) fn words(&self) -> [u128; 4] {
        let word = |k: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&self.bytes[16 * k..16 * (k + 1)]);
            u128::from_be_bytes(a)
        };
        [word(0), word(1), word(2), word(3)]
    }

    /// Rebuilds a name of at most 32 bytes from its first two [`words`](Self::words) (of a
    /// name built by `try_new`).
    pub(crate) fn from_short(words: [u128; 2]) -> Self {
        let mut bytes = [0u8; 64];
        bytes[..16].copy_from_slice(&words[0].to_be_bytes());
        bytes[16..32].copy_from_slice(&words[1].to_be_bytes());
        // Names hold no NUL: the length is where the zero padding starts.
        let pad = if words[1] != 0 {
            words[1].trailing_zeros() / 8
        } else {
            16 + words[0].trailing_zeros() / 8
        };
        bytes[63] = 32 - pad as u8;
        Self { bytes }
    }

    /// The length of the name in bytes.
    pub(crate) fn len(&self) -> usize {
        self.bytes[63] as usize
    }
}

impl PartialEq for ServiceName {
    fn eq(&self, other: &Self) -> bool {
        // Compared as numbers, first 16 bytes first (where most names differ), without a
        // call to `memcmp` for 64 bytes.
        let (a, b) = (self.words(), other.words());
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
    }
}

impl std::hash::Hash for ServiceName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialOrd for ServiceName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ServiceName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.words().cmp(&other.words())
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ServiceName").field(&self.as_str()).finish()
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A priority: 1 is the highest. Lower priorities give up capacity first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(u32);

impl Priority {
    /// The highest priority.
    pub const HIGHEST: Priority = Priority(1);

    /// Checks that `p >= 1`.
    pub fn try_new(p: u32) -> Result<Self, String> {
        if p == 0 {
            Err("must be >= 1 (1 is the highest priority), got 0".into())
        } else {
            Ok(Self(p))
        }
    }

    /// The number (1 = highest).
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How a service's wanted replica count is decided. `S` is the sources' options type
/// ([`SourcePlugins`](crate::plugin::SourcePlugins)).
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceKind<S> {
    /// Demand-driven: the service wants what its triggers ask for (combined by max).
    Triggered(Vec<Trigger<S>>),
    /// A remainder service: it wants all capacity that is left and never evicts anyone.
    Remainder,
    /// One replica on every ready host (Swarm global mode, a Kubernetes DaemonSet).
    PerHost,
}

/// A demand signal of a service. `S` is the sources' options type; the engine never reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger<S> {
    /// The trigger's name, unique within its service (defaults to the source type). Shared
    /// (`Arc`): the control loop hands a clone to each [`TriggerSample`], and the engine
    /// matches a sample to its trigger by pointer before it compares the strings.
    pub name: Arc<str>,
    /// Where the value comes from: the source's validated options.
    pub source: S,
    /// How the value becomes replicas (default: the value is the replica count).
    pub rule: Rule,
    /// No change while `|value / target - 1| <= tolerance` (average and utilisation rules).
    pub tolerance: f64,
    /// The service wakes from zero only when some trigger's value is strictly above its
    /// activation; when no trigger is, it goes to zero (or its min).
    pub activation: f64,
    /// What to do when the trigger keeps failing; `None`: a failing trigger holds the service
    /// (it never scales down on a missing metric), however long it fails.
    pub failure: Option<FailurePolicy>,
}

/// The default tolerance band of a trigger (the HPA's).
pub const DEFAULT_TOLERANCE: f64 = 0.1;

impl<S> Trigger<S> {
    /// The default tolerance band (the HPA's).
    pub const DEFAULT_TOLERANCE: f64 = DEFAULT_TOLERANCE;

    /// A trigger with the default rules: the value is the replica count, activation 0, no
    /// fallback.
    pub fn new(name: impl Into<Arc<str>>, source: S) -> Self {
        Trigger {
            name: name.into(),
            source,
            rule: Rule::Value,
            tolerance: Self::DEFAULT_TOLERANCE,
            activation: 0.0,
            failure: None,
        }
    }
}

/// A validated service. `P` is the plugin set ([`Plugins`]): its sources' options sit in the
/// triggers, its backend's part in `workload`.
#[derive(Debug, Clone, PartialEq)]
pub struct Service<P: Plugins> {
    /// Unique name.
    pub name: ServiceName,
    /// 1 is the highest.
    pub priority: Priority,
    /// Fewest replicas, even under capacity pressure from higher priorities.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Largest change of the replica count in one tick; `None` means unlimited.
    pub max_step: Option<u32>,
    /// How the wanted count is decided.
    pub kind: ServiceKind<P::Source>,
    /// The backend's part of the service: what each replica runs, or which existing
    /// orchestrator object it is.
    pub workload: WorkloadOf<P>,
    /// Time between SIGTERM and SIGKILL when a replica is stopped.
    pub stop_grace: Duration,
    /// The warm pool and what a scale-down does (`[services.pool]`); the default keeps no pool
    /// and stops replicas.
    pub pool: PoolSpec,
    /// What one replica asks for (`resources = { cpu = "250m", memory = "256Mi" }`): required
    /// when capacity is counted in resources; container backends also set it as each replica's
    /// limits.
    pub resources: Option<Resources>,
}

/// What a scale-down of a service does to the replicas it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preempt {
    /// Stop and remove them (their work is lost). The default.
    #[default]
    Stop,
    /// Pause (freeze) them: their memory and work are kept and they resume, as they were, when
    /// the service grows again.
    Pause,
}

/// A service's warm pool: replicas created and paused ahead of demand, so that a scale-up is an
/// unpause (~0.02 s on Docker) instead of a create + start (~0.3 s).
///
/// A paused replica (pooled, or preempted with [`Preempt::Pause`]) is neither running nor
/// pending: the demand rule and convergence never count it. It keeps its memory but uses no
/// CPU; with capacity in slots, it takes a slot only when `paused_takes_slot` says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolSpec {
    /// Paused replicas kept ready to unpause (0: no pool).
    pub size: u32,
    /// What a scale-down does to the replicas given up.
    pub preempt: Preempt,
    /// Whether each paused replica of this service takes a capacity slot (default: no; a paused
    /// replica holds memory, not CPU).
    pub paused_takes_slot: bool,
}

impl PoolSpec {
    /// True when the service keeps paused replicas at all (a pool, or pause on preemption).
    pub fn pauses(&self) -> bool {
        self.size > 0 || self.preempt == Preempt::Pause
    }
}

impl<P: Plugins> Service<P> {
    /// True for a remainder service.
    pub fn is_remainder(&self) -> bool {
        matches!(self.kind, ServiceKind::Remainder)
    }
}

/// The cluster's capacity: slots (one replica takes one slot), or the hosts' CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// A fixed total, whatever the hosts.
    Slots(u32),
    /// This many slots on every ready host.
    SlotsPerHost(u32),
    /// Each ready host's CPU and memory, less this reserve per host; every service's replica
    /// asks for its `resources`, and the engine plans where they fit.
    Resources {
        /// Kept free on every host (for the system, the orchestrator's agents).
        reserve: Resources,
    },
}

impl Capacity {
    /// Total slots given the observed hosts; 0 when capacity is counted in resources (the
    /// engine places replicas on hosts then, and counts no slots).
    pub fn slots(&self, hosts: &[Host]) -> u32 {
        match *self {
            Capacity::Slots(n) => n,
            Capacity::SlotsPerHost(n) => {
                n.saturating_mul(hosts.iter().filter(|h| h.ready).count() as u32)
            }
            Capacity::Resources { .. } => 0,
        }
    }
}

/// CPU and memory: what one replica asks for, or what a host has free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Resources {
    /// CPU in thousandths of a core (Kubernetes' millicores).
    pub cpu_milli: u64,
    /// Memory in bytes.
    pub memory: u64,
}

impl Resources {
    /// Nothing.
    pub const ZERO: Resources = Resources {
        cpu_milli: 0,
        memory: 0,
    };

    /// Whether `self` fits in `free`, in every dimension.
    pub fn fits(&self, free: &Resources) -> bool {
        self.cpu_milli <= free.cpu_milli && self.memory <= free.memory
    }

    /// `self - other`, each dimension at least zero.
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.saturating_sub(other.cpu_milli),
            memory: self.memory.saturating_sub(other.memory),
        }
    }

    /// `self + other`, saturating.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.saturating_add(other.cpu_milli),
            memory: self.memory.saturating_add(other.memory),
        }
    }

    /// `n` times `self`, saturating.
    pub fn times(self, n: u32) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.saturating_mul(u64::from(n)),
            memory: self.memory.saturating_mul(u64::from(n)),
        }
    }

    /// What a host can give: its CPUs and memory less `reserve`; `None` when the backend does
    /// not know them (the host then takes nothing).
    pub fn of_host(host: &Host, reserve: Resources) -> Option<Resources> {
        let cpus = host.cpus.filter(|c| c.is_finite() && *c >= 0.0)?;
        let total = Resources {
            cpu_milli: (cpus * 1000.0).round() as u64,
            memory: host.memory_bytes?,
        };
        Some(total.saturating_sub(reserve))
    }

    /// Parses a CPU quantity: cores (`2`, `0.5`) or millicores (`250m`).
    pub fn parse_cpu(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let (number, scale) = match t.strip_suffix('m') {
            Some(n) => (n, 1.0),
            None => (t, 1000.0),
        };
        match number.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => {
                let milli = v * scale;
                if (milli - milli.round()).abs() > 1e-6 {
                    Err(format!(
                        "{text:?} is finer than a millicore (1m = 0.001 CPU)"
                    ))
                } else {
                    Ok(milli.round() as u64)
                }
            }
            _ => Err(format!(
                "{text:?} is not a CPU quantity: cores (\"0.5\", \"2\") or millicores (\"250m\")"
            )),
        }
    }

    /// Parses a memory quantity: bytes, or with a suffix `Ki`, `Mi`, `Gi`, `Ti` (powers of
    /// 1024) or `k`, `M`, `G`, `T` (powers of 1000), as Kubernetes writes them.
    pub fn parse_memory(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let units: [(&str, f64); 8] = [
            ("Ki", 1024.0),
            ("Mi", 1024.0 * 1024.0),
            ("Gi", 1024.0 * 1024.0 * 1024.0),
            ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
            ("k", 1e3),
            ("M", 1e6),
            ("G", 1e9),
            ("T", 1e12),
        ];
        let (number, scale) = units
            .iter()
            .find_map(|(suffix, scale)| t.strip_suffix(suffix).map(|n| (n, *scale)))
            .unwrap_or((t, 1.0));
        match number.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 && v * scale < u64::MAX as f64 => {
                Ok((v * scale).round() as u64)
            }
            _ => Err(format!(
                "{text:?} is not a memory quantity: bytes, or a number with Ki, Mi, Gi, Ti (or k, M, G, T), like \"256Mi\""
            )),
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpu = self.cpu_milli as f64 / 1000.0;
        let mib = self.memory as f64 / (1024.0 * 1024.0);
        let memory = if mib >= 1024.0 {
            format!("{} GiB", trim(mib / 1024.0))
        } else {
            format!("{} MiB", trim(mib))
        };
        write!(f, "{} CPU and {memory}", trim(cpu))
    }
}

/// A number with at most 3 decimals, without trailing zeros.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A host's id as its orchestrator knows it (a Swarm node id, a Kubernetes Node's name, an
/// ECS container instance ARN, the Docker engine's id): what replicas refer to. Shown to people
/// only through the host's name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostId(pub String);

impl HostId {
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for HostId {
    fn from(s: String) -> Self {
        HostId(s)
    }
}

impl From<&str> for HostId {
    fn from(s: &str) -> Self {
        HostId(s.to_string())
    }
}

/// A host of the cluster as a backend reports it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Host {
    /// The orchestrator's id of the host; replicas refer to it.
    pub id: HostId,
    /// Human-readable name, for people (the dashboard, logs).
    pub name: String,
    /// Whether replicas can be placed on it.
    pub ready: bool,
    /// CPUs, if known.
    pub cpus: Option<f64>,
    /// Memory in bytes, if known.
    pub memory_bytes: Option<u64>,
}

/// Replica counts of one service as observed from the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceObservation {
    /// Replicas running.
    pub running: u32,
    /// Replicas asked for but not running yet (created, starting, being scheduled).
    pub pending: u32,
    /// Of `pending`, the replicas no host can take (Kubernetes' `Unschedulable`, a Nomad
    /// blocked evaluation, a Swarm task with no suitable node).
    pub unschedulable: u32,
    /// Replicas that failed (exited with an error, crash-looping, rejected) and hold no
    /// capacity; in neither `running` nor `pending`.
    pub failed: u32,
    /// The count the orchestrator itself wants now (Swarm's replicas, a Deployment's
    /// `spec.replicas`, an ECS `desiredCount`), for service-level backends: when someone else
    /// changes it, this shows it. `None` for container-level backends, which keep no count.
    pub orchestrator_wants: Option<u32>,
    /// Whether the orchestrator has caught up with the last change (its observed generation,
    /// a finished deployment). Always true for container-level backends.
    pub caught_up: bool,
}

impl Default for ServiceObservation {
    fn default() -> Self {
        ServiceObservation {
            running: 0,
            pending: 0,
            unschedulable: 0,
            failed: 0,
            orchestrator_wants: None,
            caught_up: true,
        }
    }
}

impl ServiceObservation {
    /// `running` and `pending` replicas, caught up, nothing else to report.
    pub fn counts(running: u32, pending: u32) -> Self {
        ServiceObservation {
            running,
            pending,
            ..ServiceObservation::default()
        }
    }

    /// Replicas that occupy capacity.
    pub fn total(&self) -> u32 {
        self.running + self.pending
    }
}

/// Everything observed in one tick.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// Per service; a missing service counts as zero replicas.
    pub services: BTreeMap<ServiceName, ServiceObservation>,
    /// The hosts of the cluster.
    pub hosts: Vec<Host>,
    /// Where the replicas are (running, pending on a host, or stopping: each holds its
    /// resources until it is gone), per host and service. Read only when capacity is counted
    /// in resources.
    pub placement: BTreeMap<HostId, BTreeMap<ServiceName, u32>>,
    /// Per-host services the orchestrator runs on some hosts only (an ECS service limited to
    /// the container instances a cluster query matches): the hosts each may run on. A
    /// per-host service not in it runs on every ready host.
    pub runs_on: BTreeMap<ServiceName, Vec<HostId>>,
}

impl Observed {
    /// The observation of `name`, zero if absent.
    pub fn service(&self, name: &ServiceName) -> ServiceObservation {
        self.services.get(name).copied().unwrap_or_default()
    }

    /// Number of ready hosts.
    pub fn ready_hosts(&self) -> u32 {
        self.hosts.iter().filter(|h| h.ready).count() as u32
    }
}

/// One trigger's value in one tick: `None` when the sample failed or timed out.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerSample {
    /// Name of the trigger: best a clone of [`Trigger::name`], which the engine matches
    /// without reading the string.
    pub trigger: Arc<str>,
    /// The value, or `None` when missing.
    pub value: Option<f64>,
}

/// The samples of one tick, per service (in the order of its triggers).
///
/// Kept as one row per service in the order they were added, all the values in one buffer: a
/// tick adds every service's samples with two allocations in all, not one per service. The
/// engine matches rows to services by position when they come in the configuration's order
/// (as the control loop adds them; services without samples may be left out), and by name
/// otherwise.
#[derive(Clone, Default)]
pub struct Samples {
    /// Per service: its name and where its samples end in `values`.
    rows: Vec<(ServiceName, u32)>,
    values: Vec<TriggerSample>,
}

impl Samples {
    /// Room for `services` services and `samples` samples in all.
    pub fn with_capacity(services: usize, samples: usize) -> Self {
        Samples {
            rows: Vec::with_capacity(services),
            values: Vec::with_capacity(samples),
        }
    }

    /// Adds the samples of `service`, which must not have any yet (the control loop's way: no
    /// lookup). Of a service added twice, the engine reads the last.
    pub fn push(&mut self, service: ServiceName, samples: impl IntoIterator<Item = TriggerSample>) {
        self.values.extend(samples);
        self.rows.push((service, self.values.len() as u32));
    }

    /// Sets the samples of `service`, replacing any it had (a lookup: for tests and tools).
    pub fn insert(
        &mut self,
        service: ServiceName,
        samples: impl IntoIterator<Item = TriggerSample>,
    ) {
        if let Some(at) = self.rows.iter().rposition(|(n, _)| *n == service) {
            let (from, to) = self.range(at);
            let new: Vec<TriggerSample> = samples.into_iter().collect();
            let grew = new.len() as i64 - (to - from) as i64;
            self.values.splice(from..to, new);
            for row in &mut self.rows[at..] {
                row.1 = (row.1 as i64 + grew) as u32;
            }
        } else {
            self.push(service, samples);
        }
    }

    /// Sets a single-trigger service's value (convenient in tests and the demo).
    pub fn set(&mut self, service: &ServiceName, trigger: &str, value: Option<f64>) {
        self.insert(
            service.clone(),
            [TriggerSample {
                trigger: trigger.into(),
                value,
            }],
        );
    }

    /// Where row `at`'s samples are in `values`.
    fn range(&self, at: usize) -> (usize, usize) {
        let from = at.checked_sub(1).map_or(0, |p| self.rows[p].1 as usize);
        (from, self.rows[at].1 as usize)
    }

    /// The samples of `service` (the last added), if it has any.
    pub fn get(&self, service: &ServiceName) -> Option<&[TriggerSample]> {
        let at = self.rows.iter().rposition(|(n, _)| n == service)?;
        let (from, to) = self.range(at);
        Some(&self.values[from..to])
    }

    /// The samples of `service` (the last added), to change in place.
    pub fn get_mut(&mut self, service: &ServiceName) -> Option<&mut [TriggerSample]> {
        let at = self.rows.iter().rposition(|(n, _)| n == service)?;
        let (from, to) = self.range(at);
        Some(&mut self.values[from..to])
    }

    /// Every service's samples, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (&ServiceName, &[TriggerSample])> {
        let mut from = 0;
        self.rows.iter().map(move |(name, to)| {
            let to = *to as usize;
            let values = &self.values[from..to];
            from = to;
            (name, values)
        })
    }

    /// Every service's samples, in the order they were added, to change in place.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&ServiceName, &mut [TriggerSample])> {
        let mut rest = &mut self.values[..];
        let mut from = 0;
        self.rows.iter().map(move |(name, to)| {
            let to = *to as usize;
            let (values, tail) = std::mem::take(&mut rest).split_at_mut(to - from);
            rest = tail;
            from = to;
            (name, values)
        })
    }

    /// How many services have samples (a service added twice counts twice).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no service has samples.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Shown as a map from each service to its samples, in the order they were added.
impl fmt::Debug for Samples {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Equal when every service has the same samples, whatever the order they were added in.
impl PartialEq for Samples {
    fn eq(&self, other: &Self) -> bool {
        fn by_name(s: &Samples) -> BTreeMap<&ServiceName, &[TriggerSample]> {
            s.iter().collect()
        }
        by_name(self) == by_name(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::try_new(s).unwrap()
    }

    fn row(values: &[f64]) -> Vec<TriggerSample> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| TriggerSample {
                trigger: format!("t{i}").into(),
                value: Some(*v),
            })
            .collect()
    }

    fn values(s: &[TriggerSample]) -> Vec<f64> {
        s.iter().filter_map(|t| t.value).collect()
    }

    #[test]
    fn samples_keep_each_services_row_and_insert_replaces_it() {
        let mut s = Samples::default();
        s.push(name("a"), row(&[1.0]));
        s.push(name("b"), row(&[2.0, 3.0]));
        s.push(name("c"), row(&[4.0]));
        // Replaced by a longer row, then a shorter one: the rows after it stay whole.
        s.insert(name("b"), row(&[5.0, 6.0, 7.0]));
        assert_eq!(values(s.get(&name("b")).unwrap()), [5.0, 6.0, 7.0]);
        assert_eq!(values(s.get(&name("c")).unwrap()), [4.0]);
        s.insert(name("a"), row(&[]));
        assert_eq!(values(s.get(&name("a")).unwrap()), Vec::<f64>::new());
        assert_eq!(values(s.get(&name("b")).unwrap()), [5.0, 6.0, 7.0]);
        s.set(&name("d"), "t0", Some(8.0));
        let all: Vec<(String, Vec<f64>)> =
            s.iter().map(|(n, r)| (n.to_string(), values(r))).collect();
        assert_eq!(
            all,
            [
                ("a".to_string(), vec![]),
                ("b".to_string(), vec![5.0, 6.0, 7.0]),
                ("c".to_string(), vec![4.0]),
                ("d".to_string(), vec![8.0]),
            ]
        );
        for (_, r) in s.iter_mut() {
            for t in r {
                t.value = t.value.map(|v| v * 10.0);
            }
        }
        assert_eq!(values(s.get(&name("b")).unwrap()), [50.0, 60.0, 70.0]);
        if let Some(r) = s.get_mut(&name("c")) {
            r[0].value = None;
        }
        assert_eq!(s.get(&name("c")).unwrap()[0].value, None);
        assert_eq!(s.get(&name("e")), None);
        assert_eq!(s.len(), 4);
        let shown = format!("{s:?}");
        assert!(
            shown.starts_with("{ServiceName(\"a\"): [], ServiceName(\"b\"): [TriggerSample {"),
            "{shown}"
        );
    }

    #[test]
    fn samples_are_equal_whatever_the_order_they_were_added_in() {
        let mut a = Samples::default();
        a.push(name("a"), row(&[1.0]));
        a.push(name("b"), row(&[2.0]));
        let mut b = Samples::with_capacity(2, 2);
        b.push(name("b"), row(&[2.0]));
        b.push(name("a"), row(&[1.0]));
        assert_eq!(a, b);
        b.insert(name("a"), row(&[9.0]));
        assert_ne!(a, b);
        // Of a service added twice, the last counts.
        let mut c = a.clone();
        c.push(name("a"), row(&[9.0]));
        assert_eq!(c, b);
        assert_eq!(values(c.get(&name("a")).unwrap()), [9.0]);
    }
}
