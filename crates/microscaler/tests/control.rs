//! The control loop against an in-memory backend, on tokio's paused clock.
//!
//! The backend here is a fake on purpose: these tests are about the loop's own behaviour
//! (order of execution, backoff after failed starts, the rest of the plan going on). The real
//! backends are tested against the real Docker engine, Swarm and processes in their own crate,
//! and the whole binary end to end in `demo.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microscaler::control::Controller;
use microscaler_backends::{Backend, BackendError, Observation, ScaleOutcome, StartFailure};
use microscaler_backends::{Config, Service};
use microscaler_core::{Host, ServiceName, ServiceObservation};

#[derive(Default)]
struct FakeState {
    running: BTreeMap<String, u32>,
    /// Services whose starts fail.
    broken: Vec<String>,
    /// Log of (service, target) calls in order.
    calls: Vec<(String, u32)>,
    /// How long each scale takes (none by default).
    delay: Duration,
    /// `begin <service>` and `end <service>` of every scale, in order.
    spans: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Backend for Fake {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn capabilities(&self) -> microscaler_core::Capabilities {
        microscaler_core::Capabilities::CONTAINER_LEVEL
    }
    async fn prepare(&self, _services: &[Service]) -> Result<(), BackendError> {
        Ok(())
    }
    async fn observe(&self) -> Result<Observation, BackendError> {
        let s = self.0.lock().unwrap();
        Ok(Observation {
            services: s
                .running
                .iter()
                .map(|(k, v)| {
                    (
                        ServiceName::try_new(k.clone()).unwrap(),
                        ServiceObservation::counts(*v, 0),
                    )
                })
                .collect(),
            hosts: vec![Host {
                id: "h".into(),
                name: "h".into(),
                ready: true,
                ..Default::default()
            }],
            replicas: vec![],
            paused: Default::default(),
        })
    }
    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        let name = service.name.to_string();
        let delay = {
            let mut s = self.0.lock().unwrap();
            s.spans.push(format!("begin {name}"));
            s.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.0.lock().unwrap();
        s.spans.push(format!("end {name}"));
        s.calls.push((name.clone(), target));
        let cur = *s.running.get(&name).unwrap_or(&0);
        if target > cur && s.broken.contains(&name) {
            return Ok(ScaleOutcome {
                started: 0,
                stopped: 0,
                failures: vec![StartFailure {
                    service: service.name.clone(),
                    message: "exec failed".into(),
                }],
                ..ScaleOutcome::default()
            });
        }
        s.running.insert(name, target);
        Ok(ScaleOutcome {
            started: target.saturating_sub(cur),
            stopped: cur.saturating_sub(target),
            failures: vec![],
            ..ScaleOutcome::default()
        })
    }
    async fn shutdown(&self, _services: &[Service], remove: bool) -> Result<(), BackendError> {
        if remove {
            self.0.lock().unwrap().running.clear();
        }
        Ok(())
    }
}

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
    let fake = Fake::default();
    let mut ctl = Controller::new(config(""), fake.clone(), 1);
    ctl.tick().await;
    assert_eq!(fake.0.lock().unwrap().running["web"], 4);
    assert_eq!(fake.0.lock().unwrap().running["batch"], 5);

    ctl.controls().manual_of("web").unwrap().set(7.0).unwrap();
    fake.0.lock().unwrap().calls.clear();
    tokio::time::advance(Duration::from_millis(500)).await;
    let report = ctl.tick().await;
    let calls = fake.0.lock().unwrap().calls.clone();
    assert_eq!(
        calls,
        vec![("batch".to_string(), 2), ("web".to_string(), 7)],
        "capacity is freed before it is used"
    );
    let plan = report.plan.unwrap();
    assert!(
        plan.actions[1].reason.contains("took 3 slots from batch"),
        "{:?}",
        plan.actions
    );
}

#[tokio::test(start_paused = true)]
async fn failed_starts_back_off_and_the_rest_goes_on() {
    let fake = Fake::default();
    fake.0.lock().unwrap().broken.push("web".into());
    let mut ctl = Controller::new(config(""), fake.clone(), 1);

    let r = ctl.tick().await;
    assert_eq!(
        fake.0.lock().unwrap().running.get("batch"),
        Some(&5),
        "batch started despite web failing"
    );
    let failures: usize = r
        .executions
        .iter()
        .map(|e| e.result.as_ref().map_or(1, |o| o.failures.len()))
        .sum();
    assert_eq!(failures, 1);

    // Within the backoff (0.5 s after the first failure) web is not retried.
    fake.0.lock().unwrap().calls.clear();
    tokio::time::advance(Duration::from_millis(100)).await;
    ctl.tick().await;
    assert!(!fake.0.lock().unwrap().calls.iter().any(|(s, _)| s == "web"));

    // After it, web is retried; once the engine works again it converges.
    fake.0.lock().unwrap().broken.clear();
    tokio::time::advance(Duration::from_millis(600)).await;
    ctl.tick().await;
    assert_eq!(fake.0.lock().unwrap().running.get("web"), Some(&4));
}

#[tokio::test(start_paused = true)]
async fn repairs_replicas_that_vanished() {
    let fake = Fake::default();
    let mut ctl = Controller::new(config(""), fake.clone(), 1);
    ctl.tick().await;
    // Someone removes two web replicas behind microscaler's back.
    fake.0.lock().unwrap().running.insert("web".into(), 2);
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!(fake.0.lock().unwrap().running["web"], 4);
}

#[tokio::test(start_paused = true)]
async fn shutdown_honours_on_exit() {
    let fake = Fake::default();
    let mut ctl = Controller::new(config(""), fake.clone(), 1);
    ctl.tick().await;
    ctl.shutdown().await.unwrap();
    assert_eq!(
        fake.0.lock().unwrap().running.len(),
        2,
        "on_exit = leave keeps replicas"
    );

    let fake = Fake::default();
    let cfg = config("").clone();
    let cfg = Config {
        on_exit: microscaler_core::config::OnExit::Stop,
        ..cfg
    };
    let mut ctl = Controller::new(cfg, fake.clone(), 1);
    ctl.tick().await;
    ctl.shutdown().await.unwrap();
    assert!(
        fake.0.lock().unwrap().running.is_empty(),
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
    let fake = Fake::default();
    let mut ctl = Controller::new(config(""), fake.clone(), 1);
    ctl.tick().await;
    let batch = ServiceName::try_new("batch").unwrap();
    ctl.controls().set_paused(&batch, true);
    ctl.controls().manual_of("web").unwrap().set(7.0).unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!(
        fake.0.lock().unwrap().running["batch"],
        5,
        "paused batch is not preempted"
    );
    assert_eq!(fake.0.lock().unwrap().running["web"], 4);
    ctl.controls().set_paused(&batch, false);
    tokio::time::advance(Duration::from_millis(500)).await;
    ctl.tick().await;
    assert_eq!(fake.0.lock().unwrap().running["web"], 7);
    assert_eq!(fake.0.lock().unwrap().running["batch"], 2);
}

/// A pushed demand change (a manual source, set through the CLI or the API) is acted on at once,
/// not at the next tick: with a 60 s tick, a change made 50 ms after the first tick is applied
/// well within a second.
#[tokio::test]
async fn a_manual_change_wakes_the_loop_at_once() {
    let fake = Fake::default();
    let cfg = Config {
        tick: Duration::from_secs(60),
        ..config("")
    };
    let mut ctl = Controller::new(cfg, fake.clone(), 1);
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
    assert_eq!(fake.0.lock().unwrap().running["web"], 7);
}

/// Scale-downs that stop replicas finish before any scale-up begins; the scale-down of a
/// `preempt = "pause"` service (a pause frees no memory) runs alongside the scale-ups instead.
#[tokio::test(start_paused = true)]
async fn pauses_run_alongside_starts_stops_before_them() {
    for (preempt, together) in [("stop", false), ("pause", true)] {
        // `preempt = "pause"` is refused on the process backend; the fake stands for docker.
        let cfg = config_on(
            "docker",
            &format!("[services.pool]\npreempt = \"{preempt}\""),
        );
        let fake = Fake::default();
        let mut ctl = Controller::new(cfg, fake.clone(), 1);
        ctl.tick().await;
        {
            let mut s = fake.0.lock().unwrap();
            s.delay = Duration::from_millis(10);
            s.spans.clear();
        }
        ctl.controls().manual_of("web").unwrap().set(7.0).unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        let report = ctl.tick().await;
        let spans = fake.0.lock().unwrap().spans.clone();
        let expected = if together {
            ["begin batch", "begin web", "end batch", "end web"]
        } else {
            ["begin batch", "end batch", "begin web", "end web"]
        };
        assert_eq!(spans, expected, "preempt = {preempt}");
        let s = fake.0.lock().unwrap();
        assert_eq!((s.running["web"], s.running["batch"]), (7, 2));
        assert!(report.phases.starts >= Duration::from_millis(10));
        if together {
            assert_eq!(report.phases.stops, Duration::ZERO, "nothing stopped first");
        } else {
            assert!(report.phases.stops >= Duration::from_millis(10));
        }
    }
}
