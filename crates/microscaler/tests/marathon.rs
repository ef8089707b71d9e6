//! The control loop on Marathon, against the test kit's fake of Marathon's REST API
//! (`microscaler_testkit::marathon`): no Marathon can run on these machines (it needs a Mesos
//! master and agents, neither packaged nor downloadable here). The fake launches tasks on
//! agents of 3 slots each and locks an app while a deployment of it runs; see its doc comment
//! for what it does not model.

use std::time::Duration;

use microscaler::control::{Controller, TickReport};
use microscaler::wiring::build_backend;
use microscaler_backends::{AnyBackend, Config, ErrorClass};
use microscaler_testkit::marathon::{MarathonFake, MarathonOptions};
use microscaler_testkit::unique;

const TICK: Duration = Duration::from_millis(100);
const CONVERGE: Duration = Duration::from_secs(30);

fn config(address: &str, instance: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "{tick}ms"
        on_exit = "stop"
        [capacity]
        slots = 9
        [backend]
        type = "marathon"
        address = "{address}"
        [[services]]
        name = "p1"
        priority = 1
        image = "registry.k8s.io/pause:3.10"
        [[services.triggers]]
        type = "manual"
        initial = 4
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        image = "registry.k8s.io/pause:3.10"
        "#,
        tick = TICK.as_millis(),
    ))
    .expect("valid configuration")
}

/// Ticks until p1 runs `demand` and p1 + p2 run 9; returns the reports.
async fn converged(ctl: &mut Controller<AnyBackend>, demand: u32) -> Vec<TickReport> {
    let t0 = std::time::Instant::now();
    let mut reports = Vec::new();
    loop {
        let r = ctl.tick().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let (p1, p2) = (r.observed_of("p1"), r.observed_of("p2"));
        let done = p1.running == demand
            && p1.running + p2.running == 9
            && p1.pending + p2.pending == 0
            && p1.caught_up
            && p2.caught_up;
        reports.push(r);
        if done {
            return reports;
        }
        assert!(
            t0.elapsed() < CONVERGE,
            "p1 == {demand}, p1 + p2 == 9 not reached: p1 {p1:?}, p2 {p2:?}"
        );
        tokio::time::sleep(TICK).await;
    }
}

/// p1's app is locked by a deployment (someone restarted it) when its demand rises: the
/// change is a conflict, reported and retried tick after tick without `force`, and goes
/// through once the deployment ends; p2 gave its slots up meanwhile, and the seeds' rule holds
/// again. At the end `on_exit = "stop"` deletes both apps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_during_a_deployment_is_retried_until_it_succeeds_without_force() {
    let fake = MarathonFake::start(MarathonOptions::default()).await;
    for i in 0..3 {
        fake.add_agent(&format!("agent-{i}"), 3);
    }
    let instance = unique("ml");
    let cfg = config(&fake.address(), &instance);
    let state = tempfile::tempdir().expect("state dir");
    let backend = build_backend(&cfg, state.path()).await.expect("backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let demand = ctl.controls().manual_of("p1").expect("p1's manual").clone();
    converged(&mut ctl, 4).await;

    let p1_app = format!("/{instance}/p1");
    fake.lock(&p1_app, Duration::from_secs(3));
    demand.set(7.0).expect("set demand");
    let reports = converged(&mut ctl, 7).await;
    let conflicts = reports
        .iter()
        .flat_map(|r| &r.executions)
        .filter(|ex| ex.service.as_str() == "p1")
        .filter(|ex| {
            ex.result
                .as_ref()
                .is_err_and(|e| e.class == ErrorClass::Conflict)
        })
        .count();
    assert!(conflicts >= 2, "the lock was met and retried: {conflicts}");
    let updates = fake.updates();
    assert!(
        updates.iter().all(|(_, force, _, _)| !force),
        "never forced: {updates:?}"
    );
    assert_eq!(fake.app(&p1_app).unwrap()["instances"], 7);

    ctl.shutdown().await.expect("shutdown");
    for s in ["p1", "p2"] {
        assert!(
            fake.app(&format!("/{instance}/{s}")).is_none(),
            "on_exit = \"stop\" deletes the app of {s}"
        );
    }
}
