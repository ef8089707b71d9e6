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

pub(crate) fn config() -> Config {
    let mut t = format!(
        "instance = \"bench\"\ntick = \"100ms\"\n[capacity]\nslots_per_host = {SLOTS_PER_HOST}\n\
         [backend]\ntype = \"process\"\n"
    );
    for i in 0..SERVICES - REMAINDER {
        t.push_str(&format!(
            "[[services]]\nname = \"svc-{i}\"\npriority = {}\nmax = 8\n\
             [[services.triggers]]\ntype = \"manual\"\n",
            1 + i % 10
        ));
    }
    for i in 0..REMAINDER {
        t.push_str(&format!(
            "[[services]]\nname = \"rest-{i}\"\npriority = 11\nremainder = true\n"
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
            let values = triggers
                .iter()
                .map(|t| TriggerSample {
                    trigger: t.name.clone(),
                    value: Some(demand(i, round)),
                })
                .collect();
            s.services.insert(svc.name.clone(), values);
        }
    }
    s
}

/// Times `decide` `iterations` times on a converged tick with 10% of demands moved.
pub fn run(iterations: usize) -> (Value, Vec<Row>) {
    let cfg = config();
    let mut observed = Observed {
        placement: Default::default(),
        services: Default::default(),
        hosts: (0..HOSTS)
            .map(|i| Host {
                id: format!("h{i}").into(),
                name: format!("host-{i}"),
                ready: true,
                cpus: Some(2.0),
                memory_bytes: None,
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
    for sp in &plan.services {
        observed
            .services
            .insert(sp.service.clone(), ServiceObservation::counts(sp.target, 0));
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
    let d = Dist::new(&times);
    let row = Row::values(
        "plan: 10,000 services, 1,000 hosts",
        format!("p50 {:.2} / max {:.2} ms", d.p50, d.max),
        format!("{TARGET_MS} ms (the issue's target)"),
        ratio(d.p50, TARGET_MS),
        "< 5 ms",
    );
    let v = json!({
        "services": SERVICES, "hosts": HOSTS, "slots_per_host": SLOTS_PER_HOST,
        "actions_in_plan": actions, "iterations": iterations,
        "decide": d.json(), "target_ms": TARGET_MS, "ratio_p50_to_target": ratio(d.p50, TARGET_MS),
    });
    (v, vec![row])
}
