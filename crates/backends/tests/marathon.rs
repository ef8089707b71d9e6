//! The Marathon backend against the test kit's fake of Marathon's REST API
//! (`microscaler_testkit::marathon`). No Marathon can run on these machines (it needs a Mesos
//! master and agents, which are neither packaged nor downloadable here), so this is a fake:
//! written from Marathon 1.x's API documentation, it models tasks launched on agents with a
//! number of slots each (staged, then running), apps that wait for room, deployments that lock
//! an app (409 with Marathon's body) until its tasks run, `?force=true`, `hostname UNIQUE`,
//! lost agents and HTTP basic auth or a DC/OS token. It does not model cpus/mem matching,
//! other constraints, running health checks or the event stream (see the fake's doc comment).

mod common;

use std::time::Duration;

use microscaler_backends::marathon::{Auth, MarathonBackend, MarathonConfig, MarathonReference};
use microscaler_backends::{Backend, BackendError, ErrorClass, Reference, Service, Workload};
use microscaler_core::ServiceKind;
use microscaler_testkit::marathon::{MarathonFake, MarathonOptions};
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(20);

fn spec(address: &str) -> MarathonConfig {
    MarathonConfig {
        address: Some(address.into()),
        ..MarathonConfig::default()
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

/// An app of someone else: no microscaler labels, a label and an env of its own that every
/// scale must leave alone.
fn plain_app(id: &str, instances: u32) -> Value {
    json!({
        "id": id, "instances": instances, "cpus": 0.5, "mem": 256,
        "labels": {"team": "payments"}, "env": {"OWNER": "someone-else"},
        "container": {"type": "DOCKER", "docker": {"image": "shop:1"}},
    })
}

/// A fake with 3 agents of 3 slots (the seeds' 9).
async fn fake(opts: MarathonOptions) -> MarathonFake {
    let f = MarathonFake::start(opts).await;
    for i in 0..3 {
        f.add_agent(&format!("agent-{i}"), 3);
    }
    f
}

/// A backend on `f`, prepared for `s`, of an instance of its own.
async fn prepared(f: &MarathonFake, prefix: &str, s: &Service) -> MarathonBackend {
    let backend = MarathonBackend::connect(&spec(&f.address()), &common::unique(prefix))
        .await
        .expect("connect");
    backend
        .prepare(std::slice::from_ref(s))
        .await
        .expect("prepare");
    backend
}

fn reference(app: &str) -> Workload {
    Workload::Reference(Reference::Marathon(MarathonReference { app: app.into() }))
}

struct MarathonHarness {
    fake: MarathonFake,
    instance: String,
}

impl microscaler_testkit::contract::Harness for MarathonHarness {
    type B = MarathonBackend;

    async fn connect(&self) -> MarathonBackend {
        MarathonBackend::connect(&spec(&self.fake.address()), &self.instance)
            .await
            .expect("connect to the fake")
    }

    async fn add_foreign(&self, replicas: u32) {
        self.fake.create_app(plain_app("/foreign", replicas));
    }

    async fn foreign_running(&self) -> u32 {
        let asked = self
            .fake
            .app("/foreign")
            .and_then(|a| a["instances"].as_u64())
            .unwrap_or(0) as u32;
        let running = common::poll_until(|| self.fake.running("/foreign"), asked).await;
        running.min(asked)
    }

    async fn remove_foreign(&self) {}

    async fn unreachable(&self) -> Option<Result<MarathonBackend, BackendError>> {
        Some(MarathonBackend::connect(&spec("http://127.0.0.1:1"), &self.instance).await)
    }

    fn settle(&self) -> Duration {
        SETTLE
    }
}

impl microscaler_testkit::contract::ReferenceHarness for MarathonHarness {
    async fn add_referenced(&self, replicas: u32) -> Workload {
        self.fake.create_app(plain_app("/shop/web", replicas));
        reference("/shop/web")
    }

    async fn referenced_template(&self) -> Option<String> {
        let app = self.fake.app("/shop/web")?;
        Some(format!(
            "{} {} {} {} {} {}",
            app["labels"], app["env"], app["container"], app["cpus"], app["mem"], app["id"]
        ))
    }

    async fn referenced_wants(&self) -> Option<u32> {
        self.fake
            .app("/shop/web")?
            .get("instances")?
            .as_u64()
            .map(|n| n as u32)
    }

    async fn remove_referenced(&self) {
        let url = format!("{}/v2/apps/shop/web?force=true", self.fake.address());
        let status = reqwest::Client::new()
            .delete(url)
            .send()
            .await
            .expect("DELETE the referenced app")
            .status();
        assert_eq!(status.as_u16(), 200, "DELETE the referenced app");
        for _ in 0..100 {
            if self.fake.app("/shop/web").is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the referenced app is still there");
    }
}

/// The contract suite (scale, adoption, foreign objects, typed errors) and its reference case;
/// no change was ever forced.
#[tokio::test]
async fn contract() {
    let f = fake(MarathonOptions::default()).await;
    let h = MarathonHarness {
        fake: f.clone(),
        instance: common::unique("mc"),
    };
    let (a, b) = (service("a"), service("b"));
    microscaler_testkit::contract::run(&h, &a, &b).await;
    for s in [&a, &b] {
        let app = MarathonBackend::app_id(&h.instance, s.name.as_str());
        assert!(
            f.app(&app).is_none(),
            "shutdown(remove) deletes managed app {app}"
        );
    }
    microscaler_testkit::contract::references(&h, "web").await;
    let updates = f.updates();
    assert!(!updates.is_empty());
    assert!(
        updates.iter().all(|(_, force, _, _)| !force),
        "never forced: {updates:?}"
    );
}

/// A locked app (a deployment in progress): the change waits a second for it, is then not
/// sent and is a conflict that says so; once the deployment ends it goes through, without
/// `force`. A 409 from Marathon
/// itself (the lock taken between the read and the write) is a conflict too.
#[tokio::test]
async fn a_locked_app_is_a_conflict_until_its_deployment_ends_and_is_never_forced() {
    let f = fake(MarathonOptions::default()).await;
    f.create_app(plain_app("/shop/web", 1));
    let mut s = service("web");
    s.workload = reference("/shop/web");
    let backend = prepared(&f, "ml", &s).await;
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.services
            .get(&s.name)
            .is_some_and(|x| x.running == 1 && x.caught_up)
    })
    .await;
    assert!(obs.services[&s.name].caught_up, "{obs:?}");

    let deployment = f.lock("/shop/web", Duration::from_millis(2_500));
    let e = backend.scale(&s, 3).await.expect_err("locked");
    assert_eq!(e.class(), ErrorClass::Conflict, "{e}");
    assert!(
        e.to_string().contains(&deployment),
        "names the deployment: {e}"
    );
    let obs = backend.observe().await.expect("observe");
    assert!(!obs.services[&s.name].caught_up, "{obs:?}");

    let t0 = std::time::Instant::now();
    loop {
        match backend.scale(&s, 3).await {
            Ok(out) => {
                assert_eq!(out.started, 2);
                break;
            }
            Err(e) => {
                assert_eq!(e.class(), ErrorClass::Conflict, "{e}");
                assert!(t0.elapsed() < SETTLE, "still locked: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let obs = common::wait_for(&backend, SETTLE, |o| common::running(o, &s) == 3).await;
    assert_eq!(common::running(&obs, &s), 3, "{obs:?}");
    let updates = f.updates();
    assert!(updates.iter().all(|(_, force, _, _)| !force), "{updates:?}");
    assert_eq!(
        updates.iter().filter(|u| u.2 == 200).count(),
        1,
        "one change went through: {updates:?}"
    );
    // The lock taken between microscaler's read and its write: Marathon's own 409.
    let other = MarathonBackend::connect(
        &MarathonConfig {
            force: false,
            ..spec(&f.address())
        },
        &common::unique("ml"),
    )
    .await
    .expect("connect");
    other
        .prepare(std::slice::from_ref(&s))
        .await
        .expect("prepare");
    let obs = common::wait_for(&other, SETTLE, |o| {
        o.services.get(&s.name).is_some_and(|x| x.caught_up)
    })
    .await;
    assert!(obs.services[&s.name].caught_up);
    let raced = tokio::join!(backend.scale(&s, 4), other.scale(&s, 5));
    let outcomes = [raced.0.map(|_| ()), raced.1.map(|_| ())];
    assert!(
        outcomes.iter().all(|r| r
            .as_ref()
            .map_or_else(|e| e.class() == ErrorClass::Conflict, |_| true)),
        "each write went through or was a conflict: {outcomes:?}"
    );
}

/// `force = true` in the configuration: a locked app is changed anyway, with `?force=true`.
#[tokio::test]
async fn force_is_only_used_when_configured() {
    let f = fake(MarathonOptions::default()).await;
    f.create_app(plain_app("/shop/web", 1));
    let mut s = service("web");
    s.workload = reference("/shop/web");
    let backend = MarathonBackend::connect(
        &MarathonConfig {
            force: true,
            ..spec(&f.address())
        },
        &common::unique("mf"),
    )
    .await
    .expect("connect");
    backend
        .prepare(std::slice::from_ref(&s))
        .await
        .expect("prepare");
    f.lock("/shop/web", Duration::from_secs(30));
    backend.scale(&s, 2).await.expect("forced");
    let updates = f.updates();
    assert_eq!(updates.len(), 1);
    assert!(updates[0].1, "sent with force: {updates:?}");
    assert_eq!(f.app("/shop/web").unwrap()["instances"], 2);
}

/// A per-host service is an app constrained `hostname UNIQUE`; one without the constraint is
/// refused at start. Hosts are the agents that run tasks, or `[backend] hosts`.
#[tokio::test]
async fn per_host_apps_need_hostname_unique_and_hosts_come_from_tasks_or_configuration() {
    let f = fake(MarathonOptions::default()).await;
    let mut unique = plain_app("/agents/log", 3);
    unique["constraints"] = json!([["hostname", "UNIQUE"]]);
    f.create_app(unique);
    f.create_app(plain_app("/shop/web", 1));
    let mut s = service("log");
    s.kind = ServiceKind::PerHost;
    s.workload = reference("/agents/log");
    let backend = prepared(&f, "mu", &s).await;
    let obs = common::wait_for(&backend, SETTLE, |o| common::running(o, &s) == 3).await;
    assert_eq!(common::running(&obs, &s), 3, "one per agent: {obs:?}");
    let mut hosts: Vec<_> = obs.hosts.iter().map(|h| h.name.as_str()).collect();
    hosts.sort();
    assert_eq!(hosts, ["agent-0", "agent-1", "agent-2"]);
    let on: std::collections::BTreeSet<_> = obs.replicas.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(on.len(), 3, "one task on each agent: {obs:?}");

    let configured = MarathonBackend::connect(
        &MarathonConfig {
            hosts: vec!["agent-0".into(), "agent-9".into()],
            ..spec(&f.address())
        },
        &common::unique("mu"),
    )
    .await
    .expect("connect");
    let obs = configured.observe().await.expect("observe");
    let hosts: Vec<_> = obs.hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(hosts, ["agent-0", "agent-9"]);

    let mut wrong = s.clone();
    wrong.workload = reference("/shop/web");
    let e = configured
        .prepare(&[wrong])
        .await
        .expect_err("a per-host service needs hostname UNIQUE");
    assert!(e.to_string().contains("UNIQUE"), "{e}");
}

/// Basic auth: without credentials Marathon's 401 is explained; with them everything works,
/// and the password is never printed. A DC/OS token likewise.
#[tokio::test]
async fn credentials_are_sent_and_a_refusal_is_explained() {
    let f = fake(MarathonOptions {
        basic_auth: Some(("ops".into(), "s3cret-pass".into())),
        ..MarathonOptions::default()
    })
    .await;
    let e = match MarathonBackend::connect(&spec(&f.address()), &common::unique("mb")).await {
        Ok(_) => panic!("connected without credentials"),
        Err(e) => e,
    };
    assert_eq!(e.class(), ErrorClass::Unsupported, "{e}");
    assert!(
        e.to_string().contains("401") && e.to_string().contains("password_file"),
        "{e}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("password");
    std::fs::write(&file, "s3cret-pass\n").expect("write");
    let with = MarathonBackend::connect(
        &MarathonConfig {
            auth: Auth::Basic {
                username: "ops".into(),
                password_file: file.display().to_string(),
            },
            ..spec(&f.address())
        },
        &common::unique("mb"),
    )
    .await
    .expect("connect with credentials");
    let a = service("a");
    with.prepare(std::slice::from_ref(&a))
        .await
        .expect("prepare");
    with.scale(&a, 2).await.expect("scale");
    let obs = common::wait_for(&with, SETTLE, |o| common::running(o, &a) == 2).await;
    assert_eq!(common::running(&obs, &a), 2, "{obs:?}");
    with.shutdown(&[a], true).await.expect("shutdown");

    let t = MarathonFake::start(MarathonOptions {
        dcos_token: Some("jwt-abc".into()),
        ..MarathonOptions::default()
    })
    .await;
    let token = dir.path().join("token");
    std::fs::write(&token, "not-it").expect("write");
    let e = match MarathonBackend::connect(
        &MarathonConfig {
            auth: Auth::DcosToken {
                token_file: token.display().to_string(),
            },
            ..spec(&t.address())
        },
        &common::unique("mb"),
    )
    .await
    {
        Ok(_) => panic!("connected with a wrong token"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("403"), "{e}");
    assert!(!e.to_string().contains("not-it"), "never printed: {e}");
    std::fs::write(&token, "jwt-abc").expect("write");
    MarathonBackend::connect(
        &MarathonConfig {
            auth: Auth::DcosToken {
                token_file: token.display().to_string(),
            },
            ..spec(&t.address())
        },
        &common::unique("mb"),
    )
    .await
    .expect("connect with the token");
}

/// Tasks waiting for room are reported unschedulable, and run once an agent joins.
#[tokio::test]
async fn tasks_without_room_are_unschedulable_until_an_agent_joins() {
    let f = MarathonFake::start(MarathonOptions::default()).await;
    f.add_agent("agent-0", 2);
    let a = service("a");
    let backend = prepared(&f, "mr", &a).await;
    backend.scale(&a, 4).await.expect("scale to 4");
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.services
            .get(&a.name)
            .is_some_and(|s| s.running == 2 && s.unschedulable == 2)
    })
    .await;
    let s = obs.services[&a.name];
    assert_eq!(
        (
            s.running,
            s.pending,
            s.unschedulable,
            s.orchestrator_wants,
            s.caught_up
        ),
        (2, 2, 2, Some(4), false),
        "{obs:?}"
    );
    f.add_agent("agent-1", 2);
    let obs = common::wait_for(&backend, SETTLE, |o| {
        o.services
            .get(&a.name)
            .is_some_and(|s| s.running == 4 && s.caught_up)
    })
    .await;
    assert_eq!(obs.services[&a.name].unschedulable, 0, "{obs:?}");
    backend.shutdown(&[a], true).await.expect("shutdown");
}

/// TLS with a private CA: with `ca_file` naming it the API answers; without it the
/// certificate is not trusted, which is "cannot reach" naming the address and `ca_file`.
#[tokio::test]
async fn tls_needs_the_ca_file_of_a_private_ca() {
    let server = match microscaler_testkit::tls::TlsServer::start(
        r#"{"name": "marathon", "version": "1.11.0"}"#,
    ) {
        Ok(s) => s,
        Err(e) => {
            assert!(common::missing_service(
                "openssl and python3 (a TLS server)",
                e
            ));
            return;
        }
    };
    let trusted = MarathonConfig {
        ca_file: Some(server.ca_file.display().to_string()),
        ..spec(&server.address)
    };
    MarathonBackend::connect(&trusted, &common::unique("tls"))
        .await
        .expect("trusted through ca_file");
    let e = match MarathonBackend::connect(&spec(&server.address), &common::unique("tls")).await {
        Ok(_) => panic!("a certificate of a private CA trusted without ca_file"),
        Err(e) => e,
    };
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    assert!(
        e.to_string().contains(&server.address) && e.to_string().contains("ca_file"),
        "{e}"
    );
}
