//! Helpers for tests against the Kubernetes test rig (`scripts/k8s-rig.sh start`,
//! docs/kubernetes-rig.md): an admin client, a namespace per test removed even when the test
//! fails, and nodes of kwok's own.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::Client;
use microscaler_backends::kubernetes::Toleration;
use serde_json::json;

use crate::{block_on_own_runtime, missing_service};

/// Any image: kwok runs no container.
pub const IMAGE: &str = "registry.k8s.io/pause:3.10";

/// A Deployment `name` in `namespace` that is someone else's (no microscaler label), its pods
/// labelled `app: <name>` and tolerating kwok's nodes.
pub fn plain_deployment(namespace: &str, name: &str, replicas: u32) -> Deployment {
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

/// The rig's admin kubeconfig (`MICROSCALER_KUBECONFIG` overrides it).
pub fn kubeconfig() -> String {
    std::env::var("MICROSCALER_KUBECONFIG")
        .unwrap_or_else(|_| "/var/lib/microscaler-ci/k8s/run/admin.kubeconfig".into())
}

/// The rig's kubectl (`MICROSCALER_KUBECTL` overrides it), as the rig's admin.
pub fn kubectl() -> std::process::Command {
    let path = std::env::var("MICROSCALER_KUBECTL")
        .unwrap_or_else(|_| "/var/lib/microscaler-ci/k8s/run/kubectl".into());
    let mut c = std::process::Command::new(path);
    c.env("KUBECONFIG", kubeconfig());
    c
}

/// Runs the rig's kubectl with `args` and returns its stdout; panics with its stderr if it
/// fails.
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl()
        .args(args)
        .output()
        .expect("run the rig's kubectl (scripts/k8s-rig.sh start links it)");
    assert!(
        out.status.success(),
        "kubectl {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kubeconfig (written as JSON, which is YAML) for the rig's apiserver, with its CA, that
/// authenticates with `token` (a ServiceAccount's) instead of the admin's certificate.
pub fn token_kubeconfig(token: &str) -> String {
    let admin = kube::config::Kubeconfig::read_from(kubeconfig()).expect("the admin kubeconfig");
    let cluster = admin.clusters[0].cluster.clone().expect("a cluster");
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "rig", "cluster": {
            "server": cluster.server,
            "certificate-authority-data": cluster.certificate_authority_data,
        }}],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "rig", "context": {"cluster": "rig", "user": "token"}}],
        "current-context": "rig",
    })
    .to_string()
}

/// What the kubelet mounts in a pod for a ServiceAccount `token`: a directory under `dir` with
/// `token`, `ca.crt` (the rig's CA) and `namespace`, as at
/// /var/run/secrets/kubernetes.io/serviceaccount; with [`in_pod`] a process finds it there.
pub fn pod_service_account(
    dir: &std::path::Path,
    token: &str,
    namespace: &str,
) -> std::path::PathBuf {
    let admin = kube::config::Kubeconfig::read_from(kubeconfig()).expect("the admin kubeconfig");
    let cluster = admin.clusters[0].cluster.clone().expect("a cluster");
    let ca: k8s_openapi::ByteString =
        serde_json::from_value(json!(cluster.certificate_authority_data.expect("CA data")))
            .expect("the CA, base64");
    let sa = dir.join("serviceaccount");
    std::fs::create_dir_all(&sa).expect("create the service account directory");
    for (file, bytes) in [
        ("token", token.as_bytes()),
        ("ca.crt", ca.0.as_slice()),
        ("namespace", namespace.as_bytes()),
    ] {
        std::fs::write(sa.join(file), bytes).expect("write the service account's files");
    }
    sa
}

/// `c` run as in a pod of the rig: in a private mount namespace (root only, `unshare` from
/// util-linux) where a tmpfs hides the host's /run and /run/secrets/kubernetes.io/serviceaccount
/// holds `service_account` (from [`pod_service_account`]), with `KUBERNETES_SERVICE_HOST` and
/// `_PORT` naming the apiserver and no kubeconfig anywhere (`KUBECONFIG` unset, `HOME` set to
/// `home`). A Kubernetes client then has only the in-cluster configuration to find. The
/// caller sets the returned command's stdio.
pub fn in_pod(
    c: &std::process::Command,
    service_account: &std::path::Path,
    home: &std::path::Path,
) -> std::process::Command {
    let admin = kube::config::Kubeconfig::read_from(kubeconfig()).expect("the admin kubeconfig");
    let server = admin.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("the apiserver's address");
    // The rig's apiserver is `https://127.0.0.1:PORT`.
    let (host, port) = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .rsplit_once(':')
        .expect("the apiserver's URL names a port");
    let mut p = std::process::Command::new("unshare");
    p.args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(
            "mount -t tmpfs -o mode=0755 microscaler-test /run\n\
             mkdir -p /run/secrets/kubernetes.io\n\
             cp -r \"$1\" /run/secrets/kubernetes.io/serviceaccount\n\
             shift\n\
             exec \"$@\"",
        )
        .arg("in-pod")
        .arg(service_account)
        .arg(c.get_program())
        .args(c.get_args())
        .env_remove("KUBECONFIG")
        .env("HOME", home)
        .env("KUBERNETES_SERVICE_HOST", host)
        .env("KUBERNETES_SERVICE_PORT", port);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => p.env(k, v),
            None => p.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        p.current_dir(d);
    }
    p
}

/// A client of the rig from `kubeconfig`'s text.
pub async fn client_of(kubeconfig: &str) -> Client {
    microscaler_backends::kubernetes::install_crypto_provider();
    let file = kube::config::Kubeconfig::from_yaml(kubeconfig).expect("a kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .expect("its configuration");
    Client::try_from(cfg).expect("a client")
}

/// The toleration of kwok's nodes' taint.
pub fn kwok_toleration() -> Toleration {
    Toleration {
        key: Some("kwok.x-k8s.io/node".into()),
        operator: "Exists".into(),
        value: None,
        effect: Some("NoSchedule".into()),
    }
}

/// An admin client of the rig, or `None` when the test is skipped (see [`missing_service`]:
/// under `CI=true` a missing rig fails the test).
pub async fn admin() -> Option<Client> {
    microscaler_backends::kubernetes::install_crypto_provider();
    let built = async {
        let file = kube::config::Kubeconfig::read_from(kubeconfig()).map_err(|e| e.to_string())?;
        let cfg = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .map_err(|e| e.to_string())?;
        let client = Client::try_from(cfg).map_err(|e| e.to_string())?;
        client
            .apiserver_version()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(client)
    };
    match built.await {
        Ok(c) => Some(c),
        Err(e) => {
            missing_service("the Kubernetes test rig (scripts/k8s-rig.sh start)", e);
            None
        }
    }
}

/// Runs `f` with an admin client, from `Drop` (see [`block_on_own_runtime`]).
fn with_admin_blocking<F>(f: impl FnOnce(Client) -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    block_on_own_runtime(move || async move {
        if let Some(c) = admin().await {
            f(c).await;
        }
    });
}

/// Namespace `name`, created by [`NamespaceGuard::create`] and removed (with everything in
/// it) when dropped; the drop returns once its pods are gone (a minute at most).
pub struct NamespaceGuard(pub String);

impl NamespaceGuard {
    /// Creates namespace `name`.
    pub async fn create(client: &Client, name: &str) -> NamespaceGuard {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create the test's namespace");
        NamespaceGuard(name.to_string())
    }
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let name = self.0.clone();
        with_admin_blocking(move |c| async move {
            let _ = Api::<Namespace>::all(c.clone())
                .delete(&name, &DeleteParams::background())
                .await;
            // Its pods hold the nodes' slots until they are gone: the next test needs them.
            let pods: Api<Pod> = Api::namespaced(c, &name);
            for _ in 0..600 {
                match pods.list(&Default::default()).await {
                    Ok(l) if !l.items.is_empty() => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await
                    }
                    _ => return,
                }
            }
        });
    }
}

/// A node of kwok's own, created by [`KwokNode::create`] (shaped as the rig's: 3 pods, 4 CPUs,
/// 8 GiB, kwok's taint) or [`KwokNode::create_shaped`], and deleted when dropped. kwok makes it
/// Ready within a second or so.
pub struct KwokNode(pub String);

/// What a node of kwok's has, and the taint that keeps other pods off it.
#[derive(Debug, Clone, Copy)]
pub struct NodeShape<'a> {
    /// Allocatable CPUs, a Kubernetes quantity.
    pub cpu: &'a str,
    /// Allocatable memory, a Kubernetes quantity.
    pub memory: &'a str,
    /// How many pods it takes.
    pub pods: &'a str,
    /// Its `NoSchedule` taint, key and value.
    pub taint: (&'a str, &'a str),
}

impl NodeShape<'_> {
    /// The rig's nodes.
    pub const RIG: NodeShape<'static> = NodeShape {
        cpu: "4",
        memory: "8Gi",
        pods: "3",
        taint: ("kwok.x-k8s.io/node", "fake"),
    };
}

impl KwokNode {
    /// Creates node `name`, shaped as the rig's.
    pub async fn create(client: &Client, name: &str) -> KwokNode {
        Self::create_shaped(client, name, NodeShape::RIG).await
    }

    /// Creates node `name` with `shape`.
    pub async fn create_shaped(client: &Client, name: &str, shape: NodeShape<'_>) -> KwokNode {
        let has = json!({"cpu": shape.cpu, "memory": shape.memory, "pods": shape.pods});
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"type": "kwok", "kubernetes.io/hostname": name},
            },
            "spec": {"taints": [{"key": shape.taint.0, "value": shape.taint.1, "effect": "NoSchedule"}]},
            "status": {"allocatable": has, "capacity": has},
        }))
        .expect("node");
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
            .expect("create a kwok node");
        KwokNode(name.to_string())
    }
}

impl Drop for KwokNode {
    fn drop(&mut self) {
        let name = self.0.clone();
        with_admin_blocking(move |c| async move {
            let _ = Api::<Node>::all(c)
                .delete(&name, &DeleteParams::default())
                .await;
        });
    }
}
