//! The control loop on the test kit's simulated orchestrator ([`microscaler_testkit::sim`]),
//! on tokio's paused clock.
//!
//! The orchestrator is simulated on purpose: these tests are about the loop's own behaviour
//! (order of execution, backoff after failed starts, the rest of the plan going on, pauses,
//! wake-ups). The real backends are tested against the real Docker engine, Swarm and
//! processes in their own crate, and the whole binary end to end in `demo.rs`.

use std::time::Duration;

use microscaler::control::Controller;
use microscaler_backends::Config;
use microscaler_core::config::OnExit;
use microscaler_core::ServiceName;
use microscaler_testkit::sim::{Sim, SimOptions};

fn config(extra: &str) -> Config {
    config_on("process", extra)
}

/// Web (priority 1, manual, 4) and a batch remainder on 9 slots; `extra` ends batch's table.
fn config_on(backend: &str, extra: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        tick = "500ms"
        [capacity]
        slots = 9
        [backend]
        type = "{backend}"
        [[services]]
        name = "web"
        priority = 1
        [[services.triggers]]
        type = "manual"
        initial = 4
        [[services]]
        name = "batch"
        priority = 2
        remainder = true
        {extra}
        "#
    ))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn stops_before_starts_and_fills_capacity() {
    let sim = Sim::default();
    let mut ctl = Controller::new(config(""), sim.clone(), 1);
    ctl.tick().await;
    assert_eq!((sim.running("web"), sim.running("batch")), (4, 5));

    ctl.controls().manual_of("web").unwrap().set(7.0).unwrap();
    sim.clear_log();
    tokio::time::advance(Duration::from_millis(500)).await;
    let report = ctl.tick().await;
    assert_eq!(
        sim.calls(),
        vec![("batch".to_string(), 2), ("web".to_string(), 7)],
        "capacity is freed before it is used"
    );
    assert_eq!(
        sim.spans(),
        ["begin batch", "end batch", "begin web", "end web"],
        "the stop ends before the start begins"
    );
    assert_eq!((sim.running("web"), sim.running("batch")), (7, 2));
    let plan = report.plan.unwrap();
    assert!(
        plan.actions[1].reason.contains("took 3 slots from batch"),
        "{:?}",
        plan.actions
    );
}

#[tokio::test(start_paused = true)]
async fn failed_starts_back_off_and_the_rest_goes_on() {
    let sim = Sim::default();
    // Every start of web fails until mended.
    sim.fail_starts("web", u32::MAX);
    let mut ctl = Controller::new(config(""), sim.clone(), 1);

    let r = ctl.tick().await;
    assert_eq!(sim.running("batch"), 5, "batch started despite web failing");
    assert_eq!(sim.replicas("web"), 0);
    let outcome = |service: &str| {
        let e = r
            .executions
            .iter()
            .find(|e| e.service.as_str() == service)
            .unwrap_or_else(|| panic!("{service}'s change reported"));
        let o = e.result.as_ref().expect("a scale that ran");
        (o.started, o.failures.len())
    };
    assert_eq!(outcome("web"), (0, 4), "each of web's starts failed");
    assert_eq!(outcome("batch"), (5, 0));

    // Within the backoff (0.5 s after the first failure) web is not retried.
    sim.clear_log();
    tokio::time::advance(Duration::from_millis(100)).await;
    ctl.tick().await;
    assert!(
        !sim.calls().iter().any(|(s, _)| s == "web"),
        "{:?}",
        sim.calls()
    );

    // After it, web is retried; once the engine works again it converges.
    sim.fail_starts("web", 0);
    tokio::time::advance(Duration::from_millis(600)).await;
    ctl.tick().await;
    assert_eq!(sim.calls(), [("web".to_string(), 4)]);
    assert_eq!((sim.running("web"), sim.running("batch")), (4, 5));
}

#[tokio::test(start_paused = true)]
async fn repairs_replicas_that_vanished() {
    let sim = Sim::default();
    let mut ctl = Controller::new(config(""), sim.clone(), 1);
    ctl.tick().await;
    // Someone removes two web replicas behind microscaler's back.
    sim.kill("web", 2);
    sim.clear_log();
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!(
        sim.calls(),
        [("web".to_string(), 4)],
        "only web is repaired"
    );
    assert_eq!((sim.running("web"), sim.running("batch")), (4, 5));
}

#[tokio::test(start_paused = true)]
async fn shutdown_honours_on_exit() {
    let sim = Sim::default();
    let mut ctl = Controller::new(config(""), sim.clone(), 1);
    ctl.tick().await;
    ctl.shutdown().await.unwrap();
    assert_eq!(
        (sim.replicas("web"), sim.replicas("batch")),
        (4, 5),
        "on_exit = leave keeps replicas"
    );

    let sim = Sim::default();
    let cfg = Config {
        on_exit: OnExit::Stop,
        ..config("")
    };
    let mut ctl = Controller::new(cfg, sim.clone(), 1);
    ctl.tick().await;
    assert_eq!((sim.replicas("web"), sim.replicas("batch")), (4, 5));
    ctl.shutdown().await.unwrap();
    assert_eq!(
        (sim.replicas("web"), sim.replicas("batch")),
        (0, 0),
        "on_exit = stop removes them"
    );
}

/// Every example configuration in `examples/` validates.
#[test]
fn examples_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&p).unwrap();
            if let Err(e) = Config::from_toml(&text) {
                panic!("{} is invalid:\n{e}", p.display());
            }
            n += 1;
        }
    }
    assert!(n >= 3, "expected an example per backend, found {n}");
}

#[tokio::test(start_paused = true)]
async fn pause_holds_a_service_until_resumed() {
    let sim = Sim::default();
    let mut ctl = Controller::new(config(""), sim.clone(), 1);
    ctl.tick().await;
    let batch = ServiceName::try_new("batch").unwrap();
    ctl.controls().set_paused(&batch, true);
    ctl.controls().manual_of("web").unwrap().set(7.0).unwrap();
    sim.clear_log();
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!(sim.running("batch"), 5, "paused batch is not preempted");
    assert_eq!(sim.running("web"), 4);
    assert!(sim.calls().is_empty(), "{:?}", sim.calls());
    ctl.controls().set_paused(&batch, false);
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!((sim.running("web"), sim.running("batch")), (7, 2));
}

/// A pushed demand change (a manual source, set through the CLI or the API) is acted on at once,
/// not at the next tick: with a 60 s tick, a change made 50 ms after the first tick began is
/// applied well within a second (on the real clock, with the simulated orchestrator's
/// latencies).
#[tokio::test]
async fn a_manual_change_wakes_the_loop_at_once() {
    let sim = Sim::default();
    let cfg = Config {
        tick: Duration::from_secs(60),
        ..config("")
    };
    let mut ctl = Controller::new(cfg, sim.clone(), 1);
    let handle = ctl.controls().manual_of("web").unwrap().clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        handle.set(7.0).unwrap();
    });
    let mut ticks = 0;
    microscaler::control::run_loop(
        &mut ctl,
        tokio::time::sleep(Duration::from_millis(800)),
        |_| ticks += 1,
    )
    .await;
    assert_eq!(ticks, 2, "the first tick, then one woken by the change");
    assert_eq!((sim.running("web"), sim.running("batch")), (7, 2));
}

/// A random walk's move is acted on when it happens: with a 60 s tick and a walk that moves
/// every 2 s, the loop ticks at each move (paused clock: exactly at it), not a minute later.
#[tokio::test(start_paused = true)]
async fn a_random_walk_wakes_the_loop_when_it_moves() {
    let sim = Sim::default();
    let cfg = Config::from_toml(
        r#"
        tick = "60s"
        [capacity]
        slots = 9
        [backend]
        type = "process"
        [[services]]
        name = "web"
        priority = 1
        [[services.triggers]]
        type = "random"
        delta = 3
        interval = "2s"
        seed = 7
        "#,
    )
    .unwrap();
    let mut ctl = Controller::new(cfg, sim.clone(), 1);
    let mut began = Vec::new();
    microscaler::control::run_loop(
        &mut ctl,
        tokio::time::sleep(Duration::from_millis(6_500)),
        |r| began.push(r.now.as_millis()),
    )
    .await;
    assert_eq!(
        began,
        vec![0, 2_000, 4_000, 6_000],
        "the first tick, then one beginning at each move"
    );
}

/// An operator's demand overrides the random walk until cleared (the demo's dashboard): with
/// a walk and a manual trigger (demand = their max), a manual demand below the walk brings the
/// service down to it and keeps it there while the walk's moves come and go; cleared, the walk
/// walks on from that value and the manual trigger is back to 0.
#[tokio::test(start_paused = true)]
async fn an_operators_demand_overrides_the_random_walk_until_cleared() {
    let sim = Sim::default();
    let cfg = Config::from_toml(
        r#"
        tick = "500ms"
        [capacity]
        slots = 9
        [backend]
        type = "process"
        [[services]]
        name = "web"
        priority = 1
        [[services.triggers]]
        type = "random"
        delta = 3
        interval = "1s"
        initial = 7
        seed = 7
        [[services.triggers]]
        name = "manual"
        type = "manual"
        "#,
    )
    .unwrap();
    let mut ctl = Controller::new(cfg, sim.clone(), 1);
    ctl.tick().await;
    assert_eq!(sim.running("web"), 7, "the walk starts at 7");
    let controls = ctl.controls().clone();
    controls.override_demand("web", 2.0).unwrap();
    assert!(controls.overriding("web"));
    for _ in 0..10 {
        ctl.tick().await;
        assert_eq!(sim.running("web"), 2, "held at the operator's demand");
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    controls.clear_demand("web").unwrap();
    assert!(!controls.overriding("web"));
    assert_eq!(controls.manual_of("web").unwrap().get(), 0.0);
    let mut seen = Vec::new();
    for _ in 0..20 {
        ctl.tick().await;
        seen.push(sim.running("web"));
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    let first_move = seen.iter().find(|&&v| v != 2).copied();
    assert!(first_move.is_some(), "the walk moves again: {seen:?}");
    assert!(
        first_move.is_some_and(|v| v <= 5),
        "its first move is from the held 2 (±3): {seen:?}"
    );
}

/// Scale-downs that stop replicas finish before any scale-up begins; the scale-down of a
/// `preempt = "pause"` service (a pause frees no memory) runs alongside the scale-ups instead.
#[tokio::test(start_paused = true)]
async fn pauses_run_alongside_starts_stops_before_them() {
    // The simulated orchestrator's default latencies: a start 200 ms, a stop 50 ms.
    let SimOptions {
        start_latency,
        stop_latency,
        ..
    } = SimOptions::default();
    for (preempt, together) in [("stop", false), ("pause", true)] {
        // `preempt = "pause"` is refused on the process backend; the simulated orchestrator
        // stands for docker.
        let cfg = config_on(
            "docker",
            &format!("[services.pool]\npreempt = \"{preempt}\""),
        );
        let sim = Sim::default();
        let mut ctl = Controller::new(cfg, sim.clone(), 1);
        ctl.tick().await;
        sim.clear_log();
        ctl.controls().manual_of("web").unwrap().set(7.0).unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        let report = ctl.tick().await;
        let expected = if together {
            ["begin batch", "begin web", "end batch", "end web"]
        } else {
            ["begin batch", "end batch", "begin web", "end web"]
        };
        assert_eq!(sim.spans(), expected, "preempt = {preempt}");
        assert_eq!((sim.running("web"), sim.running("batch")), (7, 2));
        assert_eq!(report.phases.starts, start_latency, "preempt = {preempt}");
        if together {
            assert_eq!(report.phases.stops, Duration::ZERO, "nothing stopped first");
        } else {
            assert_eq!(report.phases.stops, stop_latency);
        }
    }
}

/// A second priority-1 service on a manual trigger (ends batch's table).
const API: &str = r#"
    [[services]]
    name = "api"
    priority = 1
    [[services.triggers]]
    type = "manual"
    initial = 1
    "#;

/// Triggers of the same name share one copy of it, so the samples of thousands of services
/// carry clones of a few names rather than one each.
#[tokio::test(start_paused = true)]
async fn samples_share_their_trigger_names() {
    let mut ctl = Controller::new(config(API), Sim::default(), 1);
    let report = ctl.tick().await;
    let name = |s: &str| {
        report
            .samples
            .get(&ServiceName::try_new(s).unwrap())
            .unwrap()[0]
            .trigger
            .clone()
    };
    let (web, api) = (name("web"), name("api"));
    assert_eq!((&*web, &*api), ("manual", "manual"));
    assert!(std::sync::Arc::ptr_eq(&web, &api), "one shared name");
}

/// After a reload, a service left unchanged keeps its live sources, and its samples carry the
/// new configuration's trigger names (which the engine matches by pointer).
#[tokio::test(start_paused = true)]
async fn a_reload_hands_unchanged_triggers_the_new_names() {
    let mut ctl = Controller::new(config(""), Sim::default(), 1);
    ctl.tick().await;
    ctl.reload(config(API)).await.expect("the reload is taken");
    let report = ctl.tick().await;
    let web = ServiceName::try_new("web").unwrap();
    let sampled = report.samples.get(&web).unwrap()[0].trigger.clone();
    let microscaler_core::ServiceKind::Triggered(ts) = &ctl.config().service("web").unwrap().kind
    else {
        panic!("web has triggers");
    };
    assert!(std::sync::Arc::ptr_eq(&sampled, &ts[0].name));
}
