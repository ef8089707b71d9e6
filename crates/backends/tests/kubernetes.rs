//! The Kubernetes backend against a real control plane: the test rig's kube-apiserver,
//! kube-controller-manager and kube-scheduler over etcd, with kwok playing the kubelets
//! (`scripts/k8s-rig.sh start`; docs/kubernetes-rig.md). What is real: the apiserver (its
//! validation, `/scale`, resourceVersion preconditions, RBAC), the Deployment and ReplicaSet
//! controllers, the garbage collector and the scheduler (node capacity, taints). What kwok
//! simulates: the kubelets of 3 fake nodes (3 pods each); no container runs, and a pod becomes
//! Ready as soon as kwok sees it scheduled.
//!
//! Every test works in a namespace of its own, removed at the end even when it fails. Without
//! the rig the tests say they are skipped, and fail under CI=true.
#![cfg(feature = "kubernetes")]

mod common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, PostParams};
use kube::Client;
use microscaler_backends::kubernetes::{
    KubernetesBackend, KubernetesConfig, KubernetesReference, ObjectKind,
};
use microscaler_backends::{BackendError, Reference, Service, Workload};
use microscaler_testkit::kube_rig::{
    admin, kubeconfig, kwok_toleration, plain_deployment, NamespaceGuard, IMAGE,
};
use serde_json::json;

/// kwok makes a scheduled pod Ready at once; a minute covers a loaded machine.
const SETTLE: Duration = Duration::from_secs(60);

/// The tests share the rig's 9 pod slots: one at a time (nextest runs them in processes of
/// their own and .config/nextest.toml keeps them apart; `cargo test` runs them as threads).
static RIG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec(namespace: &str) -> KubernetesConfig {
    KubernetesConfig {
        kubeconfig: Some(kubeconfig()),
        context: None,
        namespace: namespace.into(),
        tolerations: vec![kwok_toleration()],
        leader_election: None,
        priority_classes: Default::default(),
    }
}

/// A service of the test running the placeholder image.
fn service(name: &str) -> Service {
    let mut s = common::service(name, vec![]);
    if let Some(run) = s.workload.run_mut() {
        run.image = Some(IMAGE.into());
    }
    s
}

struct KubeHarness {
    client: Client,
    namespace: String,
    instance: String,
    unreachable_kubeconfig: tempfile::TempDir,
}

impl KubeHarness {
    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn replicas_of(&self, name: &str) -> Option<u32> {
        let d = self.deployments().get_opt(name).await.ok()??;
        Some(d.spec?.replicas? as u32)
    }
}

impl microscaler_testkit::contract::Harness for KubeHarness {
    type B = KubernetesBackend;

    async fn connect(&self) -> KubernetesBackend {
        KubernetesBackend::connect(&spec(&self.namespace), &self.instance)
            .await
            .expect("connect to the rig")
    }

    async fn add_foreign(&self, replicas: u32) {
        self.deployments()
            .create(
                &PostParams::default(),
                &plain_deployment(&self.namespace, "foreign", replicas),
            )
            .await
            .expect("create a foreign Deployment");
    }

    /// The foreign Deployment's replica count, 0 once it is gone.
    async fn foreign_running(&self) -> u32 {
        self.replicas_of("foreign").await.unwrap_or(0)
    }

    async fn remove_foreign(&self) {
        let _ = self
            .deployments()
            .delete("foreign", &DeleteParams::background())
            .await;
    }

    async fn unreachable(&self) -> Option<Result<KubernetesBackend, BackendError>> {
        let path = self.unreachable_kubeconfig.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: nowhere\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\ncontexts:\n- name: nowhere\n  context:\n    cluster: nowhere\n    user: nobody\nusers:\n- name: nobody\n  user:\n    token: x\ncurrent-context: nowhere\n",
        )
        .expect("write a kubeconfig");
        let nowhere = KubernetesConfig {
            kubeconfig: Some(path.display().to_string()),
            ..spec(&self.namespace)
        };
        Some(KubernetesBackend::connect(&nowhere, &self.instance).await)
    }

    fn settle(&self) -> Duration {
        SETTLE
    }
}

/// The referenced object: a Deployment without microscaler's labels, with a label and an
/// environment variable of its own that every scale must leave alone.
impl microscaler_testkit::contract::ReferenceHarness for KubeHarness {
    async fn add_referenced(&self, replicas: u32) -> Workload {
        self.deployments()
            .create(
                &PostParams::default(),
                &plain_deployment(&self.namespace, "shop", replicas),
            )
            .await
            .expect("create the referenced Deployment");
        Workload::Reference(Reference::Kubernetes(KubernetesReference {
            kind: ObjectKind::Deployment,
            namespace: self.namespace.clone(),
            name: "shop".into(),
        }))
    }

    async fn referenced_template(&self) -> Option<String> {
        let d = self.deployments().get_opt("shop").await.ok()??;
        let spec = d.spec?;
        Some(format!(
            "{:?} {:?} {:?}",
            d.metadata.labels, spec.selector, spec.template
        ))
    }

    async fn referenced_wants(&self) -> Option<u32> {
        self.replicas_of("shop").await
    }

    async fn remove_referenced(&self) {
        self.deployments()
            .delete("shop", &DeleteParams::background())
            .await
            .expect("remove the referenced Deployment");
    }
}

/// The contract suite (scale, adoption, foreign objects, typed errors) and its reference case,
/// one after the other: the rig has 9 pod slots, and the two cases together need at most 6.
#[tokio::test]
async fn contract() {
    let _rig = RIG.lock().await;
    let Some(client) = admin().await else {
        return;
    };
    let namespace = common::unique("k8s-contract");
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let h = KubeHarness {
        client: client.clone(),
        namespace: namespace.clone(),
        instance: common::unique("kc"),
        unreachable_kubeconfig: tempfile::tempdir().expect("tempdir"),
    };
    let (a, b) = (service("a"), service("b"));
    microscaler_testkit::contract::run(&h, &a, &b).await;
    let left = h
        .deployments()
        .list(&Default::default())
        .await
        .expect("list Deployments");
    assert!(
        left.items.is_empty(),
        "shutdown(remove) removes the managed Deployments: {:?}",
        left.items
            .iter()
            .map(|d| &d.metadata.name)
            .collect::<Vec<_>>()
    );
    microscaler_testkit::contract::references(&h, "web").await;
}

/// `priority_classes = true`: a class per priority for managed services (a remainder's never
/// preempts), the pods get their values from the apiserver's own Priority admission, a class
/// of the same name that microscaler did not make stops the start and is left alone, and
/// `shutdown(remove)` removes the classes it made. Then `priority_classes` naming existing
/// classes: used as they are, and a missing one fails the start naming it.
#[tokio::test]
async fn priority_classes_order_the_schedulers_view_as_microscaler_does() {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::scheduling::v1::PriorityClass;
    use microscaler_backends::kubernetes::PriorityClasses;
    use microscaler_backends::Backend;
    use microscaler_core::{Priority, ServiceKind};
    let _rig = RIG.lock().await;
    let Some(client) = admin().await else {
        return;
    };
    let namespace = common::unique("k8s-prio");
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let instance = common::unique("kp");
    let classes: Api<PriorityClass> = Api::all(client.clone());
    let p1 = service("web");
    let mut p2 = service("batch");
    p2.priority = Priority::try_new(2).unwrap();
    p2.kind = ServiceKind::Remainder;
    let services = [p1.clone(), p2.clone()];
    let created = |p, r| PriorityClasses::created_name(&instance, p, r);
    // Removed even when the test fails.
    struct Classes(Vec<String>);
    impl Drop for Classes {
        fn drop(&mut self) {
            let names = std::mem::take(&mut self.0);
            microscaler_testkit::block_on_own_runtime(move || async move {
                if let Some(c) = admin().await {
                    let api: Api<PriorityClass> = Api::all(c);
                    for n in names {
                        let _ = api.delete(&n, &DeleteParams::default()).await;
                    }
                }
            });
        }
    }
    let _classes = Classes(vec![
        created(1, false),
        created(2, true),
        format!("{instance}-critical"),
    ]);

    // Someone else's class with the name microscaler would make for priority 1: not touched.
    let foreign: PriorityClass = serde_json::from_value(json!({
        "metadata": {"name": created(1, false)},
        "value": 5,
    }))
    .unwrap();
    classes
        .create(&PostParams::default(), &foreign)
        .await
        .expect("create a foreign PriorityClass");
    let made = KubernetesConfig {
        priority_classes: PriorityClasses::Create,
        ..spec(&namespace)
    };
    let b = KubernetesBackend::connect(&made, &instance)
        .await
        .expect("connect");
    let err = b.prepare(&services).await.expect_err("a foreign class");
    assert!(
        err.to_string().contains("does not carry the label"),
        "{err}"
    );
    assert_eq!(
        classes.get(&created(1, false)).await.unwrap().value,
        5,
        "the foreign class is left as it was"
    );
    classes
        .delete(&created(1, false), &DeleteParams::default())
        .await
        .expect("remove the foreign class");
    drop(b);

    let b = KubernetesBackend::connect(&made, &instance)
        .await
        .expect("connect");
    b.prepare(&services).await.expect("prepare");
    let c1 = classes.get(&created(1, false)).await.expect("p1's class");
    let c2 = classes.get(&created(2, true)).await.expect("p2's class");
    assert_eq!(
        (c1.value, c1.preemption_policy.as_deref()),
        (999, Some("PreemptLowerPriority"))
    );
    assert_eq!(
        (c2.value, c2.preemption_policy.as_deref()),
        (998, Some("Never"))
    );
    b.scale(&p1, 1).await.expect("scale web");
    b.scale(&p2, 1).await.expect("scale batch");
    common::wait_for(&b, SETTLE, |o| {
        o.services.get(&p1.name).is_some_and(|s| s.running == 1)
            && o.services.get(&p2.name).is_some_and(|s| s.running == 1)
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let mut seen: Vec<(String, Option<String>, Option<i32>)> = pods
        .list(&Default::default())
        .await
        .expect("list pods")
        .items
        .into_iter()
        .map(|p| {
            let s = p.spec.unwrap();
            (
                p.metadata.labels.unwrap()["io.microscaler.service"].clone(),
                s.priority_class_name,
                s.priority,
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("batch".into(), Some(created(2, true)), Some(998)),
            ("web".into(), Some(created(1, false)), Some(999)),
        ],
        "the apiserver's Priority admission gave each pod its class's value"
    );
    b.shutdown(&services, true).await.expect("shutdown");
    for name in [created(1, false), created(2, true)] {
        assert!(
            classes.get_opt(&name).await.unwrap().is_none(),
            "{name} removed with on_exit = stop"
        );
    }

    // Existing classes, by priority: used as they are; one missing fails the start.
    let critical: PriorityClass = serde_json::from_value(json!({
        "metadata": {"name": format!("{instance}-critical")},
        "value": 100_000,
    }))
    .unwrap();
    classes
        .create(&PostParams::default(), &critical)
        .await
        .expect("create an existing class");
    let named = |names: &[(u32, String)]| KubernetesConfig {
        priority_classes: PriorityClasses::Names(names.iter().cloned().collect()),
        ..spec(&namespace)
    };
    let missing = format!("{instance}-nowhere");
    let b = KubernetesBackend::connect(
        &named(&[(1, format!("{instance}-critical")), (2, missing.clone())]),
        &instance,
    )
    .await
    .expect("connect");
    let err = b.prepare(&services).await.expect_err("a missing class");
    assert!(
        matches!(err, BackendError::NotFound { .. }) && err.to_string().contains(&missing),
        "{err}"
    );
    drop(b);
    let b = KubernetesBackend::connect(&named(&[(1, format!("{instance}-critical"))]), &instance)
        .await
        .expect("connect");
    b.prepare(&services).await.expect("prepare");
    let template = |name: String| {
        let d = Api::<Deployment>::namespaced(client.clone(), &namespace);
        async move {
            d.get(&name)
                .await
                .expect("the managed Deployment")
                .spec
                .and_then(|s| s.template.spec)
                .and_then(|s| s.priority_class_name)
        }
    };
    assert_eq!(
        template(format!("{instance}-web")).await,
        Some(format!("{instance}-critical"))
    );
    assert_eq!(template(format!("{instance}-batch")).await, None);
    b.shutdown(&services, true).await.expect("shutdown");
    assert!(
        classes
            .get_opt(&format!("{instance}-critical"))
            .await
            .unwrap()
            .is_some(),
        "a class microscaler did not make is never removed"
    );
}
