//! The ECS backend against moto server (an AWS emulator from PyPI on 127.0.0.1:5000, started
//! by the test command). Each test has a cluster of its own, with container instances
//! registered for EC2 instances that moto runs.
//!
//! What moto does not simulate, and these tests therefore cannot prove (see
//! `microscaler_testkit::moto`): it starts no tasks (`runningCount` jumps to `desiredCount`),
//! does not throttle (a fault proxy of ours in front of it injects `ThrottlingException` and
//! 5xx), emits no EventBridge events, ignores cluster-query filters and checks no IAM policy.
#![cfg(feature = "ecs")]

mod common;

use std::time::Duration;

use microscaler_backends::ecs::{EcsBackend, EcsConfig, EcsReference};
use microscaler_backends::{Backend, BackendError, ErrorClass, Reference, Service, Workload};
use microscaler_core::ServiceKind;
use microscaler_testkit::moto;

const SETTLE: Duration = Duration::from_secs(10);

fn spec(cluster: &str, endpoint: &str) -> EcsConfig {
    EcsConfig {
        cluster: cluster.into(),
        region: Some(moto::REGION.into()),
        endpoint_url: Some(endpoint.into()),
        timeout: Duration::from_secs(5),
        ..EcsConfig::default()
    }
}

fn service(name: &str) -> Service {
    let mut s = common::service(name, vec![]);
    s.workload.run_mut().expect("managed").image = Some("busybox:1".into());
    s
}

fn referencing(name: &str, ecs_service: &str, per_host: bool) -> Service {
    let mut s = common::service(name, vec![]);
    s.workload = Workload::Reference(Reference::Ecs(EcsReference {
        service: ecs_service.into(),
        cluster: None,
    }));
    if per_host {
        s.kind = ServiceKind::PerHost;
    }
    s
}

struct EcsHarness {
    ecs: aws_sdk_ecs::Client,
    cluster: String,
    instance: String,
}

impl EcsHarness {
    async fn new(prefix: &str, instances: usize) -> EcsHarness {
        let ecs = moto::ecs().await;
        let cluster = common::unique(prefix);
        moto::cluster(&ecs, &cluster, instances).await;
        EcsHarness {
            ecs,
            cluster,
            instance: common::unique("ei"),
        }
    }
}

impl microscaler_testkit::contract::Harness for EcsHarness {
    type B = EcsBackend;

    async fn connect(&self) -> EcsBackend {
        EcsBackend::connect(&spec(&self.cluster, moto::ENDPOINT), &self.instance)
            .await
            .expect("connect to moto")
    }

    async fn add_foreign(&self, replicas: u32) {
        moto::plain_service(&self.ecs, &self.cluster, "foreign", replicas, "REPLICA").await;
    }

    async fn foreign_running(&self) -> u32 {
        moto::service(&self.ecs, &self.cluster, "foreign")
            .await
            .map(|s| s.running_count().max(0) as u32)
            .unwrap_or(0)
    }

    async fn remove_foreign(&self) {
        moto::delete_service(&self.ecs, &self.cluster, "foreign").await;
    }

    async fn unreachable(&self) -> Option<Result<EcsBackend, BackendError>> {
        let dead = format!("http://127.0.0.1:{}", free_port());
        Some(EcsBackend::connect(&spec(&self.cluster, &dead), &self.instance).await)
    }

    fn settle(&self) -> Duration {
        SETTLE
    }
}

impl microscaler_testkit::contract::ReferenceHarness for EcsHarness {
    async fn add_referenced(&self, replicas: u32) -> Workload {
        moto::plain_service(&self.ecs, &self.cluster, "shop", replicas, "REPLICA").await;
        Workload::Reference(Reference::Ecs(EcsReference {
            service: "shop".into(),
            cluster: Some(self.cluster.clone()),
        }))
    }

    async fn referenced_template(&self) -> Option<String> {
        let s = moto::service(&self.ecs, &self.cluster, "shop").await?;
        Some(format!(
            "{:?} {:?} {:?} {:?} {:?} {:?}",
            s.task_definition(),
            s.launch_type(),
            s.scheduling_strategy(),
            s.tags(),
            s.load_balancers(),
            s.placement_constraints(),
        ))
    }

    async fn referenced_wants(&self) -> Option<u32> {
        moto::desired(&self.ecs, &self.cluster, "shop").await
    }

    async fn remove_referenced(&self) {
        moto::delete_service(&self.ecs, &self.cluster, "shop").await;
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The contract suite: scale up and down, adoption after a restart (the services carry our
/// tags), a foreign service untouched, an unreachable endpoint named; and references.
#[tokio::test]
async fn contract() {
    if !moto::available().await {
        return;
    }
    let h = EcsHarness::new("ec", 3).await;
    microscaler_testkit::contract::run(&h, &service("a"), &service("b")).await;
    microscaler_testkit::contract::references(&h, "ref").await;
}

/// Container instances are the hosts: ACTIVE ones with their agent connected are ready, with
/// their registered CPU and memory; a DRAINING one is not ready; a deregistered one is gone.
/// A per-host service that references a DAEMON service is counted and never updated.
#[tokio::test]
async fn container_instances_are_hosts_and_daemon_services_are_never_updated() {
    if !moto::available().await {
        return;
    }
    let h = EcsHarness::new("eh", 3).await;
    let arns: Vec<String> = {
        let mut a = h
            .ecs
            .list_container_instances()
            .cluster(&h.cluster)
            .send()
            .await
            .unwrap()
            .container_instance_arns()
            .to_vec();
        a.sort();
        a
    };
    moto::plain_service(&h.ecs, &h.cluster, "agent", 0, "DAEMON").await;
    let backend = EcsBackend::connect(&spec(&h.cluster, moto::ENDPOINT), &h.instance)
        .await
        .unwrap();
    let agent = referencing("agent", "agent", true);
    backend.prepare(std::slice::from_ref(&agent)).await.unwrap();
    let obs = backend.observe().await.unwrap();
    assert_eq!(obs.hosts.len(), 3, "{obs:?}");
    assert!(
        obs.hosts.iter().all(|h| h.ready),
        "new ACTIVE instances are ready at once, before their description: {obs:?}"
    );
    // Their descriptions (EC2 id, resources) arrive in the background, a tick later.
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.hosts.iter().all(|h| h.cpus.is_some())
    })
    .await;
    assert!(obs.hosts.iter().all(|h| h.ready), "{obs:?}");
    assert!(obs
        .hosts
        .iter()
        .all(|h| h.cpus.is_some_and(|c| c > 0.0) && h.memory_bytes.is_some()));
    assert!(
        obs.hosts.iter().all(|h| h.name.starts_with("i-")),
        "{obs:?}"
    );
    assert_eq!(
        obs.services[&agent.name].orchestrator_wants, None,
        "a DAEMON service's count is ECS's own"
    );

    moto::drain(&h.ecs, &h.cluster, &arns[0], true).await;
    let obs = backend.observe().await.unwrap();
    let ready: Vec<_> = obs.hosts.iter().filter(|h| h.ready).collect();
    assert_eq!(ready.len(), 2, "a DRAINING instance is not ready: {obs:?}");
    assert!(obs
        .hosts
        .iter()
        .any(|h| h.id.as_str() == arns[0] && !h.ready));
    moto::deregister(&h.ecs, &h.cluster, &arns[1]).await;
    let obs = backend.observe().await.unwrap();
    assert!(
        obs.hosts.iter().all(|h| h.id.as_str() != arns[1]),
        "a deregistered instance is gone: {obs:?}"
    );

    let out = backend.scale(&agent, 5).await.unwrap();
    assert_eq!((out.started, out.stopped), (0, 0));
    assert_eq!(
        moto::desired(&h.ecs, &h.cluster, "agent").await,
        Some(0),
        "a DAEMON service is never updated"
    );

    // A DAEMON service referenced by a service that is not per-host is refused, naming it.
    let wrong = referencing("w", "agent", false);
    let e = backend
        .prepare(std::slice::from_ref(&wrong))
        .await
        .expect_err("a DAEMON service needs per_host");
    assert!(
        e.to_string().contains("DAEMON") && e.to_string().contains("per_host"),
        "{e}"
    );
}

/// More than 10 services are observed with `DescribeServices` in batches of 10 (moto answers
/// any number, so the batches are counted at a proxy in front of it), each scaled with one
/// `UpdateService`, and none when the count is already right.
#[tokio::test]
async fn more_than_ten_services_are_described_in_batches_of_ten() {
    if !moto::available().await {
        return;
    }
    let h = EcsHarness::new("eb", 1).await;
    let proxy = microscaler_testkit::fault_proxy::FaultProxy::start(moto::ENDPOINT).await;
    let backend = EcsBackend::connect(&spec(&h.cluster, &proxy.address()), &h.instance)
        .await
        .unwrap();
    let services: Vec<Service> = (0..23).map(|i| service(&format!("s{i}"))).collect();
    backend.prepare(&services).await.unwrap();
    for (i, s) in services.iter().enumerate() {
        backend.scale(s, (i % 4) as u32).await.unwrap();
    }
    let updates = proxy.seen("UpdateService");
    assert_eq!(
        updates,
        services
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 4 != 0)
            .count() as u32,
        "one UpdateService per change, none for a count already right"
    );
    let before = proxy.seen("DescribeServices");
    let obs = backend.observe().await.unwrap();
    assert_eq!(
        proxy.seen("DescribeServices") - before,
        3,
        "23 services in 3 calls"
    );
    for (i, s) in services.iter().enumerate() {
        assert_eq!(
            obs.services[&s.name].orchestrator_wants,
            Some((i % 4) as u32)
        );
        assert_eq!(obs.services[&s.name].running, (i % 4) as u32);
    }
    for s in &services {
        backend.scale(s, 2).await.unwrap();
    }
    backend.shutdown(&services, true).await.unwrap();
    let obs = backend.observe().await.unwrap();
    assert!(obs.services.is_empty(), "all deleted: {obs:?}");
}

/// A throttled call (`ThrottlingException`, "Rate exceeded") and a 5xx are errors of their
/// class, with AWS's words, and not retried by the SDK (the control loop backs off): the next
/// call goes through. A reference to a missing service and a cluster that does not exist are
/// not-found errors naming them. A managed name taken by a service without our tags is never
/// adopted.
#[tokio::test]
async fn throttling_5xx_and_missing_objects_are_typed() {
    if !moto::available().await {
        return;
    }
    use microscaler_testkit::fault_proxy::{Fault, FaultProxy};
    let h = EcsHarness::new("et", 1).await;
    let proxy = FaultProxy::start(moto::ENDPOINT).await;
    let backend = EcsBackend::connect(&spec(&h.cluster, &proxy.address()), &h.instance)
        .await
        .unwrap();
    let a = service("a");
    backend.prepare(std::slice::from_ref(&a)).await.unwrap();

    proxy.inject("UpdateService", Fault::Throttle, 1);
    let e = backend.scale(&a, 2).await.expect_err("throttled");
    assert_eq!(e.class(), ErrorClass::Throttled, "{e}");
    assert!(e.to_string().contains("Rate exceeded"), "{e}");
    assert_eq!(proxy.seen("UpdateService"), 1, "the SDK did not retry");
    proxy.inject("UpdateService", Fault::ServerError(503), 1);
    let e = backend.scale(&a, 2).await.expect_err("a 503");
    assert_eq!(e.class(), ErrorClass::Failed, "{e}");
    assert!(e.to_string().contains("503"), "{e}");
    backend.scale(&a, 2).await.expect("then it goes through");
    assert_eq!(
        moto::desired(
            &h.ecs,
            &h.cluster,
            &EcsBackend::service_name(&h.instance, "a")
        )
        .await,
        Some(2)
    );
    proxy.inject("DescribeServices", Fault::Throttle, 1);
    let e = backend.observe().await.expect_err("observation throttled");
    assert_eq!(e.class(), ErrorClass::Throttled, "{e}");

    let missing = referencing("m", "no-such-service", false);
    let e = backend
        .prepare(std::slice::from_ref(&missing))
        .await
        .expect_err("missing");
    assert_eq!(e.class(), ErrorClass::NotFound, "{e}");
    assert!(e.to_string().contains("no-such-service"), "{e}");

    let e = match EcsBackend::connect(&spec("no-such-cluster", moto::ENDPOINT), &h.instance).await {
        Err(e) => e,
        Ok(_) => panic!("a cluster that does not exist"),
    };
    assert_eq!(e.class(), ErrorClass::NotFound, "{e}");
    assert!(e.to_string().contains("no-such-cluster"), "{e}");

    let taken = service("taken");
    moto::plain_service(
        &h.ecs,
        &h.cluster,
        &EcsBackend::service_name(&h.instance, "taken"),
        1,
        "REPLICA",
    )
    .await;
    let e = backend
        .prepare(std::slice::from_ref(&taken))
        .await
        .expect_err("not ours");
    assert!(e.to_string().contains("not this microscaler's"), "{e}");
    backend.shutdown(&[a, taken], true).await.unwrap();
    assert_eq!(
        moto::desired(
            &h.ecs,
            &h.cluster,
            &EcsBackend::service_name(&h.instance, "taken")
        )
        .await,
        Some(1),
        "a service that is not ours is left as it is"
    );
}
