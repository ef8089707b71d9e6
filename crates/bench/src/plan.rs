//! Plan time of the engine alone, timed in the binary: the same workload as the criterion
//! bench in `crates/core/benches/plan.rs` (10,000 services on 1,000 hosts, one service in ten
//! sees its demand move), so the benchmark command reports it next to the Docker figures.

use std::hint::black_box;
use std::time::{Duration, Instant};

use microscaler_backends::Config;
use microscaler_core::{
    decide, EngineState, Host, Observed, Samples, ServiceKind, ServiceObservation, TriggerSample,
};
use serde_json::{json, Value};

use crate::report::{ratio, Dist, Row};

const SERVICES: usize = 10_000;
const REMAINDER: usize = 10;
const HOSTS: usize = 1_000;
const SLOTS_PER_HOST: u32 = 20;
/// The target.
const TARGET_MS: f64 = 5.0;
/// Issue 13's target for the same workload with capacity in CPU and memory.
const RESOURCES_TARGET_MS: f64 = 10.0;

pub(crate) fn config() -> Config {
    config_with(false)
}

/// The workload; with `resources`, capacity in CPU and memory: every replica 1 CPU and 1 GiB,
/// every host 20 CPUs and 64 GiB (so the same 20 replicas per host as the slots).
fn config_with(resources: bool) -> Config {
    let (capacity, backend, each) = if resources {
        (
            "resources = true".to_string(),
            "docker",
            "resources = { cpu = \"1\", memory = \"1Gi\" }\n",
        )
    } else {
        (format!("slots_per_host = {SLOTS_PER_HOST}"), "process", "")
    };
    let mut t = format!(
        "instance = \"bench\"\ntick = \"100ms\"\n[capacity]\n{capacity}\n\
         [backend]\ntype = \"{backend}\"\n"
    );
    for i in 0..SERVICES - REMAINDER {
        t.push_str(&format!(
            "[[services]]\nname = \"svc-{i}\"\npriority = {}\nmax = 8\n{each}\
             [[services.triggers]]\ntype = \"manual\"\n",
            1 + i % 10
        ));
    }
    for i in 0..REMAINDER {
        t.push_str(&format!(
            "[[services]]\nname = \"rest-{i}\"\npriority = 11\nremainder = true\n{each}"
        ));
    }
    Config::from_toml(&t).expect("the benchmark's configuration is valid")
}

pub(crate) fn demand(i: usize, round: usize) -> f64 {
    let moved = if i % 10 == round % 10 { round } else { 0 };
    ((i + moved) % 4) as f64
}

/// The samples of round `round` as the control loop builds them: one per trigger, in the
/// trigger's order, carrying a clone of the trigger's shared name.
pub(crate) fn samples(cfg: &Config, round: usize) -> Samples {
    let mut s = Samples::default();
    for (i, svc) in cfg.services.iter().enumerate() {
        if let ServiceKind::Triggered(triggers) = &svc.kind {
            let values: Vec<TriggerSample> = triggers
                .iter()
                .map(|t| TriggerSample {
                    trigger: t.name.clone(),
                    value: Some(demand(i, round)),
                })
                .collect();
            s.push(svc.name.clone(), values);
        }
    }
    s
}

/// Times `decide` `iterations` times on a converged tick with 10% of demands moved: capacity
/// in slots, then the same workload in CPU and memory (replicas placed where the first tick
/// put them, first fit, 20 per host).
pub fn run(iterations: usize) -> (Value, Vec<Row>) {
    let (slots, slots_actions) = time(false, iterations);
    let (res, res_actions) = time(true, iterations);
    let rows = vec![
        Row::values(
            "plan: 10,000 services, 1,000 hosts",
            format!("p50 {:.2} / max {:.2} ms", slots.p50, slots.max),
            format!("{TARGET_MS} ms (the issue's target)"),
            ratio(slots.p50, TARGET_MS),
            "< 5 ms",
        ),
        Row::values(
            "plan: 10,000 services, 1,000 hosts, CPU and memory",
            format!("p50 {:.2} / max {:.2} ms", res.p50, res.max),
            format!("slots in the same run: p50 {:.2} ms", slots.p50),
            ratio(res.p50, slots.p50),
            "< 10 ms",
        ),
    ];
    let v = json!({
        "services": SERVICES, "hosts": HOSTS, "slots_per_host": SLOTS_PER_HOST,
        "actions_in_plan": slots_actions, "iterations": iterations,
        "decide": slots.json(), "target_ms": TARGET_MS, "ratio_p50_to_target": ratio(slots.p50, TARGET_MS),
        "resources": {
            "actions_in_plan": res_actions, "decide": res.json(),
            "target_ms": RESOURCES_TARGET_MS, "ratio_p50_to_slots": ratio(res.p50, slots.p50),
        },
    });
    (v, rows)
}

fn time(resources: bool, iterations: usize) -> (Dist, usize) {
    let cfg = config_with(resources);
    let mut observed = Observed {
        placement: Default::default(),
        runs_on: Default::default(),
        services: Default::default(),
        hosts: (0..HOSTS)
            .map(|i| Host {
                id: format!("h{i}").into(),
                name: format!("host-{i}"),
                ready: true,
                cpus: Some(SLOTS_PER_HOST as f64),
                memory_bytes: Some(64 << 30),
            })
            .collect(),
    };
    let (plan, memory) = decide(
        &cfg,
        &observed,
        &samples(&cfg, 0),
        &EngineState::default(),
        Duration::ZERO,
    );
    let mut host = 0;
    let mut room = SLOTS_PER_HOST;
    for sp in &plan.services {
        observed
            .services
            .insert(sp.service.clone(), ServiceObservation::counts(sp.target, 0));
        let mut left = sp.target;
        while left > 0 && host < HOSTS {
            let n = left.min(room);
            *observed
                .placement
                .entry(observed.hosts[host].id.clone())
                .or_default()
                .entry(sp.service.clone())
                .or_default() += n;
            left -= n;
            room -= n;
            if room == 0 {
                host += 1;
                room = SLOTS_PER_HOST;
            }
        }
    }
    if !resources {
        observed.placement.clear();
    }
    let next = samples(&cfg, 1);
    let now = Duration::from_secs(1);
    let (plan, _) = decide(&cfg, &observed, &next, &memory, now);
    let actions = plan.actions.len();
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t0 = Instant::now();
        black_box(decide(black_box(&cfg), &observed, &next, &memory, now));
        times.push(t0.elapsed());
    }
    (Dist::new(&times), actions)
}
