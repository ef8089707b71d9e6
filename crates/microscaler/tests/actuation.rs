//! Per-service actuation, on the test kit's simulated orchestrator and tokio's paused clock.
//!
//! The orchestrator is simulated on purpose: these tests are about the control loop's own
//! dispatching (a slow stop never holds up another service, no two changes for one service,
//! backoff by error class). The real backends are tested against the real engines in their
//! own crate.

use std::time::Duration;

use microscaler::control::{Controller, TickError};
use microscaler_backends::{Config, ErrorClass};
use microscaler_testkit::sim::{Level, Sim, SimOptions};

/// B (priority 1, manual demand) and A (a priority 2 remainder) on 4 slots.
fn config(a_grace: &str) -> Config {
    config_with(a_grace, "")
}

/// [`config`] with `top` (top-level keys) first.
fn config_with(a_grace: &str, top: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        {top}
        tick = "500ms"
        [capacity]
        slots = 4
        [backend]
        type = "process"
        [[services]]
        name = "b"
        priority = 1
        [[services.triggers]]
        type = "manual"
        initial = 1
        [[services]]
        name = "a"
        priority = 2
        remainder = true
        stop_grace = "{a_grace}"
        "#
    ))
    .expect("valid")
}

fn sim() -> Sim {
    Sim::new(SimOptions {
        start_latency: Duration::from_millis(100),
        stop_latency: Duration::from_millis(20),
        ..SimOptions::default()
    })
}

/// A's replicas ignore SIGTERM with `stop_grace = "10s"` while B's demand rises: A gives up
/// its slots at once, B's scale-up starts within one tick, the loop keeps its period, and A's
/// slow stop is reported when it ends.
#[tokio::test(start_paused = true)]
async fn a_slow_stop_never_holds_up_another_service() {
    let sim = sim();
    sim.ignore_sigterm("a", true);
    let mut ctl = Controller::new(config("10s"), sim.clone(), 1);
    ctl.tick().await;
    assert_eq!((sim.running("b"), sim.running("a")), (1, 3));

    ctl.controls().manual_of("b").unwrap().set(3.0).unwrap();
    sim.clear_log();
    tokio::time::advance(Duration::from_millis(500)).await;
    let t0 = tokio::time::Instant::now();
    let report = ctl.tick().await;
    let took = t0.elapsed();
    let spans = sim.spans();
    assert_eq!(
        spans,
        ["begin a", "begin b", "end b"],
        "b starts while a is still stopping"
    );
    assert!(
        took <= Duration::from_millis(600),
        "the tick keeps its period: {took:?}"
    );
    assert_eq!(
        report.phases.stops,
        Duration::from_millis(250),
        "the stops are waited for half a tick period at most"
    );
    assert_eq!(sim.running("b"), 3);
    assert_eq!(ctl.in_flight(), 1, "a's stop goes on in the background");

    // While a's change runs, a gets no other; b still moves at every tick.
    ctl.controls().manual_of("b").unwrap().set(2.0).unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!(sim.running("b"), 2, "b moves while a's stop runs");
    assert_eq!(
        sim.calls().iter().filter(|(s, _)| s == "a").count(),
        1,
        "never two changes for one service at once"
    );

    // A's stop ends after its grace and is reported by the tick that sees it.
    tokio::time::advance(Duration::from_secs(10)).await;
    let report = ctl.tick().await;
    let a = report
        .executions
        .iter()
        .find(|e| e.service.as_str() == "a")
        .expect("a's stop reported");
    assert_eq!(a.result.as_ref().unwrap().stopped, 2);
    // Now a may fill what b left: the slots add up again.
    assert_eq!((sim.replicas("b"), sim.replicas("a")), (2, 2));
}

/// With replicas that stop promptly, the order is the seeds': every stop ends before any
/// start begins.
#[tokio::test(start_paused = true)]
async fn prompt_stops_end_before_starts_begin() {
    let sim = sim();
    let mut ctl = Controller::new(config("10s"), sim.clone(), 1);
    ctl.tick().await;
    ctl.controls().manual_of("b").unwrap().set(3.0).unwrap();
    sim.clear_log();
    tokio::time::advance(Duration::from_millis(500)).await;
    let report = ctl.tick().await;
    assert_eq!(sim.spans(), ["begin a", "end a", "begin b", "end b"]);
    assert_eq!(report.phases.stops, Duration::from_millis(20));
    assert_eq!(ctl.in_flight(), 0);
    assert_eq!((sim.running("b"), sim.running("a")), (3, 1));
}

/// A conflict is retried at the next tick; a throttle backs off for a second or more; neither
/// holds up the other service.
#[tokio::test(start_paused = true)]
async fn backoff_follows_the_error_class() {
    let sim = sim();
    let mut ctl = Controller::new(config("1s"), sim.clone(), 1);
    sim.conflict_next(1);
    let report = ctl.tick().await;
    let failed: Vec<_> = report
        .executions
        .iter()
        .filter_map(|e| {
            e.result
                .as_ref()
                .err()
                .map(|err| (e.service.to_string(), err.class))
        })
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].1, ErrorClass::Conflict);
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!(
        (sim.running("b"), sim.running("a")),
        (1, 3),
        "the conflict was retried at the next tick"
    );

    ctl.controls().manual_of("b").unwrap().set(2.0).unwrap();
    sim.throttle_next(1);
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await; // a's stop is throttled; b waits for the capacity a did not free
    assert_eq!(
        sim.running("b"),
        1,
        "no scale-up into slots a failed stop did not free"
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!(
        sim.running("a"),
        3,
        "a throttled change is not retried within a second"
    );
    for _ in 0..4 {
        tokio::time::advance(Duration::from_millis(500)).await;
        ctl.tick().await;
    }
    assert_eq!((sim.running("b"), sim.running("a")), (2, 2));
}

/// The external changes a tick reported, as (service, ours, theirs, fight?).
fn external(report: &microscaler::control::TickReport) -> Vec<(String, u32, u32, bool)> {
    report
        .errors
        .iter()
        .filter_map(|e| match e {
            TickError::External {
                service,
                ours,
                theirs,
                ..
            } => Some((service.to_string(), *ours, *theirs, e.is_fight())),
            _ => None,
        })
        .collect()
}

/// Someone else changing a service-level orchestrator's count (an HPA, `kubectl scale`) is
/// seen, reported, and undone by the plan; twice within a minute is reported as a fight. The
/// loop's own changes, however many, are never taken for someone else's.
#[tokio::test(start_paused = true)]
async fn someone_else_changing_the_count_is_reported_and_undone() {
    let sim = Sim::new(SimOptions {
        level: Level::Service,
        ..SimOptions::default()
    });
    let mut ctl = Controller::new(config("1s"), sim.clone(), 1);
    let b = ctl.controls().manual_of("b").unwrap().clone();
    let mut tick = async || {
        let r = ctl.tick().await;
        tokio::time::advance(Duration::from_millis(500)).await;
        r
    };
    // microscaler's own changes, many of them: nothing external.
    for demand in [1.0, 3.0, 2.0, 4.0, 0.0, 2.0] {
        b.set(demand).unwrap();
        for _ in 0..4 {
            let r = tick().await;
            assert_eq!(external(&r), [], "demand {demand}");
        }
    }
    assert_eq!((sim.desired("b"), sim.desired("a")), (2, 2));

    sim.scale_externally("b", 4);
    let r = tick().await;
    assert_eq!(external(&r), [("b".into(), 2, 4, false)]);
    assert!(r
        .errors
        .iter()
        .any(|e| e.kind() == "external" && e.to_string().contains("changed to 4 by someone else")));
    for _ in 0..4 {
        let r = tick().await;
        assert_eq!(external(&r), [], "reported once");
    }
    assert_eq!(sim.desired("b"), 2, "the plan set its own count again");
    assert_eq!(sim.running("b"), 2);

    // Again within the minute: a fight.
    sim.scale_externally("b", 0);
    let r = tick().await;
    assert_eq!(external(&r), [("b".into(), 2, 0, true)]);
    assert!(r.errors[0]
        .to_string()
        .contains("fighting another controller"));
    for _ in 0..4 {
        tick().await;
    }
    assert_eq!(sim.desired("b"), 2);

    // A minute later the window has moved on: one change is not a fight.
    tokio::time::advance(Duration::from_secs(61)).await;
    tick().await;
    sim.scale_externally("a", 1);
    let r = tick().await;
    assert_eq!(external(&r), [("a".into(), 2, 1, false)]);
}

/// A follower (leader election lost) observes, decides and reports, and changes nothing, not
/// even at shutdown with `on_exit = "stop"`; once it leads it acts at its next tick.
#[tokio::test(start_paused = true)]
async fn a_follower_changes_nothing_until_it_leads() {
    let sim = sim();
    let mut ctl = Controller::new(config_with("1s", "on_exit = \"stop\""), sim.clone(), 1);
    ctl.tick().await;
    assert_eq!((sim.running("b"), sim.running("a")), (1, 3));
    sim.set_leading(false);
    ctl.controls().manual_of("b").unwrap().set(3.0).unwrap();
    sim.clear_log();
    for _ in 0..5 {
        tokio::time::advance(Duration::from_millis(500)).await;
        let r = ctl.tick().await;
        assert!(!r.leading);
        assert!(r.executions.is_empty());
        let plan = r.plan.expect("a follower still decides");
        assert_eq!(
            plan.services.iter().map(|s| s.target).collect::<Vec<_>>(),
            [3, 1]
        );
    }
    assert!(sim.calls().is_empty(), "{:?}", sim.calls());
    sim.set_leading(true);
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(ctl.tick().await.leading);
    assert_eq!((sim.running("b"), sim.running("a")), (3, 1));
    sim.set_leading(false);
    let keep = sim.clone();
    ctl.shutdown().await.unwrap();
    assert_eq!(keep.replicas("b"), 3, "a follower removes nothing");
    // The same as leader removes them: the check above can fail.
    keep.set_leading(true);
    let ctl = Controller::new(config_with("1s", "on_exit = \"stop\""), keep.clone(), 1);
    ctl.shutdown().await.unwrap();
    assert_eq!(keep.replicas("b"), 0);
}
