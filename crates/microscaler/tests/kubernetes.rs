//! The control loop on a real Kubernetes control plane: the test rig's kube-apiserver,
//! kube-controller-manager and kube-scheduler over etcd, with kwok playing the kubelets
//! (`scripts/k8s-rig.sh start`; docs/kubernetes-rig.md). Real: the apiserver, the Deployment,
//! ReplicaSet, garbage-collection and pod-GC controllers, the scheduler (each node's pod
//! capacity, taints, cordons). Simulated by kwok: the kubelets of the nodes, so no container
//! runs and a scheduled pod is Ready at once.
//!
//! The tests add and remove a node of their own (`kwok-node-t…`) and never touch the rig's
//! three. They share the rig's pod slots, so they run one at a time; each works in a namespace
//! of its own, removed at the end even when it fails.
//! Without the rig they say they are skipped, and fail under CI=true.
#![cfg(feature = "kubernetes")]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use microscaler::control::{Controller, TickError, TickReport};
use microscaler::wiring::build_backend;
use microscaler_backends::{AnyBackend, Config};
use microscaler_sources::ManualHandle;
use microscaler_testkit::kube_rig::{
    admin, kubeconfig, plain_deployment, KwokNode, NamespaceGuard, IMAGE,
};
use microscaler_testkit::unique;
use serde_json::json;

const TICK: Duration = Duration::from_millis(200);

/// The tests share the rig's 9 pod slots: one at a time.
static RIG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// The longest a convergence may take: pods on a deleted node wait for the pod garbage
/// collector (its 40 s quarantine of orphans, checked every 20 s).
const CONVERGE: Duration = Duration::from_secs(120);

/// The seeds' demo on Kubernetes: 3 pods per node, p1 on manual demand, p2 the remainder.
fn config(namespace: &str, instance: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "{tick}ms"
        on_exit = "stop"
        [capacity]
        slots_per_host = 3
        [backend]
        type = "kubernetes"
        kubeconfig = "{kubeconfig}"
        namespace = "{namespace}"
        tolerations = [{{ key = "kwok.x-k8s.io/node", operator = "Exists", effect = "NoSchedule" }}]
        [[services]]
        name = "p1"
        priority = 1
        image = "{IMAGE}"
        stop_grace = "1s"
        [[services.triggers]]
        type = "manual"
        initial = 5
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        image = "{IMAGE}"
        stop_grace = "1s"
        "#,
        tick = TICK.as_millis(),
        kubeconfig = kubeconfig(),
    ))
    .expect("valid configuration")
}

/// The control loop, ticked by the test, with the invariants checked at every tick.
struct Run {
    ctl: Controller<AnyBackend>,
    /// The services none of whose pods may be Unschedulable for more than one tick, and for
    /// how many ticks in a row one was.
    unschedulable: BTreeMap<&'static str, u32>,
    ticks: u64,
}

fn ready_hosts(r: &TickReport) -> usize {
    r.observed
        .as_ref()
        .map_or(0, |o| o.hosts.iter().filter(|h| h.ready).count())
}

impl Run {
    /// The prepared control loop of `cfg`, holding `watched` services to at most one tick
    /// Unschedulable; p1's manual demand; the state directory.
    async fn start(
        cfg: Config,
        watched: &[&'static str],
    ) -> (Run, ManualHandle, tempfile::TempDir) {
        let state = tempfile::tempdir().expect("state dir");
        let backend = build_backend(&cfg, state.path()).await.expect("backend");
        let mut ctl = Controller::new(cfg, backend, 1);
        ctl.prepare().await.expect("prepare");
        let demand = ctl.controls().manual_of("p1").expect("p1's manual").clone();
        let run = Run {
            ctl,
            unschedulable: watched.iter().map(|s| (*s, 0)).collect(),
            ticks: 0,
        };
        (run, demand, state)
    }

    async fn tick(&mut self) -> TickReport {
        let r = self.ctl.tick().await;
        self.ticks += 1;
        assert!(
            r.errors
                .iter()
                .all(|e| matches!(e, TickError::External { .. })),
            "tick {}: {:?}",
            self.ticks,
            r.errors
        );
        for ex in &r.executions {
            assert!(ex.result.is_ok(), "tick {}: {ex:?}", self.ticks);
        }
        for (service, ticks) in &mut self.unschedulable {
            let o = r.observed_of(service);
            *ticks = if o.unschedulable > 0 { *ticks + 1 } else { 0 };
            assert!(
                *ticks <= 1,
                "tick {}: a pod of {service} was Unschedulable for more than one tick: {o:?}",
                self.ticks,
            );
        }
        tokio::time::sleep(TICK).await;
        r
    }

    /// Ticks until `done` holds for a tick's report; returns the reports of every tick.
    async fn until(&mut self, what: &str, done: impl Fn(&TickReport) -> bool) -> Vec<TickReport> {
        let t0 = std::time::Instant::now();
        let mut reports = Vec::new();
        loop {
            let r = self.tick().await;
            let ok = done(&r);
            reports.push(r);
            if ok {
                return reports;
            }
            if t0.elapsed() > CONVERGE {
                let last = reports.last().expect("a tick");
                panic!(
                    "{what}: not reached within {CONVERGE:?}; last tick: p1 {:?}, p2 {:?}, hosts ready {}",
                    last.observed_of("p1"),
                    last.observed_of("p2"),
                    ready_hosts(last)
                );
            }
        }
    }

    /// Ticks until the seeds' rule holds: p1 runs its demand, p1 + p2 fill the capacity, and
    /// nothing is pending.
    async fn converged(&mut self, demand: u32, capacity: u32) -> Vec<TickReport> {
        self.until(&format!("p1 == {demand}, p1 + p2 == {capacity}"), |r| {
            let (p1, p2) = (r.observed_of("p1"), r.observed_of("p2"));
            p1.running == demand
                && p1.running + p2.running == capacity
                && p1.pending + p2.pending == 0
                && p1.orchestrator_wants == Some(demand)
                && p2.orchestrator_wants == Some(capacity - demand)
        })
        .await
    }
}

/// Pods of the instance's services by node.
async fn pods_on(client: &Client, namespace: &str, node: &str) -> usize {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    pods.list(&Default::default())
        .await
        .expect("list pods")
        .items
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .count()
}

/// The seeds' rule on 3 nodes x 3 pods while demand moves; a node added (p2 grows into it in
/// the tick that first sees it Ready), cordoned (p2 is shed, p1 keeps its demand) and deleted
/// (its pods are collected and replaced on the others); someone else scaling p1's Deployment
/// (seen, reported, set back); at the end `on_exit = "stop"` removes the Deployments. At every
/// tick: no error, and no pod of p1 Unschedulable for more than one tick (p2 is lowered
/// before p1 is raised).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_rule_holds_as_demand_moves_and_nodes_come_and_go() {
    let _rig = RIG.lock().await;
    let Some(client) = admin().await else {
        return;
    };
    let namespace = unique("k8s-loop");
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let instance = unique("kl");
    let (mut run, demand, _state) = Run::start(config(&namespace, &instance), &["p1"]).await;

    // Demand moves on the rig's 3 nodes (9 pod slots): the seeds' rule after each move.
    run.converged(5, 9).await;
    for d in [8, 2, 9, 0, 4] {
        demand.set(f64::from(d)).expect("set demand");
        run.converged(d, 9).await;
    }

    // A fourth node: p2 grows into it in the very tick that first sees it Ready.
    let node = KwokNode::create(&client, &unique("kwok-node-t")).await;
    let reports = run.converged(4, 12).await;
    let first_ready = reports
        .iter()
        .find(|r| ready_hosts(r) == 4)
        .expect("a tick saw the new node Ready");
    assert_eq!(
        first_ready.target_of("p2"),
        Some(8),
        "p2 grew into the node in the tick that first saw it Ready"
    );
    assert_eq!(pods_on(&client, &namespace, &node.0).await, 3);

    // Cordoned: capacity drops to 9, p2 is shed, p1 keeps its demand.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &node.0,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"unschedulable": true}})),
        )
        .await
        .expect("cordon the node");
    let reports = run.converged(4, 9).await;
    for r in &reports {
        assert_eq!(
            r.target_of("p1"),
            Some(4),
            "p1 keeps its demand while the node is cordoned"
        );
    }
    // Priority 1 rises while the node is cordoned: p2 gives way.
    demand.set(6.0).expect("set demand");
    run.converged(6, 9).await;

    // Deleted: its pods are collected and replaced on the other nodes; the rule holds again.
    let gone = node.0.clone();
    drop(node);
    run.until("the deleted node's pods replaced", |r| {
        let (p1, p2) = (r.observed_of("p1"), r.observed_of("p2"));
        ready_hosts(r) == 3
            && p1.running == 6
            && p1.running + p2.running == 9
            && r.observed
                .as_ref()
                .is_some_and(|o| o.replicas.iter().all(|x| x.host.as_str() != gone))
    })
    .await;
    assert_eq!(pods_on(&client, &namespace, &gone).await, 0);

    // Someone else scales p1's Deployment: seen, reported, set back by the plan.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let p1_name = format!("{instance}-p1");
    deployments
        .patch_scale(
            &p1_name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("scale p1 behind microscaler's back");
    let reports = run
        .until("the change seen", |r| {
            r.errors.iter().any(|e| {
                matches!(e, TickError::External { service, ours: 6, theirs: 2, .. } if service.as_str() == "p1")
            })
        })
        .await;
    let reported = reports.last().expect("a tick").errors[0].to_string();
    assert!(reported.contains("by someone else"), "{reported}");
    run.converged(6, 9).await;
    let spec = deployments.get_scale(&p1_name).await.expect("p1's scale");
    assert_eq!(spec.spec.and_then(|s| s.replicas), Some(6));

    // on_exit = "stop": the Deployments are removed.
    run.ctl.shutdown().await.expect("shutdown");
    let left: BTreeMap<String, ()> = deployments
        .list(&Default::default())
        .await
        .expect("list deployments")
        .items
        .into_iter()
        .map(|d| (d.metadata.name.unwrap_or_default(), ()))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A `microscaler run` on the rig: `config` with web's manual demand set to `demand`, its log
/// in `state/log-<demand>.txt`.
fn run_command(
    config: &std::path::Path,
    demand: u32,
    state: &std::path::Path,
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_microscaler"));
    c.args(["run", "--listen", "off", "--log-level", "info", "--config"])
        .arg(config)
        .args(["--set-demand", &format!("web={demand}"), "--history"])
        .arg(state.join(format!("history-{demand}.sqlite")))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(state.join(format!("log-{demand}.txt"))).expect("log file"));
    c
}

fn spawn_run(
    config: &std::path::Path,
    demand: u32,
    state: &std::path::Path,
) -> std::process::Child {
    run_command(config, demand, state)
        .spawn()
        .expect("start microscaler run")
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `limit`.
async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two microscalers, one Lease: only the leader sets the count (the two ask for different
/// counts, so `spec.replicas` tells who acts); the follower changes nothing for longer than a
/// lease; after `kill -9` of the leader the other takes the Lease and acts within the lease
/// duration plus a retry period and a tick. The failover time is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_microscalers_one_lease_only_the_leader_acts() {
    let _rig = RIG.lock().await;
    use k8s_openapi::api::coordination::v1::Lease;
    let Some(client) = admin().await else {
        return;
    };
    let namespace = unique("k8s-ha");
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let web = plain_deployment(&namespace, "web", 0);
    deployments
        .create(&Default::default(), &web)
        .await
        .expect("create web");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("ha.toml");
    let (lease_s, retry_ms, tick_ms) = (3u64, 500u64, 200u64);
    std::fs::write(
        &config,
        format!(
            r#"
            instance = "ha"
            tick = "{tick_ms}ms"
            [capacity]
            slots_per_host = 3
            [backend]
            type = "kubernetes"
            kubeconfig = "{kubeconfig}"
            namespace = "{namespace}"
            tolerations = [{{ key = "kwok.x-k8s.io/node", operator = "Exists", effect = "NoSchedule" }}]
            [backend.leader_election]
            lease_duration = "{lease_s}s"
            renew_deadline = "2s"
            retry_period = "{retry_ms}ms"
            [[services]]
            name = "web"
            priority = 1
            [services.reference]
            deployment = "web"
            [[services.triggers]]
            type = "manual"
            "#,
            kubeconfig = kubeconfig(),
        ),
    )
    .expect("write the configuration");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let holder = || async {
        leases
            .get_opt("microscaler-ha")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec.and_then(|s| s.holder_identity))
    };
    let replicas = || async {
        deployments
            .get_scale("web")
            .await
            .ok()
            .and_then(|s| s.spec.and_then(|s| s.replicas))
    };

    let mut a = spawn_run(&config, 2, dir.path());
    let a_id = poll(Duration::from_secs(60), "a takes the Lease", || async {
        holder().await
    })
    .await;
    assert!(a_id.ends_with(&format!("-{}", a.id())), "{a_id}");
    poll(Duration::from_secs(30), "a sets 2", || async {
        (replicas().await == Some(2)).then_some(())
    })
    .await;

    // b follows: for longer than a lease, the count stays a's and the Lease a's.
    let mut b = spawn_run(&config, 5, dir.path());
    for _ in 0..(lease_s * 1000 + 2000) / 250 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(replicas().await, Some(2), "the follower changed the count");
        assert_eq!(holder().await.as_deref(), Some(a_id.as_str()));
    }

    // a frozen (SIGSTOP) for longer than its lease: b takes over; a thawed acts on no stale
    // leadership (its count, 2, is never written again while b leads).
    let signal = |c: &std::process::Child, sig: i32| {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, sig) };
    };
    signal(&a, libc::SIGSTOP);
    poll(
        Duration::from_secs(30),
        "b takes over from the frozen a",
        || async { (replicas().await == Some(5)).then_some(()) },
    )
    .await;
    let b_id = holder().await.expect("a holder");
    assert!(b_id.ends_with(&format!("-{}", b.id())), "{b_id}");
    signal(&a, libc::SIGCONT);
    for _ in 0..(lease_s * 1000 + 2000) / 250 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            replicas().await,
            Some(5),
            "a thawed acted on stale leadership"
        );
    }

    // kill -9 of the leader (b): a takes over and acts.
    b.kill().expect("kill -9 b");
    let killed = std::time::Instant::now();
    let _ = b.wait();
    poll(Duration::from_secs(30), "a sets 2 again", || async {
        (replicas().await == Some(2)).then_some(())
    })
    .await;
    let failover = killed.elapsed();
    assert_eq!(holder().await.as_deref(), Some(a_id.as_str()));
    let bound = Duration::from_millis(lease_s * 1000 + 2 * retry_ms + tick_ms + 1000);
    eprintln!("failover after kill -9 of the leader: {failover:?} (lease {lease_s} s, retry {retry_ms} ms, tick {tick_ms} ms)");
    assert!(
        failover <= bound,
        "failover took {failover:?}, more than {bound:?}"
    );

    // A graceful stop gives the Lease up.
    signal(&a, libc::SIGTERM);
    let status = a.wait().expect("a exits");
    let err = std::fs::read_to_string(dir.path().join("log-2.txt")).unwrap_or_default();
    assert!(status.success(), "a: {status:?}\n{err}");
    assert!(err.contains("released the Lease"), "{err}");
    assert_eq!(holder().await, None, "released at shutdown");
}

/// deploy/kubernetes/, as `kubectl apply -f` puts it, and the `default/web` and
/// `default/worker` Deployments its configuration references: removed before (a run killed
/// earlier) and after the test.
struct Manifests;

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/kubernetes");

impl Manifests {
    fn remove(wait: bool) {
        let wait = format!("--wait={wait}");
        for args in [
            vec!["delete", "-R", "-f", MANIFESTS, "--ignore-not-found", &wait],
            vec![
                "-n",
                "default",
                "delete",
                "deployment",
                "web",
                "worker",
                "--ignore-not-found",
                &wait,
            ],
        ] {
            let _ = microscaler_testkit::kube_rig::kubectl()
                .args(&args)
                .output();
        }
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        Manifests::remove(false);
    }
}

/// The manifests on the real apiserver, run as a user would run them: `kubectl apply -f
/// deploy/kubernetes/`, then microscaler with the configuration of its ConfigMap and **the
/// token of its ServiceAccount** (not as an administrator), so a rule missing from
/// 10-rbac.yaml fails here. It runs as in one of its pods (kwok runs no container): in a
/// private mount namespace with the token, CA and namespace where the kubelet mounts them and
/// KUBERNETES_SERVICE_HOST/PORT set, so its in-cluster configuration is what connects. It takes the Lease (named after its pod), sets web to its demand and
/// worker to the rest of the 9 slots; requests outside its rules are refused by the apiserver
/// (403); its own Deployment's pods pass the namespace's restricted Pod Security admission
/// (they stay Pending: they do not tolerate kwok's taint, and would take the test's slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_least_rbac_runs_microscaler_and_refuses_the_rest() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
    use microscaler_testkit::kube_rig::{
        client_of, in_pod, kubectl_ok, pod_service_account, token_kubeconfig,
    };
    let _rig = RIG.lock().await;
    let Some(client) = admin().await else {
        return;
    };
    Manifests::remove(true);
    let _manifests = Manifests;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    for name in ["web", "worker"] {
        let d = plain_deployment("default", name, 0);
        deployments
            .create(&Default::default(), &d)
            .await
            .expect("create a referenced Deployment");
    }
    kubectl_ok(&["apply", "-f", MANIFESTS]);

    // Admission: the ReplicaSet's two pods are created (restricted Pod Security holds).
    let pods: Api<Pod> = Api::namespaced(client.clone(), "microscaler");
    poll(
        Duration::from_secs(60),
        "microscaler's two pods admitted",
        || async {
            let l = pods
                .list(
                    &kube::api::ListParams::default().labels("app.kubernetes.io/name=microscaler"),
                )
                .await
                .ok()?;
            (l.items.len() == 2).then_some(())
        },
    )
    .await;

    // The ConfigMap's configuration, as the pods would mount it: valid, run as is.
    let dir = tempfile::tempdir().expect("dir");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), "microscaler")
        .get("microscaler")
        .await
        .expect("the ConfigMap");
    let config = dir.path().join("microscaler.toml");
    let toml = cm.data.expect("data")["microscaler.toml"].clone();
    // The one change the rig needs: its kwok Nodes are tainted, so they are hosts only with
    // the taint tolerated (the referenced Deployments' pods tolerate it too).
    let toml = toml.replacen(
        "type = \"kubernetes\"\n",
        "type = \"kubernetes\"\ntolerations = [{ key = \"kwok.x-k8s.io/node\", operator = \"Exists\", effect = \"NoSchedule\" }]\n",
        1,
    );
    assert!(
        toml.contains("kwok.x-k8s.io"),
        "[backend] not found in\n{toml}"
    );
    std::fs::write(&config, &toml).expect("write it");
    let validate = std::process::Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .arg("validate")
        .arg(&config)
        .output()
        .expect("microscaler validate");
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );

    let token = kubectl_ok(&[
        "-n",
        "microscaler",
        "create",
        "token",
        "microscaler",
        "--duration=1h",
    ]);
    let kubeconfig_text = token_kubeconfig(token.trim());
    // Run as in one of its pods: only the in-cluster configuration to find (the token, the
    // CA and the namespace where the kubelet mounts them, KUBERNETES_SERVICE_HOST/PORT).
    let service_account = pod_service_account(dir.path(), token.trim(), "microscaler");
    let mut microscaler = run_command(&config, 4, dir.path());
    microscaler
        .env("POD_NAME", "microscaler-rbac-test")
        .arg("--state-dir")
        .arg(dir.path());
    let mut run = in_pod(&microscaler, &service_account, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log-4.txt")).expect("log file"))
        .spawn()
        .expect("start microscaler run (in a private mount namespace: needs root and unshare)");
    let log = || std::fs::read_to_string(dir.path().join("log-4.txt")).unwrap_or_default();
    let scale = |name: &'static str| {
        let d = deployments.clone();
        async move {
            d.get_scale(name)
                .await
                .ok()
                .and_then(|s| s.spec.and_then(|s| s.replicas))
        }
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), "microscaler");
    let holder = || async {
        leases
            .get_opt("microscaler-cluster")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec.and_then(|s| s.holder_identity))
    };
    let t0 = std::time::Instant::now();
    while holder().await.as_deref() != Some("microscaler-rbac-test") {
        if let Ok(Some(s)) = run.try_wait() {
            panic!("microscaler exited: {s}\n{}", log());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no Lease taken\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = std::time::Instant::now();
    while !(scale("web").await == Some(4) && scale("worker").await == Some(5)) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "web = 4 (its demand), worker = 5 (the rest of 9): not within 60 s\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert!(
        log().contains("the pod's service account"),
        "microscaler connected with the in-cluster configuration\n{}",
        log()
    );

    // Outside its rules: refused by the apiserver.
    let sa = client_of(&kubeconfig_text).await;
    let refused = |what: &str, r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 from RBAC, got {other:?}"),
    };
    let sa_deployments: Api<Deployment> = Api::namespaced(sa.clone(), "default");
    refused(
        "read Secrets",
        Api::<Secret>::namespaced(sa.clone(), "default")
            .list(&Default::default())
            .await
            .map(|_| ()),
    );
    refused(
        "delete a Deployment",
        sa_deployments
            .delete("web", &Default::default())
            .await
            .map(|_| ()),
    );
    refused(
        "change a Deployment's spec",
        sa_deployments
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await
            .map(|_| ()),
    );
    refused(
        "scale in a namespace it is not bound in",
        Api::<Deployment>::namespaced(sa.clone(), "kube-system")
            .patch_scale(
                "coredns",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 1}})),
            )
            .await
            .map(|_| ()),
    );
    refused(
        "watch pods cluster-wide",
        Api::<Pod>::all(sa.clone())
            .list(&Default::default())
            .await
            .map(|_| ()),
    );

    // SIGTERM: a clean stop that gives the Lease up, and nothing was refused on the way.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let status = run.wait().expect("it exits");
    let log = log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains("refused by the apiserver"), "{log}");
    assert!(log.contains("released the Lease"), "{log}");
    assert_eq!(holder().await, None, "released at shutdown");
    assert_eq!(scale("web").await, Some(4), "on_exit = leave");
}

/// `run --dry-run` on the real control plane: a referenced Deployment at 1 replica with a
/// demand of 3 and a managed service that does not exist yet. The run plans web 1 -> 3 and
/// says so, and changes nothing: web's spec (generation) and scale stay as they were, no
/// Deployment is created for the managed service, and leader election (configured) writes no
/// Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_plans_and_changes_nothing() {
    let _rig = RIG.lock().await;
    use k8s_openapi::api::coordination::v1::Lease;
    let Some(client) = admin().await else {
        return;
    };
    let namespace = unique("k8s-dry");
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let web = plain_deployment(&namespace, "web", 1);
    deployments
        .create(&Default::default(), &web)
        .await
        .expect("create web");
    let generation = || async {
        let d = deployments.get("web").await.expect("read web");
        (
            d.metadata.generation,
            d.spec.and_then(|s| s.replicas),
            d.status.and_then(|s| s.ready_replicas),
        )
    };
    let before = poll(Duration::from_secs(60), "web's pod Ready", || async {
        let g = generation().await;
        (g.2 == Some(1)).then_some(g)
    })
    .await;

    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("dry.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            instance = "dry"
            tick = "200ms"
            on_exit = "stop"
            [capacity]
            slots_per_host = 3
            [backend]
            type = "kubernetes"
            kubeconfig = "{kubeconfig}"
            namespace = "{namespace}"
            tolerations = [{{ key = "kwok.x-k8s.io/node", operator = "Exists", effect = "NoSchedule" }}]
            [backend.leader_election]
            lease_duration = "3s"
            renew_deadline = "2s"
            retry_period = "500ms"
            [[services]]
            name = "web"
            priority = 1
            [services.reference]
            deployment = "web"
            [[services.triggers]]
            type = "manual"
            [[services]]
            name = "batch"
            priority = 2
            remainder = true
            image = "{IMAGE}"
            "#,
            kubeconfig = kubeconfig(),
        ),
    )
    .expect("write the configuration");
    let out = run_command(&config, 3, dir.path())
        .args(["--dry-run", "--duration", "4s", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .expect("run microscaler");
    let log = std::fs::read_to_string(dir.path().join("log-3.txt")).unwrap_or_default();
    assert!(out.status.success(), "dry run failed: {log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let planned = stdout.lines().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        v["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "web" && s["target"] == 3 && s["running"] == 1)
    });
    assert!(planned, "no tick planned web 1 -> 3:\n{stdout}\n{log}");
    assert!(log.contains("dry run: would scale"), "{log}");
    assert!(
        log.contains("dry run: would create the Deployment"),
        "{log}"
    );

    assert_eq!(generation().await, before, "web was changed");
    let names: Vec<String> = deployments
        .list(&Default::default())
        .await
        .expect("list deployments")
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    assert_eq!(names, ["web"], "a Deployment was created");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let leases = leases
        .list(&Default::default())
        .await
        .expect("list leases")
        .items;
    assert!(leases.is_empty(), "a Lease was written: {leases:?}");
}

/// Capacity in CPU and memory on the real scheduler (issue 13). Two nodes of the test's own
/// (2 CPUs, 4 GiB, a taint only this test tolerates: the rig's nodes are no hosts here and no
/// one else's pods land on these), and on the first a pod of someone else's that requests
/// 500m CPU and 3 GiB. p1 (1 CPU, 1 GiB, manual demand) and p2 (the remainder, 1 CPU,
/// 512 MiB) share what is left: one pod on the first node (1 GiB of memory left), two on the
/// other (2 CPUs): 3 in all, whatever the mix. Counting the foreign pod's requests is what
/// keeps the plan at 3: without it the plan asks for 4 and one pod stays Unschedulable. At
/// every tick no pod of p1 or p2 is Unschedulable for more than one tick; each demand
/// converges to p1 == demand, p1 + p2 == 3; the managed pods request the services' resources;
/// when the foreign pod goes, its room is used within the ticks that see it gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_plans_fit_the_nodes_beside_others_pods() {
    use k8s_openapi::api::core::v1::Pod;
    use microscaler_core::Resources;
    use microscaler_testkit::kube_rig::NodeShape;

    let _rig = RIG.lock().await;
    let Some(client) = admin().await else {
        return;
    };
    let namespace = unique("k8s-res");
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let instance = unique("kr");
    let taint = ("microscaler.test/resources", instance.as_str());
    let shape = NodeShape {
        cpu: "2",
        memory: "4Gi",
        pods: "110",
        taint,
    };
    let first = KwokNode::create_shaped(&client, &unique("kwok-node-r"), shape).await;
    let _second = KwokNode::create_shaped(&client, &unique("kwok-node-r"), shape).await;
    let toleration =
        json!({"key": taint.0, "operator": "Equal", "value": taint.1, "effect": "NoSchedule"});

    // Someone else's pod on the first node.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    someone_elses_pod(
        &pods,
        &first.0,
        &toleration,
        json!({"cpu": "500m", "memory": "3Gi"}),
    )
    .await;

    let cfg = resources_config(&instance, &namespace, taint, "1Gi", 1);
    let (mut run, demand, state) = Run::start(cfg, &["p1", "p2"]).await;

    let reports = run.converged(1, 3).await;
    let last = reports.last().expect("a tick");
    let hosts = &last.observed.as_ref().expect("observed").hosts;
    assert_eq!(
        ready_hosts(last),
        2,
        "only the test's nodes are hosts: {hosts:?}"
    );
    let host = hosts
        .iter()
        .find(|h| h.name == first.0)
        .expect("the first node");
    assert_eq!(
        (host.cpus, host.memory_bytes),
        (Some(1.5), Some(1 << 30)),
        "the first node's room is its allocatable less someone else's requests"
    );
    for d in [3, 0, 2] {
        demand.set(f64::from(d)).expect("set demand");
        run.converged(d, 3).await;
    }

    // The managed pods request the services' resources, and their memory is their limit.
    for (service, want) in [("p1", (1000, 1 << 30)), ("p2", (1000, 512 << 20))] {
        let list = pods
            .list(
                &kube::api::ListParams::default()
                    .labels(&format!("io.microscaler.service={service}")),
            )
            .await
            .expect("list pods");
        assert!(!list.items.is_empty(), "{service} has pods");
        for p in list.items {
            let c = &p.spec.expect("spec").containers[0];
            let r = c.resources.as_ref().expect("resources");
            let q = |m: Option<
                &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
            >,
                     k: &str| {
                m.and_then(|m| m.get(k))
                    .map(|q| q.0.clone())
                    .unwrap_or_default()
            };
            let cpu = Resources::parse_cpu(&q(r.requests.as_ref(), "cpu")).expect("cpu");
            let memory =
                Resources::parse_memory(&q(r.requests.as_ref(), "memory")).expect("memory");
            let limit = Resources::parse_memory(&q(r.limits.as_ref(), "memory")).expect("limit");
            assert_eq!(
                (cpu, memory, limit),
                (want.0, want.1, want.1),
                "{service}'s pod requests"
            );
        }
    }

    // Someone else's pod goes: its room is the services' again.
    pods.delete("someone-elses", &Default::default())
        .await
        .expect("delete someone else's pod");
    run.converged(2, 4).await;
    run.ctl.shutdown().await.expect("shutdown");

    // A referenced Deployment's pods must request what its service's resources say: the plan
    // places them by those.
    let mut shop = plain_deployment(&namespace, "shop", 0);
    let template = shop.spec.as_mut().and_then(|s| s.template.spec.as_mut());
    template.expect("a pod template").containers[0].resources = Some(
        serde_json::from_value(json!({"requests": {"cpu": "250m", "memory": "256Mi"}}))
            .expect("requirements"),
    );
    Api::<Deployment>::namespaced(client.clone(), &namespace)
        .create(&Default::default(), &shop)
        .await
        .expect("create shop");
    for (cpu, fits) in [("500m", false), ("250m", true)] {
        let cfg = Config::from_toml(&format!(
            r#"
            instance = "{instance}"
            [capacity]
            resources = true
            [backend]
            type = "kubernetes"
            kubeconfig = "{kubeconfig}"
            namespace = "{namespace}"
            [[services]]
            name = "shop"
            priority = 1
            resources = {{ cpu = "{cpu}", memory = "256Mi" }}
            [services.reference]
            deployment = "shop"
            [[services.triggers]]
            type = "manual"
            initial = 1
            "#,
            kubeconfig = kubeconfig(),
        ))
        .expect("valid configuration");
        let backend = build_backend(&cfg, state.path()).await.expect("backend");
        let mut ctl = Controller::new(cfg, backend, 1);
        microscaler_testkit::assert_start(
            ctl.prepare().await,
            fits,
            &[
                "Deployment",
                "shop",
                "request 0.25 CPU and 256 MiB",
                "resources are 0.5 CPU and 256 MiB",
            ],
        );
    }
}

/// The resources tests' configuration: p1 (1 CPU and `p1_memory`, manual demand `initial`)
/// and the remainder p2 (1 CPU, 512 MiB), managed in `namespace`, tolerating the test's
/// `taint` (only the test's own nodes are hosts).
fn resources_config(
    instance: &str,
    namespace: &str,
    taint: (&str, &str),
    p1_memory: &str,
    initial: u32,
) -> Config {
    Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "{tick}ms"
        on_exit = "stop"
        [capacity]
        resources = true
        [backend]
        type = "kubernetes"
        kubeconfig = "{kubeconfig}"
        namespace = "{namespace}"
        tolerations = [{{ key = "{key}", operator = "Equal", value = "{value}", effect = "NoSchedule" }}]
        [[services]]
        name = "p1"
        priority = 1
        image = "{IMAGE}"
        stop_grace = "1s"
        resources = {{ cpu = "1", memory = "{p1_memory}" }}
        [[services.triggers]]
        type = "manual"
        initial = {initial}
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        image = "{IMAGE}"
        stop_grace = "1s"
        resources = {{ cpu = "1", memory = "512Mi" }}
        "#,
        tick = TICK.as_millis(),
        kubeconfig = kubeconfig(),
        key = taint.0,
        value = taint.1,
    ))
    .expect("valid configuration")
}

/// Creates someone else's pod `someone-elses` on `node` (tolerating the test's taint) with
/// `requests`, and waits until it is Ready.
async fn someone_elses_pod(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    node: &str,
    toleration: &serde_json::Value,
    requests: serde_json::Value,
) {
    let other = serde_json::from_value(json!({
        "metadata": {"name": "someone-elses", "labels": {"app": "other"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [toleration],
            "containers": [{"name": "c", "image": IMAGE, "resources": {"requests": requests}}],
        },
    }))
    .expect("a pod");
    pods.create(&Default::default(), &other)
        .await
        .expect("create someone else's pod");
    poll(
        Duration::from_secs(60),
        "someone else's pod Ready",
        || async {
            let p = pods.get("someone-elses").await.ok()?;
            let ready = p
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        },
    )
    .await;
}

/// Which pods go on a scale-down follows the plan (issue 13: "frees room on a host where it
/// will fit"). Node A (2 CPUs, 4 GiB) and node B (4 CPUs, 4 GiB, someone else's pod holding
/// 2 GiB of it); the remainder p2 (1 CPU, 512 MiB) fills both: 2 pods on A, 4 on B. p1 (1 CPU,
/// 3 GiB) fits only where one of p2's pods on A goes. Left to itself the ReplicaSet controller
/// removes a pod from the node that has the most of them (B), and p1's pod would stay
/// Unschedulable while every tick plans the same again; the plan names A, and microscaler
/// marks a pod there with the lowest pod deletion cost before the count goes down. At every
/// tick no pod of p1 is Unschedulable for more than one tick; twice, p1 runs on A with p2 at
/// 1 + 4; when p1's demand falls p2 fills A again; no mark is left on the pods that stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_removes_the_pods_the_plan_takes_room_from() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::ResourceExt;
    use microscaler_testkit::kube_rig::NodeShape;

    let _rig = RIG.lock().await;
    let Some(client) = admin().await else {
        return;
    };
    let namespace = unique("k8s-steer");
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let instance = unique("ks");
    let taint = ("microscaler.test/steer", instance.as_str());
    let shape = |cpu| NodeShape {
        cpu,
        memory: "4Gi",
        pods: "110",
        taint,
    };
    let a = KwokNode::create_shaped(&client, &unique("kwok-node-a"), shape("2")).await;
    let b = KwokNode::create_shaped(&client, &unique("kwok-node-b"), shape("4")).await;
    let toleration =
        json!({"key": taint.0, "operator": "Equal", "value": taint.1, "effect": "NoSchedule"});
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    someone_elses_pod(&pods, &b.0, &toleration, json!({"memory": "2Gi"})).await;

    let cfg = resources_config(&instance, &namespace, taint, "3Gi", 0);
    let (mut run, demand, _state) = Run::start(cfg, &["p1"]).await;
    let service_on = |service: &'static str, node: String| {
        let pods = pods.clone();
        async move {
            pods.list(
                &kube::api::ListParams::default()
                    .labels(&format!("io.microscaler.service={service}")),
            )
            .await
            .expect("list pods")
            .items
            .iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
            })
            .count()
        }
    };

    run.converged(0, 6).await;
    assert_eq!(
        (
            service_on("p2", a.0.clone()).await,
            service_on("p2", b.0.clone()).await
        ),
        (2, 4),
        "p2 fills both nodes"
    );
    for round in 1..=2 {
        demand.set(1.0).expect("set demand");
        let reports = run.converged(1, 6).await;
        let steered = reports.iter().any(|r| {
            r.plan.as_ref().is_some_and(|p| {
                p.service("p2").is_some_and(|s| {
                    s.remove_from
                        .iter()
                        .any(|(h, n)| h.as_str() == a.0 && *n == 1)
                })
            })
        });
        assert!(steered, "round {round}: the plan took p2's pod from node A");
        assert_eq!(
            (
                service_on("p1", a.0.clone()).await,
                service_on("p2", a.0.clone()).await,
                service_on("p2", b.0.clone()).await
            ),
            (1, 1, 4),
            "round {round}: p1 runs on A where p2's pod went"
        );
        let marked = pods
            .list(&Default::default())
            .await
            .expect("list pods")
            .items
            .into_iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.annotations()
                        .contains_key("controller.kubernetes.io/pod-deletion-cost")
            })
            .count();
        assert_eq!(marked, 0, "round {round}: no pod that stays is marked");
        demand.set(0.0).expect("set demand");
        run.converged(0, 6).await;
        assert_eq!(
            (
                service_on("p2", a.0.clone()).await,
                service_on("p2", b.0.clone()).await
            ),
            (2, 4),
            "round {round}: p2 fills node A again"
        );
    }
    run.ctl.shutdown().await.expect("shutdown");
}
