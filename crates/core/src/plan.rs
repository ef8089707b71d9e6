//! The output of one decision: a target per service and the ordered actions that reach it, every
//! one with its reason.

use std::fmt;
use std::sync::OnceLock;

use crate::model::{HostId, Priority, ServiceName};

/// The rule that had the last word on a service's target this tick. Exported as a metric label
/// and shown in the dashboard, so the names are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bound {
    /// The target is what the demand asked for.
    Demand,
    /// A remainder service takes what capacity is left.
    Remainder,
    /// A per-host service follows the number of ready hosts.
    Hosts,
    /// Clamped up to the service's `min`.
    Min,
    /// Clamped down to the service's `max`.
    Max,
    /// The change was cut to `max_step`.
    MaxStep,
    /// Not enough capacity left for what the service wanted.
    Capacity,
    /// Gave up capacity to a higher priority.
    Preempted,
    /// Held: the previous change has not converged yet.
    Converging,
    /// Held: no demand sample this tick (a missing metric never scales down).
    MissingDemand,
    /// Forced down because the cluster shrank under what is already placed.
    OverCapacity,
    /// Held: an operator paused the service.
    Paused,
    /// Held or moved less: a stabilisation window (the lowest recommendation of the up window,
    /// the highest of the down window).
    Stabilisation,
    /// The change was cut by a rate-limit policy (replicas or percent per period).
    RateLimit,
    /// Kept at or sent to zero because no trigger's value was above its activation, or raised
    /// to one because one was.
    Activation,
    /// Held: the values are within the tolerance band of their targets.
    Tolerance,
    /// A failing trigger's fallback decided.
    Fallback,
}

impl Bound {
    /// Stable snake_case name (metric label, API).
    pub fn as_str(self) -> &'static str {
        match self {
            Bound::Demand => "demand",
            Bound::Remainder => "remainder",
            Bound::Hosts => "hosts",
            Bound::Min => "min",
            Bound::Max => "max",
            Bound::MaxStep => "max_step",
            Bound::Capacity => "capacity",
            Bound::Preempted => "preempted",
            Bound::Converging => "converging",
            Bound::MissingDemand => "missing_demand",
            Bound::OverCapacity => "over_capacity",
            Bound::Paused => "paused",
            Bound::Stabilisation => "stabilisation",
            Bound::RateLimit => "rate_limit",
            Bound::Activation => "activation",
            Bound::Tolerance => "tolerance",
            Bound::Fallback => "fallback",
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePlan {
    /// The service.
    pub service: ServiceName,
    /// Its priority.
    pub priority: Priority,
    /// True for a remainder service.
    pub remainder: bool,
    /// What the demand asked for, before limits (`None` for remainder services and when no
    /// demand sample arrived).
    pub demand: Option<f64>,
    /// The target committed before this tick.
    pub current: u32,
    /// Replicas running, as observed.
    pub running: u32,
    /// Replicas pending, as observed.
    pub pending: u32,
    /// Replicas paused (the warm pool, and replicas preempted with `preempt = "pause"`), as
    /// observed: neither running nor pending.
    pub paused: u32,
    /// The new target.
    pub target: u32,
    /// The rule that had the last word.
    pub bound: Bound,
    /// Human-readable reason for the target.
    pub reason: Reason,
    /// With capacity in CPU and memory, for a service that gives replicas up: the hosts the
    /// placement takes them from, `(host, count)` by host (where a higher priority's room was
    /// made, or where its surplus leaves). A backend that can choose which replicas go
    /// prefers these; empty when the plan has no preference (slots).
    pub remove_from: Vec<(HostId, u32)>,
}

/// What an action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    /// Remove replicas (frees capacity).
    Stop,
    /// Add replicas.
    Start,
}

/// One ordered step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// Start or stop.
    pub kind: ActionKind,
    /// The service.
    pub service: ServiceName,
    /// How many replicas.
    pub count: u32,
    /// Target before.
    pub from: u32,
    /// Target after.
    pub to: u32,
    /// The rule that decided it.
    pub bound: Bound,
    /// Why, in words: "started 2 of web: demand 7 > 5; took 2 slots from batch (priority 2)".
    pub reason: Reason,
}

/// The plan of one tick.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Capacity in slots this tick that replicas can be given: the cluster's, less the slots
    /// paused replicas hold (only those of services whose pool sets `paused_takes_slot`).
    pub capacity: u32,
    /// Sum of all targets (never above `capacity`, unless mins of validated config forbid it).
    pub allocated: u32,
    /// One entry per service, in allocation order (priority, then name; remainder last).
    pub services: Vec<ServicePlan>,
    /// Ordered actions: all stops first, lowest priority first; then starts, highest first.
    pub actions: Vec<Action>,
}

impl Plan {
    /// The plan of `service`.
    pub fn service(&self, name: &str) -> Option<&ServicePlan> {
        self.services.iter().find(|s| s.service.as_str() == name)
    }

    /// Target of `service`, 0 if unknown.
    pub fn target(&self, name: &str) -> u32 {
        self.service(name).map_or(0, |s| s.target)
    }

    /// Slots not allocated.
    pub fn free(&self) -> u32 {
        self.capacity.saturating_sub(self.allocated)
    }
}

/// Why, in words: a service's reason for its target, or an action's. Read it as a string
/// (`&*reason`, [`as_str`](Self::as_str), `Display`).
///
/// A tick gives every service a reason and few are ever shown, so the common ones are kept as
/// what they say (the demand and the current target, the service and what it took) and written
/// when first read, once; equal when their words are.
#[derive(Clone, Default)]
pub struct Reason {
    words: Words,
    text: OnceLock<String>,
}

/// A reason before it is written.
#[derive(Debug, Clone)]
pub(crate) enum Words {
    /// Already written.
    Text(String),
    /// A service whose demand decided: "{asks} {>, < or =} {current}".
    Demand {
        asks: Asks,
        cmp: std::cmp::Ordering,
        current: u32,
    },
    /// An action: "stopped 3 of batch: {reason}", "started 2 of web: {reason}; took 2 slots
    /// from batch (priority 2)".
    Action(Box<ActionWords>),
}

impl Default for Words {
    fn default() -> Self {
        Words::Text(String::new())
    }
}

/// An action's reason before it is written.
#[derive(Debug, Clone)]
pub(crate) struct ActionWords {
    pub(crate) kind: ActionKind,
    pub(crate) count: u32,
    pub(crate) service: ServiceName,
    /// The service's reason.
    pub(crate) reason: Words,
    /// The slots a start took: from whom (and its priority), how many.
    pub(crate) took: Vec<(ServiceName, Priority, u32)>,
}

/// What a triggered service's triggers asked, worded only when a reason is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Asks {
    /// "no demand sample".
    NoSample,
    /// The default rules: "demand 4" (or "demand none").
    Demand(Option<f64>),
    /// Already in words.
    Words(String),
}

impl Asks {
    pub(crate) fn push_to(&self, s: &mut String) {
        match self {
            Asks::NoSample => s.push_str("no demand sample"),
            Asks::Demand(v) => {
                s.push_str("demand ");
                match v {
                    Some(v) => push_num(s, *v),
                    None => s.push_str("none"),
                }
            }
            Asks::Words(w) => s.push_str(w),
        }
    }
}

impl fmt::Display for Asks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Asks::Words(w) => f.write_str(w),
            _ => {
                let mut s = String::new();
                self.push_to(&mut s);
                f.write_str(&s)
            }
        }
    }
}

impl Words {
    fn push_to(&self, s: &mut String) {
        match self {
            Words::Text(t) => s.push_str(t),
            Words::Demand { asks, cmp, current } => {
                asks.push_to(s);
                s.push_str(match cmp {
                    std::cmp::Ordering::Greater => " > ",
                    std::cmp::Ordering::Less => " < ",
                    std::cmp::Ordering::Equal => " = ",
                });
                push_u64(s, u64::from(*current));
            }
            Words::Action(a) => {
                s.push_str(match a.kind {
                    ActionKind::Stop => "stopped ",
                    ActionKind::Start => "started ",
                });
                push_u64(s, u64::from(a.count));
                s.push_str(" of ");
                s.push_str(a.service.as_str());
                s.push_str(": ");
                a.reason.push_to(s);
                for (victim, priority, n) in &a.took {
                    s.push_str("; took ");
                    push_u64(s, u64::from(*n));
                    s.push_str(if *n == 1 {
                        " slot from "
                    } else {
                        " slots from "
                    });
                    s.push_str(victim.as_str());
                    s.push_str(" (priority ");
                    push_u64(s, u64::from(priority.get()));
                    s.push(')');
                }
            }
        }
    }
}

impl Reason {
    pub(crate) fn new(words: Words) -> Self {
        Reason {
            words,
            text: OnceLock::new(),
        }
    }

    /// The empty reason, for a change the plan says nothing of.
    pub fn empty() -> &'static Reason {
        static EMPTY: Reason = Reason {
            words: Words::Text(String::new()),
            text: OnceLock::new(),
        };
        &EMPTY
    }

    /// What it says, before it is written (for an action that repeats it).
    pub(crate) fn words(&self) -> &Words {
        &self.words
    }

    /// The reason as a string slice (written at the first read).
    pub fn as_str(&self) -> &str {
        match &self.words {
            Words::Text(t) => t,
            words => self.text.get_or_init(|| {
                let mut s = String::with_capacity(48);
                words.push_to(&mut s);
                s
            }),
        }
    }
}

impl std::ops::Deref for Reason {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Reason {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for Reason {
    fn from(text: String) -> Self {
        Reason::new(Words::Text(text))
    }
}

impl From<&str> for Reason {
    fn from(text: &str) -> Self {
        Reason::new(Words::Text(text.to_string()))
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> Self {
        match r.words {
            Words::Text(t) => t,
            words => r.text.into_inner().unwrap_or_else(|| {
                let mut s = String::new();
                words.push_to(&mut s);
                s
            }),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for Reason {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Reason {}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Reason {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Reason> for str {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Reason> for &str {
    fn eq(&self, other: &Reason) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Reason> for String {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

/// Appends `v` rounded to three decimals, as `format!("{}", ..)` writes it (integers without
/// the formatting machinery).
pub(crate) fn push_num(s: &mut String, v: f64) {
    let x = (v * 1000.0).round() / 1000.0;
    if x.fract() == 0.0 && x.abs() < 1e15 && !(x == 0.0 && x.is_sign_negative()) {
        let i = x as i64;
        if i < 0 {
            s.push('-');
        }
        push_u64(s, i.unsigned_abs());
    } else {
        use std::fmt::Write;
        let _ = write!(s, "{x}");
    }
}

/// Appends `n` in decimal.
pub(crate) fn push_u64(s: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    s.push_str(std::str::from_utf8(&buf[at..]).unwrap_or_default());
}
