//! What the server knows, as plain serialisable values: the configuration as the dashboard
//! shows it, and one [`Tick`] per pass of the control loop.
//!
//! The server does not depend on the binary crate (which depends on it): the binary turns its
//! tick report into a [`Tick`] with [`Tick::build`], from the core's plan and the backend's
//! observation.

use std::collections::BTreeMap;
use std::time::Duration;

use microscaler_backends::{Config, Observation, ReplicaState};
use microscaler_core::{Plan, Samples, ServiceKind, SourcePlugins};
use serde::{Deserialize, Serialize};

/// A service as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceInfo {
    /// Name.
    pub name: String,
    /// Priority (1 = highest).
    pub priority: u32,
    /// `triggered`, `remainder` or `per_host`.
    pub kind: String,
    /// Fewest replicas.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Largest change per tick, if limited.
    pub max_step: Option<u32>,
    /// Its triggers.
    pub triggers: Vec<TriggerInfo>,
    /// Its warm pool: paused replicas kept ready (0: none).
    #[serde(default)]
    pub pool_size: u32,
    /// What a scale-down does: `stop` or `pause`.
    #[serde(default = "default_preempt")]
    pub preempt: String,
    /// What one replica asks for (`resources`), if set.
    #[serde(default)]
    pub resources: Option<ResourcesInfo>,
}

/// CPU and memory.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ResourcesInfo {
    /// CPUs (0.25 for 250m).
    pub cpu: f64,
    /// Bytes.
    pub memory: u64,
}

fn default_preempt() -> String {
    "stop".into()
}

/// A trigger as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TriggerInfo {
    /// Name (unique within the service).
    pub name: String,
    /// Source type (`random`, `manual`, ...).
    pub source: String,
}

/// What the server shows of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Setup {
    /// Instance name.
    pub instance: String,
    /// Backend kind (`docker`, `swarm`, `process`).
    pub backend: String,
    /// Tick period in milliseconds.
    pub tick_ms: u64,
    /// True when started by `microscaler demo`.
    pub demo: bool,
    /// The services, in configuration order.
    pub services: Vec<ServiceInfo>,
}

impl Setup {
    /// The setup of `cfg` running on `backend`.
    pub fn from_config(cfg: &Config, backend: &str, demo: bool) -> Setup {
        Setup {
            instance: cfg.instance.clone(),
            backend: backend.to_string(),
            tick_ms: cfg.tick.as_millis() as u64,
            demo,
            services: cfg
                .services
                .iter()
                .map(|s| ServiceInfo {
                    name: s.name.to_string(),
                    priority: s.priority.get(),
                    kind: match &s.kind {
                        ServiceKind::Triggered(_) => "triggered",
                        ServiceKind::Remainder => "remainder",
                        ServiceKind::PerHost => "per_host",
                    }
                    .to_string(),
                    min: s.min,
                    max: s.max,
                    max_step: s.max_step,
                    triggers: match &s.kind {
                        ServiceKind::Triggered(ts) => ts
                            .iter()
                            .map(|t| TriggerInfo {
                                name: t.name.to_string(),
                                source: t.source.type_name().to_string(),
                            })
                            .collect(),
                        _ => Vec::new(),
                    },
                    pool_size: s.pool.size,
                    preempt: match s.pool.preempt {
                        microscaler_core::Preempt::Stop => "stop",
                        microscaler_core::Preempt::Pause => "pause",
                    }
                    .to_string(),
                    resources: s.resources.map(|r| ResourcesInfo {
                        cpu: r.cpu_milli as f64 / 1000.0,
                        memory: r.memory,
                    }),
                })
                .collect(),
        }
    }
}

/// One service in a tick.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceTick {
    /// Name.
    pub name: String,
    /// Priority.
    pub priority: u32,
    /// Remainder service?
    pub remainder: bool,
    /// Demand (max over triggers), if any.
    pub demand: Option<f64>,
    /// Target after this tick (desired).
    pub target: u32,
    /// Running, observed at the start of the tick.
    pub running: u32,
    /// Pending, observed at the start of the tick.
    pub pending: u32,
    /// Paused (the warm pool, and replicas preempted with `preempt = "pause"`), observed at the
    /// start of the tick: neither running nor pending.
    #[serde(default)]
    pub paused: u32,
    /// The rule with the last word (the plan's `Bound` name).
    pub bound: String,
    /// Why the target is what it is.
    pub reason: String,
}

/// One action of a tick's plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    /// Wall-clock time of the tick, Unix milliseconds.
    pub ts: i64,
    /// `start` or `stop`.
    pub kind: String,
    /// The service.
    pub service: String,
    /// How many replicas.
    pub count: u32,
    /// Target before.
    pub from: u32,
    /// Target after.
    pub to: u32,
    /// The rule that decided it (the plan's `Bound` name).
    pub bound: String,
    /// The reason in words.
    pub reason: String,
}

/// The replicas on one host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostTick {
    /// The orchestrator's id of the host (what replicas refer to).
    pub id: String,
    /// Host name, for people.
    pub name: String,
    /// Ready for replicas?
    pub ready: bool,
    /// The CPUs its replicas may use, if the backend reports them.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// The memory its replicas may use, in bytes, if the backend reports it.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Replicas per service: `[running, pending]`.
    pub services: BTreeMap<String, [u32; 2]>,
}

/// One demand sample of a trigger.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleTick {
    /// The service.
    pub service: String,
    /// The trigger.
    pub trigger: String,
    /// The value, `None` when missing.
    pub value: Option<f64>,
}

/// An error of a tick, with the kind used as a metric label.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TickError {
    /// `observe`, `scale`, `start` (backend) or `sample` (source).
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

/// Everything the server records of one tick.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tick {
    /// Wall-clock time, Unix milliseconds.
    pub ts: i64,
    /// Milliseconds since the loop started.
    pub t_ms: u64,
    /// Capacity in slots (0 when the tick could not decide).
    pub capacity: u32,
    /// Slots not allocated.
    pub free: u32,
    /// Per service, in allocation order.
    pub services: Vec<ServiceTick>,
    /// The plan's actions, in order.
    pub decisions: Vec<Decision>,
    /// Replicas by host.
    pub hosts: Vec<HostTick>,
    /// Demand samples.
    pub samples: Vec<SampleTick>,
    /// Errors.
    pub errors: Vec<TickError>,
    /// Tick duration in milliseconds.
    pub took_ms: f64,
    /// Services an operator paused.
    pub paused: Vec<String>,
}

/// The parts of a tick report, borrowed, for [`Tick::build`].
pub struct TickParts<'a> {
    /// Wall-clock time, Unix milliseconds.
    pub ts: i64,
    /// Time since the loop started.
    pub now: Duration,
    /// What was observed.
    pub observed: Option<&'a Observation>,
    /// The samples.
    pub samples: &'a Samples,
    /// The plan.
    pub plan: Option<&'a Plan>,
    /// Errors, each with its kind.
    pub errors: Vec<TickError>,
    /// How long the tick took.
    pub took: Duration,
    /// Paused services.
    pub paused: Vec<String>,
}

impl Tick {
    /// Builds the tick from the control loop's parts.
    pub fn build(p: TickParts<'_>) -> Tick {
        let (capacity, free, services, decisions) = match p.plan {
            Some(plan) => (
                plan.capacity,
                plan.free(),
                plan.services
                    .iter()
                    .map(|s| ServiceTick {
                        name: s.service.to_string(),
                        priority: s.priority.get(),
                        remainder: s.remainder,
                        demand: s.demand,
                        target: s.target,
                        running: s.running,
                        pending: s.pending,
                        paused: s.paused,
                        bound: s.bound.as_str().to_string(),
                        reason: s.reason.to_string(),
                    })
                    .collect(),
                plan.actions
                    .iter()
                    .map(|a| Decision {
                        ts: p.ts,
                        kind: match a.kind {
                            microscaler_core::ActionKind::Start => "start",
                            microscaler_core::ActionKind::Stop => "stop",
                        }
                        .to_string(),
                        service: a.service.to_string(),
                        count: a.count,
                        from: a.from,
                        to: a.to,
                        bound: a.bound.as_str().to_string(),
                        reason: a.reason.to_string(),
                    })
                    .collect(),
            ),
            None => (0, 0, Vec::new(), Vec::new()),
        };
        let mut hosts: Vec<HostTick> = Vec::new();
        if let Some(o) = p.observed {
            for h in &o.hosts {
                hosts.push(HostTick {
                    id: h.id.to_string(),
                    name: h.name.clone(),
                    ready: h.ready,
                    cpus: h.cpus,
                    memory_bytes: h.memory_bytes,
                    services: BTreeMap::new(),
                });
            }
            for r in &o.replicas {
                // Replicas name their host by id; a host the observation did not list (a node
                // that just left, a task not placed yet) gets a card of its own.
                let idx = match hosts.iter().position(|h| h.id == r.host.as_str()) {
                    Some(i) => i,
                    None => {
                        hosts.push(HostTick {
                            id: r.host.to_string(),
                            name: if r.host.as_str().is_empty() {
                                "(not placed yet)".to_string()
                            } else {
                                r.host.to_string()
                            },
                            ready: true,
                            cpus: None,
                            memory_bytes: None,
                            services: BTreeMap::new(),
                        });
                        hosts.len() - 1
                    }
                };
                let e = hosts[idx]
                    .services
                    .entry(r.service.to_string())
                    .or_default();
                match r.state {
                    ReplicaState::Running => e[0] += 1,
                    ReplicaState::Pending => e[1] += 1,
                    ReplicaState::Stopping => {}
                }
            }
        }
        let samples = p
            .samples
            .iter()
            .flat_map(|(svc, ts)| {
                ts.iter().map(move |t| SampleTick {
                    service: svc.to_string(),
                    trigger: t.trigger.to_string(),
                    value: t.value,
                })
            })
            .collect();
        Tick {
            ts: p.ts,
            t_ms: p.now.as_millis() as u64,
            capacity,
            free,
            services,
            decisions,
            hosts,
            samples,
            errors: p.errors,
            took_ms: p.took.as_secs_f64() * 1000.0,
            paused: p.paused,
        }
    }
}

/// A point of the history: one tick reduced to what the charts draw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryPoint {
    /// Wall-clock time, Unix milliseconds.
    pub ts: i64,
    /// Capacity in slots.
    pub capacity: u32,
    /// Per service.
    pub services: BTreeMap<String, HistoryService>,
}

/// A service in a history point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryService {
    /// Demand, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub demand: Option<f64>,
    /// Running.
    pub running: u32,
    /// Pending.
    pub pending: u32,
    /// Desired (target).
    pub desired: u32,
}

impl HistoryPoint {
    /// The history point of `t`.
    pub fn of(t: &Tick) -> HistoryPoint {
        HistoryPoint {
            ts: t.ts,
            capacity: t.capacity,
            services: t
                .services
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        HistoryService {
                            demand: s.demand,
                            running: s.running,
                            pending: s.pending,
                            desired: s.target,
                        },
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use microscaler_backends::Replica;
    use microscaler_core::{Host, ServiceName};

    /// Replicas refer to their host by id (a Swarm node id), hosts carry a name: each host is
    /// shown once, by its name, with its replicas.
    #[test]
    fn hosts_are_joined_by_id_and_shown_by_name() {
        let host = |id: &str, name: &str| Host {
            id: id.into(),
            name: name.into(),
            ready: true,
            ..Host::default()
        };
        let replica = |id: &str, host: &str, state| Replica {
            id: id.into(),
            service: ServiceName::try_new("web").unwrap(),
            host: host.into(),
            state,
        };
        let sized = Host {
            cpus: Some(1.5),
            memory_bytes: Some(1 << 30),
            ..host("n1x9", "node-a")
        };
        let observed = Observation {
            hosts: vec![sized, host("n2y8", "node-b")],
            replicas: vec![
                replica("t1", "n1x9", ReplicaState::Running),
                replica("t2", "n1x9", ReplicaState::Pending),
                replica("t3", "n2y8", ReplicaState::Running),
                replica("t4", "", ReplicaState::Pending),
            ],
            ..Observation::default()
        };
        let tick = Tick::build(TickParts {
            ts: 0,
            now: Duration::ZERO,
            observed: Some(&observed),
            samples: &Samples::default(),
            plan: None,
            errors: Vec::new(),
            took: Duration::ZERO,
            paused: Vec::new(),
        });
        let shown: Vec<(&str, [u32; 2])> = tick
            .hosts
            .iter()
            .map(|h| {
                (
                    h.name.as_str(),
                    h.services.get("web").copied().unwrap_or([0, 0]),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("node-a", [1, 1]),
                ("node-b", [1, 0]),
                ("(not placed yet)", [0, 1])
            ]
        );
        // A host's room is shown as the backend reports it.
        let room: Vec<_> = tick
            .hosts
            .iter()
            .map(|h| (h.cpus, h.memory_bytes))
            .collect();
        assert_eq!(
            room,
            [(Some(1.5), Some(1 << 30)), (None, None), (None, None)]
        );
    }
}
