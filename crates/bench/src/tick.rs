//! One whole control-loop tick at scale, on the test kit's simulated orchestrator: observe +
//! sample + decide + dispatch for 10,000 services on 1,000 hosts (the plan figure's workload),
//! with about 1,000 services changing every tick. The orchestrator answers at once (no start or
//! stop latency, no per-replica list), so the figure is the loop's own cost; the baseline, in
//! the same run, is `decide` alone on the same configuration.

use std::time::{Duration, Instant};

use microscaler::control::Controller;
use microscaler_core::{decide, EngineState, Observed};
use microscaler_testkit::sim::{Level, Sim, SimOptions};
use serde_json::{json, Value};

use crate::plan::{config, demand, samples};
use crate::report::{ratio, Dist, Row};

/// The target for one tick.
const TARGET_MS: f64 = 10.0;

/// Runs `rounds` measured ticks (after a warm-up) and reports their times.
pub async fn run(rounds: usize) -> (Value, Vec<Row>) {
    let cfg = config();
    let sim = Sim::new(SimOptions {
        level: Level::Container,
        start_latency: Duration::ZERO,
        stop_latency: Duration::ZERO,
        hosts: 1_000,
        list_replicas: false,
        log: false,
    });
    let mut ctl = Controller::new(cfg.clone(), sim.clone(), 1);
    let handles: Vec<_> = cfg
        .services
        .iter()
        .map(|s| {
            ctl.controls()
                .manual
                .get(&(s.name.to_string(), "manual".to_string()))
                .cloned()
        })
        .collect();
    let set_round = |round: usize| {
        for (i, h) in handles.iter().enumerate() {
            if let Some(h) = h {
                // Values are always valid (finite, >= 0).
                let _ = h.set(demand(i, round));
            }
        }
    };
    // Warm-up: converge once.
    set_round(0);
    ctl.tick().await;
    ctl.tick().await;

    let mut ticks = Vec::with_capacity(rounds);
    let mut decides = Vec::with_capacity(rounds);
    let mut actions = Vec::with_capacity(rounds);
    let mut observe = Vec::with_capacity(rounds);
    let mut sample = Vec::with_capacity(rounds);
    let mut dispatch = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        set_round(round);
        let t0 = Instant::now();
        let report = ctl.tick().await;
        ticks.push(t0.elapsed());
        let plan = report.plan.expect("the simulated orchestrator answers");
        actions.push(plan.actions.len());
        decides.push(report.phases.decide);
        observe.push(report.phases.observe);
        sample.push(report.phases.sample);
        dispatch.push(report.phases.stops + report.phases.starts);
    }
    // The baseline: decide alone, on the inputs of a tick like the ones above.
    let observed = sim_view(&sim).await;
    let mut alone = Vec::with_capacity(rounds);
    let memory = EngineState::default();
    let samples = samples(&cfg, rounds + 1);
    let (_, memory) = decide(&cfg, &observed, &samples, &memory, Duration::from_secs(1));
    for _ in 0..rounds {
        let t0 = Instant::now();
        std::hint::black_box(decide(
            &cfg,
            &observed,
            &samples,
            &memory,
            Duration::from_secs(2),
        ));
        alone.push(t0.elapsed());
    }
    let (t, d, a) = (Dist::new(&ticks), Dist::new(&decides), Dist::new(&alone));
    let mean_actions = actions.iter().sum::<usize>() as f64 / actions.len().max(1) as f64;
    let row = Row::values(
        &format!("tick: 10,000 services, {mean_actions:.0} actions (sim)"),
        format!("p50 {:.2} / max {:.2} ms", t.p50, t.max),
        format!("decide alone p50 {:.2} ms; target {TARGET_MS} ms", a.p50),
        ratio(t.p50, TARGET_MS),
        "< 10 ms",
    );
    let v = json!({
        "services": cfg.services.len(), "hosts": 1_000, "rounds": rounds,
        "actions_per_tick_mean": mean_actions,
        "tick": t.json(), "decide_in_tick": d.json(), "decide_alone": a.json(),
        "observe": Dist::new(&observe).json(), "sample": Dist::new(&sample).json(), "dispatch": Dist::new(&dispatch).json(),
        "target_ms": TARGET_MS, "ratio_p50_to_target": ratio(t.p50, TARGET_MS),
        "ratio_p50_to_decide_alone": ratio(t.p50, a.p50),
    });
    (v, vec![row])
}

async fn sim_view(sim: &Sim) -> Observed {
    use microscaler_backends::Backend;
    let o = sim
        .observe()
        .await
        .expect("the simulated orchestrator answers");
    Observed {
        placement: Default::default(),
        runs_on: Default::default(),
        services: o.services,
        hosts: o.hosts,
    }
}
