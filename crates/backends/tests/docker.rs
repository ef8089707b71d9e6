//! The Docker backend against a real Docker Engine (the test script starts dockerd as root).
//!
//! Every test uses its own instance name and removes what it created, also when it fails (a
//! guard removes the instance's containers and the test's foreign containers on drop).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptions, InspectContainerOptions,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use microscaler_backends::docker::DockerBackend;
use microscaler_backends::docker::DockerConfig;
use microscaler_backends::Service;
use microscaler_backends::{docker_api, labels, Backend, BackendError};

use common::{running, service, unique, wait_for};

const SETTLE: Duration = Duration::from_secs(20);

fn spec() -> DockerConfig {
    DockerConfig {
        host: None,
        start_parallelism: 4,
        network: "none".into(),
        allocatable: None,
        ..DockerConfig::default()
    }
}

/// Connects a backend for `instance`, or reports the missing engine (a panic under CI=true).
async fn connect(instance: &str) -> Option<DockerBackend> {
    match DockerBackend::connect(&spec(), instance).await {
        Ok(b) => Some(b),
        Err(e) => {
            common::missing_service("Docker engine", e);
            None
        }
    }
}

/// A raw client, to check what the engine really holds.
async fn raw() -> Docker {
    docker_api::connect(None).await.expect("connect bollard")
}

/// Removes, on drop, every container of `instance` and the named foreign containers, so a
/// failing test leaves nothing behind either.
struct Cleanup {
    instance: String,
    foreign: Vec<String>,
}

impl Cleanup {
    fn new(instance: &str) -> Self {
        Cleanup {
            instance: instance.to_string(),
            foreign: Vec::new(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let instance = self.instance.clone();
        let foreign = std::mem::take(&mut self.foreign);
        // Drop cannot await; a thread with its own runtime can, whatever runtime we are in.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(docker) = docker_api::connect(None).await else {
                    return;
                };
                let mut ids = foreign;
                ids.extend(list(&docker, &instance, None, true).await);
                for id in ids {
                    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
                    let _ = docker.remove_container(&id, Some(opts)).await;
                }
            })
        })
        .join();
    }
}

/// Ids of the containers carrying `instance` (and `service`, if given), like
/// `docker ps [-a] --filter label=...`.
async fn list(
    docker: &Docker,
    instance: &str,
    service: Option<&Service>,
    all: bool,
) -> Vec<String> {
    let mut label = vec![format!("{}={instance}", labels::INSTANCE)];
    if let Some(s) = service {
        label.push(format!("{}={}", labels::SERVICE, s.name));
    }
    let filters = HashMap::from([("label", label)]);
    let opts = ListContainersOptionsBuilder::new()
        .all(all)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(opts))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Whether a container with this id or name exists, in any state.
async fn exists(docker: &Docker, id: &str) -> bool {
    docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .is_ok()
}

/// The engine's container events of `instance` from `since` (seconds since the epoch) on,
/// only `event`s if given: what happened, read back from the engine itself.
fn instance_events(
    docker: &Docker,
    instance: &str,
    since: u64,
    event: Option<&str>,
) -> impl futures::Stream<Item = Result<bollard::models::EventMessage, bollard::errors::Error>> {
    let mut filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        (
            "label".to_string(),
            vec![format!("{}={instance}", labels::INSTANCE)],
        ),
    ]);
    if let Some(e) = event {
        filters.insert("event".to_string(), vec![e.to_string()]);
    }
    docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        until: Some((since + 3600).to_string()),
        filters: Some(filters),
    }))
}

/// A second before now, in seconds since the epoch (the engine's clock is this machine's).
fn a_second_ago() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 1
}

/// The contract suite against the real engine. The foreign object is a running container of
/// the built-in image without microscaler's labels.
struct DockerHarness {
    instance: String,
    foreign: String,
}

impl microscaler_testkit::contract::Harness for DockerHarness {
    type B = DockerBackend;

    async fn connect(&self) -> DockerBackend {
        DockerBackend::connect(&spec(), &self.instance)
            .await
            .expect("connect to the engine")
    }

    async fn add_foreign(&self, _replicas: u32) {
        let docker = raw().await;
        let image = docker_api::ensure_replica_image(&docker)
            .await
            .expect("the built-in image");
        let body = ContainerCreateBody {
            image: Some(image),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::new()
            .name(&self.foreign)
            .build();
        docker.create_container(Some(opts), body).await.unwrap();
        docker.start_container(&self.foreign, None).await.unwrap();
    }

    async fn foreign_running(&self) -> u32 {
        let c = raw()
            .await
            .inspect_container(&self.foreign, None::<InspectContainerOptions>)
            .await;
        u32::from(c.ok().and_then(|c| c.state?.running) == Some(true))
    }

    async fn remove_foreign(&self) {
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        let _ = raw()
            .await
            .remove_container(&self.foreign, Some(opts))
            .await;
    }

    async fn unreachable(&self) -> Option<Result<DockerBackend, BackendError>> {
        let nowhere = DockerConfig {
            host: Some("unix:///nonexistent/docker.sock".into()),
            ..spec()
        };
        Some(DockerBackend::connect(&nowhere, &self.instance).await)
    }

    fn settle(&self) -> Duration {
        SETTLE
    }
}

#[tokio::test]
async fn contract() {
    let instance = unique("dk-contract");
    if connect(&instance).await.is_none() {
        return;
    }
    let mut cleanup = Cleanup::new(&instance);
    let h = DockerHarness {
        instance: instance.clone(),
        foreign: unique("foreign-contract"),
    };
    cleanup.foreign.push(h.foreign.clone());
    let (a, b) = (service(&unique("a"), vec![]), service(&unique("b"), vec![]));
    microscaler_testkit::contract::run(&h, &a, &b).await;
}

#[tokio::test]
async fn scale_up_and_down_leaves_no_stopped_containers() {
    let instance = unique("dk-scale");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup::new(&instance);
    let docker = raw().await;
    let svc = service(&unique("web"), vec![]);
    backend.prepare(std::slice::from_ref(&svc)).await.unwrap();

    let out = backend.scale(&svc, 5).await.unwrap();
    assert_eq!((out.started, out.stopped), (5, 0), "{out:?}");
    assert!(out.failures.is_empty(), "{out:?}");
    // `docker ps`: five running, and nothing else of ours exists.
    assert_eq!(list(&docker, &instance, Some(&svc), false).await.len(), 5);
    assert_eq!(list(&docker, &instance, Some(&svc), true).await.len(), 5);
    let obs = backend.observe().await.unwrap();
    assert_eq!(running(&obs, &svc), 5, "{obs:?}");
    assert_eq!(obs.replicas.len(), 5);
    assert_eq!(obs.hosts.len(), 1);
    let host = &obs.hosts[0];
    assert!(
        host.ready && host.cpus.unwrap_or(0.0) >= 1.0 && host.memory_bytes.unwrap_or(0) > 0,
        "{host:?}"
    );
    assert!(obs.replicas.iter().all(|r| r.host == host.id), "{obs:?}");

    let out = backend.scale(&svc, 2).await.unwrap();
    assert_eq!((out.started, out.stopped), (0, 3), "{out:?}");
    // `docker ps -a`: only the two running ones remain; nothing stopped is left behind.
    let running_ids = list(&docker, &instance, Some(&svc), false).await;
    let all_ids = list(&docker, &instance, Some(&svc), true).await;
    assert_eq!(running_ids.len(), 2);
    assert_eq!(
        all_ids.len(),
        2,
        "stopped containers left behind: {all_ids:?}"
    );

    let out = backend.scale(&svc, 0).await.unwrap();
    assert_eq!((out.started, out.stopped), (0, 2), "{out:?}");
    assert!(list(&docker, &instance, None, true).await.is_empty());
    backend.shutdown(&[svc], true).await.unwrap();
}

#[tokio::test]
async fn adopts_replicas_of_an_earlier_run() {
    let instance = unique("dk-adopt");
    let Some(first) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup::new(&instance);
    let svc = service(&unique("worker"), vec![]);
    let services = std::slice::from_ref(&svc);
    first.prepare(services).await.unwrap();
    let out = first.scale(&svc, 3).await.unwrap();
    assert_eq!(out.started, 3, "{out:?}");
    first.shutdown(services, false).await.unwrap();
    drop(first);

    let second = connect(&instance).await.expect("reconnect");
    second.prepare(services).await.unwrap();
    let obs = second.observe().await.unwrap();
    assert_eq!(running(&obs, &svc), 3, "{obs:?}");
    let out = second.scale(&svc, 3).await.unwrap();
    assert_eq!((out.started, out.stopped), (0, 0), "no duplicates: {out:?}");
    assert_eq!(list(&raw().await, &instance, None, true).await.len(), 3);
    second.shutdown(services, true).await.unwrap();
    assert!(list(&raw().await, &instance, None, true).await.is_empty());
}

#[tokio::test]
async fn foreign_containers_are_never_touched() {
    let instance = unique("dk-foreign");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let mut cleanup = Cleanup::new(&instance);
    let docker = raw().await;
    let svc = service(&unique("svc"), vec![]);
    backend.prepare(std::slice::from_ref(&svc)).await.unwrap();
    let image = docker_api::replica_image();

    // Running and unlabelled; running with our service label but another instance's; and one
    // stopped with our instance label but no service label (observe sweeps only our stopped
    // replicas, never this one).
    let other_instance = unique("dk-other");
    let foreign: [(&str, HashMap<String, String>, bool); 3] = [
        ("unlabelled", HashMap::new(), true),
        (
            "other-instance",
            HashMap::from([
                (labels::INSTANCE.to_string(), other_instance.clone()),
                (labels::SERVICE.to_string(), svc.name.to_string()),
            ]),
            true,
        ),
        (
            "no-service-label",
            HashMap::from([(labels::INSTANCE.to_string(), instance.clone())]),
            false,
        ),
    ];
    let mut names = Vec::new();
    for (what, labels, keep_running) in foreign {
        let name = unique(&format!("foreign-{what}"));
        cleanup.foreign.push(name.clone());
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        docker.create_container(Some(opts), body).await.unwrap();
        docker.start_container(&name, None).await.unwrap();
        if !keep_running {
            docker.stop_container(&name, None).await.unwrap();
        }
        names.push(name);
    }

    let out = backend.scale(&svc, 3).await.unwrap();
    assert_eq!(out.started, 3, "{out:?}");
    let obs = backend.observe().await.unwrap();
    assert_eq!(
        running(&obs, &svc),
        3,
        "foreign containers are not counted: {obs:?}"
    );
    let out = backend.scale(&svc, 0).await.unwrap();
    assert_eq!(out.stopped, 3, "{out:?}");
    backend.scale(&svc, 2).await.unwrap();
    backend
        .shutdown(std::slice::from_ref(&svc), true)
        .await
        .unwrap();
    let obs = backend.observe().await.unwrap();
    assert!(obs.replicas.is_empty(), "{obs:?}");

    for name in &names {
        assert!(
            exists(&docker, name).await,
            "foreign container {name} was removed"
        );
    }
    let state = |name: &String| {
        let docker = docker.clone();
        let name = name.clone();
        async move {
            docker
                .inspect_container(&name, None::<InspectContainerOptions>)
                .await
                .unwrap()
                .state
                .and_then(|s| s.running)
        }
    };
    assert_eq!(
        state(&names[0]).await,
        Some(true),
        "unlabelled container was stopped"
    );
    assert_eq!(
        state(&names[1]).await,
        Some(true),
        "other instance's container was stopped"
    );
}

#[tokio::test]
async fn a_failed_start_is_reported_and_the_rest_goes_on() {
    let instance = unique("dk-fail");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup::new(&instance);
    let docker = raw().await;
    let good = service(&unique("good"), vec![]);
    let bad_cmd = service(&unique("badcmd"), vec!["/nonexistent".into()]);
    let mut bad_image = service(&unique("badimg"), vec![]);
    bad_image.workload.run_mut().unwrap().image = Some("microscaler-test-no-such-image:1".into());

    // prepare names the missing image and says what to do.
    let err = backend
        .prepare(&[good.clone(), bad_image.clone()])
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("microscaler-test-no-such-image:1")
            && msg.contains("no registry")
            && msg.contains("import"),
        "{msg}"
    );
    backend
        .prepare(&[good.clone(), bad_cmd.clone()])
        .await
        .unwrap();

    let out = backend
        .scale(&bad_cmd, 2)
        .await
        .expect("a failed start is not an error");
    assert_eq!(out.started, 0, "{out:?}");
    assert_eq!(out.failures.len(), 2, "{out:?}");
    assert!(out.failures.iter().all(|f| f.service == bad_cmd.name));
    assert!(
        out.failures[0].message.contains("/nonexistent"),
        "engine's message kept: {out:?}"
    );
    assert!(
        list(&docker, &instance, Some(&bad_cmd), true)
            .await
            .is_empty(),
        "a container that failed to start is removed"
    );

    let out = backend
        .scale(&bad_image, 1)
        .await
        .expect("a failed create is not an error");
    assert_eq!((out.started, out.failures.len()), (0, 1), "{out:?}");
    assert!(
        out.failures[0]
            .message
            .contains("microscaler-test-no-such-image"),
        "{out:?}"
    );

    let out = backend.scale(&good, 2).await.unwrap();
    assert_eq!(out.started, 2, "{out:?}");
    assert!(out.failures.is_empty());
    let obs = backend.observe().await.unwrap();
    assert_eq!(running(&obs, &good), 2, "{obs:?}");
    assert_eq!(running(&obs, &bad_cmd), 0, "{obs:?}");
    assert_eq!(list(&docker, &instance, None, true).await.len(), 2);
    backend
        .shutdown(&[good, bad_cmd, bad_image], true)
        .await
        .unwrap();
}

#[tokio::test]
async fn replicas_stop_promptly_on_sigterm() {
    let instance = unique("dk-term");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup::new(&instance);
    let mut svc = service(&unique("term"), vec![]);
    svc.stop_grace = Duration::from_secs(10);
    backend.prepare(std::slice::from_ref(&svc)).await.unwrap();
    backend.scale(&svc, 3).await.unwrap();
    let obs = wait_for(&backend, SETTLE, |o| running(o, &svc) == 3).await;
    assert_eq!(running(&obs, &svc), 3, "{obs:?}");

    let start = Instant::now();
    let out = backend.scale(&svc, 0).await.unwrap();
    let took = start.elapsed();
    assert_eq!(out.stopped, 3, "{out:?}");
    // A behaviour check, not a benchmark: a replica that ignored SIGTERM would take the full
    // 10 s grace before the engine killed it.
    assert!(took < Duration::from_secs(5), "3 -> 0 took {took:?}");
    assert!(list(&raw().await, &instance, None, true).await.is_empty());
}

/// Stops go to the engine at most `stop_parallelism` at a time (Docker 20.10 loses track of
/// containers when about 1,000 are removed at once). Read from the engine's own event stream: a
/// replica is being ended from its `kill` (the stop's SIGTERM) to its `destroy` (the removal),
/// and never more than two are at once, also across two services scaled down together (the
/// control loop changes many services at once). Without the bound all six are; with a bound
/// per call instead of per backend, four (both checked).
#[tokio::test]
async fn stops_are_bounded_by_stop_parallelism() {
    let instance = unique("dk-stoppar");
    let spec = DockerConfig {
        stop_parallelism: 2,
        ..spec()
    };
    let backend = match DockerBackend::connect(&spec, &instance).await {
        Ok(b) => b,
        Err(e) => {
            common::missing_service("Docker engine", e);
            return;
        }
    };
    let _cleanup = Cleanup::new(&instance);
    let docker = raw().await;
    let (a, b) = (
        service(&unique("stoppar"), vec![]),
        service(&unique("stoppar"), vec![]),
    );
    let both = [a.clone(), b.clone()];
    backend.prepare(&both).await.unwrap();
    for svc in &both {
        backend.scale(svc, 3).await.unwrap();
    }
    let obs = wait_for(&backend, SETTLE, |o| {
        both.iter().all(|s| running(o, s) == 3)
    })
    .await;
    assert!(both.iter().all(|s| running(&obs, s) == 3), "{obs:?}");

    let since = a_second_ago();
    let other = backend.clone();
    let (out_a, out_b) = tokio::join!(backend.scale(&a, 0), other.scale(&b, 0));
    assert_eq!(out_a.unwrap().stopped + out_b.unwrap().stopped, 6);
    let mut events = instance_events(&docker, &instance, since, None);
    let (mut ending, mut most, mut destroyed) = (std::collections::HashSet::new(), 0, 0);
    let read = tokio::time::timeout(SETTLE, async {
        while let Some(e) = events.next().await {
            let e = e.expect("event stream");
            let id = e.actor.and_then(|a| a.id).unwrap_or_default();
            match e.action.as_deref() {
                Some("kill") => {
                    ending.insert(id);
                    most = most.max(ending.len());
                }
                Some("destroy") => {
                    ending.remove(&id);
                    destroyed += 1;
                    if destroyed == 6 {
                        return;
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "only {destroyed} of 6 destroy events");
    assert!(
        (1..=2).contains(&most),
        "{most} replicas being stopped at once"
    );
    assert!(list(&docker, &instance, None, true).await.is_empty());
}

/// `init = true` runs Docker's init as PID 1: a command that ignores SIGTERM as PID 1 (busybox
/// `sleep`) gets the signal and ends with it (exit 143), where without it the engine kills it
/// after the grace period (exit 137). Read from the containers' `die` events.
#[tokio::test]
async fn init_passes_sigterm_to_the_command() {
    let instance = unique("dk-init");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup::new(&instance);
    let docker = raw().await;
    let image = microscaler_testkit::busybox_image();
    let sleeper = |name: &str, init: bool| {
        let mut svc = service(
            &unique(name),
            vec!["/bin/busybox".into(), "sleep".into(), "3600".into()],
        );
        let run = svc.workload.run_mut().unwrap();
        run.image = Some(image.to_string());
        run.init = init;
        svc.stop_grace = Duration::from_secs(1);
        svc
    };
    let (with, without) = (sleeper("init", true), sleeper("noinit", false));
    let both = [with.clone(), without.clone()];
    backend.prepare(&both).await.unwrap();
    for svc in &both {
        assert_eq!(backend.scale(svc, 1).await.unwrap().started, 1);
    }
    let obs = wait_for(&backend, SETTLE, |o| {
        both.iter().all(|s| running(o, s) == 1)
    })
    .await;
    assert!(both.iter().all(|s| running(&obs, s) == 1), "{obs:?}");
    for (svc, init) in [(&with, Some(true)), (&without, None)] {
        let id = &list(&docker, &instance, Some(svc), false).await[0];
        let c = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .unwrap();
        let set = c.host_config.unwrap().init.filter(|i| *i);
        assert_eq!(set, init, "{}", svc.name);
    }

    let since = a_second_ago();
    for svc in &both {
        assert_eq!(backend.scale(svc, 0).await.unwrap().stopped, 1);
    }
    let mut events = instance_events(&docker, &instance, since, Some("die"));
    let mut exits = HashMap::new();
    let read = tokio::time::timeout(SETTLE, async {
        while let Some(e) = events.next().await {
            let attrs = e.expect("event stream").actor.and_then(|a| a.attributes);
            let attrs = attrs.unwrap_or_default();
            if let (Some(svc), Some(code)) = (attrs.get(labels::SERVICE), attrs.get("exitCode")) {
                exits.insert(svc.clone(), code.clone());
            }
            if exits.len() == 2 {
                return;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "die events: {exits:?}");
    assert_eq!(exits[with.name.as_str()], "143", "{exits:?}");
    assert_eq!(exits[without.name.as_str()], "137", "{exits:?}");
}

#[tokio::test]
async fn the_daemon_environment_does_not_leak() {
    // Edition 2021: `set_var` is safe; no other test reads this variable.
    std::env::set_var("MS_SECRET_TEST", "1");
    let instance = unique("dk-env");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup::new(&instance);
    let docker = raw().await;
    let mut svc = service(&unique("env"), vec![]);
    svc.workload
        .run_mut()
        .unwrap()
        .env
        .insert("GREETING".into(), "hello world".into());
    svc.stop_grace = Duration::from_millis(2500);
    backend.prepare(std::slice::from_ref(&svc)).await.unwrap();
    let out = backend.scale(&svc, 1).await.unwrap();
    assert_eq!(out.started, 1, "{out:?}");

    let ids = list(&docker, &instance, Some(&svc), true).await;
    assert_eq!(ids.len(), 1);
    let c = docker
        .inspect_container(&ids[0], None::<InspectContainerOptions>)
        .await
        .unwrap();
    let config = c.config.unwrap();
    let mut env = config.env.unwrap_or_default();
    env.sort();
    assert_eq!(
        env,
        vec![
            "GREETING=hello world".to_string(),
            format!("MICROSCALER_INSTANCE={instance}"),
            format!("MICROSCALER_SERVICE={}", svc.name),
        ]
    );
    // The rest of the container spec: name, network, no restart policy, the grace as the
    // container's stop timeout (rounded up to whole seconds).
    let name = c.name.unwrap();
    assert!(
        name.starts_with(&format!("/ms-{instance}-{}-", svc.name)),
        "{name}"
    );
    assert_eq!(config.stop_timeout, Some(3));
    let host = c.host_config.unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    let restart = host
        .restart_policy
        .and_then(|p| p.name)
        .map(|n| n.to_string());
    assert!(
        matches!(restart.as_deref(), None | Some("") | Some("no")),
        "{restart:?}"
    );
    backend.shutdown(&[svc], true).await.unwrap();
}

#[tokio::test]
async fn observe_removes_replicas_that_exited_on_their_own() {
    let instance = unique("dk-sweep");
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let _cleanup = Cleanup::new(&instance);
    let docker = raw().await;
    let svc = service(&unique("crashy"), vec![]);
    backend.prepare(std::slice::from_ref(&svc)).await.unwrap();
    backend.scale(&svc, 2).await.unwrap();
    let ids = list(&docker, &instance, Some(&svc), false).await;
    assert_eq!(ids.len(), 2);
    let opts = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
    docker.kill_container(&ids[0], Some(opts)).await.unwrap();

    let obs = wait_for(&backend, SETTLE, |o| running(o, &svc) == 1).await;
    assert_eq!(running(&obs, &svc), 1, "{obs:?}");
    // The observe that saw it exited removed it.
    let obs = backend.observe().await.unwrap();
    assert_eq!(obs.replicas.len(), 1, "{obs:?}");
    assert!(
        !exists(&docker, &ids[0]).await,
        "an exited replica was left behind"
    );
    assert_eq!(
        list(&docker, &instance, None, true).await,
        vec![ids[1].clone()]
    );
    backend.shutdown(&[svc], true).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_engine_gives_a_clear_error() {
    let spec = DockerConfig {
        host: Some("unix:///nonexistent.sock".into()),
        ..spec()
    };
    match DockerBackend::connect(&spec, "dk-unreachable").await {
        Ok(_) => panic!("connected to a socket that does not exist"),
        Err(e @ BackendError::Unreachable { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("unix:///nonexistent.sock"), "{msg}");
            assert!(msg.contains("DOCKER_HOST"), "{msg}");
        }
        Err(e) => panic!("expected Unreachable, got {:?}: {e}", e.kind()),
    }
}
