//! The output of one decision: a target per service and the ordered actions that reach it, every
//! one with its reason.

use std::fmt;

use crate::model::{Priority, ServiceName};

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
    pub reason: String,
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
    pub reason: String,
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
