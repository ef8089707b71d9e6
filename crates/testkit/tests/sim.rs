//! The simulated orchestrator passes the backend contract suite, in both of its modes, and
//! its faults behave as documented. It is in memory on purpose: it is what the control loop's
//! tests run on; the real backends run the same suite against the real engines.

use std::time::Duration;

use microscaler_backends::{Backend, BackendError, ErrorClass};
use microscaler_testkit::contract::{self, Harness};
use microscaler_testkit::service;
use microscaler_testkit::sim::{Level, Sim, SimOptions};

struct SimHarness(Sim);

impl Harness for SimHarness {
    type B = Sim;

    async fn connect(&self) -> Sim {
        self.0.clone()
    }

    async fn add_foreign(&self, replicas: u32) {
        self.0.add_foreign("app", replicas);
    }

    async fn foreign_running(&self) -> u32 {
        self.0.foreign_running("app")
    }

    async fn remove_foreign(&self) {}

    async fn unreachable(&self) -> Option<Result<Sim, BackendError>> {
        let sim = Sim::default();
        sim.set_unreachable(true);
        Some(Ok(sim))
    }

    fn settle(&self) -> Duration {
        Duration::from_secs(2)
    }
}

#[tokio::test(start_paused = true)]
async fn container_level_sim_passes_the_contract() {
    let h = SimHarness(Sim::default());
    contract::run(&h, &service("a", vec![]), &service("b", vec![])).await;
}

#[tokio::test(start_paused = true)]
async fn service_level_sim_passes_the_contract() {
    let h = SimHarness(Sim::new(SimOptions {
        level: Level::Service,
        ..SimOptions::default()
    }));
    contract::run(&h, &service("a", vec![]), &service("b", vec![])).await;
}

/// Faults, many times over in virtual time: start failures are reported per replica, conflicts
/// and throttles are typed, a replica killed behind microscaler's back is gone from the next
/// observation, and a host that leaves takes its replicas with it.
#[tokio::test(start_paused = true)]
async fn faults_are_reported_as_documented() {
    let sim = Sim::default();
    let a = service("a", vec![]);
    for round in 0..200u32 {
        sim.fail_starts("a", 1);
        let out = sim.scale(&a, 2).await.unwrap();
        assert_eq!((out.started, out.failures.len()), (1, 1), "round {round}");
        sim.conflict_next(1);
        let e = sim.scale(&a, 2).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Conflict);
        sim.throttle_next(1);
        assert_eq!(
            sim.scale(&a, 2).await.unwrap_err().class(),
            ErrorClass::Throttled
        );
        sim.scale(&a, 2).await.unwrap();
        assert_eq!(sim.observe().await.unwrap().services[&a.name].running, 2);
        sim.kill("a", 1);
        assert_eq!(sim.observe().await.unwrap().services[&a.name].running, 1);
        sim.scale(&a, 0).await.unwrap();
    }
    sim.scale(&a, 3).await.unwrap();
    sim.set_host_ready("host-0", false);
    let obs = sim.observe().await.unwrap();
    assert_eq!(
        obs.services[&a.name].running, 2,
        "host-0's replica went with it"
    );
    assert!(obs.hosts.iter().any(|h| h.name == "host-0" && !h.ready));
    sim.set_unreachable(true);
    assert_eq!(
        sim.observe().await.unwrap_err().class(),
        ErrorClass::Unreachable
    );
}

/// A replica that ignores SIGTERM takes its service's whole stop grace to stop.
#[tokio::test(start_paused = true)]
async fn a_replica_that_ignores_sigterm_takes_its_grace() {
    let sim = Sim::default();
    let mut a = service("a", vec![]);
    a.stop_grace = Duration::from_secs(10);
    sim.scale(&a, 1).await.unwrap();
    sim.ignore_sigterm("a", true);
    let t0 = tokio::time::Instant::now();
    sim.scale(&a, 0).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(10));
    sim.ignore_sigterm("a", false);
    sim.scale(&a, 1).await.unwrap();
    let t0 = tokio::time::Instant::now();
    sim.scale(&a, 0).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_millis(50));
}
