//! The Nomad backend against the test kit's fake of Nomad's HTTP API
//! (`microscaler_testkit::nomad`). No Nomad server can run on these machines (Nomad's source
//! is not under an open-source licence from 1.7 on, and no binary can be downloaded here), so
//! this is a fake: written from Nomad's API documentation, it models asynchronous placement on
//! nodes with a number of slots each, blocked evaluations when there is no room, node drain and
//! loss, deployments that lock a job against scaling, blocking queries and an ACL token, with
//! Nomad's status codes and plain-text errors. It does not model CPU/memory bin-packing,
//! constraints, canaries or rolling-update batches (see the fake's doc comment).

mod common;

use std::time::Duration;

use microscaler_backends::nomad::{NomadBackend, NomadConfig, NomadReference};
use microscaler_backends::{Backend, BackendError, ErrorClass, Reference, Service, Workload};
use microscaler_core::ServiceKind;
use microscaler_testkit::nomad::{plain_job, NomadFake, NomadOptions};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(20);

fn spec(address: &str) -> NomadConfig {
    NomadConfig {
        address: Some(address.into()),
        datacenters: vec!["*".into()],
        ..NomadConfig::default()
    }
}

/// A service of the test running a placeholder image.
fn service(name: &str) -> Service {
    let mut s = common::service(name, vec![]);
    if let Some(run) = s.workload.run_mut() {
        run.image = Some("registry.k8s.io/pause:3.10".into());
    }
    s
}

/// A fake with 3 nodes of 3 slots (the seeds' 9).
async fn fake(opts: NomadOptions) -> (NomadFake, Vec<String>) {
    let f = NomadFake::start(opts).await;
    let nodes = (0..3)
        .map(|i| f.add_node(&format!("node-{i}"), 3))
        .collect();
    (f, nodes)
}

/// A backend on `f`, prepared for `s`, of an instance of its own.
async fn prepared(f: &NomadFake, prefix: &str, s: &Service) -> NomadBackend {
    let backend = NomadBackend::connect(&spec(&f.address()), &common::unique(prefix))
        .await
        .expect("connect");
    backend
        .prepare(std::slice::from_ref(s))
        .await
        .expect("prepare");
    backend
}

struct NomadHarness {
    fake: NomadFake,
    instance: String,
}

impl microscaler_testkit::contract::Harness for NomadHarness {
    type B = NomadBackend;

    async fn connect(&self) -> NomadBackend {
        NomadBackend::connect(&spec(&self.fake.address()), &self.instance)
            .await
            .expect("connect to the fake")
    }

    async fn add_foreign(&self, replicas: u32) {
        self.fake.register(plain_job("foreign", replicas, false));
    }

    async fn foreign_running(&self) -> u32 {
        // What the job asks for and what runs, both: neither may change.
        let asked = self
            .fake
            .job("foreign")
            .and_then(|j| j["TaskGroups"][0]["Count"].as_u64())
            .unwrap_or(0) as u32;
        let running = common::poll_until(|| self.fake.running("foreign", "web"), asked).await;
        running.min(asked)
    }

    async fn remove_foreign(&self) {}

    async fn unreachable(&self) -> Option<Result<NomadBackend, BackendError>> {
        Some(NomadBackend::connect(&spec("http://127.0.0.1:1"), &self.instance).await)
    }

    fn settle(&self) -> Duration {
        SETTLE
    }
}

impl microscaler_testkit::contract::ReferenceHarness for NomadHarness {
    async fn add_referenced(&self, replicas: u32) -> Workload {
        self.fake.register(plain_job("shop", replicas, false));
        Workload::Reference(Reference::Nomad(NomadReference {
            job: "shop".into(),
            group: Some("web".into()),
            namespace: None,
            region: None,
        }))
    }

    async fn referenced_template(&self) -> Option<String> {
        let mut job = self.fake.job("shop")?;
        let o = job.as_object_mut()?;
        for k in [
            "Version",
            "ModifyIndex",
            "JobModifyIndex",
            "Status",
            "SubmitTime",
        ] {
            o.remove(k);
        }
        if let Some(g) = job["TaskGroups"][0].as_object_mut() {
            g.remove("Count");
        }
        Some(job.to_string())
    }

    async fn referenced_wants(&self) -> Option<u32> {
        let job = self.fake.job("shop")?;
        job["TaskGroups"][0]["Count"].as_u64().map(|c| c as u32)
    }

    async fn remove_referenced(&self) {
        self.fake.purge("shop");
    }
}

/// The contract suite (scale, adoption, foreign objects, typed errors) and its reference case.
#[tokio::test]
async fn contract() {
    let (fake, _) = fake(NomadOptions::default()).await;
    let h = NomadHarness {
        fake: fake.clone(),
        instance: common::unique("nc"),
    };
    let (a, b) = (service("a"), service("b"));
    microscaler_testkit::contract::run(&h, &a, &b).await;
    for s in [&a, &b] {
        let job = NomadBackend::job_id(&h.instance, s.name.as_str());
        assert!(
            fake.job(&job).is_none(),
            "shutdown(remove) purges managed job {job}"
        );
    }
    microscaler_testkit::contract::references(&h, "web").await;
    // Every count microscaler set says who set it.
    let requests = fake.scale_requests();
    assert!(!requests.is_empty());
    for r in &requests {
        let m = r["Message"].as_str().unwrap_or("");
        assert!(
            m.starts_with(&format!("microscaler {}: ", h.instance)),
            "{r}"
        );
    }
}

/// A group asked for more than the nodes hold: Nomad places what fits and blocks an
/// evaluation for the rest; those are reported unschedulable, and placed when a node joins.
#[tokio::test]
async fn a_blocked_evaluation_is_reported_unschedulable_until_a_node_joins() {
    let f = NomadFake::start(NomadOptions::default()).await;
    f.add_node("node-0", 2);
    let a = service("a");
    let backend = prepared(&f, "nb", &a).await;
    backend.scale(&a, 5).await.expect("scale to 5");
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.services
            .get(&a.name)
            .is_some_and(|s| s.running == 2 && s.unschedulable == 3)
    })
    .await;
    let s = obs.services[&a.name];
    assert_eq!(
        (s.running, s.pending, s.unschedulable, s.orchestrator_wants),
        (2, 3, 3, Some(5)),
        "{obs:?}"
    );
    f.add_node("node-1", 3);
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.services
            .get(&a.name)
            .is_some_and(|s| s.running == 5 && s.unschedulable == 0)
    })
    .await;
    let s = obs.services[&a.name];
    assert_eq!(
        (s.running, s.pending, s.unschedulable),
        (5, 0, 0),
        "{obs:?}"
    );
    assert_eq!(obs.hosts.len(), 2);
    backend.shutdown(&[a], true).await.expect("shutdown");
}

/// A referenced job with deployments on: after a scale its deployment runs, the group is held
/// (a conflict, said as such, retried later) and observed as not caught up; once the
/// deployment finished it scales again. Nothing is forced.
#[tokio::test]
async fn a_group_in_an_active_deployment_is_held_until_it_finishes() {
    let (f, _) = fake(NomadOptions {
        min_healthy: Duration::from_millis(800),
        ..NomadOptions::default()
    })
    .await;
    f.register(plain_job("shop", 1, true));
    let backend = NomadBackend::connect(&spec(&f.address()), &common::unique("nd"))
        .await
        .expect("connect");
    let mut s = service("web");
    s.workload = Workload::Reference(Reference::Nomad(NomadReference {
        job: "shop".into(),
        group: None,
        namespace: None,
        region: None,
    }));
    backend
        .prepare(std::slice::from_ref(&s))
        .await
        .expect("prepare");
    // Its registration's own deployment finishes first.
    common::wait_for(&backend, SETTLE, |o| {
        o.services
            .get(&s.name)
            .is_some_and(|x| x.running == 1 && x.caught_up)
    })
    .await;
    backend.scale(&s, 3).await.expect("the first scale");
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.services.get(&s.name).is_some_and(|x| !x.caught_up)
    })
    .await;
    assert!(!obs.services[&s.name].caught_up, "{obs:?}");
    let e = backend
        .scale(&s, 4)
        .await
        .expect_err("held while the deployment runs");
    assert_eq!(e.class(), ErrorClass::Conflict, "{e}");
    assert!(e.to_string().contains("deployment"), "{e}");
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.services
            .get(&s.name)
            .is_some_and(|x| x.caught_up && x.running == 3)
    })
    .await;
    assert!(obs.services[&s.name].caught_up, "{obs:?}");
    backend.scale(&s, 4).await.expect("scales once it finished");
    assert_eq!(f.job("shop").unwrap()["TaskGroups"][0]["Count"], 4);
    assert_eq!(f.scale_requests().len(), 2, "the held scale was never sent");
}

/// A reference's region reaches Nomad on every call about its job (Nomad forwards it to that
/// region's servers): the fake serves the region `global` and answers any other with Nomad's
/// 500 "No path to region", so a reference to `eu` fails at prepare, naming the job, while one
/// to `global` is followed and scaled; the backend itself names no region.
#[tokio::test]
async fn a_references_region_is_sent_with_its_jobs_calls() {
    let (f, _) = fake(NomadOptions::default()).await;
    f.register(plain_job("shop", 1, false));
    let backend = NomadBackend::connect(&spec(&f.address()), &common::unique("nr"))
        .await
        .expect("connect");
    let in_region = |region: &str| {
        let mut s = service("web");
        s.workload = Workload::Reference(Reference::Nomad(NomadReference {
            job: "shop".into(),
            group: None,
            namespace: None,
            region: Some(region.into()),
        }));
        s
    };
    let elsewhere = in_region("eu");
    let e = backend
        .prepare(std::slice::from_ref(&elsewhere))
        .await
        .expect_err("no path to region eu");
    assert!(
        e.to_string().contains("No path to region") && e.to_string().contains("shop"),
        "{e}"
    );
    let here = in_region("global");
    backend
        .prepare(std::slice::from_ref(&here))
        .await
        .expect("prepare in region global");
    backend.scale(&here, 2).await.expect("scale");
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.services.get(&here.name).is_some_and(|x| x.running == 2)
    })
    .await;
    assert_eq!(obs.services[&here.name].running, 2, "{obs:?}");
    assert_eq!(f.job("shop").unwrap()["TaskGroups"][0]["Count"], 2);
}

/// With ACLs on: without a token the API refuses with 403 and microscaler says what token it
/// needs (and never prints one); with the token from `token_file` everything works.
#[tokio::test]
async fn the_acl_token_is_sent_and_a_403_is_explained() {
    let secret = "9a1b2c3d-secret-token";
    let (f, _) = fake(NomadOptions {
        acl_token: Some(secret.into()),
        ..NomadOptions::default()
    })
    .await;
    let instance = common::unique("na");
    let a = service("a");
    let without = NomadBackend::connect(&spec(&f.address()), &instance)
        .await
        .expect("the leader's status needs no token");
    let e = without
        .prepare(std::slice::from_ref(&a))
        .await
        .expect_err("refused without a token");
    let text = e.to_string();
    assert_eq!(e.class(), ErrorClass::Unsupported, "{text}");
    assert!(
        text.contains("403") && text.contains("Permission denied"),
        "{text}"
    );
    assert!(text.contains("NOMAD_TOKEN"), "says what to do: {text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token\n").expect("write");
    let e = NomadBackend::connect(
        &NomadConfig {
            token_file: Some(wrong.display().to_string()),
            ..spec(&f.address())
        },
        &instance,
    )
    .await
    .expect("connect")
    .prepare(std::slice::from_ref(&a))
    .await
    .expect_err("a wrong token");
    assert!(e.to_string().contains("ACL token not found"), "{e}");
    assert!(
        !e.to_string().contains("not-the-token"),
        "never printed: {e}"
    );

    let file = dir.path().join("token");
    std::fs::write(&file, format!("{secret}\n")).expect("write");
    let with = NomadBackend::connect(
        &NomadConfig {
            token_file: Some(file.display().to_string()),
            ..spec(&f.address())
        },
        &instance,
    )
    .await
    .expect("connect");
    with.prepare(std::slice::from_ref(&a))
        .await
        .expect("prepare with the token");
    with.scale(&a, 2).await.expect("scale with the token");
    let obs = common::wait_for(&with, SETTLE, |o| common::running(o, &a) == 2).await;
    assert_eq!(common::running(&obs, &a), 2, "{obs:?}");
    with.shutdown(&[a], true).await.expect("shutdown");
}

/// Hosts are the ready, eligible, undrained nodes; a drained node's allocations move to the
/// others; a system job (a per-host service) is counted, never scaled.
#[tokio::test]
async fn drained_and_down_nodes_are_not_hosts_and_system_jobs_are_counted() {
    let (f, nodes) = fake(NomadOptions::default()).await;
    let mut sys = plain_job("agent", 1, false);
    sys["Type"] = json!("system");
    f.register(sys);
    let backend = NomadBackend::connect(&spec(&f.address()), &common::unique("nh"))
        .await
        .expect("connect");
    let mut s = service("agent");
    s.kind = ServiceKind::PerHost;
    s.workload = Workload::Reference(Reference::Nomad(NomadReference {
        job: "agent".into(),
        group: None,
        namespace: None,
        region: None,
    }));
    backend
        .prepare(std::slice::from_ref(&s))
        .await
        .expect("prepare");
    let obs = common::wait_for(&backend, SETTLE, |o| common::running(o, &s) == 3).await;
    assert_eq!(common::running(&obs, &s), 3, "one per node: {obs:?}");
    assert_eq!(obs.hosts.iter().filter(|h| h.ready).count(), 3);
    let out = backend.scale(&s, 7).await.expect("a no-op");
    assert_eq!((out.started, out.stopped), (0, 0));
    assert!(
        f.scale_requests().is_empty(),
        "a system job is never scaled"
    );

    f.drain_node(&nodes[0], true);
    f.set_node_down(&nodes[1], true);
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.hosts.iter().filter(|h| h.ready).count() == 1 && common::running(o, &s) == 1
    })
    .await;
    let ready: Vec<_> = obs
        .hosts
        .iter()
        .filter(|h| h.ready)
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(ready, vec!["node-2"], "{obs:?}");
    assert_eq!(common::running(&obs, &s), 1, "{obs:?}");

    // A service job that references a system job, and the other way round, are refused.
    let mut wrong = s.clone();
    wrong.kind = ServiceKind::Triggered(vec![]);
    let e = NomadBackend::connect(&spec(&f.address()), &common::unique("nh"))
        .await
        .expect("connect")
        .prepare(&[wrong])
        .await
        .expect_err("a system job is per-host");
    assert!(e.to_string().contains("per_host = true"), "{e}");
}

/// Observation follows blocking queries: many observations in a quiet second make no request
/// each; a change reaches the next observation through the long poll that was waiting.
#[tokio::test]
async fn observation_uses_blocking_queries_not_a_request_per_tick() {
    let (f, _) = fake(NomadOptions::default()).await;
    let a = service("a");
    let backend = prepared(&f, "nq", &a).await;
    backend.scale(&a, 2).await.expect("scale");
    common::wait_for(&backend, SETTLE, |o| common::running(o, &a) == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = f.requests();
    for _ in 0..50 {
        let obs = backend.observe().await.expect("observe");
        assert_eq!(common::running(&obs, &a), 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = f.requests();
    let key = "GET /v1/job/:id/allocations";
    let made = after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0);
    assert!(
        made <= 2,
        "50 observations of a quiet job made {made} allocation requests: {after:?}"
    );
    backend.scale(&a, 1).await.expect("scale down");
    let obs = common::wait_for(&backend, SETTLE, |o| common::running(o, &a) == 1).await;
    assert_eq!(common::running(&obs, &a), 1, "{obs:?}");
    backend.shutdown(&[a], true).await.expect("shutdown");
}

/// TLS with a private CA: with `ca_file` naming it the API answers; without it the
/// certificate is not trusted, which is "cannot reach" naming the address and `ca_file`.
#[tokio::test]
async fn tls_needs_the_ca_file_of_a_private_ca() {
    let server = match microscaler_testkit::tls::TlsServer::start("\"127.0.0.1:4647\"") {
        Ok(s) => s,
        Err(e) => {
            assert!(common::missing_service(
                "openssl and python3 (a TLS server)",
                e
            ));
            return;
        }
    };
    let trusted = NomadConfig {
        ca_file: Some(server.ca_file.display().to_string()),
        ..spec(&server.address)
    };
    NomadBackend::connect(&trusted, &common::unique("tls"))
        .await
        .expect("trusted through ca_file");
    let e = match NomadBackend::connect(&spec(&server.address), &common::unique("tls")).await {
        Ok(_) => panic!("a certificate of a private CA trusted without ca_file"),
        Err(e) => e,
    };
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    assert!(
        e.to_string().contains(&server.address) && e.to_string().contains("ca_file"),
        "{e}"
    );
}
