//! The control loop on a real Kubernetes control plane: the test rig's kube-apiserver,
//! kube-controller-manager and kube-scheduler over etcd, with kwok playing the kubelets
//! (`scripts/k8s-rig.sh start`; docs/kubernetes-rig.md). Real: the apiserver, the Deployment,
//! ReplicaSet, garbage-collection and pod-GC controllers, the scheduler (each node's pod
//! capacity, taints, cordons). Simulated by kwok: the kubelets of the nodes, so no container
//! runs and a scheduled pod is Ready at once.
//!
//! The tests add and remove a node of their own (`kwok-node-t…`) and never touch the rig's
//! three. They work in a namespace of their own, removed at the end even when they fail.
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
use microscaler_core::ServiceObservation;
use microscaler_testkit::kube_rig::{admin, kubeconfig, KwokNode, NamespaceGuard, IMAGE};
use microscaler_testkit::unique;
use serde_json::json;

const TICK: Duration = Duration::from_millis(200);
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
    /// Ticks in a row in which a pod of p1 was Unschedulable.
    p1_unschedulable: u32,
    ticks: u64,
}

fn counts(r: &TickReport, service: &str) -> ServiceObservation {
    r.observed
        .as_ref()
        .and_then(|o| o.services.iter().find(|(k, _)| k.as_str() == service))
        .map(|(_, v)| *v)
        .unwrap_or_default()
}

fn ready_hosts(r: &TickReport) -> usize {
    r.observed
        .as_ref()
        .map_or(0, |o| o.hosts.iter().filter(|h| h.ready).count())
}

fn target(r: &TickReport, service: &str) -> Option<u32> {
    r.plan.as_ref().and_then(|p| {
        p.services
            .iter()
            .find(|s| s.service.as_str() == service)
            .map(|s| s.target)
    })
}

impl Run {
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
        if counts(&r, "p1").unschedulable > 0 {
            self.p1_unschedulable += 1;
        } else {
            self.p1_unschedulable = 0;
        }
        assert!(
            self.p1_unschedulable <= 1,
            "tick {}: a pod of p1 was Unschedulable for more than one tick: {:?}",
            self.ticks,
            counts(&r, "p1")
        );
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
                    counts(last, "p1"),
                    counts(last, "p2"),
                    ready_hosts(last)
                );
            }
        }
    }

    /// Ticks until the seeds' rule holds: p1 runs its demand, p1 + p2 fill the capacity, and
    /// nothing is pending.
    async fn converged(&mut self, demand: u32, capacity: u32) -> Vec<TickReport> {
        self.until(&format!("p1 == {demand}, p1 + p2 == {capacity}"), |r| {
            let (p1, p2) = (counts(r, "p1"), counts(r, "p2"));
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
    let Some(client) = admin().await else {
        return;
    };
    let namespace = unique("k8s-loop");
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let instance = unique("kl");
    let cfg = config(&namespace, &instance);
    let state = tempfile::tempdir().expect("state dir");
    let backend = build_backend(&cfg, state.path()).await.expect("backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let demand = ctl.controls().manual_of("p1").expect("p1's manual").clone();
    let mut run = Run {
        ctl,
        p1_unschedulable: 0,
        ticks: 0,
    };

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
        target(first_ready, "p2"),
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
            target(r, "p1"),
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
        let (p1, p2) = (counts(r, "p1"), counts(r, "p2"));
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

    // The scheduler never had to turn a pod of p1 away: p2 always made room first.
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(client.clone(), &namespace);
    let refused: Vec<String> = events
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("FailedScheduling")
                && e.involved_object
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&format!("{p1_name}-")))
        })
        .map(|e| format!("{:?}: {:?}", e.involved_object.name, e.message))
        .collect();
    assert!(
        refused.is_empty(),
        "p1's pods were refused by the scheduler: {refused:?}"
    );

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
