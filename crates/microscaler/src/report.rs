//! One line per tick, for people (text) or programs (JSON lines).

use serde::Serialize;

use crate::control::TickReport;

/// A tick as a JSON line.
#[derive(Debug, Serialize)]
pub struct TickLine {
    /// Milliseconds since the loop started.
    pub t_ms: u64,
    /// Capacity in slots.
    pub capacity: u32,
    /// Slots not allocated by the plan.
    pub free: u32,
    /// Per service, in allocation order.
    pub services: Vec<ServiceLine>,
    /// Reasons of the plan's actions, in order.
    pub actions: Vec<String>,
    /// Start failures and other errors.
    pub errors: Vec<String>,
    /// Tick duration in milliseconds.
    pub took_ms: f64,
    /// Whether this microscaler could act in this tick (false for a follower of `[ha]` or a
    /// Kubernetes Lease, and in a dry run): a follower changes nothing.
    pub leading: bool,
}

/// A service in a tick line.
#[derive(Debug, Serialize)]
pub struct ServiceLine {
    /// Name.
    pub name: String,
    /// Priority (1 = highest).
    pub priority: u32,
    /// Remainder service?
    pub remainder: bool,
    /// Demand, if any.
    pub demand: Option<f64>,
    /// Target after this tick.
    pub target: u32,
    /// Observed running at the start of the tick.
    pub running: u32,
    /// Observed pending at the start of the tick.
    pub pending: u32,
    /// Observed paused at the start of the tick (the warm pool, and replicas preempted with
    /// `preempt = "pause"`): neither running nor pending.
    pub paused: u32,
    /// The rule that had the last word.
    pub bound: &'static str,
}

impl TickLine {
    /// Builds the line of `r`.
    pub fn from_report(r: &TickReport) -> TickLine {
        let mut errors: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        for ex in &r.executions {
            match &ex.result {
                Ok(o) => errors.extend(
                    o.failures
                        .iter()
                        .map(|f| format!("{}: start failed: {}", f.service, f.message)),
                ),
                Err(e) => errors.push(format!("{}: {e}", ex.service)),
            }
        }
        let (capacity, free, services, actions) = match &r.plan {
            Some(p) => (
                p.capacity,
                p.free(),
                p.services
                    .iter()
                    .map(|s| ServiceLine {
                        name: s.service.to_string(),
                        priority: s.priority.get(),
                        remainder: s.remainder,
                        demand: s.demand,
                        target: s.target,
                        running: s.running,
                        pending: s.pending,
                        paused: s.paused,
                        bound: s.bound.as_str(),
                    })
                    .collect(),
                p.actions.iter().map(|a| a.reason.to_string()).collect(),
            ),
            None => (0, 0, Vec::new(), Vec::new()),
        };
        TickLine {
            t_ms: r.now.as_millis() as u64,
            capacity,
            free,
            services,
            actions,
            errors,
            took_ms: r.took.as_secs_f64() * 1000.0,
            leading: r.leading,
        }
    }

    /// The human line: time, then per service `name running/target` (with demand for
    /// triggered ones, and `pool N` when replicas are paused), free slots, and what changed.
    pub fn text(&self) -> String {
        let mut s = format!("[{:>7.1}s]", self.t_ms as f64 / 1000.0);
        for svc in &self.services {
            let pool = if svc.paused > 0 {
                format!(" pool {}", svc.paused)
            } else {
                String::new()
            };
            match svc.demand {
                Some(d) if !svc.remainder => s.push_str(&format!(
                    " {} P{} demand {:>2} run {:>2}/{:<2}{pool}|",
                    svc.name,
                    svc.priority,
                    fmt_num(d),
                    svc.running,
                    svc.target
                )),
                _ => s.push_str(&format!(
                    " {} P{} run {:>2}/{:<2}{pool}|",
                    svc.name, svc.priority, svc.running, svc.target
                )),
            }
        }
        s.push_str(&format!(" free {}", self.free));
        if !self.leading {
            s.push_str(" | not leading");
        }
        if !self.actions.is_empty() {
            s.push_str(" | ");
            s.push_str(&self.actions.join("; "));
        }
        for e in &self.errors {
            s.push_str(" | ERROR ");
            s.push_str(e);
        }
        s
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
