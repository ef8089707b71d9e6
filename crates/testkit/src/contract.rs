//! The backend contract suite: the same cases run against every backend.
//!
//! A backend's test file implements [`Harness`] (how to build the backend again on the same
//! orchestrator, how to make an object microscaler does not own, and one that cannot reach its
//! orchestrator) and calls [`run`]. The cases:
//! - **scale**: up, observe, idempotent at target, down, to zero, without touching another
//!   service; every replica names its host by an observed host's id; shutdown with removal
//!   leaves nothing behind;
//! - **adoption**: a second backend on the same orchestrator and instance (a restarted daemon)
//!   sees the replicas the first one started, and scaling it does not duplicate them;
//! - **foreign objects**: an object of the orchestrator that microscaler does not own is never
//!   counted, scaled or removed, not even by `shutdown(remove)`;
//! - **errors are typed**: a backend that cannot reach its orchestrator says so with the
//!   [`ErrorClass::Unreachable`] class (backends with no orchestrator to lose skip this);
//! - **references** ([`references`], for backends that can reference existing objects): a
//!   referenced object has only its count set, is never removed, and is observed as it is.

use std::future::Future;
use std::time::Duration;

use microscaler_backends::{Backend, ErrorClass, Service, Workload};

use crate::{running, wait_for};

/// What the contract suite needs from a backend's test.
pub trait Harness {
    /// The backend under test.
    type B: Backend;

    /// A backend on the orchestrator under test, for this test's instance. Called twice by
    /// the adoption case: the second is a restarted daemon.
    fn connect(&self) -> impl Future<Output = Self::B>;

    /// Creates an object on the orchestrator that microscaler does not own (a container or
    /// service without our labels, another instance's process), with `replicas` running.
    fn add_foreign(&self, replicas: u32) -> impl Future<Output = ()>;

    /// How many replicas of the foreign object run now.
    fn foreign_running(&self) -> impl Future<Output = u32>;

    /// Removes the foreign object (the end of the test).
    fn remove_foreign(&self) -> impl Future<Output = ()>;

    /// A backend of the same kind that cannot reach its orchestrator, or the error building
    /// it gave (then that error is checked); `None` for a backend that has no orchestrator to
    /// lose (local processes).
    fn unreachable(
        &self,
    ) -> impl Future<Output = Option<Result<Self::B, microscaler_backends::BackendError>>>;

    /// How long the orchestrator may take to converge.
    fn settle(&self) -> Duration;
}

/// Runs every case of the contract against `h`, with two services of this test (`a`, `b`).
pub async fn run<H: Harness>(h: &H, a: &Service, b: &Service) {
    let services = [a.clone(), b.clone()];
    h.add_foreign(1).await;

    let backend = h.connect().await;
    scale(&backend, &services, h.settle()).await;
    adoption(h, &services).await;
    assert_eq!(
        h.foreign_running().await,
        1,
        "an object microscaler does not own is never scaled or removed"
    );
    h.remove_foreign().await;
    errors_are_typed(h).await;
}

/// Scale up, observe, idempotent at target, down, to zero; shutdown(remove) leaves nothing.
pub async fn scale<B: Backend>(backend: &B, services: &[Service], settle: Duration) {
    backend.prepare(services).await.expect("prepare");
    let (a, b) = (&services[0], &services[1]);

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
    assert!(
        obs.services.keys().all(|k| *k == a.name || *k == b.name),
        "only our services are observed: {obs:?}"
    );
    // Replicas name their host by the host's id, so a per-host view joins them (each host
    // shown once, by its name).
    for r in &obs.replicas {
        assert!(
            r.host.as_str().is_empty() || obs.hosts.iter().any(|h| h.id == r.host),
            "replica {} is on host {:?}, which is not among the observed hosts {:?}",
            r.id,
            r.host,
            obs.hosts
        );
    }

    let out = backend.scale(a, 3).await.expect("scale a to 3 again");
    assert_eq!(
        (out.started, out.stopped),
        (0, 0),
        "idempotent at target: {out:?}"
    );

    backend.scale(a, 1).await.expect("scale a to 1");
    let obs = wait_for(backend, settle, |o| running(o, a) == 1).await;
    assert_eq!(running(&obs, a), 1, "{obs:?}");
    assert_eq!(running(&obs, b), 2, "scaling a must not touch b: {obs:?}");

    backend.scale(b, 0).await.expect("scale b to 0");
    let obs = wait_for(backend, settle, |o| running(o, b) == 0).await;
    assert_eq!(running(&obs, b), 0, "{obs:?}");

    backend.shutdown(services, true).await.expect("shutdown");
    let obs = wait_for(backend, settle, |o| {
        o.replicas.is_empty() && o.services.values().all(|s| s.total() == 0)
    })
    .await;
    assert!(
        obs.replicas.is_empty(),
        "shutdown(remove) leaves nothing: {obs:?}"
    );
}

/// A restarted daemon adopts what the first one started and does not duplicate it.
pub async fn adoption<H: Harness>(h: &H, services: &[Service]) {
    let a = &services[0];
    let first = h.connect().await;
    first.prepare(services).await.expect("prepare");
    first.scale(a, 2).await.expect("scale a to 2");
    let obs = wait_for(&first, h.settle(), |o| running(o, a) == 2).await;
    assert_eq!(running(&obs, a), 2, "{obs:?}");
    first
        .shutdown(services, false)
        .await
        .expect("shutdown, leaving the replicas");
    drop(first);

    let second = h.connect().await;
    second
        .prepare(services)
        .await
        .expect("prepare after a restart");
    let obs = wait_for(&second, h.settle(), |o| running(o, a) == 2).await;
    assert_eq!(running(&obs, a), 2, "adopted after a restart: {obs:?}");
    let out = second
        .scale(a, 2)
        .await
        .expect("scale a to 2 after a restart");
    assert_eq!(
        (out.started, out.stopped),
        (0, 0),
        "adopted, not duplicated: {out:?}"
    );
    second.scale(a, 3).await.expect("scale a to 3");
    let obs = wait_for(&second, h.settle(), |o| running(o, a) == 3).await;
    assert_eq!(running(&obs, a), 3, "{obs:?}");
    second.shutdown(services, true).await.expect("shutdown");
    let obs = wait_for(&second, h.settle(), |o| {
        o.services.values().all(|s| s.total() == 0)
    })
    .await;
    assert_eq!(running(&obs, a), 0, "{obs:?}");
}

/// A backend that cannot reach its orchestrator fails with the unreachable class, and the
/// message names what it tried.
pub async fn errors_are_typed<H: Harness>(h: &H) {
    let Some(built) = h.unreachable().await else {
        return;
    };
    let e = match built {
        Err(e) => e,
        Ok(b) => b
            .observe()
            .await
            .expect_err("observing an unreachable orchestrator fails"),
    };
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    assert!(e.to_string().starts_with("cannot reach "), "{e}");
}

/// What the reference case needs from a backend whose services may reference an object that
/// exists in the orchestrator ([`Capabilities::references`](microscaler_core::Capabilities)).
pub trait ReferenceHarness: Harness {
    /// Creates an object microscaler does not own, with `replicas`, and returns the workload
    /// of a service that references it.
    fn add_referenced(&self, replicas: u32) -> impl Future<Output = Workload>;

    /// Everything of the referenced object but its replica count (its template, labels,
    /// placement), as text to compare; `None` once it is gone.
    fn referenced_template(&self) -> impl Future<Output = Option<String>>;

    /// The replica count the orchestrator holds for the referenced object (its spec, not what
    /// runs); `None` once it is gone.
    fn referenced_wants(&self) -> impl Future<Output = Option<u32>>;

    /// Removes the referenced object.
    fn remove_referenced(&self) -> impl Future<Output = ()>;
}

/// A service that references an existing object: prepare and a restart never change its
/// count, scaling sets only the count (the rest of the object stays as it was), the count is
/// observed as the orchestrator's own (`orchestrator_wants`), `shutdown(remove)` leaves the
/// object in place, and a reference to an object that is gone fails with the not-found class.
pub async fn references<H: ReferenceHarness>(h: &H, name: &str) {
    let mut svc = crate::service(name, vec![]);
    svc.workload = h.add_referenced(1).await;
    let services = std::slice::from_ref(&svc);
    let template = h
        .referenced_template()
        .await
        .expect("the referenced object");

    let backend = h.connect().await;
    backend.prepare(services).await.expect("prepare");
    assert_eq!(
        h.referenced_wants().await,
        Some(1),
        "prepare keeps the count"
    );
    let obs = wait_for(&backend, h.settle(), |o| running(o, &svc) == 1).await;
    assert_eq!(
        running(&obs, &svc),
        1,
        "the referenced object is observed: {obs:?}"
    );
    assert_eq!(
        obs.services[&svc.name].orchestrator_wants,
        Some(1),
        "the orchestrator's own count is observed"
    );

    backend
        .scale(&svc, 3)
        .await
        .expect("scale the reference to 3");
    let obs = wait_for(&backend, h.settle(), |o| running(o, &svc) == 3).await;
    assert_eq!(running(&obs, &svc), 3, "{obs:?}");
    assert_eq!(h.referenced_wants().await, Some(3));
    assert_eq!(
        h.referenced_template().await.as_ref(),
        Some(&template),
        "scaling sets the count and nothing else"
    );
    backend
        .scale(&svc, 2)
        .await
        .expect("scale the reference to 2");
    backend
        .shutdown(services, true)
        .await
        .expect("shutdown, remove");
    drop(backend);
    assert_eq!(
        h.referenced_wants().await,
        Some(2),
        "shutdown(remove) leaves a referenced object as it is"
    );

    let restarted = h.connect().await;
    restarted
        .prepare(services)
        .await
        .expect("prepare after a restart");
    assert_eq!(
        h.referenced_wants().await,
        Some(2),
        "a restart keeps the count"
    );
    restarted
        .scale(&svc, 0)
        .await
        .expect("scale the reference to 0");
    let obs = wait_for(&restarted, h.settle(), |o| running(o, &svc) == 0).await;
    assert_eq!(running(&obs, &svc), 0, "{obs:?}");
    assert_eq!(h.referenced_template().await.as_ref(), Some(&template));

    h.remove_referenced().await;
    let gone = h.connect().await;
    let e = gone
        .prepare(services)
        .await
        .expect_err("a reference to an object that is gone");
    assert_eq!(e.class(), ErrorClass::NotFound, "{e}");
    assert!(e.to_string().contains("not found"), "{e}");
}
