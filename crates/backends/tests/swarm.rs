//! The Docker Swarm backend against a real single-node swarm (`docker swarm init` on the local
//! engine). Every test uses its own instance and removes what it created, even when it fails.
//! Without a swarm manager the tests say they are skipped, and fail under CI=true.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{
    NetworkCreateRequest, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, SwarmInfo,
    TaskSpec, TaskSpecContainerSpec,
};
use bollard::query_parameters::{ListContainersOptions, ListServicesOptions};
use bollard::Docker;
use microscaler_backends::swarm::{check_manager, swarm_service_name, SwarmBackend};
use microscaler_backends::swarm::{SwarmConfig, SwarmReference};
use microscaler_backends::{docker_api, labels, Backend, BackendError, ReplicaState};
use microscaler_backends::{Reference, Service, Workload};
use microscaler_core::ServiceKind;

/// Swarm starts a task in about a second; a minute covers a loaded machine.
const SETTLE: Duration = Duration::from_secs(60);

fn spec() -> SwarmConfig {
    SwarmConfig {
        host: None,
        network: None,
    }
}

/// Connects for `instance`, or says why the test is skipped.
async fn connect(instance: &str) -> Option<SwarmBackend> {
    match SwarmBackend::connect(&spec(), instance).await {
        Ok(b) => Some(b),
        Err(e) => {
            common::missing_service("Docker Swarm (docker swarm init)", e);
            None
        }
    }
}

async fn raw() -> Docker {
    docker_api::connect(None)
        .await
        .expect("connect to the engine")
}

/// Removes the instance's Swarm services and the named foreign ones when dropped, so a failed
/// test leaves nothing behind either.
struct Cleanup {
    instance: String,
    foreign: Vec<String>,
    networks: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let instance = self.instance.clone();
        let foreign = std::mem::take(&mut self.foreign);
        let networks = std::mem::take(&mut self.networks);
        microscaler_testkit::block_on_own_runtime(move || async move {
            let Ok(docker) = docker_api::connect(None).await else {
                return;
            };
            for s in instance_services(&docker, &instance).await {
                let _ = docker.delete_service(&s).await;
            }
            for name in foreign {
                let _ = docker.delete_service(&name).await;
            }
            for net in networks {
                remove_network(&docker, &net).await;
            }
        });
    }
}

/// IDs of the Swarm services labelled with `instance`.
async fn instance_services(docker: &Docker, instance: &str) -> Vec<String> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{}={instance}", labels::INSTANCE)],
    )]);
    docker
        .list_services(Some(ListServicesOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| s.id)
        .collect()
}

/// Waits until no container (running or stopped) carries the instance's label.
async fn containers_gone(docker: &Docker, instance: &str, timeout: Duration) -> Vec<String> {
    let start = Instant::now();
    loop {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}={instance}", labels::INSTANCE)],
        )]);
        let left: Vec<String> = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .expect("list containers")
            .into_iter()
            .map(|c| format!("{:?} {:?}", c.names, c.state))
            .collect();
        if left.is_empty() || start.elapsed() > timeout {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes a network once the tasks that used it have let go of it.
async fn remove_network(docker: &Docker, name: &str) {
    let start = Instant::now();
    while docker.remove_network(name).await.is_err() && start.elapsed() < Duration::from_secs(20) {
        if docker.inspect_network(name, None).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn per_host(name: &str) -> Service {
    Service {
        kind: ServiceKind::PerHost,
        ..common::service(name, vec![])
    }
}

/// A replicated Swarm service `name` of `image` without microscaler's labels.
fn replicated(name: &str, image: &str, replicas: u32) -> ServiceSpec {
    ServiceSpec {
        name: Some(name.to_string()),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(image.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(i64::from(replicas)),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The replica count and version of a Swarm service, by name.
async fn replicas_and_version(docker: &Docker, name: &str) -> (Option<i64>, u64) {
    let s = docker
        .inspect_service(name, None)
        .await
        .unwrap_or_else(|e| panic!("inspect {name}: {e}"));
    let replicas = s
        .spec
        .and_then(|s| s.mode)
        .and_then(|m| m.replicated)
        .and_then(|r| r.replicas);
    (replicas, s.version.and_then(|v| v.index).unwrap_or(0))
}

/// The contract suite against the real swarm. The foreign object is a replicated Swarm
/// service of the built-in image without microscaler's labels.
struct SwarmHarness {
    instance: String,
    foreign: String,
}

impl microscaler_testkit::contract::Harness for SwarmHarness {
    type B = SwarmBackend;

    async fn connect(&self) -> SwarmBackend {
        SwarmBackend::connect(&spec(), &self.instance)
            .await
            .expect("connect to the swarm")
    }

    async fn add_foreign(&self, replicas: u32) {
        let docker = raw().await;
        let image = docker_api::ensure_replica_image(&docker)
            .await
            .expect("image");
        docker
            .create_service(replicated(&self.foreign, &image, replicas), None)
            .await
            .expect("create a foreign service");
    }

    /// The foreign service's replica count, 0 once it is gone.
    async fn foreign_running(&self) -> u32 {
        match raw().await.inspect_service(&self.foreign, None).await {
            Ok(s) => s
                .spec
                .and_then(|s| s.mode)
                .and_then(|m| m.replicated)
                .and_then(|r| r.replicas)
                .map_or(0, |n| n as u32),
            Err(_) => 0,
        }
    }

    async fn remove_foreign(&self) {
        let _ = raw().await.delete_service(&self.foreign).await;
    }

    async fn unreachable(&self) -> Option<Result<SwarmBackend, BackendError>> {
        let nowhere = SwarmConfig {
            host: Some("unix:///nonexistent/docker.sock".into()),
            ..spec()
        };
        Some(SwarmBackend::connect(&nowhere, &self.instance).await)
    }

    fn settle(&self) -> Duration {
        SETTLE
    }
}

/// The referenced object is a replicated Swarm service without microscaler's labels, with an
/// environment variable and a label of its own that must survive every scale.
impl microscaler_testkit::contract::ReferenceHarness for SwarmHarness {
    async fn add_referenced(&self, replicas: u32) -> Workload {
        let docker = raw().await;
        let image = docker_api::ensure_replica_image(&docker)
            .await
            .expect("image");
        let mut spec = replicated(&format!("{}-ref", self.instance), &image, replicas);
        spec.labels = Some(HashMap::from([("team".into(), "payments".into())]));
        if let Some(c) = spec
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
        {
            c.env = Some(vec!["OWNER=someone-else".into()]);
        }
        docker
            .create_service(spec, None)
            .await
            .expect("create the referenced service");
        Workload::Reference(Reference::Swarm(SwarmReference {
            service: format!("{}-ref", self.instance),
        }))
    }

    async fn referenced_template(&self) -> Option<String> {
        let name = format!("{}-ref", self.instance);
        let mut spec = raw().await.inspect_service(&name, None).await.ok()?.spec?;
        spec.mode = None;
        Some(format!("{spec:?}"))
    }

    async fn referenced_wants(&self) -> Option<u32> {
        let name = format!("{}-ref", self.instance);
        let spec = raw().await.inspect_service(&name, None).await.ok()?.spec?;
        Some(spec.mode?.replicated?.replicas? as u32)
    }

    async fn remove_referenced(&self) {
        let name = format!("{}-ref", self.instance);
        raw()
            .await
            .delete_service(&name)
            .await
            .expect("remove the referenced service");
    }
}

#[tokio::test]
async fn references_existing_services() {
    let instance = common::unique("swr");
    if connect(&instance).await.is_none() {
        return;
    }
    let _cleanup = Cleanup {
        instance: instance.clone(),
        foreign: vec![format!("{instance}-ref")],
        networks: vec![],
    };
    let h = SwarmHarness {
        instance: instance.clone(),
        foreign: format!("{instance}-foreign"),
    };
    microscaler_testkit::contract::references(&h, "web").await;
    assert!(
        instance_services(&raw().await, &instance).await.is_empty(),
        "a reference creates no Swarm service"
    );
}

#[tokio::test]
async fn contract() {
    let instance = common::unique("swc");
    if connect(&instance).await.is_none() {
        return;
    }
    let foreign = format!("{instance}-foreign");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        foreign: vec![foreign.clone()],
        networks: vec![],
    };
    let h = SwarmHarness {
        instance: instance.clone(),
        foreign,
    };
    let (a, b) = (common::service("a", vec![]), common::service("b", vec![]));
    microscaler_testkit::contract::run(&h, &a, &b).await;

    let docker = raw().await;
    assert!(
        instance_services(&docker, &instance).await.is_empty(),
        "shutdown(remove) removes the Swarm services"
    );
    let left = containers_gone(&docker, &instance, Duration::from_secs(30)).await;
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

#[tokio::test]
async fn per_host_service_runs_in_global_mode_one_task_per_node() {
    let instance = common::unique("swg");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup {
        instance: instance.clone(),
        foreign: vec![],
        networks: vec![],
    };
    let svc = per_host("agent");
    backend
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect("prepare");

    let docker = raw().await;
    let name = swarm_service_name(&instance, &svc.name);
    let mode = docker
        .inspect_service(&name, None)
        .await
        .expect("inspect")
        .spec
        .and_then(|s| s.mode)
        .expect("mode");
    assert!(
        mode.global.is_some() && mode.replicated.is_none(),
        "{mode:?}"
    );

    let obs = backend.observe().await.expect("observe");
    let ready = obs.hosts.iter().filter(|h| h.ready).count() as u32;
    assert!(ready >= 1, "{:?}", obs.hosts);
    let obs = common::wait_for(&backend, SETTLE, |o| common::running(o, &svc) == ready).await;
    assert_eq!(common::running(&obs, &svc), ready, "{obs:?}");
    for host in obs.hosts.iter().filter(|h| h.ready) {
        let on_host = obs
            .replicas
            .iter()
            .filter(|r| r.host == host.id && r.state == ReplicaState::Running)
            .count();
        assert_eq!(on_host, 1, "one task on node {}: {obs:?}", host.name);
        assert!(
            host.cpus.unwrap_or(0.0) > 0.0 && host.memory_bytes.unwrap_or(0) > 0,
            "{host:?}"
        );
    }

    // Swarm places per-host replicas: scale is a no-op.
    let out = backend.scale(&svc, 5).await.expect("scale");
    assert_eq!((out.started, out.stopped), (0, 0), "{out:?}");
    let obs = backend.observe().await.expect("observe");
    assert_eq!(common::running(&obs, &svc), ready, "{obs:?}");

    backend.shutdown(&[svc], true).await.expect("shutdown");
    let left = containers_gone(&docker, &instance, Duration::from_secs(30)).await;
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

/// The container part of Swarm service `name`'s task template, as the engine holds it.
async fn container_spec(docker: &Docker, name: &str) -> TaskSpecContainerSpec {
    docker
        .inspect_service(name, None)
        .await
        .expect("inspect")
        .spec
        .and_then(|s| s.task_template)
        .and_then(|t| t.container_spec)
        .expect("container spec")
}

#[tokio::test]
async fn adopts_existing_services_with_their_replica_count() {
    let instance = common::unique("swa");
    let Some(first) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup {
        instance: instance.clone(),
        foreign: vec![],
        networks: vec![],
    };
    let mut svc = common::service("web", vec![]);
    svc.workload
        .run_mut()
        .unwrap()
        .env
        .insert("GREETING".into(), "hello".into());
    first
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect("prepare");

    // The task template is exactly what the configuration says.
    let docker = raw().await;
    let name = swarm_service_name(&instance, &svc.name);
    let c = container_spec(&docker, &name).await;
    let mut env = c.env.clone().unwrap_or_default();
    env.sort();
    assert_eq!(
        env,
        [
            "GREETING=hello".to_string(),
            format!("MICROSCALER_INSTANCE={instance}"),
            "MICROSCALER_SERVICE=web".to_string(),
        ],
        "env is run.env plus the microscaler variables, nothing else"
    );
    let l = c.labels.clone().unwrap_or_default();
    assert_eq!(l.get(labels::INSTANCE), Some(&instance));
    assert_eq!(l.get(labels::SERVICE).map(String::as_str), Some("web"));
    assert_eq!(c.stop_grace_period, Some(5_000_000_000));
    let image = c.image.clone().unwrap_or_default();
    assert!(
        image.starts_with("sha256:"),
        "built-in image pinned by ID, never pulled: {image}"
    );
    assert_eq!(c.command, None, "the image's own command");
    assert_eq!(c.init, None, "no init unless the service sets it");

    let out = first.scale(&svc, 2).await.expect("scale to 2");
    assert_eq!((out.started, out.stopped), (2, 0));
    let obs = common::wait_for(&first, SETTLE, |o| common::running(o, &svc) == 2).await;
    assert_eq!(common::running(&obs, &svc), 2, "{obs:?}");
    let mut before: Vec<String> = obs.replicas.iter().map(|r| r.id.clone()).collect();
    before.sort();
    first
        .shutdown(std::slice::from_ref(&svc), false)
        .await
        .expect("shutdown, keep");
    drop(first);

    let second = connect(&instance).await.expect("connect again");
    second
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect("prepare again");
    let obs = second.observe().await.expect("observe");
    assert_eq!(
        common::running(&obs, &svc),
        2,
        "adopted as running: {obs:?}"
    );
    let mut after: Vec<String> = obs.replicas.iter().map(|r| r.id.clone()).collect();
    after.sort();
    assert_eq!(
        before, after,
        "adopting an unchanged service restarts nothing"
    );
    assert_eq!(replicas_and_version(&docker, &name).await.0, Some(2));
    let out = second.scale(&svc, 2).await.expect("scale at target");
    assert_eq!((out.started, out.stopped), (0, 0));

    // A changed configuration updates the task template and keeps the replica count.
    svc.workload
        .run_mut()
        .unwrap()
        .env
        .insert("GREETING".into(), "bonjour".into());
    let third = connect(&instance).await.expect("connect a third time");
    third
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect("prepare changed");
    let s = docker.inspect_service(&name, None).await.expect("inspect");
    let spec = s.spec.expect("spec");
    let env = spec
        .task_template
        .and_then(|t| t.container_spec)
        .and_then(|c| c.env)
        .unwrap_or_default();
    assert!(env.contains(&"GREETING=bonjour".to_string()), "{env:?}");
    assert_eq!(
        spec.mode
            .and_then(|m| m.replicated)
            .and_then(|r| r.replicas),
        Some(2)
    );

    // `init = true` alone is a change too: Docker's init runs as each task's PID 1.
    svc.workload.run_mut().unwrap().init = true;
    let fourth = connect(&instance).await.expect("connect a fourth time");
    fourth
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect("prepare with init");
    assert_eq!(container_spec(&docker, &name).await.init, Some(true));

    fourth.shutdown(&[svc], true).await.expect("shutdown");
    assert!(instance_services(&docker, &instance).await.is_empty());
}

#[tokio::test]
async fn foreign_swarm_services_are_untouched() {
    let instance = common::unique("swf");
    let other = format!("{instance}-other");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let docker = raw().await;
    let image = docker_api::ensure_replica_image(&docker)
        .await
        .expect("image");
    let plain = format!("{instance}-plain");
    let clash = format!("{instance}-clash");
    let other_a = format!("{other}-a");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        foreign: vec![plain.clone(), clash.clone(), other_a.clone()],
        networks: vec![],
    };
    let foreign = |name: &str, labels: HashMap<String, String>| ServiceSpec {
        labels: Some(labels),
        ..replicated(name, &image, 1)
    };
    // No labels at all; our instance's prefix, and a service name we use: the name is taken.
    for name in [&plain, &clash] {
        docker
            .create_service(foreign(name, HashMap::new()), None)
            .await
            .expect("create foreign service");
    }
    // Another instance's service "a", with both labels.
    let theirs = HashMap::from([
        (labels::INSTANCE.to_string(), other.clone()),
        (labels::SERVICE.to_string(), "a".to_string()),
    ]);
    docker
        .create_service(foreign(&other_a, theirs), None)
        .await
        .expect("create other instance's service");
    let mut versions = HashMap::new();
    for name in [&plain, &clash, &other_a] {
        versions.insert(name.clone(), replicas_and_version(&docker, name).await);
    }

    let a = common::service("a", vec![]);
    backend
        .prepare(std::slice::from_ref(&a))
        .await
        .expect("prepare");
    backend.scale(&a, 1).await.expect("scale");
    let obs = common::wait_for(&backend, SETTLE, |o| common::running(o, &a) == 1).await;
    assert_eq!(common::running(&obs, &a), 1, "{obs:?}");
    assert_eq!(
        obs.services.len(),
        1,
        "only our service is observed: {obs:?}"
    );
    // The other instance's "a" runs too, and is not counted.
    let ours = obs
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Running)
        .count();
    assert_eq!(ours, 1, "{obs:?}");

    // A name taken by a service without our labels is an error, and that service is kept.
    let err = backend
        .prepare(&[common::service("clash", vec![])])
        .await
        .expect_err("a foreign service holds the name");
    let msg = err.to_string();
    assert!(msg.contains(&clash) && msg.contains("labels"), "{msg}");

    backend
        .shutdown(std::slice::from_ref(&a), true)
        .await
        .expect("shutdown");
    for name in [&plain, &clash, &other_a] {
        assert_eq!(
            replicas_and_version(&docker, name).await,
            versions[name],
            "{name} is untouched"
        );
    }
    assert!(instance_services(&docker, &instance).await.is_empty());
    for name in [&plain, &clash, &other_a] {
        docker
            .delete_service(name)
            .await
            .expect("delete foreign service");
    }
}

#[tokio::test]
async fn tasks_join_the_configured_network() {
    let instance = common::unique("swn");
    if connect(&instance).await.is_none() {
        return;
    }
    let docker = raw().await;
    let net = format!("{instance}-net");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        foreign: vec![],
        networks: vec![net.clone()],
    };
    let svc = common::service("api", vec![]);
    let with_network = |network: String| SwarmConfig {
        host: None,
        network: Some(network),
    };

    // A network that does not exist is a clear error before anything is created.
    let missing = SwarmBackend::connect(&with_network(format!("{instance}-nope")), &instance)
        .await
        .expect("connect");
    let msg = missing
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect_err("missing network")
        .to_string();
    assert!(
        msg.contains("docker network create --driver overlay"),
        "{msg}"
    );
    assert!(instance_services(&docker, &instance).await.is_empty());

    let id = docker
        .create_network(NetworkCreateRequest {
            name: net.clone(),
            driver: Some("overlay".into()),
            attachable: Some(true),
            ..Default::default()
        })
        .await
        .expect("create overlay network")
        .id;
    let backend = SwarmBackend::connect(&with_network(net.clone()), &instance)
        .await
        .expect("connect");
    backend
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect("prepare");
    backend.scale(&svc, 1).await.expect("scale");
    let obs = common::wait_for(&backend, SETTLE, |o| common::running(o, &svc) == 1).await;
    assert_eq!(common::running(&obs, &svc), 1, "{obs:?}");

    let name = swarm_service_name(&instance, &svc.name);
    let targets: Vec<String> = docker
        .inspect_service(&name, None)
        .await
        .expect("inspect")
        .spec
        .and_then(|s| s.task_template)
        .and_then(|t| t.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.target)
        .collect();
    assert!(
        targets == [id.clone()] || targets == [net.clone()],
        "{targets:?}"
    );

    // Swarm stores the network's ID; adoption must not mistake that for a change.
    let version = replicas_and_version(&docker, &name).await;
    let again = SwarmBackend::connect(&with_network(net.clone()), &instance)
        .await
        .expect("connect again");
    again
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect("prepare again");
    assert_eq!(replicas_and_version(&docker, &name).await, version);

    again.shutdown(&[svc], true).await.expect("shutdown");
    let left = containers_gone(&docker, &instance, Duration::from_secs(30)).await;
    assert!(left.is_empty(), "containers left behind: {left:?}");
    remove_network(&docker, &net).await;
}

#[test]
fn not_a_manager_error_says_what_to_run() {
    let addr = "unix:///var/run/docker.sock";
    let inactive = SwarmInfo {
        local_node_state: Some(bollard::models::LocalNodeState::INACTIVE),
        control_available: Some(false),
        ..Default::default()
    };
    for info in [Some(&inactive), None] {
        let err = check_manager(addr, info).expect_err("inactive");
        assert!(matches!(err, BackendError::Unsupported(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(addr), "{msg}");
        assert!(msg.contains("run: docker swarm init"), "{msg}");
        assert!(msg.contains("manager"), "{msg}");
    }

    let worker = SwarmInfo {
        local_node_state: Some(bollard::models::LocalNodeState::ACTIVE),
        control_available: Some(false),
        ..Default::default()
    };
    let msg = check_manager(addr, Some(&worker))
        .expect_err("worker")
        .to_string();
    assert!(msg.contains(addr) && msg.contains("worker"), "{msg}");

    let locked = SwarmInfo {
        local_node_state: Some(bollard::models::LocalNodeState::LOCKED),
        ..Default::default()
    };
    let msg = check_manager(addr, Some(&locked))
        .expect_err("locked")
        .to_string();
    assert!(msg.contains("docker swarm unlock"), "{msg}");

    let manager = SwarmInfo {
        local_node_state: Some(bollard::models::LocalNodeState::ACTIVE),
        control_available: Some(true),
        ..Default::default()
    };
    check_manager(addr, Some(&manager)).expect("an active manager");
}

#[tokio::test]
async fn unreachable_engine_is_named() {
    let spec = SwarmConfig {
        host: Some("unix:///nonexistent.sock".into()),
        network: None,
    };
    let err = match SwarmBackend::connect(&spec, "x").await {
        Ok(_) => panic!("connected to a socket that does not exist"),
        Err(e) => e,
    };
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string().contains("unix:///nonexistent.sock"),
        "{err}"
    );
}
