//! The docker backend's view of its replicas kept from the engine's event stream, against the
//! real Docker Engine (the test script starts dockerd as root): after churn by microscaler and
//! behind its back, after the stream drops and after the engine is away for a while, what
//! `observe` reports is what a fresh listing of the engine says, and at steady state it asks
//! the engine for no listing at all.
//!
//! The engine going away and coming back is played by a proxy in front of its socket
//! ([`SocketProxy`]) that cuts every connection and refuses new ones for a while: the engine is
//! shared with the other tests running at the same time, so it is not restarted. To the backend
//! the two look the same: the stream ends, calls fail, and when the engine answers again
//! containers have changed without events it saw.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{
    KillContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use microscaler_backends::docker::{DockerBackend, DockerConfig};
use microscaler_backends::{docker_api, labels, Backend, Observation, ReplicaState, Service};
use microscaler_core::{PoolSpec, Preempt};
use microscaler_testkit::socket_proxy::SocketProxy;
use microscaler_testkit::{Leftovers, Rng};

use common::{poll_until, unique};

/// What one service has, as counted by `observe` or by a listing: running, pending (created),
/// paused, and the ids of its running and pending replicas.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counts {
    running: u32,
    pending: u32,
    paused: u32,
    ids: Vec<String>,
}

/// Per service, what `obs` says.
fn observed(obs: &Observation) -> BTreeMap<String, Counts> {
    let mut out: BTreeMap<String, Counts> = BTreeMap::new();
    for r in &obs.replicas {
        let c = out.entry(r.service.to_string()).or_default();
        match r.state {
            ReplicaState::Running => c.running += 1,
            ReplicaState::Pending => c.pending += 1,
            ReplicaState::Stopping => continue,
        }
        c.ids.push(r.id.clone());
    }
    for (s, n) in &obs.paused {
        out.entry(s.to_string()).or_default().paused = *n;
    }
    tidy(out)
}

/// Per service, what a fresh listing of the engine says (stopped containers left out: observe
/// removes them).
async fn listed(docker: &Docker, instance: &str) -> BTreeMap<String, Counts> {
    let filters = HashMap::from([("label", vec![format!("{}={instance}", labels::INSTANCE)])]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let mut out: BTreeMap<String, Counts> = BTreeMap::new();
    for c in docker.list_containers(Some(opts)).await.expect("list") {
        let service = c
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::SERVICE))
            .cloned()
            .unwrap_or_default();
        let counts = out.entry(service).or_default();
        let state = c.state.map(|s| s.to_string()).unwrap_or_default();
        match state.as_str() {
            "running" => counts.running += 1,
            "created" | "restarting" => counts.pending += 1,
            "paused" => {
                counts.paused += 1;
                continue;
            }
            _ => continue,
        }
        counts.ids.push(c.id.unwrap_or_default());
    }
    tidy(out)
}

fn tidy(mut m: BTreeMap<String, Counts>) -> BTreeMap<String, Counts> {
    m.retain(|_, c| *c != Counts::default());
    for c in m.values_mut() {
        c.ids.sort();
    }
    m
}

/// Observes until `observe` and a fresh listing agree (the backend's changes and its pool's
/// refill settle, events arrive) or 20 s pass; returns both, last seen.
async fn agreed(
    backend: &DockerBackend,
    docker: &Docker,
    instance: &str,
) -> (BTreeMap<String, Counts>, BTreeMap<String, Counts>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = match backend.observe().await {
            Ok(obs) => observed(&obs),
            Err(e) => panic!("observe: {e}"),
        };
        let truth = listed(docker, instance).await;
        if seen == truth || tokio::time::Instant::now() > deadline {
            return (seen, truth);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn service(name: &str, pool: u32) -> Service {
    Service {
        pool: PoolSpec {
            size: pool,
            preempt: Preempt::Pause,
            paused_takes_slot: false,
        },
        max: 6,
        ..common::service(name, vec![])
    }
}

/// A backend of `instance` on the engine at `host` (the default one when `None`), prepared for
/// `services`, whose event view is synced; `None` without an engine.
async fn synced(
    instance: &str,
    host: Option<String>,
    services: &[Service],
) -> Option<DockerBackend> {
    let spec = DockerConfig {
        host,
        start_parallelism: 4,
        ..DockerConfig::default()
    };
    let backend = match DockerBackend::connect(&spec, instance).await {
        Ok(b) => b,
        Err(e) => {
            common::missing_service("Docker engine", e);
            return None;
        }
    };
    backend.prepare(services).await.expect("prepare");
    backend.observe().await.expect("the first observe");
    poll_until(|| backend.watch_stats().synced, true).await;
    assert!(backend.watch_stats().synced, "{:?}", backend.watch_stats());
    Some(backend)
}

async fn raw() -> Docker {
    docker_api::connect(None).await.expect("connect bollard")
}

/// Ids of `instance`'s containers of `service` in `status`.
async fn ids_in(docker: &Docker, instance: &str, service: &str, status: &str) -> Vec<String> {
    let filters = HashMap::from([
        (
            "label",
            vec![
                format!("{}={instance}", labels::INSTANCE),
                format!("{}={service}", labels::SERVICE),
            ],
        ),
        ("status", vec![status.to_string()]),
    ]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let mut ids: Vec<String> = docker
        .list_containers(Some(opts))
        .await
        .expect("list")
        .into_iter()
        .filter_map(|c| c.id)
        .collect();
    ids.sort();
    ids
}

async fn remove_by_hand(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
    docker
        .remove_container(id, Some(opts))
        .await
        .expect("remove by hand");
}

async fn kill_by_hand(docker: &Docker, id: &str) {
    docker
        .kill_container(id, None::<KillContainerOptions>)
        .await
        .expect("kill by hand");
}

/// Seeded churn, by microscaler (scale-ups and downs, a warm pool taken and refilled, replicas
/// paused on preemption) and behind its back (replicas killed, removed, paused and unpaused by
/// hand): after every step `observe` agrees with a fresh listing, and no step made the backend
/// list (only its resyncs list, none of which is due within the test).
#[tokio::test]
async fn the_view_matches_a_fresh_listing_after_churn() {
    let instance = unique("watchchurn");
    let _leftovers = Leftovers::containers(&instance);
    let web = service("web", 0);
    let batch = service("batch", 1);
    let services = [web.clone(), batch.clone()];
    let Some(backend) = synced(&instance, None, &services).await else {
        return;
    };
    let docker = raw().await;
    let (seen, truth) = agreed(&backend, &docker, &instance).await;
    assert_eq!(seen, truth, "after prepare");
    let listings = backend.listings();
    let stats = backend.watch_stats();

    let mut rng = Rng::from_env("MICROSCALER_WATCH_SEED");
    for step in 0..14 {
        let (w, b) = (rng.below(5) as u32, rng.below(4) as u32);
        backend.scale(&web, w).await.expect("scale web");
        backend.scale(&batch, b).await.expect("scale batch");
        let running = ids_in(&docker, &instance, "web", "running").await;
        let what = match (rng.below(4), running.first()) {
            (0, Some(id)) => {
                kill_by_hand(&docker, id).await;
                "killed a web replica by hand"
            }
            (1, Some(id)) => {
                remove_by_hand(&docker, id).await;
                "removed a web replica by hand"
            }
            (2, Some(id)) => {
                docker.pause_container(id).await.expect("pause by hand");
                "paused a web replica by hand"
            }
            _ => match ids_in(&docker, &instance, "web", "paused").await.first() {
                Some(id) => {
                    docker.unpause_container(id).await.expect("unpause by hand");
                    "unpaused a web replica by hand"
                }
                None => "nothing by hand",
            },
        };
        let (seen, truth) = agreed(&backend, &docker, &instance).await;
        assert_eq!(
            seen, truth,
            "step {step}: web {w}, batch {b}, then {what}: observe (left) and a fresh listing \
             (right) differ"
        );
    }
    let now = backend.watch_stats();
    assert!(now.synced, "{now:?}");
    assert!(now.events > stats.events + 20, "{now:?}");
    assert_eq!(
        backend.listings() - listings,
        now.resyncs - stats.resyncs,
        "only resyncs listed: {now:?}"
    );
    assert_eq!(now.stream_failures, 0, "{now:?}");
    backend.shutdown(&services, true).await.expect("shutdown");
}

/// The stream cut under the backend, then the engine away (every connection refused) for a
/// while, with replicas changed behind its back each time: `observe` lists while the view is
/// not synced (or fails, while the engine is away), the view resynchronises when the engine
/// answers again, and `observe` then agrees with a fresh listing.
#[tokio::test]
async fn a_dropped_stream_and_an_absent_engine_are_resynchronised() {
    let instance = unique("watchdrop");
    let _leftovers = Leftovers::containers(&instance);
    let proxy = SocketProxy::start("/var/run/docker.sock").await;
    let web = service("web", 0);
    let services = [web.clone()];
    let Some(backend) = synced(&instance, Some(proxy.address()), &services).await else {
        return;
    };
    let docker = raw().await;
    backend.scale(&web, 4).await.expect("scale up");
    let (seen, truth) = agreed(&backend, &docker, &instance).await;
    assert_eq!(seen, truth);
    assert_eq!(seen["web"].running, 4, "{seen:?}");
    let before = backend.watch_stats();

    // The stream drops; while the backend subscribes again, replicas change.
    proxy.cut();
    let running = ids_in(&docker, &instance, "web", "running").await;
    remove_by_hand(&docker, &running[0]).await;
    docker
        .pause_container(&running[1])
        .await
        .expect("pause by hand");
    poll_until(
        || backend.watch_stats().stream_failures > before.stream_failures,
        true,
    )
    .await;
    let (seen, truth) = agreed(&backend, &docker, &instance).await;
    assert_eq!(seen, truth, "after the stream dropped");
    poll_until(|| backend.watch_stats().synced, true).await;
    let after_cut = backend.watch_stats();
    assert!(after_cut.synced, "{after_cut:?}");
    assert!(after_cut.resyncs > before.resyncs, "{after_cut:?}");

    // The engine away for two seconds; meanwhile a replica is unpaused and one removed.
    proxy.set_down(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        backend.observe().await.is_err(),
        "observe succeeded with the engine away"
    );
    docker
        .unpause_container(&running[1])
        .await
        .expect("unpause by hand");
    remove_by_hand(&docker, &running[2]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_down(false);
    poll_until(|| backend.watch_stats().synced, true).await;
    let back = backend.watch_stats();
    assert!(back.synced, "{back:?}");
    assert!(back.stream_failures > after_cut.stream_failures, "{back:?}");
    let (seen, truth) = agreed(&backend, &docker, &instance).await;
    assert_eq!(seen, truth, "after the engine came back");
    assert_eq!(seen["web"].running, 2, "{seen:?}");

    // And it goes on following: a scale-up is seen from events alone.
    let listings = backend.listings();
    backend.scale(&web, 4).await.expect("scale up again");
    let (seen, truth) = agreed(&backend, &docker, &instance).await;
    assert_eq!(seen, truth);
    assert_eq!(seen["web"].running, 4, "{seen:?}");
    let now = backend.watch_stats();
    assert_eq!(
        backend.listings() - listings,
        now.resyncs - back.resyncs,
        "{now:?}"
    );
    backend.shutdown(&services, true).await.expect("shutdown");
}

/// A replica killed behind the backend's back rings the control loop's waker at once (it is
/// replaced without waiting for the next tick); replicas the backend stops itself do not.
#[tokio::test]
async fn a_replica_killed_behind_its_back_wakes_the_loop() {
    let instance = unique("watchwake");
    let _leftovers = Leftovers::containers(&instance);
    let web = service("web", 0);
    let services = [web.clone()];
    let Some(backend) = synced(&instance, None, &services).await else {
        return;
    };
    let waker = Arc::new(tokio::sync::Notify::new());
    backend.wake_on_change(Arc::clone(&waker));
    let docker = raw().await;
    backend.scale(&web, 3).await.expect("scale up");
    let (seen, truth) = agreed(&backend, &docker, &instance).await;
    assert_eq!(seen, truth);

    backend.scale(&web, 2).await.expect("scale down");
    let quiet = tokio::time::timeout(Duration::from_secs(1), waker.notified()).await;
    assert!(
        quiet.is_err(),
        "a replica stopped by the backend woke the loop"
    );

    let victim = ids_in(&docker, &instance, "web", "running").await[0].clone();
    kill_by_hand(&docker, &victim).await;
    tokio::time::timeout(Duration::from_secs(5), waker.notified())
        .await
        .expect("a replica killed behind the backend's back woke the loop within 5 s");
    let obs = backend.observe().await.expect("observe");
    assert_eq!(observed(&obs)["web"].running, 1, "{obs:?}");
    backend.shutdown(&services, true).await.expect("shutdown");
}
