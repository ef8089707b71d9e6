//! Prometheus metrics, in the text exposition format, written by hand (a few gauges,
//! counters and one histogram do not need a library).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::model::Tick;

/// A service's latest (desired, running, pending, demand).
type Gauges = (u32, u32, u32, Option<f64>);

/// A gauge: name, help, and how to read it from a service's [`Gauges`].
type GaugeDef = (&'static str, &'static str, fn(&Gauges) -> Option<f64>);

/// Upper bounds of the tick duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Counters and the latest gauges, updated once per tick.
#[derive(Debug, Default)]
pub struct Metrics {
    ticks: u64,
    capacity: u32,
    /// service -> (desired, running, pending, demand)
    services: BTreeMap<String, Gauges>,
    /// (service, bound) -> count of actions
    decisions: BTreeMap<(String, String), u64>,
    /// kind -> count
    errors: BTreeMap<String, u64>,
    /// Cumulative counts per bucket, then +Inf.
    buckets: [u64; BUCKETS.len()],
    duration_sum: f64,
    /// (service, trigger) -> wall-clock ms of the last sample with a value
    last_sample: BTreeMap<(String, String), i64>,
}

impl Metrics {
    /// Counts `t`.
    pub fn observe(&mut self, t: &Tick) {
        self.ticks += 1;
        if t.capacity > 0 {
            self.capacity = t.capacity;
        }
        for s in &t.services {
            self.services
                .insert(s.name.clone(), (s.target, s.running, s.pending, s.demand));
        }
        for d in &t.decisions {
            *self
                .decisions
                .entry((d.service.clone(), d.bound.clone()))
                .or_default() += 1;
        }
        for e in &t.errors {
            *self.errors.entry(e.kind.clone()).or_default() += 1;
        }
        let secs = t.took_ms / 1000.0;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i] += 1;
            }
        }
        self.duration_sum += secs;
        for s in &t.samples {
            let key = (s.service.clone(), s.trigger.clone());
            if s.value.is_some() {
                self.last_sample.insert(key, t.ts);
            } else {
                self.last_sample.entry(key).or_insert(i64::MIN);
            }
        }
    }

    /// The exposition text at wall-clock time `now_ms`. `sources` maps (service, trigger) to
    /// the trigger's source type.
    pub fn render(&self, now_ms: i64, sources: &BTreeMap<(String, String), String>) -> String {
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut o,
            "microscaler_ticks_total",
            "counter",
            "Ticks of the control loop.",
        );
        let _ = writeln!(o, "microscaler_ticks_total {}", self.ticks);
        head(
            &mut o,
            "microscaler_capacity_slots",
            "gauge",
            "Capacity of the cluster in slots.",
        );
        let _ = writeln!(o, "microscaler_capacity_slots {}", self.capacity);
        let gauges: [GaugeDef; 4] = [
            (
                "microscaler_replicas_desired",
                "Replicas the plan wants per service.",
                |v| Some(v.0 as f64),
            ),
            (
                "microscaler_replicas_running",
                "Replicas observed running per service.",
                |v| Some(v.1 as f64),
            ),
            (
                "microscaler_replicas_pending",
                "Replicas observed pending per service.",
                |v| Some(v.2 as f64),
            ),
            (
                "microscaler_demand",
                "Demand per service (max over its triggers), in replicas.",
                |v| v.3,
            ),
        ];
        for (name, help, get) in gauges {
            head(&mut o, name, "gauge", help);
            for (svc, v) in &self.services {
                if let Some(x) = get(v) {
                    let _ = writeln!(o, "{name}{{service=\"{}\"}} {x}", esc(svc));
                }
            }
        }
        head(
            &mut o,
            "microscaler_decisions_total",
            "counter",
            "Actions taken, by service and reason (the rule that decided it).",
        );
        for ((svc, bound), n) in &self.decisions {
            let _ = writeln!(
                o,
                "microscaler_decisions_total{{service=\"{}\",reason=\"{}\"}} {n}",
                esc(svc),
                esc(bound)
            );
        }
        head(
            &mut o,
            "microscaler_backend_errors_total",
            "counter",
            "Errors by kind: observe, scale, start (backend) and sample (demand sources).",
        );
        for (kind, n) in &self.errors {
            let _ = writeln!(
                o,
                "microscaler_backend_errors_total{{kind=\"{}\"}} {n}",
                esc(kind)
            );
        }
        head(
            &mut o,
            "microscaler_tick_duration_seconds",
            "histogram",
            "Duration of one tick (observe, sample, decide, act).",
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "microscaler_tick_duration_seconds_bucket{{le=\"{b}\"}} {}",
                self.buckets[i]
            );
        }
        let _ = writeln!(
            o,
            "microscaler_tick_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            self.ticks
        );
        let _ = writeln!(
            o,
            "microscaler_tick_duration_seconds_sum {}",
            self.duration_sum
        );
        let _ = writeln!(o, "microscaler_tick_duration_seconds_count {}", self.ticks);
        head(
            &mut o,
            "microscaler_demand_sample_age_seconds",
            "gauge",
            "Time since the last demand sample with a value, per trigger (+Inf if none yet).",
        );
        for ((svc, trig), at) in &self.last_sample {
            let age = if *at == i64::MIN {
                "+Inf".to_string()
            } else {
                format!("{}", (now_ms - at).max(0) as f64 / 1000.0)
            };
            let src = sources
                .get(&(svc.clone(), trig.clone()))
                .map_or("unknown", String::as_str);
            let _ = writeln!(
                o,
                "microscaler_demand_sample_age_seconds{{service=\"{}\",trigger=\"{}\",source=\"{}\"}} {age}",
                esc(svc),
                esc(trig),
                esc(src)
            );
        }
        o
    }
}

/// Escapes a label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
