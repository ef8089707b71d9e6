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
use microscaler_testkit::kube_rig::{admin, kubeconfig, kwok_toleration, NamespaceGuard, IMAGE};
use serde_json::json;

/// kwok makes a scheduled pod Ready at once; a minute covers a loaded machine.
const SETTLE: Duration = Duration::from_secs(60);

fn spec(namespace: &str) -> KubernetesConfig {
    KubernetesConfig {
        kubeconfig: Some(kubeconfig()),
        context: None,
        namespace: namespace.into(),
        tolerations: vec![kwok_toleration()],
        leader_election: None,
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

/// A Deployment `name` in `namespace` without microscaler's labels, tolerating kwok's nodes.
fn plain_deployment(namespace: &str, name: &str, replicas: u32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": "payments"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{"name": "app", "image": IMAGE, "env": [{"name": "OWNER", "value": "someone-else"}]}],
                    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
        },
    }))
    .expect("deployment")
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
