//! Plan time of the decision engine alone: 10,000 services on 1,000 hosts.
//!
//! `cargo bench -p microscaler-core --bench plan`. The same workload is timed by
//! `cargo run --release -p bench -- plan` (crates/bench/src/plan.rs builds it the same way), so
//! the benchmark command can report it next to the Docker figures; results are in BENCHMARKS.md.
//!
//! The workload: 9,990 demand-driven services (priorities 1 to 10) and 10 remainder services on
//! 1,000 ready hosts with 20 slots each. The engine's memory is that of a converged tick; in the
//! measured tick one service in ten sees its demand move, so the plan has real actions and
//! preemptions, not an idle pass.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use microscaler_core::{
    decide, EngineState, Host, Observed, Samples, ServiceObservation, TriggerSample,
};

use microscaler_core::plugin::opaque::{self, Opaque};

type Config = microscaler_core::Config<Opaque>;
type ServiceKind = microscaler_core::ServiceKind<opaque::Source>;

const SERVICES: usize = 10_000;
const REMAINDER: usize = 10;
const HOSTS: usize = 1_000;
const SLOTS_PER_HOST: u32 = 20;

/// The workload; with `resources`, capacity in CPU and memory: every replica 1 CPU and 1 GiB on
/// hosts of 20 CPUs and 64 GiB (the same 20 replicas per host as the slots).
fn config(resources: bool) -> Config {
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

fn hosts() -> Vec<Host> {
    (0..HOSTS)
        .map(|i| Host {
            id: format!("h{i}").into(),
            name: format!("host-{i}"),
            ready: true,
            cpus: Some(SLOTS_PER_HOST as f64),
            memory_bytes: Some(64 << 30),
        })
        .collect()
}

/// Demand of triggered service `i` in round `round`: 0 to 3, one service in ten moves per round.
fn demand(i: usize, round: usize) -> f64 {
    let moved = if i % 10 == round % 10 { round } else { 0 };
    ((i + moved) % 4) as f64
}

/// The samples of round `round` as the control loop builds them: one per trigger, in the
/// trigger's order, carrying a clone of the trigger's shared name.
fn samples(cfg: &Config, round: usize) -> Samples {
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

/// A converged tick: (observed, memory) after deciding round 0 and running its targets.
fn converged(cfg: &Config) -> (Observed, EngineState) {
    let mut observed = Observed {
        placement: Default::default(),
        runs_on: Default::default(),
        services: Default::default(),
        hosts: hosts(),
    };
    let (plan, memory) = decide(
        cfg,
        &observed,
        &samples(cfg, 0),
        &EngineState::default(),
        Duration::ZERO,
    );
    // Placed first fit, 20 per host (read only with capacity in resources).
    let (mut host, mut room) = (0, SLOTS_PER_HOST);
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
    (observed, memory)
}

fn bench_plan(c: &mut Criterion) {
    let cfg = config(false);
    let (observed, memory) = converged(&cfg);
    let next = samples(&cfg, 1);
    let now = Duration::from_secs(1);
    let mut g = c.benchmark_group("plan");
    g.sample_size(30);
    g.bench_function("decide 10000 services on 1000 hosts", |b| {
        b.iter(|| decide(black_box(&cfg), &observed, &next, &memory, now))
    });
    g.bench_function("first tick 10000 services on 1000 hosts", |b| {
        let empty = Observed {
            placement: Default::default(),
            runs_on: Default::default(),
            services: Default::default(),
            hosts: observed.hosts.clone(),
        };
        b.iter(|| decide(black_box(&cfg), &empty, &next, &EngineState::default(), now))
    });
    let res = config(true);
    let (observed, memory) = converged(&res);
    // Its own samples: they carry clones of its own triggers' names, as the control loop's do.
    let next = samples(&res, 1);
    g.bench_function("decide 10000 services on 1000 hosts, CPU and memory", |b| {
        b.iter(|| decide(black_box(&res), &observed, &next, &memory, now))
    });
    g.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
