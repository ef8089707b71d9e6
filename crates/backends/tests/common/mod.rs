//! Shared by the backend tests: the rule for missing services, unique names, and the contract
//! suite every backend must pass.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use microscaler_backends::{Backend, Observation};
use microscaler_backends::{RunSpec, Service, Workload};
use microscaler_core::{Priority, ServiceKind, ServiceName};

/// Under `CI=true` a missing service fails the test; elsewhere the test says why it is skipped.
/// A test never passes by skipping in CI.
pub fn missing_service(what: &str, err: impl std::fmt::Display) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{what} is required under CI=true but is not available: {err}");
    }
    eprintln!("SKIPPED: {what} not available ({err}); run the test command (scripts/test.sh) as root to start it");
    true
}

/// A name unique to this test run, valid as an instance or service name.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{:x}-{}",
        std::process::id(),
        nanos & 0xfffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A triggered service running the built-in replica (or `command` when not empty).
pub fn service(name: &str, command: Vec<String>) -> Service {
    Service {
        name: ServiceName::try_new(name).unwrap(),
        priority: Priority::HIGHEST,
        min: 0,
        max: 100,
        max_step: None,
        kind: ServiceKind::Triggered(vec![]),
        workload: Workload::Managed(RunSpec {
            image: None,
            command,
            env: Default::default(),
        }),
        stop_grace: Duration::from_secs(5),
        pool: Default::default(),
    }
}

/// Polls `observe` until `check` holds or `timeout` passes; returns the last observation.
pub async fn wait_for<B: Backend>(
    backend: &B,
    timeout: Duration,
    check: impl Fn(&Observation) -> bool,
) -> Observation {
    let start = Instant::now();
    loop {
        let obs = backend.observe().await.expect("observe");
        if check(&obs) || start.elapsed() > timeout {
            return obs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Running replicas of `svc` in `obs`.
pub fn running(obs: &Observation, svc: &Service) -> u32 {
    obs.services.get(&svc.name).map_or(0, |o| o.running)
}

/// The contract every backend passes: prepare, scale up, observe, scale down, scale to zero,
/// and shutdown with removal leaves nothing behind. `settle` is how long the orchestrator may
/// take to converge (0.x s for containers and processes, longer for Swarm).
pub async fn contract<B: Backend>(backend: &B, services: &[Service], settle: Duration) {
    backend.prepare(services).await.expect("prepare");
    let a = &services[0];
    let b = &services[1];

    let out = backend.scale(a, 3).await.expect("scale a to 3");
    assert!(out.failures.is_empty(), "failures: {:?}", out.failures);
    backend.scale(b, 2).await.expect("scale b to 2");
    let obs = wait_for(backend, settle, |o| {
        running(o, a) == 3 && running(o, b) == 2
    })
    .await;
    assert_eq!(running(&obs, a), 3, "{obs:?}");
    assert_eq!(running(&obs, b), 2, "{obs:?}");
    assert!(!obs.hosts.is_empty(), "a backend reports at least one host");
    assert!(obs.hosts.iter().any(|h| h.ready));

    // Idempotent at target.
    let out = backend.scale(a, 3).await.expect("scale a to 3 again");
    assert_eq!((out.started, out.stopped), (0, 0), "{out:?}");

    backend.scale(a, 1).await.expect("scale a to 1");
    let obs = wait_for(backend, settle, |o| running(o, a) == 1).await;
    assert_eq!(running(&obs, a), 1, "{obs:?}");
    assert_eq!(running(&obs, b), 2, "scaling a must not touch b: {obs:?}");

    backend.scale(b, 0).await.expect("scale b to 0");
    let obs = wait_for(backend, settle, |o| running(o, b) == 0).await;
    assert_eq!(running(&obs, b), 0, "{obs:?}");

    backend.shutdown(services, true).await.expect("shutdown");
    let obs = wait_for(backend, settle, |o| o.replicas.is_empty()).await;
    assert!(
        obs.replicas.is_empty(),
        "shutdown(remove) leaves nothing: {obs:?}"
    );
}
