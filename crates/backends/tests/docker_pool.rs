//! The Docker backend's warm pool and pause on preemption, against a real Docker Engine (the
//! test script starts dockerd as root).
//!
//! Every test uses its own instance name and removes what it created, also when it fails (a
//! guard removes the instance's containers on drop).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use microscaler_backends::docker::DockerBackend;
use microscaler_backends::docker::DockerConfig;
use microscaler_backends::Service;
use microscaler_backends::{docker_api, labels, Backend, Observation};
use microscaler_core::{PoolSpec, Preempt};

use common::{running, unique, wait_for};

const SETTLE: Duration = Duration::from_secs(30);

fn spec() -> DockerConfig {
    DockerConfig {
        host: None,
        start_parallelism: 4,
        network: "none".into(),
        allocatable: None,
        ..DockerConfig::default()
    }
}

/// A service of the built-in replica with this pool.
fn service(name: &str, size: u32, preempt: Preempt) -> Service {
    Service {
        pool: PoolSpec {
            size,
            preempt,
            paused_takes_slot: false,
        },
        ..common::service(name, vec![])
    }
}

/// Connects a backend for `instance`, or reports the missing engine (a panic under CI=true).
async fn connect(instance: &str) -> Option<DockerBackend> {
    connect_with(instance, spec()).await
}

/// Connects a backend for `instance` with `spec`.
async fn connect_with(instance: &str, spec: DockerConfig) -> Option<DockerBackend> {
    match DockerBackend::connect(&spec, instance).await {
        Ok(b) => Some(b),
        Err(e) => {
            common::missing_service("Docker engine", e);
            None
        }
    }
}

async fn raw() -> Docker {
    docker_api::connect(None).await.expect("connect bollard")
}

/// Removes, on drop, every container of `instance`, so a failing test leaves nothing behind.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let instance = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(docker) = docker_api::connect(None).await else {
                    return;
                };
                for id in ids(&docker, &instance, None).await {
                    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
                    let _ = docker.remove_container(&id, Some(opts)).await;
                }
            })
        })
        .join();
    }
}

/// Ids of the containers of `instance` in `status` (any status when `None`), as the engine
/// reports them.
async fn ids(docker: &Docker, instance: &str, status: Option<&str>) -> BTreeSet<String> {
    let mut filters = HashMap::from([("label", vec![format!("{}={instance}", labels::INSTANCE)])]);
    if let Some(s) = status {
        filters.insert("status", vec![s.to_string()]);
    }
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
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

/// Paused replicas of `svc` in `obs`.
fn paused(obs: &Observation, svc: &Service) -> u32 {
    obs.paused.get(&svc.name).copied().unwrap_or(0)
}

fn pending(obs: &Observation, svc: &Service) -> u32 {
    obs.services.get(&svc.name).map_or(0, |o| o.pending)
}

/// The process inside a container: its pid on the host and when it started.
async fn process_of(docker: &Docker, id: &str) -> (i64, String) {
    let c = docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .expect("inspect container");
    let state = c.state.expect("state");
    (
        state.pid.expect("pid"),
        state.started_at.expect("started_at"),
    )
}

/// A pool fills to its size in the background; paused replicas are neither running nor
/// pending; a scale-up unpauses the pooled containers (same ids); the pool refills; a
/// `preempt = "stop"` scale-down removes; shutdown(remove) removes the paused ones too.
#[tokio::test]
async fn pool_fills_scale_up_unpauses_and_refills() {
    let instance = unique("pool");
    let _cleanup = Cleanup(instance.clone());
    let svc = service("web", 2, Preempt::Stop);
    let Some((backend, docker)) = prepared(&instance, &svc).await else {
        return;
    };

    // The first observe starts the refill; observe never waits for it.
    let obs = wait_for(&backend, SETTLE, |o| paused(o, &svc) == 2).await;
    assert_eq!(paused(&obs, &svc), 2, "pool filled: {obs:?}");
    assert_eq!(
        running(&obs, &svc),
        0,
        "pooled replicas are not running: {obs:?}"
    );
    assert_eq!(
        pending(&obs, &svc),
        0,
        "pooled replicas are not pending: {obs:?}"
    );
    assert!(obs.replicas.is_empty(), "{obs:?}");
    let pooled = ids(&docker, &instance, Some("paused")).await;
    assert_eq!(pooled.len(), 2, "two paused containers on the engine");
    assert_eq!(ids(&docker, &instance, None).await, pooled, "nothing else");

    // Scale-up from the pool: an unpause of exactly the pooled containers.
    let out = backend.scale(&svc, 2).await.expect("scale up");
    assert_eq!((out.started, out.resumed), (2, 2), "{out:?}");
    assert!(out.failures.is_empty(), "{out:?}");
    let now_running = ids(&docker, &instance, Some("running")).await;
    assert_eq!(
        now_running, pooled,
        "the new replicas are the former pooled ones"
    );

    // The pool returns to its size, and the refill never shows up as running.
    let obs = wait_for(&backend, SETTLE, |o| {
        assert!(
            running(o, &svc) <= 2,
            "a filling replica counted as running: {o:?}"
        );
        paused(o, &svc) == 2
    })
    .await;
    assert_eq!((running(&obs, &svc), paused(&obs, &svc)), (2, 2), "{obs:?}");
    let refilled = ids(&docker, &instance, Some("paused")).await;
    assert_eq!(refilled.len(), 2);
    assert!(refilled.is_disjoint(&pooled), "new pool containers");
    // Settled: no more than the pool's size is ever created.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ids(&docker, &instance, None).await.len(), 4);

    // Beyond the pool: 2 unpaused and 1 created.
    let out = backend
        .scale(&svc, 5)
        .await
        .expect("scale up beyond the pool");
    assert_eq!((out.started, out.resumed), (3, 2), "{out:?}");
    let obs = wait_for(&backend, SETTLE, |o| {
        running(o, &svc) == 5 && paused(o, &svc) == 2
    })
    .await;
    assert_eq!((running(&obs, &svc), paused(&obs, &svc)), (5, 2), "{obs:?}");

    // preempt = "stop": a scale-down removes, the pool stays.
    let before = ids(&docker, &instance, Some("running")).await;
    let out = backend.scale(&svc, 1).await.expect("scale down");
    assert_eq!((out.stopped, out.paused), (4, 0), "{out:?}");
    let obs = backend.observe().await.expect("observe");
    assert_eq!((running(&obs, &svc), paused(&obs, &svc)), (1, 2), "{obs:?}");
    let after = ids(&docker, &instance, None).await;
    assert_eq!(after.len(), 3, "stopped replicas are removed");
    assert_eq!(before.difference(&after).count(), 4);

    backend
        .shutdown(std::slice::from_ref(&svc), true)
        .await
        .expect("shutdown");
    assert!(
        ids(&docker, &instance, None).await.is_empty(),
        "shutdown(remove) removes paused replicas too"
    );
}

/// `preempt = "pause"`: a scale-down freezes the replicas (kept, not counted as running), a
/// scale-up resumes the same containers with the same process inside (pid and start time).
#[tokio::test]
async fn preempt_pause_keeps_the_process_and_resumes_it() {
    let instance = unique("pausepre");
    let _cleanup = Cleanup(instance.clone());
    let Some(backend) = connect(&instance).await else {
        return;
    };
    let docker = raw().await;
    let svc = service("worker", 0, Preempt::Pause);
    backend
        .prepare(std::slice::from_ref(&svc))
        .await
        .expect("prepare");

    let out = backend.scale(&svc, 3).await.expect("scale up");
    assert_eq!((out.started, out.resumed), (3, 0), "{out:?}");
    let obs = wait_for(&backend, SETTLE, |o| running(o, &svc) == 3).await;
    assert_eq!(running(&obs, &svc), 3, "{obs:?}");
    let mut before = HashMap::new();
    for id in ids(&docker, &instance, Some("running")).await {
        before.insert(id.clone(), process_of(&docker, &id).await);
    }

    // Preempted: two frozen, one still running.
    let out = backend.scale(&svc, 1).await.expect("scale down");
    assert_eq!((out.stopped, out.paused), (2, 2), "{out:?}");
    let obs = backend.observe().await.expect("observe");
    assert_eq!(
        running(&obs, &svc),
        1,
        "paused replicas are not running: {obs:?}"
    );
    assert_eq!(pending(&obs, &svc), 0, "nor pending: {obs:?}");
    assert_eq!(paused(&obs, &svc), 2, "{obs:?}");
    let frozen = ids(&docker, &instance, Some("paused")).await;
    assert_eq!(frozen.len(), 2);
    assert!(frozen.iter().all(|id| before.contains_key(id)));
    // Kept while frozen: no refill trims them (they are within the service's max).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let obs = backend.observe().await.expect("observe");
    assert_eq!(paused(&obs, &svc), 2, "{obs:?}");

    // Capacity returns: the same containers resume, the same processes inside.
    let out = backend.scale(&svc, 3).await.expect("resume");
    assert_eq!((out.started, out.resumed), (3 - 1, 2), "{out:?}");
    let now = ids(&docker, &instance, Some("running")).await;
    assert_eq!(
        now,
        before.keys().cloned().collect::<BTreeSet<_>>(),
        "same containers"
    );
    for (id, process) in &before {
        assert_eq!(
            &process_of(&docker, id).await,
            process,
            "container {id} kept its process (pid, start time)"
        );
    }
    let obs = backend.observe().await.expect("observe");
    assert_eq!((running(&obs, &svc), paused(&obs, &svc)), (3, 0), "{obs:?}");

    // Preempted again, then shut down with removal: the frozen ones go too.
    backend.scale(&svc, 0).await.expect("scale to 0");
    assert_eq!(ids(&docker, &instance, Some("paused")).await.len(), 3);
    backend
        .shutdown(std::slice::from_ref(&svc), true)
        .await
        .expect("shutdown");
    assert!(ids(&docker, &instance, None).await.is_empty());
}

/// A restarted daemon adopts the paused containers of its instance as its pool: it creates no
/// new ones and scales up from them.
#[tokio::test]
async fn restarted_daemon_adopts_the_pool() {
    let instance = unique("pooladopt");
    let _cleanup = Cleanup(instance.clone());
    let Some(first) = connect(&instance).await else {
        return;
    };
    let docker = raw().await;
    let svc = service("web", 2, Preempt::Stop);
    let services = std::slice::from_ref(&svc);
    first.prepare(services).await.expect("prepare");
    let obs = wait_for(&first, SETTLE, |o| paused(o, &svc) == 2).await;
    assert_eq!(paused(&obs, &svc), 2, "{obs:?}");
    first.shutdown(services, false).await.expect("leave");
    drop(first);
    let pooled = ids(&docker, &instance, Some("paused")).await;
    assert_eq!(pooled.len(), 2, "left for the next start");

    let second = connect(&instance).await.expect("reconnect");
    second.prepare(services).await.expect("prepare again");
    let obs = second.observe().await.expect("observe");
    assert_eq!((running(&obs, &svc), paused(&obs, &svc)), (0, 2), "{obs:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ids(&docker, &instance, None).await,
        pooled,
        "adopted, not duplicated"
    );

    let out = second.scale(&svc, 1).await.expect("scale up");
    assert_eq!((out.started, out.resumed), (1, 1), "{out:?}");
    let now_running = ids(&docker, &instance, Some("running")).await;
    assert_eq!(now_running.len(), 1);
    assert!(
        now_running.is_subset(&pooled),
        "taken from the adopted pool"
    );

    second.shutdown(services, true).await.expect("shutdown");
    assert!(ids(&docker, &instance, None).await.is_empty());
}

/// A backend of `instance` prepared for `svc`, and a raw client; `None` without an engine.
async fn prepared(instance: &str, svc: &Service) -> Option<(DockerBackend, Docker)> {
    prepared_with(instance, svc, spec()).await
}

/// [`prepared`] with `spec`.
async fn prepared_with(
    instance: &str,
    svc: &Service,
    spec: DockerConfig,
) -> Option<(DockerBackend, Docker)> {
    let backend = connect_with(instance, spec).await?;
    backend
        .prepare(std::slice::from_ref(svc))
        .await
        .expect("prepare");
    Some((backend, raw().await))
}

/// A prepared backend of a fresh instance whose service `web` has a settled pool of 2 (filled,
/// and the refill that filled it finished); the ids of the pooled containers. `None` without
/// an engine.
async fn settled_pool(
    instance: &str,
) -> Option<(DockerBackend, Docker, Service, BTreeSet<String>)> {
    settled_pool_with(instance, spec()).await
}

/// [`settled_pool`] with `spec`.
async fn settled_pool_with(
    instance: &str,
    spec: DockerConfig,
) -> Option<(DockerBackend, Docker, Service, BTreeSet<String>)> {
    let svc = service("web", 2, Preempt::Stop);
    let (backend, docker) = prepared_with(instance, &svc, spec).await?;
    let obs = wait_for(&backend, SETTLE, |o| paused(o, &svc) == 2).await;
    assert_eq!(paused(&obs, &svc), 2, "pool filled: {obs:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pooled = ids(&docker, instance, Some("paused")).await;
    Some((backend, docker, svc, pooled))
}

/// Shuts `backend` down with removal and checks that nothing of `instance` is left.
async fn removed_on_shutdown(
    backend: &DockerBackend,
    docker: &Docker,
    instance: &str,
    svc: &Service,
) {
    backend
        .shutdown(std::slice::from_ref(svc), true)
        .await
        .expect("shutdown");
    assert!(ids(docker, instance, None).await.is_empty());
}

/// The backend as it works without the event view (`events = false`, or while the engine's
/// event stream is down): every observe lists.
fn listing() -> DockerConfig {
    DockerConfig {
        events: false,
        ..spec()
    }
}

/// Without the event view, `scale` reuses the listing of the `observe` just before it (no
/// second listing), once: a second scale of the same service lists again, so the replica the
/// first one unpaused is never counted as pooled twice.
#[tokio::test]
async fn scale_reuses_the_observed_listing_once() {
    let instance = unique("poolsnap");
    let _cleanup = Cleanup(instance.clone());
    let Some((backend, docker, svc, pooled)) = settled_pool_with(&instance, listing()).await else {
        return;
    };

    backend.observe().await.expect("observe");
    let listed = backend.listings();
    let out = backend.scale(&svc, 1).await.expect("scale to 1");
    assert_eq!((out.started, out.resumed), (1, 1), "{out:?}");
    assert_eq!(
        backend.listings(),
        listed,
        "the scale right after observe reused its listing"
    );

    // No observe in between: the listing is stale for this service now.
    let out = backend.scale(&svc, 2).await.expect("scale to 2");
    assert_eq!((out.started, out.resumed), (1, 1), "{out:?}");
    assert!(out.failures.is_empty(), "{out:?}");
    assert!(backend.listings() > listed, "the second scale listed again");
    let now_running = ids(&docker, &instance, Some("running")).await;
    assert_eq!(
        now_running, pooled,
        "both pooled replicas unpaused, each once, nothing created"
    );

    removed_on_shutdown(&backend, &docker, &instance, &svc).await;
}

/// A pooled replica removed behind microscaler's back between `observe` and `scale`: the
/// service ends at its target, nothing counted twice. With the event view, the removal's event
/// usually reaches the view first and the other pooled replica is taken; if not, or without the
/// view (the listing `scale` reuses still shows it), its unpause fails and a new replica is
/// started instead. Both end the same.
async fn a_pooled_replica_gone_since_observe(prefix: &str, spec: DockerConfig) {
    let instance = unique(prefix);
    let _cleanup = Cleanup(instance.clone());
    let Some((backend, docker, svc, pooled)) = settled_pool_with(&instance, spec).await else {
        return;
    };
    let pooled: Vec<String> = pooled.into_iter().collect();

    backend.observe().await.expect("observe");
    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
    docker
        .remove_container(&pooled[0], Some(opts))
        .await
        .expect("remove a pooled replica behind the backend's back");
    let out = backend.scale(&svc, 2).await.expect("scale up");
    assert_eq!((out.started, out.resumed), (2, 1), "{out:?}");
    assert!(out.failures.is_empty(), "{out:?}");
    let obs = wait_for(&backend, SETTLE, |o| running(o, &svc) == 2).await;
    assert_eq!(running(&obs, &svc), 2, "{obs:?}");
    let now_running = ids(&docker, &instance, Some("running")).await;
    assert!(
        now_running.contains(&pooled[1]),
        "the other one was unpaused"
    );
    assert!(!now_running.contains(&pooled[0]));
    assert_eq!(now_running.len(), 2, "{now_running:?}");

    removed_on_shutdown(&backend, &docker, &instance, &svc).await;
}

#[tokio::test]
async fn a_pooled_replica_gone_since_observe_is_replaced() {
    a_pooled_replica_gone_since_observe("poolgone", spec()).await;
}

#[tokio::test]
async fn a_pooled_replica_gone_since_a_listing_is_replaced_by_a_start() {
    a_pooled_replica_gone_since_observe("poolgonel", listing()).await;
}

/// Trimming the pool (its size lowered from 2 to 1) removes a paused replica while it is
/// frozen: the engine reports its kill, die and destroy but never an unpause or a start, and
/// no observation meanwhile counts a replica running or pending.
#[tokio::test]
async fn a_trimmed_paused_replica_never_runs_again() {
    use bollard::query_parameters::EventsOptionsBuilder;
    use futures::StreamExt;
    let instance = unique("pool-trim");
    let _cleanup = Cleanup(instance.clone());
    let Some((backend, docker, _, pooled)) = settled_pool(&instance).await else {
        return;
    };
    let events_client = docker.clone().with_timeout(Duration::from_secs(600));
    let filters = HashMap::from([
        ("type", vec!["container".to_string()]),
        ("label", vec![format!("{}={instance}", labels::INSTANCE)]),
    ]);
    let opts = EventsOptionsBuilder::new().filters(&filters).build();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        let mut stream = Box::pin(events_client.events(Some(opts)));
        while let Some(Ok(ev)) = stream.next().await {
            let id = ev.actor.and_then(|a| a.id).unwrap_or_default();
            let _ = tx.send((id, ev.action.unwrap_or_default()));
        }
    });
    // Subscribed once the engine has answered; give it that time.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let smaller = service("web", 1, Preempt::Stop);
    backend
        .prepare(std::slice::from_ref(&smaller))
        .await
        .expect("prepare with a pool of 1");
    let t0 = std::time::Instant::now();
    loop {
        let obs = backend.observe().await.expect("observe");
        assert_eq!(
            running(&obs, &smaller),
            0,
            "a trimmed replica counted running"
        );
        assert_eq!(
            pending(&obs, &smaller),
            0,
            "a trimmed replica counted pending"
        );
        if ids(&docker, &instance, None).await.len() == 1 {
            break;
        }
        assert!(
            t0.elapsed() < SETTLE,
            "the pool was not trimmed to 1: {obs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = ids(&docker, &instance, Some("paused")).await;
    assert_eq!(left.len(), 1, "one pooled replica stays paused");
    let trimmed: Vec<&String> = pooled.difference(&left).collect();
    assert_eq!(trimmed.len(), 1, "{pooled:?} -> {left:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.abort();
    let mut actions = Vec::new();
    while let Ok((id, action)) = rx.try_recv() {
        if &id == trimmed[0] {
            actions.push(action);
        }
    }
    assert!(actions.iter().any(|a| a == "destroy"), "{actions:?}");
    assert!(
        !actions.iter().any(|a| a == "unpause" || a == "start"),
        "the trimmed replica ran again: {actions:?}"
    );
    removed_on_shutdown(&backend, &docker, &instance, &smaller).await;
}
