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
        instances: None,
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

    /// The cluster's container instances' ARNs, sorted.
    async fn instances(&self) -> Vec<String> {
        let mut arns = self
            .ecs
            .list_container_instances()
            .cluster(&self.cluster)
            .send()
            .await
            .expect("ListContainerInstances")
            .container_instance_arns()
            .to_vec();
        arns.sort();
        arns
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
            instances: None,
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
    let arns = h.instances().await;
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

/// Capacity in CPU and memory: a host's room is its registered CPU and memory less what the
/// tasks that are not the services' reserve, and the services' tasks are replicas on their
/// instances (their reservation stays in the room: the engine places them itself). Managed
/// task definitions reserve the services' resources; a referenced service whose task
/// definition reserves something else, or that is in another cluster, is refused naming both;
/// Fargate is refused.
///
/// moto registers every container instance with 4096 CPU units and 7482 MiB, and places and
/// reserves only the tasks a test starts itself (`StartTask`, `RunTask`, with the group a
/// service's tasks have): it starts none for a service, and it ignores `ListTasks`'
/// `serviceName` (the backend tells the tasks apart by their group, as on AWS). It does take
/// a task's containers' `cpu` and `memory` off `remainingResources` and give them back when the
/// task stops, which is what the room is computed from.
#[tokio::test]
async fn resources_room_is_what_others_tasks_leave_and_references_must_agree() {
    if !moto::available().await {
        return;
    }
    use microscaler_core::{HostId, Resources};
    let h = EcsHarness::new("er", 2).await;
    let arns = h.instances().await;
    // Someone else's task reserves 2 CPUs and 3 GiB of the first instance.
    let foreign = moto::task_definition(&h.ecs, "someone-elses", 2048, 3072).await;
    moto::start_task(
        &h.ecs,
        &h.cluster,
        &foreign,
        &arns[0],
        "service:someone-elses",
    )
    .await;

    let mut backend = EcsBackend::connect(&spec(&h.cluster, moto::ENDPOINT), &h.instance)
        .await
        .unwrap();
    backend.count_resources().unwrap();
    let mut web = service("web");
    web.resources = Some(Resources {
        cpu_milli: 1000,
        memory: 1 << 30,
    });
    backend.prepare(std::slice::from_ref(&web)).await.unwrap();
    let ecs_web = EcsBackend::service_name(&h.instance, "web");
    let td = moto::service(&h.ecs, &h.cluster, &ecs_web)
        .await
        .and_then(|s| s.task_definition().map(str::to_string))
        .expect("web's task definition");
    let def = h
        .ecs
        .describe_task_definition()
        .task_definition(&td)
        .send()
        .await
        .unwrap();
    let c = &def.task_definition().unwrap().container_definitions()[0];
    assert_eq!(
        (c.cpu(), c.memory()),
        (1024, Some(1024)),
        "a managed task reserves its service's resources"
    );

    let room = |obs: &microscaler_backends::Observation| {
        let mut r: Vec<(String, Option<f64>, Option<u64>)> = obs
            .hosts
            .iter()
            .map(|h| (h.id.0.clone(), h.cpus, h.memory_bytes.map(|b| b >> 20)))
            .collect();
        r.sort_by(|a, b| a.0.cmp(&b.0));
        r
    };
    let empty = vec![
        (arns[0].clone(), Some(2.0), Some(7482 - 3072)),
        (arns[1].clone(), Some(4.0), Some(7482)),
    ];
    let obs = backend.observe().await.unwrap();
    assert_eq!(room(&obs), empty, "someone else's reservation is taken off");
    assert!(obs.replicas.is_empty(), "{:?}", obs.replicas);

    // Two of web's tasks on the first instance: they are web's replicas there, and what
    // they reserve stays in the room (the engine counts them itself).
    let group = format!("service:{ecs_web}");
    let mut placed = Vec::new();
    for _ in 0..2 {
        placed.push(moto::start_task(&h.ecs, &h.cluster, &td, &arns[0], &group).await);
    }
    assert_eq!(
        moto::remaining(&h.ecs, &h.cluster, &arns[0]).await,
        (0, 7482 - 3072 - 2048),
        "moto reserved them on the first instance"
    );
    let obs = backend.observe().await.unwrap();
    assert_eq!(room(&obs), empty, "the services' own tasks are not others'");
    let mut on: Vec<(&str, &HostId)> = obs
        .replicas
        .iter()
        .map(|r| (r.service.as_str(), &r.host))
        .collect();
    on.sort();
    assert_eq!(
        on,
        vec![
            ("web", &HostId(arns[0].clone())),
            ("web", &HostId(arns[0].clone()))
        ]
    );
    for arn in placed {
        moto::stop_task(&h.ecs, &h.cluster, &arn).await;
    }
    assert_eq!(room(&backend.observe().await.unwrap()), empty);

    // A referenced service must reserve what its service's resources say.
    moto::plain_service(&h.ecs, &h.cluster, "shop", 0, "REPLICA").await;
    let mut shop = referencing("shop", "shop", false);
    shop.resources = Some(Resources {
        cpu_milli: 500,
        memory: 512 << 20,
    });
    let e = backend
        .prepare(std::slice::from_ref(&shop))
        .await
        .expect_err("shop's tasks reserve 64 MiB and no CPU");
    let said = e.to_string();
    assert!(
        said.contains("ECS service shop")
            && said.contains("service shop's resources are 0.5 CPU and 512 MiB")
            && said.contains("reserves 0 CPU units and 64 MiB"),
        "{said}"
    );
    let right = moto::task_definition(&h.ecs, "shop-right", 512, 512).await;
    h.ecs
        .update_service()
        .cluster(&h.cluster)
        .service("shop")
        .task_definition(right)
        .send()
        .await
        .unwrap();
    backend
        .prepare(std::slice::from_ref(&shop))
        .await
        .expect("a reference that reserves the service's resources");

    // In another cluster than the hosts', a reference is refused.
    let mut elsewhere = shop.clone();
    elsewhere.workload = Workload::Reference(Reference::Ecs(EcsReference {
        service: "shop".into(),
        cluster: Some("other".into()),
        instances: None,
    }));
    let e = backend
        .prepare(std::slice::from_ref(&elsewhere))
        .await
        .expect_err("another cluster");
    assert!(e.to_string().contains("cluster other"), "{e}");
    backend.shutdown(&[web], true).await.unwrap();

    let fargate = EcsConfig {
        launch_type: "FARGATE".into(),
        ..spec(&h.cluster, moto::ENDPOINT)
    };
    let mut b = EcsBackend::connect(&fargate, &h.instance).await.unwrap();
    let e = b.count_resources().expect_err("Fargate");
    assert!(e.to_string().contains("Fargate"), "{e}");
}
