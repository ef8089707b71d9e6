//! Kubernetes backend (service-level): microscaler sets the replica count of Deployments and
//! StatefulSets through their `/scale` subresource, and the scheduler places the pods.
//!
//! - A service references an existing object (`[services.reference] deployment =
//!   "namespace/name"`, `statefulset = ...`, or `daemonset = ...` for a per-host service), or,
//!   managed, is a Deployment `{instance}-{service}` in `[backend] namespace` that microscaler
//!   creates (with 0 replicas) from the service's `image`, `command` and `env`, labelled with
//!   [`labels::INSTANCE`] and [`labels::SERVICE`], and removes with `on_exit = "stop"`. A
//!   Deployment of that name without both labels is never touched (that is an error).
//! - Replica counts change only through `/scale`: read, and written back with the
//!   `resourceVersion` read as a precondition, so a change made in between is a 409. The
//!   controllers' own status writes bump that version too, so a conflict is read again and,
//!   while the count is still the one first read, written again (10 times at most); a count
//!   that changed meanwhile (someone else's scale), or a conflict still there, is a
//!   [`BackendError::Conflict`], retried on the next tick with what is observed then, never
//!   forced.
//! - Observation comes from watches (reflectors on the Nodes, and on the Deployments,
//!   StatefulSets, DaemonSets and Pods of the namespaces the services live in), not from a list
//!   per tick. A pod belongs to a service when it matches its object's selector. Running =
//!   Ready pods; pending = not ready yet (of which unschedulable = `PodScheduled=False`,
//!   reason `Unschedulable`); failed = phase `Failed`; a pod being deleted is stopping. The
//!   object's own `spec.replicas` is reported as what the orchestrator wants, so someone else
//!   scaling it (an HPA, `kubectl scale`) is seen; it has caught up when its
//!   `status.observedGeneration` reached its `metadata.generation`.
//! - Hosts are the Nodes, ready when their `Ready` condition is true, they are not cordoned,
//!   and every `NoSchedule`/`NoExecute` taint they carry is tolerated by `[backend]
//!   tolerations` (which managed pods get too).
//! - A per-host service is a DaemonSet: the DaemonSet controller keeps one pod per node, and
//!   microscaler counts it and never scales it.

use std::collections::BTreeMap;
use std::time::Duration;

use microscaler_core::plugin::{Capabilities, ServiceContext, StopCompletion};
use microscaler_core::validate::join;
use microscaler_core::Validator;
use serde::Deserialize;

use crate::config::{Reference, RunSpec, Workload};

/// Makes ring rustls' process-wide crypto provider, unless one is set already. A build with
/// the AWS SDK too has two providers (ring, aws-lc-rs) and rustls then picks none by itself,
/// so every Kubernetes client of the process calls this before it connects.
#[cfg(feature = "kubernetes")]
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------------------------------------
// Configuration: `[backend] type = "kubernetes"` and what a service gives it.

/// `[backend] type = "kubernetes"`: a Kubernetes cluster, through its apiserver.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KubernetesConfig {
    /// A kubeconfig file; `None` means `$KUBECONFIG`, else `~/.kube/config`, else the
    /// in-cluster service account.
    pub kubeconfig: Option<String>,
    /// The kubeconfig context; `None` means its current context.
    pub context: Option<String>,
    /// Where managed Deployments are created, and the namespace of a reference that names
    /// none. Default `default`.
    pub namespace: String,
    /// Taints that managed pods tolerate; a node whose `NoSchedule` or `NoExecute` taints are
    /// all tolerated counts as a host.
    pub tolerations: Vec<Toleration>,
    /// `[backend.leader_election]`: several microscalers, one Lease; only its holder acts.
    pub leader_election: Option<LeaderElection>,
    /// `priority_classes`: the `PriorityClass` of managed services' pods, so that the
    /// scheduler's own order agrees with microscaler's.
    pub priority_classes: PriorityClasses,
}

/// `[backend] priority_classes`: which `PriorityClass` a managed service's pods get, so that
/// the scheduler's preemption agrees with microscaler's priorities. microscaler frees the lower
/// priority before it asks for the higher, so the scheduler should never need to preempt; the
/// classes make it agree when something else (a node lost, a pod of someone else) takes room.
/// References are never changed: their own templates decide.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PriorityClasses {
    /// No class (the default): the pods get the cluster's default priority.
    #[default]
    None,
    /// `priority_classes = true`: microscaler makes one class per priority it runs, named
    /// [`PriorityClasses::created_name`] and valued [`PriorityClasses::value_of`]; a remainder
    /// service's class never preempts (`preemptionPolicy: Never`). Removed with
    /// `on_exit = "stop"`.
    Create,
    /// `priority_classes = { "1" = "critical", "2" = "batch" }`: classes that exist already,
    /// by microscaler priority. A priority not listed gets no class.
    Names(BTreeMap<u32, String>),
}

impl PriorityClasses {
    /// The value of the class microscaler makes for `priority`: 1000 minus it (999 for
    /// priority 1, 998 for priority 2), above the default 0 of other pods and far below the
    /// system classes (2,000,000,000 and more).
    pub fn value_of(priority: u32) -> i32 {
        (1000 - i64::from(priority)).max(i64::from(i32::MIN)) as i32
    }

    /// The name of the class microscaler makes for `priority` in `instance`; a remainder
    /// service's is suffixed `-remainder` (it never preempts).
    pub fn created_name(instance: &str, priority: u32, remainder: bool) -> String {
        let suffix = if remainder { "-remainder" } else { "" };
        format!("microscaler-{instance}-p{priority}{suffix}")
    }

    fn validate(raw: toml::Value, v: &mut Validator, path: &str) -> PriorityClasses {
        match raw {
            toml::Value::Boolean(false) => PriorityClasses::None,
            toml::Value::Boolean(true) => PriorityClasses::Create,
            toml::Value::Table(t) => {
                let mut names = BTreeMap::new();
                for (key, value) in t {
                    let at = join(path, &key);
                    let priority = key.parse::<u32>().ok().filter(|p| *p >= 1);
                    if priority.is_none() {
                        v.err(
                            &at,
                            format!("{key:?} is not a priority (a number, 1 the highest)"),
                        );
                    }
                    let name = match value {
                        toml::Value::String(n) if is_dns_subdomain(&n) => Some(n),
                        other => {
                            v.err(
                                &at,
                                format!("must be the name of a PriorityClass, got {other}"),
                            );
                            None
                        }
                    };
                    if let (Some(p), Some(n)) = (priority, name) {
                        names.insert(p, n);
                    }
                }
                PriorityClasses::Names(names)
            }
            other => {
                v.err(
                    path,
                    format!(
                        "must be true (microscaler makes a class per priority) or a table of \
                         priority = \"PriorityClass name\", got {other}"
                    ),
                );
                PriorityClasses::None
            }
        }
    }
}

/// `[backend.leader_election]`: a `coordination.k8s.io/v1` Lease that only one microscaler
/// holds at a time; the others observe and serve their API but never change anything. The
/// defaults are kube-controller-manager's.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderElection {
    /// The Lease's name. Default `microscaler-<instance>`.
    pub lease: String,
    /// The Lease's namespace. Default `[backend] namespace`.
    pub namespace: String,
    /// This microscaler's name in the Lease. Default `$POD_NAME`, else `<hostname>-<pid>`.
    pub identity: Option<String>,
    /// How long a Lease not renewed stays its holder's for the others. Default 15 s.
    pub lease_duration: Duration,
    /// How long a leader keeps acting without a successful renewal. Default 10 s; less than
    /// `lease_duration`, so a leader that cannot renew stops before anyone else may start.
    pub renew_deadline: Duration,
    /// Time between attempts to take or renew the Lease. Default 2 s.
    pub retry_period: Duration,
}

#[derive(Deserialize)]
struct RawLeaderElection {
    lease: Option<String>,
    namespace: Option<String>,
    identity: Option<String>,
    lease_duration: Option<String>,
    renew_deadline: Option<String>,
    retry_period: Option<String>,
}

impl LeaderElection {
    fn validate(
        raw: toml::Value,
        v: &mut Validator,
        path: &str,
        namespace: &str,
    ) -> Option<LeaderElection> {
        let r: RawLeaderElection = v.part(raw, path)?;
        let range = (Duration::from_millis(100), Duration::from_secs(600));
        let lease_duration = v.duration(
            r.lease_duration.as_deref(),
            &join(path, "lease_duration"),
            Duration::from_secs(15),
            range,
        );
        let renew_deadline = v.duration(
            r.renew_deadline.as_deref(),
            &join(path, "renew_deadline"),
            Duration::from_secs(10),
            range,
        );
        let retry_period = v.duration(
            r.retry_period.as_deref(),
            &join(path, "retry_period"),
            Duration::from_secs(2),
            range,
        );
        if renew_deadline >= lease_duration {
            v.err(
                join(path, "renew_deadline"),
                "must be less than lease_duration: a leader must stop acting before the others may take the Lease",
            );
        }
        if retry_period >= renew_deadline {
            v.err(
                join(path, "retry_period"),
                "must be less than renew_deadline: a leader must get several tries to renew",
            );
        }
        if let Some(lease) = &r.lease {
            if !is_dns_subdomain(lease) {
                v.err(
                    join(path, "lease"),
                    format!("{lease:?} is not an object name"),
                );
            }
        }
        let ns = r.namespace.unwrap_or_else(|| namespace.to_string());
        if !is_dns_label(&ns) {
            v.err(
                join(path, "namespace"),
                format!("{ns:?} is not a namespace name"),
            );
        }
        if r.identity.as_deref().is_some_and(|s| s.trim().is_empty()) {
            v.err(join(path, "identity"), "must not be empty");
        }
        Some(LeaderElection {
            lease: r.lease.unwrap_or_default(),
            namespace: ns,
            identity: r.identity,
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }
}

/// A toleration, as in a pod spec.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Toleration {
    /// The taint key; `None` (with `operator = "Exists"`) tolerates every taint.
    pub key: Option<String>,
    /// `Equal` (the default: the value must match) or `Exists`.
    #[serde(default = "equal")]
    pub operator: String,
    /// The taint value, for `Equal`.
    pub value: Option<String>,
    /// The effect tolerated (`NoSchedule`, `PreferNoSchedule`, `NoExecute`); `None` means all.
    pub effect: Option<String>,
}

fn equal() -> String {
    "Equal".into()
}

impl Toleration {
    /// Whether this toleration tolerates a taint `key=value:effect`.
    pub fn tolerates(&self, key: &str, value: Option<&str>, effect: &str) -> bool {
        if self.effect.as_deref().is_some_and(|e| e != effect) {
            return false;
        }
        match self.key.as_deref() {
            None => self.operator == "Exists",
            Some(k) if k != key => false,
            Some(_) if self.operator == "Exists" => true,
            Some(_) => self.value.as_deref().unwrap_or("") == value.unwrap_or(""),
        }
    }
}

#[derive(Deserialize)]
struct RawKubernetes {
    kubeconfig: Option<String>,
    context: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    tolerations: Vec<toml::Value>,
    leader_election: Option<toml::Value>,
    priority_classes: Option<toml::Value>,
}

/// What the kubernetes backend can do: DaemonSets keep per-host services, no pause, nodes
/// report their CPUs and memory, pods stop after the scale returns, and services may
/// reference existing Deployments, StatefulSets and DaemonSets.
pub const CAPABILITIES: Capabilities = Capabilities {
    native_per_host: true,
    pause: false,
    host_resources: true,
    stops: StopCompletion::Converges,
    references: true,
};

/// Whether `s` is a DNS-1123 label (a namespace): 1-63 of a-z, 0-9 and '-', alphanumeric at
/// both ends.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a DNS-1123 subdomain (an object name): dot-separated labels, at most 253.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl KubernetesConfig {
    /// Validates the `[backend]` section (without `type`) at `path`. No file is read here:
    /// the kubeconfig is loaded when the backend connects.
    pub fn validate(options: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawKubernetes = v.part(options, path)?;
        for (key, value) in [("kubeconfig", &r.kubeconfig), ("context", &r.context)] {
            if value.as_deref().is_some_and(|s| s.trim().is_empty()) {
                v.err(join(path, key), "must not be empty");
            }
        }
        let namespace = r.namespace.unwrap_or_else(|| "default".into());
        if !is_dns_label(&namespace) {
            v.err(
                join(path, "namespace"),
                format!("{namespace:?} is not a namespace name (1-63 of a-z, 0-9 and '-')"),
            );
        }
        let mut tolerations = Vec::new();
        for (i, t) in r.tolerations.into_iter().enumerate() {
            let at = format!("{}[{i}]", join(path, "tolerations"));
            let Some(t) = v.part::<Toleration>(t, &at) else {
                continue;
            };
            if !matches!(t.operator.as_str(), "Equal" | "Exists") {
                v.err(
                    join(&at, "operator"),
                    format!("must be \"Equal\" or \"Exists\", got {:?}", t.operator),
                );
            }
            if t.operator == "Exists" && t.value.is_some() {
                v.err(
                    join(&at, "value"),
                    "must be empty with operator = \"Exists\"",
                );
            }
            if t.key.is_none() && t.operator != "Exists" {
                v.err(
                    join(&at, "key"),
                    "missing: a toleration without a key needs operator = \"Exists\"",
                );
            }
            if let Some(e) = t.effect.as_deref() {
                if !matches!(e, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
                    v.err(
                        join(&at, "effect"),
                        format!("must be NoSchedule, PreferNoSchedule or NoExecute, got {e:?}"),
                    );
                }
            }
            tolerations.push(t);
        }
        let leader_election = r.leader_election.and_then(|le| {
            LeaderElection::validate(le, v, &join(path, "leader_election"), &namespace)
        });
        let priority_classes = r
            .priority_classes
            .map(|p| PriorityClasses::validate(p, v, &join(path, "priority_classes")))
            .unwrap_or_default();
        Some(KubernetesConfig {
            kubeconfig: r.kubeconfig,
            context: r.context,
            namespace,
            tolerations,
            leader_election,
            priority_classes,
        })
    }

    /// Validates a service's own keys for this backend: `image` (required: there is no
    /// built-in image in a cluster's registries), `command` and `env`, or a
    /// `[services.reference]` naming an existing Deployment, StatefulSet or DaemonSet.
    pub fn workload(
        &self,
        options: toml::Table,
        cx: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Workload> {
        let w = Workload::managed_or_reference(options, v, path, |table, v, path| {
            KubernetesReference::validate(table, &self.namespace, cx.per_host, v, path)
                .map(Reference::Kubernetes)
        })?;
        if let Workload::Managed(run) = &w {
            managed_checks(run, cx, v, path);
        }
        Some(w)
    }
}

fn managed_checks(run: &RunSpec, cx: &ServiceContext<'_>, v: &mut Validator, path: &str) {
    if cx.per_host {
        v.err(
            join(path, "per_host"),
            "a per-host service on kubernetes is a DaemonSet that exists already: reference it \
             with [services.reference] daemonset = \"namespace/name\"",
        );
    }
    if run.image.is_none() {
        v.err(
            join(path, "image"),
            "missing: the image the pods run (a cluster pulls it from a registry; there is no \
             built-in one), or reference an existing Deployment with [services.reference]",
        );
    }
}

/// The kind of object a service references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// `apps/v1` Deployment: scaled.
    Deployment,
    /// `apps/v1` StatefulSet: scaled.
    StatefulSet,
    /// `apps/v1` DaemonSet: one pod per node, counted and never scaled.
    DaemonSet,
}

impl ObjectKind {
    /// The kind's name, as Kubernetes writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Deployment => "Deployment",
            ObjectKind::StatefulSet => "StatefulSet",
            ObjectKind::DaemonSet => "DaemonSet",
        }
    }
}

/// `[services.reference]` on the kubernetes backend: exactly one of `deployment`,
/// `statefulset` or `daemonset`, as `"namespace/name"` or `"name"` (in `[backend] namespace`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KubernetesReference {
    /// What it is.
    pub kind: ObjectKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::fmt::Display for KubernetesReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

#[derive(Deserialize)]
struct RawReference {
    deployment: Option<String>,
    statefulset: Option<String>,
    daemonset: Option<String>,
}

impl KubernetesReference {
    /// Validates the reference table at `path`; `namespace` is the backend's, for a reference
    /// that names none.
    pub fn validate(
        table: toml::Value,
        namespace: &str,
        per_host: bool,
        v: &mut Validator,
        path: &str,
    ) -> Option<Self> {
        let r: RawReference = v.part(table, path)?;
        let given: Vec<(ObjectKind, &str, String)> = [
            (ObjectKind::Deployment, "deployment", r.deployment),
            (ObjectKind::StatefulSet, "statefulset", r.statefulset),
            (ObjectKind::DaemonSet, "daemonset", r.daemonset),
        ]
        .into_iter()
        .filter_map(|(k, key, s)| s.map(|s| (k, key, s)))
        .collect();
        let [(kind, key, value)] = <[_; 1]>::try_from(given)
            .map_err(|given| {
                v.err(
                    path,
                    format!(
                        "give exactly one of deployment, statefulset or daemonset, got {}",
                        given.len()
                    ),
                )
            })
            .ok()?;
        let at = join(path, key);
        let (ns, name) = match value.split_once('/') {
            Some((ns, name)) => (ns.to_string(), name.to_string()),
            None => (namespace.to_string(), value.clone()),
        };
        if !is_dns_label(&ns) || !is_dns_subdomain(&name) {
            v.err(
                &at,
                format!(
                    "{value:?} is not \"namespace/name\" or \"name\" of a Kubernetes object \
                     (lowercase letters, digits, '-' and '.')"
                ),
            );
        }
        match (kind, per_host) {
            (ObjectKind::DaemonSet, false) => v.err(
                &at,
                "a DaemonSet runs one pod per node: only a per-host service (per_host = true) \
                 can reference one",
            ),
            (ObjectKind::Deployment | ObjectKind::StatefulSet, true) => v.err(
                &at,
                "a per-host service references a DaemonSet (daemonset = \"namespace/name\")",
            ),
            _ => {}
        }
        Some(KubernetesReference {
            kind,
            namespace: ns,
            name,
        })
    }
}

#[cfg(feature = "kubernetes")]
pub use live::KubernetesBackend;

/// The labels of what microscaler creates for `service` of `instance`.
pub fn owned_labels(instance: &str, service: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (crate::labels::INSTANCE.to_string(), instance.to_string()),
        (crate::labels::SERVICE.to_string(), service.to_string()),
    ])
}

// ---------------------------------------------------------------------------------------------
// The live backend (feature `kubernetes`).

#[cfg(feature = "kubernetes")]
mod live {
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::fmt::Debug;
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::Duration;

    use futures::StreamExt;
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
    use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec};
    use k8s_openapi::api::scheduling::v1::PriorityClass;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use kube::core::{Selector, SelectorExt};
    use kube::runtime::reflector::{self, ObjectRef, Store};
    use kube::runtime::{watcher, WatchStreamExt};
    use kube::{Client, Resource, ResourceExt};
    use microscaler_core::plugin::Capabilities;
    use microscaler_core::{Host, HostId, Resources, ServiceKind, ServiceName};
    use serde::de::DeserializeOwned;
    use serde_json::json;
    use tokio::task::JoinHandle;
    use tracing::{debug, info, warn};

    use super::{
        owned_labels, KubernetesConfig, ObjectKind, PriorityClasses, Toleration, CAPABILITIES,
    };
    use crate::config::{Reference, Service};
    use crate::kube_lease::Elector;
    use crate::{
        labels, Apply, Backend, BackendError, Change, Observation, Replica, ReplicaState,
        ScaleOutcome,
    };

    /// Annotation on a managed Deployment: a hash of the pod template microscaler wrote, so a
    /// restarted daemon rewrites the template only when the configuration changed.
    const TEMPLATE_ANNOTATION: &str = "io.microscaler/template-hash";
    /// The ReplicaSet controller's ranking of pods to delete on a scale-down: the lowest cost
    /// goes first (after pods that are unscheduled, pending or not ready).
    const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
    /// Beside [`DELETION_COST`] on the pods microscaler marked: its instance, so that it
    /// clears only its own marks.
    const STEERED_ANNOTATION: &str = "io.microscaler/steered";
    /// The cost microscaler marks the pods it wants gone with: the lowest there is.
    const STEERED_COST: i32 = i32::MIN;
    /// How long the watches may take to list what exists, at connect and prepare.
    const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
    /// How many times a scale is read and written again when the object changed in between
    /// but its count did not (the controllers' status writes: several a second while pods
    /// come and go).
    const CONFLICT_ATTEMPTS: u32 = 10;
    /// How much longer than a service's `stop_grace` a scale-down waits for its pods to go.
    const STOP_SLACK: Duration = Duration::from_secs(5);
    /// How often a scale-down looks at the pods it waits for.
    const STOP_POLL: Duration = Duration::from_millis(10);
    /// The field manager of microscaler's writes.
    const FIELD_MANAGER: &str = "microscaler";

    /// The watched objects of one namespace.
    struct Watched {
        deployments: Store<Deployment>,
        statefulsets: Store<StatefulSet>,
        daemonsets: Store<DaemonSet>,
        pods: Store<Pod>,
    }

    /// The object a service is scaled through.
    #[derive(Debug, Clone)]
    struct Target {
        service: ServiceName,
        kind: ObjectKind,
        namespace: String,
        name: String,
    }

    /// The Kubernetes backend.
    pub struct KubernetesBackend {
        client: Client,
        /// The apiserver's URL, for messages.
        server: String,
        instance: String,
        namespace: String,
        tolerations: Vec<Toleration>,
        nodes: Store<Node>,
        watched: Mutex<HashMap<String, Arc<Watched>>>,
        targets: RwLock<BTreeMap<ServiceName, Target>>,
        tasks: Mutex<Vec<JoinHandle<()>>>,
        /// With `[backend.leader_election]`: this microscaler's candidacy.
        elector: Option<Arc<Elector>>,
        /// Nodes exist and none counts as a host (warned once per change).
        hostless: std::sync::atomic::AtomicBool,
        priority_classes: PriorityClasses,
        /// With capacity counted in resources ([`KubernetesBackend::count_resources`]): every
        /// pod of the cluster, so that what the pods of others request is taken off their
        /// node's allocatable.
        all_pods: Option<Store<Pod>>,
    }

    /// `$POD_NAME` (the manifests set it from the pod's name), else `<hostname>-<pid>`.
    fn default_identity() -> String {
        if let Ok(p) = std::env::var("POD_NAME") {
            if !p.is_empty() {
                return p;
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "microscaler".into());
        format!("{host}-{}", std::process::id())
    }

    impl Drop for KubernetesBackend {
        fn drop(&mut self) {
            for t in self
                .tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
            {
                t.abort();
            }
        }
    }

    /// The status code of an apiserver answer, if the error is one.
    fn status(e: &kube::Error) -> Option<u16> {
        match e {
            kube::Error::Api(s) => Some(s.code),
            _ => None,
        }
    }

    impl KubernetesBackend {
        /// `prepare`, or with [`Apply::No`] its checks and watches only: the Deployments and
        /// PriorityClasses it would create or update are logged instead.
        async fn prepare_as(&self, services: &[Service], apply: Apply) -> Result<(), BackendError> {
            let mut targets = BTreeMap::new();
            let mut seen: HashMap<(ObjectKind, String, String), ServiceName> = HashMap::new();
            for s in services {
                let t = self.target_of(s);
                if let Some(other) = seen.insert(
                    (t.kind, t.namespace.clone(), t.name.clone()),
                    s.name.clone(),
                ) {
                    return Err(BackendError::Unsupported(format!(
                        "services {other} and {} both stand for {} {}/{}: one object can stand for one service only",
                        s.name, t.kind.as_str(), t.namespace, t.name
                    )));
                }
                if matches!(s.kind, ServiceKind::PerHost) != (t.kind == ObjectKind::DaemonSet) {
                    return Err(BackendError::Unsupported(format!(
                        "service {}: a per-host service references a DaemonSet, and a DaemonSet only a per-host service",
                        s.name
                    )));
                }
                self.watch(&t.namespace).await?;
                if s.workload.reference().is_some() {
                    self.check_reference(s, &t).await?;
                } else {
                    match self.priority_class_of(s) {
                        Some((class, made)) if apply == Apply::Yes => {
                            self.ensure_priority_class(s, &class, made).await?
                        }
                        Some((class, _)) => {
                            info!(service = %s.name, class = %class, "dry run: would make sure the PriorityClass exists")
                        }
                        None => {}
                    }
                    self.ensure_managed(s, &t, apply).await?;
                }
                targets.insert(s.name.clone(), t);
            }
            *self.targets.write().unwrap_or_else(|e| e.into_inner()) = targets;
            Ok(())
        }

        /// Maps a failed call to its class: what the apiserver answered (409 conflict, 404
        /// not found, 429 throttled, 400/422 invalid, 403 refused by RBAC), or unreachable.
        fn error(&self, op: impl Into<String>, e: kube::Error) -> BackendError {
            let op = op.into();
            match &e {
                kube::Error::Api(s) => {
                    let message = format!("{} (HTTP {})", s.message, s.code);
                    match s.code {
                        409 => BackendError::Conflict { op, message },
                        404 => BackendError::NotFound {
                            what: op,
                            hint: message,
                        },
                        429 => BackendError::Throttled { op, message },
                        400 | 422 => BackendError::Invalid { op, message },
                        401 | 403 => BackendError::Unsupported(format!(
                            "{op}: refused by the apiserver at {}: {message}; give microscaler's \
                             account the rules in deploy/kubernetes/10-rbac.yaml (managed mode: also \
                             deploy/kubernetes/managed/rbac.yaml)",
                            self.server
                        )),
                        _ => BackendError::Api { op, message },
                    }
                }
                _ => BackendError::Unreachable {
                    what: format!("the Kubernetes apiserver at {}", self.server),
                    hint: format!(
                        "{op}: {e}; is the cluster up, and do the kubeconfig (or \
                         [backend] kubeconfig) and its context point at it?"
                    ),
                    source: Some(Box::new(e)),
                },
            }
        }

        /// Connects with `spec`'s kubeconfig (else `$KUBECONFIG`, `~/.kube/config`, the
        /// in-cluster account), checks that the apiserver answers and starts watching the
        /// nodes and `spec.namespace`.
        pub async fn connect(
            spec: &KubernetesConfig,
            instance: &str,
        ) -> Result<KubernetesBackend, BackendError> {
            super::install_crypto_provider();
            let options = KubeConfigOptions {
                context: spec.context.clone(),
                ..Default::default()
            };
            let source = spec
                .kubeconfig
                .clone()
                .or_else(|| std::env::var("KUBECONFIG").ok().filter(|s| !s.is_empty()));
            let (config, credentials) = match &source {
                Some(path) => {
                    let file = Kubeconfig::read_from(path).map_err(|e| BackendError::Unreachable {
                        what: format!("the Kubernetes cluster of kubeconfig {path}"),
                        hint: format!("{e}; set [backend] kubeconfig or KUBECONFIG to a readable kubeconfig"),
                        source: None,
                    })?;
                    let config = kube::Config::from_custom_kubeconfig(file, &options)
                        .await
                        .map_err(|e| BackendError::Unreachable {
                            what: format!("the Kubernetes cluster of kubeconfig {path}"),
                            hint: format!("{e}; check its context ([backend] context)"),
                            source: None,
                        })?;
                    (config, format!("kubeconfig {path}"))
                }
                // As kube's `Config::infer`, saying which one was found: ~/.kube/config, else
                // (with no context asked for) the pod's service account.
                None => match kube::Config::from_kubeconfig(&options).await {
                    Ok(config) => (config, "~/.kube/config".to_string()),
                    Err(e) if spec.context.is_some() => {
                        return Err(BackendError::Unreachable {
                            what: "the Kubernetes cluster of ~/.kube/config".into(),
                            hint: format!("{e}; check [backend] context"),
                            source: None,
                        })
                    }
                    Err(kubeconfig) => match kube::Config::incluster() {
                        Ok(config) => (config, "the pod's service account".to_string()),
                        Err(in_cluster) => {
                            return Err(BackendError::Unreachable {
                                what: "a Kubernetes cluster".into(),
                                hint: format!(
                                    "no kubeconfig ({kubeconfig}) and not in a pod ({in_cluster}); \
                                     set [backend] kubeconfig or KUBECONFIG, or run in a pod with a \
                                     service account"
                                ),
                                source: None,
                            })
                        }
                    },
                },
            };
            let server = config.cluster_url.to_string();
            let client = Client::try_from(config).map_err(|e| BackendError::Unreachable {
                what: format!("the Kubernetes apiserver at {server}"),
                hint: format!("building the client failed: {e}"),
                source: None,
            })?;
            let mut backend = KubernetesBackend {
                nodes: reflector::store().0,
                client,
                server,
                instance: instance.to_string(),
                namespace: spec.namespace.clone(),
                tolerations: spec.tolerations.clone(),
                watched: Mutex::default(),
                targets: RwLock::default(),
                tasks: Mutex::default(),
                elector: None,
                hostless: Default::default(),
                priority_classes: spec.priority_classes.clone(),
                all_pods: None,
            };
            let version = tokio::time::timeout(SYNC_TIMEOUT, backend.client.apiserver_version())
                .await
                .map_err(|_| BackendError::Unreachable {
                    what: format!("the Kubernetes apiserver at {}", backend.server),
                    hint: format!(
                        "no answer within {}s; is the cluster up?",
                        SYNC_TIMEOUT.as_secs()
                    ),
                    source: None,
                })?
                .map_err(|e| backend.error("read the apiserver's version", e))?;
            backend.nodes = backend.reflect(Api::<Node>::all(backend.client.clone()));
            backend.synced(&backend.nodes, "the nodes").await?;
            backend.watch(&spec.namespace).await?;
            if let Some(le) = &spec.leader_election {
                let mut le = le.clone();
                if le.lease.is_empty() {
                    le.lease = format!("microscaler-{instance}");
                }
                let identity = le.identity.clone().unwrap_or_else(default_identity);
                info!(lease = %le.lease, namespace = %le.namespace, identity = %identity, "leader election: acting only while holding the Lease");
                let elector = Elector::new(backend.client.clone(), le, identity);
                backend
                    .tasks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(tokio::spawn(Arc::clone(&elector).run()));
                backend.elector = Some(elector);
            }
            info!(
                server = %backend.server,
                version = %version.git_version,
                credentials = %credentials,
                instance,
                namespace = %spec.namespace,
                nodes = backend.nodes.state().len(),
                "connected to a Kubernetes apiserver"
            );
            Ok(backend)
        }

        /// Capacity is counted in CPU and memory (`[capacity] resources = true`): watches every
        /// pod of the cluster, so that a host's room is its Node's allocatable less what the
        /// pods that are not the services' request (other workloads, system pods), and checks
        /// that a referenced object's pods request what its service's `resources` say. Needs
        /// list and watch on pods cluster wide (`deploy/kubernetes/resources/rbac.yaml`).
        pub async fn count_resources(&mut self) -> Result<(), BackendError> {
            let store = self.reflect(Api::<Pod>::all(self.client.clone()));
            self.synced(
                &store,
                "the pods of every namespace (for [capacity] resources = true)",
            )
            .await?;
            self.all_pods = Some(store);
            Ok(())
        }

        /// Starts a reflector on `api`, kept until the backend is dropped.
        fn reflect<K>(&self, api: Api<K>) -> Store<K>
        where
            K: Resource<DynamicType = ()>
                + Clone
                + DeserializeOwned
                + Debug
                + Send
                + Sync
                + 'static,
        {
            let (reader, writer) = reflector::store();
            let kind = K::kind(&()).to_string();
            let stream = reflector::reflector(
                writer,
                watcher(api, watcher::Config::default()).default_backoff(),
            );
            let task = tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    if let Err(e) = event {
                        warn!(kind = %kind, error = %e, "a Kubernetes watch failed; it restarts with backoff");
                    }
                }
            });
            self.tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
            reader
        }

        /// Waits until `store` has listed what exists.
        async fn synced<K>(&self, store: &Store<K>, what: &str) -> Result<(), BackendError>
        where
            K: Resource<DynamicType = ()> + Clone + 'static,
        {
            match tokio::time::timeout(SYNC_TIMEOUT, store.wait_until_ready()).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(BackendError::Unreachable {
                    what: format!("the Kubernetes apiserver at {}", self.server),
                    hint: format!(
                        "watching {what} gave no list within {}s: is the apiserver overloaded, \
                         or may microscaler's account not list and watch them (see \
                         deploy/kubernetes/10-rbac.yaml)?",
                        SYNC_TIMEOUT.as_secs()
                    ),
                    source: None,
                }),
            }
        }

        /// The watches of `namespace`, started (and synced) on first use.
        async fn watch(&self, namespace: &str) -> Result<Arc<Watched>, BackendError> {
            if let Some(w) = self.watched_in(namespace) {
                return Ok(w);
            }
            let c = &self.client;
            let w = Arc::new(Watched {
                deployments: self.reflect(Api::namespaced(c.clone(), namespace)),
                statefulsets: self.reflect(Api::namespaced(c.clone(), namespace)),
                daemonsets: self.reflect(Api::namespaced(c.clone(), namespace)),
                pods: self.reflect(Api::namespaced(c.clone(), namespace)),
            });
            let what = format!("namespace {namespace}");
            self.synced(&w.deployments, &format!("the Deployments of {what}"))
                .await?;
            self.synced(&w.statefulsets, &format!("the StatefulSets of {what}"))
                .await?;
            self.synced(&w.daemonsets, &format!("the DaemonSets of {what}"))
                .await?;
            self.synced(&w.pods, &format!("the pods of {what}")).await?;
            self.watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(namespace.to_string(), Arc::clone(&w));
            Ok(w)
        }

        fn watched_in(&self, namespace: &str) -> Option<Arc<Watched>> {
            self.watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(namespace)
                .cloned()
        }

        /// The watches of `t`'s namespace and the selector of its object's pods, once both are
        /// known.
        fn pods_of(&self, t: &Target) -> Option<(Arc<Watched>, Selector)> {
            let w = self.watched_in(&t.namespace)?;
            let selector = object_view(&w, t)
                .and_then(|v| v.selector)
                .and_then(|s| Selector::try_from(s).ok())?;
            Some((w, selector))
        }

        /// Waits until at most `n` pods of `t`'s object are left (terminating ones included:
        /// they hold their node's capacity until they are gone), or `limit` has passed.
        async fn await_pods_at_most(&self, t: &Target, n: u32, limit: Duration) {
            let Some((w, selector)) = self.pods_of(t) else {
                return;
            };
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                let left = w
                    .pods
                    .state()
                    .iter()
                    .filter(|p| {
                        !matches!(pod_count(p), PodCount::Done | PodCount::Failed)
                            && selector.matches(&p.metadata.labels.clone().unwrap_or_default())
                    })
                    .count() as u32;
                if left <= n {
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    debug!(service = %t.service, object = %t.name, left, target = n, "pods still terminating after the wait; the orchestrator finishes on its own");
                    return;
                }
                tokio::time::sleep(STOP_POLL).await;
            }
        }

        /// Marks the pods of Deployment `t` the ReplicaSet controller should remove first on a
        /// scale-down of `count`: up to `n` on each host of `from` (the plan's), with the
        /// lowest pod deletion cost; clears microscaler's marks from every other pod of it.
        /// Best effort: a pod that cannot be marked is logged, and the orchestrator chooses.
        async fn steer(&self, t: &Target, count: u32, from: &[(HostId, u32)]) {
            let Some((w, selector)) = self.pods_of(t) else {
                return;
            };
            let mut pods: Vec<Arc<Pod>> = w
                .pods
                .state()
                .into_iter()
                .filter(|p| {
                    matches!(pod_count(p), PodCount::Running | PodCount::Pending { .. })
                        && selector.matches(&p.metadata.labels.clone().unwrap_or_default())
                })
                .collect();
            // Within a host, the ones the controller would take first anyway: not ready,
            // then the newest.
            pods.sort_by_key(|p| {
                (
                    matches!(pod_count(p), PodCount::Running),
                    std::cmp::Reverse(p.metadata.creation_timestamp.clone()),
                )
            });
            let mut left = count;
            let mut marked: HashSet<String> = HashSet::new();
            for (host, n) in from {
                let mut n = (*n).min(left);
                for p in &pods {
                    if n == 0 {
                        break;
                    }
                    let on = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                    if on == Some(host.as_str()) {
                        marked.insert(p.name_any());
                        n -= 1;
                        left -= 1;
                    }
                }
            }
            let cost = STEERED_COST.to_string();
            let mut writes = Vec::new();
            for p in &pods {
                let ours = p
                    .annotations()
                    .get(STEERED_ANNOTATION)
                    .is_some_and(|i| *i == self.instance);
                let annotations = match (marked.contains(&p.name_any()), ours) {
                    (true, _) if p.annotations().get(DELETION_COST) == Some(&cost) && ours => {
                        continue
                    }
                    (true, _) => json!({DELETION_COST: cost, STEERED_ANNOTATION: self.instance}),
                    (false, true) => json!({DELETION_COST: null, STEERED_ANNOTATION: null}),
                    (false, false) => continue,
                };
                let api = Api::<Pod>::namespaced(self.client.clone(), &t.namespace);
                let name = p.name_any();
                writes.push(async move {
                    let params = PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    };
                    let patch = json!({"metadata": {"annotations": annotations}});
                    (api.patch(&name, &params, &Patch::Merge(&patch)).await, name)
                });
            }
            for (result, pod) in futures::future::join_all(writes).await {
                match result {
                    Ok(_) => {
                        debug!(service = %t.service, pod, "pod deletion cost set for the plan's scale-down")
                    }
                    Err(e) => {
                        warn!(service = %t.service, pod, error = %self.error(format!("mark pod {pod} to go first"), e), "the orchestrator chooses which pods go (give microscaler's role patch on pods to follow the plan's hosts)")
                    }
                }
            }
        }

        /// The object `service` is scaled through.
        fn target_of(&self, service: &Service) -> Target {
            match service.workload.reference() {
                Some(Reference::Kubernetes(r)) => Target {
                    service: service.name.clone(),
                    kind: r.kind,
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                },
                _ => Target {
                    service: service.name.clone(),
                    kind: ObjectKind::Deployment,
                    namespace: self.namespace.clone(),
                    name: format!("{}-{}", self.instance, service.name),
                },
            }
        }

        fn owned(
            &self,
            meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            service: &ServiceName,
        ) -> bool {
            let l = meta.labels.as_ref();
            l.and_then(|l| l.get(labels::INSTANCE)) == Some(&self.instance)
                && l.and_then(|l| l.get(labels::SERVICE)).map(String::as_str)
                    == Some(service.as_str())
        }

        /// The managed Deployment of `service`, as microscaler writes it (0 replicas).
        fn deployment(
            &self,
            service: &Service,
            target: &Target,
        ) -> Result<Deployment, BackendError> {
            let run = crate::managed(service);
            let labels = owned_labels(&self.instance, service.name.as_str());
            let env: Vec<_> = run
                .env
                .iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .chain([
                    json!({"name": crate::docker::ENV_SERVICE, "value": service.name.as_str()}),
                    json!({"name": crate::docker::ENV_INSTANCE, "value": self.instance}),
                ])
                .collect();
            let mut container = json!({
                "name": "replica",
                "image": run.image.clone().unwrap_or_default(),
                "env": env,
            });
            if !run.command.is_empty() {
                container["command"] = json!(run.command);
            }
            // What the scheduler places each pod by: the service's resources, requested, and
            // its memory as the limit too (a pod over it is killed, not its neighbours).
            if let Some(r) = service.resources {
                let mut requests = serde_json::Map::new();
                if r.cpu_milli > 0 {
                    requests.insert("cpu".into(), json!(format!("{}m", r.cpu_milli)));
                }
                if r.memory > 0 {
                    requests.insert("memory".into(), json!(r.memory.to_string()));
                    container["resources"]["limits"] = json!({"memory": r.memory.to_string()});
                }
                container["resources"]["requests"] = json!(requests);
            }
            let tolerations: Vec<_> = self
                .tolerations
                .iter()
                .map(|t| json!({"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect}))
                .collect();
            let mut template = json!({
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "tolerations": tolerations,
                    "terminationGracePeriodSeconds": service.stop_grace.as_secs(),
                },
            });
            if let Some((class, _)) = self.priority_class_of(service) {
                template["spec"]["priorityClassName"] = json!(class);
            }
            let hash = fnv(template.to_string().as_bytes());
            serde_json::from_value(json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": target.name,
                    "namespace": target.namespace,
                    "labels": labels,
                    "annotations": {TEMPLATE_ANNOTATION: format!("{hash:016x}")},
                },
                "spec": {
                    "replicas": 0,
                    "selector": {"matchLabels": labels},
                    "template": template,
                },
            }))
            .map_err(|e| BackendError::Invalid {
                op: format!("build Deployment {}/{}", target.namespace, target.name),
                message: e.to_string(),
            })
        }

        /// Creates the managed Deployment of `service`, or adopts the one that exists (its
        /// replicas kept; its pod template rewritten only if the configuration changed).
        async fn ensure_managed(
            &self,
            service: &Service,
            target: &Target,
            apply: Apply,
        ) -> Result<(), BackendError> {
            let api: Api<Deployment> = Api::namespaced(self.client.clone(), &target.namespace);
            let want = self.deployment(service, target)?;
            let what = format!("Deployment {}/{}", target.namespace, target.name);
            let existing = api
                .get_opt(&target.name)
                .await
                .map_err(|e| self.error(format!("read {what}"), e))?;
            let Some(have) = existing else {
                if apply == Apply::No {
                    info!(service = %service.name, deployment = %what, "dry run: would create the Deployment (0 replicas)");
                    return Ok(());
                }
                match api
                    .create(
                        &PostParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..Default::default()
                        },
                        &want,
                    )
                    .await
                {
                    Ok(_) => {}
                    // Another microscaler of the instance (a replica of an HA pair) made it
                    // meanwhile, from the same configuration.
                    Err(e) if status(&e) == Some(409) => return Ok(()),
                    Err(e) => return Err(self.error(format!("create {what}"), e)),
                }
                info!(instance = %self.instance, service = %service.name, deployment = %what, "created Deployment (0 replicas)");
                return Ok(());
            };
            if !self.owned(&have.metadata, &service.name) {
                return Err(BackendError::Unsupported(format!(
                    "{what} exists but does not carry the labels {}={} and {}={}, so microscaler \
                     will not touch it: remove or rename it, change the instance name, or \
                     reference it with [services.reference] deployment = \"{}/{}\"",
                    labels::INSTANCE,
                    self.instance,
                    labels::SERVICE,
                    service.name,
                    target.namespace,
                    target.name
                )));
            }
            let hash = |d: &Deployment| d.annotations().get(TEMPLATE_ANNOTATION).cloned();
            if hash(&have) == hash(&want) {
                info!(instance = %self.instance, service = %service.name, deployment = %what, replicas = have.spec.as_ref().and_then(|s| s.replicas), "adopted Deployment as it is");
                return Ok(());
            }
            if apply == Apply::No {
                info!(service = %service.name, deployment = %what, "dry run: would update the Deployment's pod template (replicas kept)");
                return Ok(());
            }
            let patch = json!({
                "metadata": {"annotations": want.metadata.annotations},
                "spec": {"template": want.spec.as_ref().map(|s| &s.template)},
            });
            api.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| self.error(format!("update the pod template of {what}"), e))?;
            info!(instance = %self.instance, service = %service.name, deployment = %what, "adopted Deployment and updated its pod template (replicas kept)");
            Ok(())
        }

        /// The `PriorityClass` of a managed `service`'s pods, and, when microscaler makes it,
        /// its value and whether it may preempt.
        fn priority_class_of(&self, service: &Service) -> Option<(String, Option<(i32, bool)>)> {
            let priority = service.priority.get();
            match &self.priority_classes {
                PriorityClasses::None => None,
                PriorityClasses::Names(names) => names.get(&priority).map(|n| (n.clone(), None)),
                PriorityClasses::Create => {
                    let remainder = matches!(service.kind, ServiceKind::Remainder);
                    Some((
                        PriorityClasses::created_name(&self.instance, priority, remainder),
                        Some((PriorityClasses::value_of(priority), !remainder)),
                    ))
                }
            }
        }

        /// Makes the class `name` microscaler makes (`made` = its value and whether it may
        /// preempt), unless it exists with microscaler's labels; or checks that the existing
        /// class `name` exists (`made` = `None`). A class of that name that microscaler did
        /// not make is never changed (an error).
        async fn ensure_priority_class(
            &self,
            service: &Service,
            name: &str,
            made: Option<(i32, bool)>,
        ) -> Result<(), BackendError> {
            let api: Api<PriorityClass> = Api::all(self.client.clone());
            let what = format!("PriorityClass {name}");
            let have = api
                .get_opt(name)
                .await
                .map_err(|e| self.error(format!("read {what}"), e))?;
            let Some((value, preempts)) = made else {
                return match have {
                    Some(_) => Ok(()),
                    None => Err(BackendError::NotFound {
                        what: format!(
                            "{what} (of service {}, priority {})",
                            service.name,
                            service.priority.get()
                        ),
                        hint: "create it, or change [backend] priority_classes".into(),
                    }),
                };
            };
            if let Some(have) = have {
                let ours = have.labels().get(labels::INSTANCE) == Some(&self.instance);
                if !ours {
                    return Err(BackendError::Unsupported(format!(
                        "{what} exists but does not carry the label {}={}, so microscaler will \
                         not use or change it: remove it, change the instance name, or name \
                         existing classes in [backend] priority_classes = {{ \"{}\" = \"{name}\" }}",
                        labels::INSTANCE,
                        self.instance,
                        service.priority.get()
                    )));
                }
                return Ok(());
            }
            let class: PriorityClass = serde_json::from_value(json!({
                "metadata": {
                    "name": name,
                    "labels": {labels::INSTANCE: self.instance},
                },
                "value": value,
                "preemptionPolicy": if preempts { "PreemptLowerPriority" } else { "Never" },
                "description": format!(
                    "microscaler instance {}: priority {}{}",
                    self.instance,
                    service.priority.get(),
                    if preempts { "" } else { " (remainder: never preempts)" }
                ),
            }))
            .map_err(|e| BackendError::Invalid {
                op: format!("build {what}"),
                message: e.to_string(),
            })?;
            match api
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &class,
                )
                .await
            {
                Ok(_) => {}
                // Made meanwhile by another microscaler of the instance.
                Err(e) if status(&e) == Some(409) => return Ok(()),
                Err(e) => return Err(self.error(format!("create {what}"), e)),
            }
            info!(instance = %self.instance, class = %name, value, preempts, "created PriorityClass");
            Ok(())
        }

        /// Checks that a referenced object exists.
        async fn check_reference(
            &self,
            service: &Service,
            target: &Target,
        ) -> Result<(), BackendError> {
            let c = self.client.clone();
            let ns = &target.namespace;
            // The object's pod template, if it exists.
            let template = match target.kind {
                ObjectKind::Deployment => Api::<Deployment>::namespaced(c, ns)
                    .get_opt(&target.name)
                    .await
                    .map(|o| o.map(|o| o.spec.map(|s| s.template))),
                ObjectKind::StatefulSet => Api::<StatefulSet>::namespaced(c, ns)
                    .get_opt(&target.name)
                    .await
                    .map(|o| o.map(|o| o.spec.map(|s| s.template))),
                ObjectKind::DaemonSet => Api::<DaemonSet>::namespaced(c, ns)
                    .get_opt(&target.name)
                    .await
                    .map(|o| o.map(|o| o.spec.map(|s| s.template))),
            };
            let what = format!("{} {}/{}", target.kind.as_str(), ns, target.name);
            let Some(template) = template.map_err(|e| self.error(format!("read {what}"), e))?
            else {
                return Err(BackendError::NotFound {
                    what: format!("{what} (the [services.reference] of service {}) on {}", target.service, self.server),
                    hint: "create it, or fix the reference; microscaler never creates a referenced object".into(),
                });
            };
            // With capacity in resources, the plan places each pod by the service's
            // resources: the scheduler must place them by the same.
            let pod = template.and_then(|t| t.spec);
            if let (true, Some(want), Some(pod)) = (self.all_pods.is_some(), service.resources, pod)
            {
                let asked = requests(&pod);
                if asked != want {
                    return Err(BackendError::Invalid {
                        op: format!(
                            "check {what} (the [services.reference] of service {})",
                            target.service
                        ),
                        message: format!(
                            "its pods request {asked} but the service's resources are {want}: \
                             with [capacity] resources = true the plan places each pod by the \
                             service's resources, so make them equal"
                        ),
                    });
                }
            }
            info!(instance = %self.instance, service = %target.service, object = %what,
                "referencing an existing object: microscaler sets only its replica count and never changes or removes it");
            Ok(())
        }

        /// A node as a host: ready when its Ready condition is true, it is not cordoned, and
        /// every NoSchedule/NoExecute taint is tolerated.
        fn host_of(&self, n: &Node) -> Host {
            let name = n.name_any();
            let status = n.status.as_ref();
            let allocatable = status.and_then(|s| s.allocatable.as_ref());
            let quantity = |key: &str| allocatable.and_then(|a| a.get(key)).map(|q| q.0.as_str());
            Host {
                id: name.clone().into(),
                name,
                ready: self.not_a_host(n).is_none(),
                cpus: quantity("cpu")
                    .and_then(|q| Resources::parse_cpu(q).ok())
                    .map(|m| m as f64 / 1000.0),
                memory_bytes: quantity("memory").and_then(|q| Resources::parse_memory(q).ok()),
            }
        }

        /// With capacity counted in resources: takes off each host's CPUs and memory what
        /// the pods on its Node that are not the services' (`ours`) request, while they hold
        /// it (scheduled, not finished).
        fn take_others(&self, hosts: &mut [Host], ours: &HashSet<(String, String)>) {
            let Some(all) = &self.all_pods else {
                return;
            };
            let mut used: HashMap<String, Resources> = HashMap::new();
            for p in all.state() {
                let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
                    continue;
                };
                if matches!(pod_count(&p), PodCount::Failed | PodCount::Done)
                    || ours.contains(&(p.namespace().unwrap_or_default(), p.name_any()))
                {
                    continue;
                }
                let r = p.spec.as_ref().map(requests).unwrap_or_default();
                let e = used.entry(node.to_string()).or_default();
                *e = e.plus(r);
            }
            for h in hosts {
                let Some(u) = used.get(h.id.0.as_str()) else {
                    continue;
                };
                h.cpus = h.cpus.map(|c| {
                    ((c * 1000.0).round() as u64).saturating_sub(u.cpu_milli) as f64 / 1000.0
                });
                h.memory_bytes = h.memory_bytes.map(|m| m.saturating_sub(u.memory));
            }
        }

        /// Why `n` does not count as a host (not Ready, cordoned, or a `NoSchedule` /
        /// `NoExecute` taint that `tolerations` does not tolerate), or `None` if it does.
        fn not_a_host(&self, n: &Node) -> Option<String> {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if !ready {
                return Some("not Ready".into());
            }
            let spec = n.spec.as_ref();
            if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
                return Some("cordoned".into());
            }
            let t = spec.and_then(|s| s.taints.as_ref())?.iter().find(|t| {
                matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
                    && !self
                        .tolerations
                        .iter()
                        .any(|tol| tol.tolerates(&t.key, t.value.as_deref(), &t.effect))
            })?;
            Some(format!(
                "tainted {}{}:{}",
                t.key,
                t.value
                    .as_deref()
                    .map(|v| format!("={v}"))
                    .unwrap_or_default(),
                t.effect
            ))
        }

        /// Warns when Nodes exist but none counts as a host (capacity is 0: nothing is
        /// scaled), with the first Node's reason, once until one counts again.
        fn warn_if_hostless(&self, nodes: &[Arc<Node>], hosts: &[Host]) {
            let hostless = !nodes.is_empty() && hosts.iter().all(|h| !h.ready);
            let was = self
                .hostless
                .swap(hostless, std::sync::atomic::Ordering::Relaxed);
            if hostless && !was {
                let why = self.not_a_host(&nodes[0]).unwrap_or_default();
                warn!(
                    nodes = nodes.len(),
                    first = %nodes[0].name_any(),
                    reason = %why,
                    "no Node counts as a host, so capacity is 0 and nothing is scaled: a host is \
                     a Ready, uncordoned Node whose NoSchedule/NoExecute taints [backend] \
                     tolerations all tolerate"
                );
            } else if was && !hostless {
                info!("a Node counts as a host again");
            }
        }
    }

    /// FNV-1a, stable across runs.
    fn fnv(data: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in data {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// What a pod asks of its node, as the scheduler counts it: the sum of its containers'
    /// (and sidecars') requests, or the largest of its init containers' if that is more, plus
    /// its overhead. A request not given counts as nothing.
    fn requests(spec: &PodSpec) -> Resources {
        let of = |q: Option<&BTreeMap<String, Quantity>>| Resources {
            cpu_milli: q
                .and_then(|q| q.get("cpu"))
                .and_then(|q| Resources::parse_cpu(&q.0).ok())
                .unwrap_or(0),
            memory: q
                .and_then(|q| q.get("memory"))
                .and_then(|q| Resources::parse_memory(&q.0).ok())
                .unwrap_or(0),
        };
        let asked = |c: &Container| of(c.resources.as_ref().and_then(|r| r.requests.as_ref()));
        let inits = spec.init_containers.as_deref().unwrap_or_default();
        let sidecar = |c: &&Container| c.restart_policy.as_deref() == Some("Always");
        let running = spec
            .containers
            .iter()
            .chain(inits.iter().filter(sidecar))
            .fold(Resources::ZERO, |sum, c| sum.plus(asked(c)));
        let init = inits
            .iter()
            .filter(|c| !sidecar(c))
            .fold(Resources::ZERO, |max, c| {
                let r = asked(c);
                Resources {
                    cpu_milli: max.cpu_milli.max(r.cpu_milli),
                    memory: max.memory.max(r.memory),
                }
            });
        Resources {
            cpu_milli: running.cpu_milli.max(init.cpu_milli),
            memory: running.memory.max(init.memory),
        }
        .plus(of(spec.overhead.as_ref()))
    }

    /// How a pod counts.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum PodCount {
        Running,
        Pending { unschedulable: bool },
        Failed,
        Stopping,
        Done,
    }

    fn pod_count(p: &Pod) -> PodCount {
        if p.metadata.deletion_timestamp.is_some() {
            return PodCount::Stopping;
        }
        let status = p.status.as_ref();
        match status.and_then(|s| s.phase.as_deref()) {
            Some("Failed") => return PodCount::Failed,
            Some("Succeeded") => return PodCount::Done,
            _ => {}
        }
        let conditions = status
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        if conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
        {
            return PodCount::Running;
        }
        let unschedulable = conditions.iter().any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        PodCount::Pending { unschedulable }
    }

    /// The selector, generation, observed generation and wanted replicas of the target object.
    struct ObjectView {
        selector: Option<LabelSelector>,
        wants: Option<u32>,
        caught_up: bool,
    }

    fn view<K: Resource>(
        o: &K,
        selector: Option<&LabelSelector>,
        wants: Option<i32>,
        observed: Option<i64>,
    ) -> ObjectView {
        let generation = o.meta().generation;
        ObjectView {
            selector: selector.cloned(),
            wants: wants.map(|n| n.max(0) as u32),
            caught_up: match (generation, observed) {
                (Some(g), Some(o)) => o >= g,
                (None, _) => true,
                (Some(_), None) => false,
            },
        }
    }

    fn object_view(w: &Watched, t: &Target) -> Option<ObjectView> {
        let key = |name: &str| name.to_string();
        match t.kind {
            ObjectKind::Deployment => w
                .deployments
                .get(&ObjectRef::new(&key(&t.name)).within(&t.namespace))
                .map(|d| {
                    let spec = d.spec.as_ref();
                    view(
                        d.as_ref(),
                        spec.map(|s| &s.selector),
                        spec.and_then(|s| s.replicas).or(Some(1)),
                        d.status.as_ref().and_then(|s| s.observed_generation),
                    )
                }),
            ObjectKind::StatefulSet => w
                .statefulsets
                .get(&ObjectRef::new(&t.name).within(&t.namespace))
                .map(|d| {
                    let spec = d.spec.as_ref();
                    view(
                        d.as_ref(),
                        spec.map(|s| &s.selector),
                        spec.and_then(|s| s.replicas).or(Some(1)),
                        d.status.as_ref().and_then(|s| s.observed_generation),
                    )
                }),
            ObjectKind::DaemonSet => w
                .daemonsets
                .get(&ObjectRef::new(&t.name).within(&t.namespace))
                .map(|d| {
                    let status = d.status.as_ref();
                    view(
                        d.as_ref(),
                        d.spec.as_ref().map(|s| &s.selector),
                        status.map(|s| s.desired_number_scheduled),
                        status.and_then(|s| s.observed_generation),
                    )
                }),
        }
    }

    impl Backend for KubernetesBackend {
        fn kind(&self) -> &'static str {
            "kubernetes"
        }

        fn capabilities(&self) -> Capabilities {
            CAPABILITIES
        }

        async fn prepare(&self, services: &[Service]) -> Result<(), BackendError> {
            self.prepare_as(services, Apply::Yes).await
        }

        async fn prepare_dry_run(&self, services: &[Service]) -> Result<(), BackendError> {
            self.prepare_as(services, Apply::No).await
        }

        async fn observe(&self) -> Result<Observation, BackendError> {
            let nodes = self.nodes.state();
            let mut obs = Observation {
                hosts: nodes.iter().map(|n| self.host_of(n)).collect(),
                ..Default::default()
            };
            self.warn_if_hostless(&nodes, &obs.hosts);
            let targets: Vec<Target> = self
                .targets
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            // Pods by namespace, listed once per tick from the stores.
            let mut pods: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
            // The services' pods (namespace, name), when others' are taken off the hosts.
            let mut ours = HashSet::new();
            for t in &targets {
                let Some(w) = self.watched_in(&t.namespace) else {
                    continue;
                };
                let Some(v) = object_view(&w, t) else {
                    debug!(service = %t.service, object = %t.name, "the object is not in the watch (yet)");
                    continue;
                };
                let entry = obs.services.entry(t.service.clone()).or_default();
                entry.orchestrator_wants = v.wants;
                entry.caught_up = v.caught_up;
                let Some(selector) = v.selector.and_then(|s| Selector::try_from(s).ok()) else {
                    continue;
                };
                let in_ns = pods
                    .entry(t.namespace.clone())
                    .or_insert_with(|| w.pods.state());
                for p in in_ns.iter() {
                    let labels = p.metadata.labels.clone().unwrap_or_default();
                    if !selector.matches(&labels) {
                        continue;
                    }
                    if self.all_pods.is_some() {
                        ours.insert((t.namespace.clone(), p.name_any()));
                    }
                    let state = match pod_count(p) {
                        PodCount::Running => {
                            entry.running += 1;
                            ReplicaState::Running
                        }
                        PodCount::Pending { unschedulable } => {
                            entry.pending += 1;
                            if unschedulable {
                                entry.unschedulable += 1;
                            }
                            ReplicaState::Pending
                        }
                        PodCount::Failed => {
                            entry.failed += 1;
                            continue;
                        }
                        PodCount::Stopping => ReplicaState::Stopping,
                        PodCount::Done => continue,
                    };
                    obs.replicas.push(Replica {
                        id: p.name_any(),
                        service: t.service.clone(),
                        host: p
                            .spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .unwrap_or_default()
                            .into(),
                        state,
                    });
                }
                // Replicas the object asks for whose pods are not made yet are pending.
                if let Some(w) = entry.orchestrator_wants {
                    entry.pending += w.saturating_sub(entry.running + entry.pending);
                }
            }
            self.take_others(&mut obs.hosts, &ours);
            Ok(obs)
        }

        async fn scale(
            &self,
            service: &Service,
            target: u32,
        ) -> Result<ScaleOutcome, BackendError> {
            self.scale_with(service, target, &Change::default()).await
        }

        async fn scale_with(
            &self,
            service: &Service,
            target: u32,
            change: &Change<'_>,
        ) -> Result<ScaleOutcome, BackendError> {
            let t = self
                .targets
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&service.name)
                .cloned()
                .unwrap_or_else(|| self.target_of(service));
            if t.kind == ObjectKind::DaemonSet {
                debug!(service = %service.name, "a DaemonSet keeps one pod per node; nothing to scale");
                return Ok(ScaleOutcome::default());
            }
            let what = format!("{} {}/{}", t.kind.as_str(), t.namespace, t.name);
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            // Read the scale, write it back at the version read: a change made in between is
            // a 409. The controllers' status writes bump the version too, so a conflict is
            // read again, and written again while the count is the one first read (up to
            // CONFLICT_ATTEMPTS times); a count changed meanwhile is someone else's scale, a
            // conflict at once.
            let mut attempt = 0;
            let mut first_read = None;
            let previous = loop {
                attempt += 1;
                let scale = match t.kind {
                    ObjectKind::StatefulSet => {
                        Api::<StatefulSet>::namespaced(self.client.clone(), &t.namespace)
                            .get_scale(&t.name)
                            .await
                    }
                    _ => {
                        Api::<Deployment>::namespaced(self.client.clone(), &t.namespace)
                            .get_scale(&t.name)
                            .await
                    }
                }
                .map_err(|e| self.error(format!("read the scale of {what}"), e))?;
                let previous = scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
                if previous == target {
                    return Ok(ScaleOutcome::default());
                }
                // The count changed since the first read: someone else scaled it. The plan was
                // made on the old count: a conflict, for the next tick to see and decide on.
                if let Some(first) = first_read.filter(|&f| f != previous) {
                    return Err(BackendError::Conflict {
                        op: format!("scale {what} to {target}"),
                        message: format!(
                            "its count changed from {first} to {previous} while microscaler \
                             was writing it; the next tick decides again"
                        ),
                    });
                }
                if first_read.is_none() && t.kind == ObjectKind::Deployment {
                    // Before the count goes down, the pods the plan takes from the hosts it
                    // names are marked to go first (on every scale: marks of an earlier
                    // plan that did not happen are cleared).
                    self.steer(&t, previous.saturating_sub(target), change.remove_from)
                        .await;
                }
                first_read.get_or_insert(previous);
                let patch = json!({
                    "metadata": {"resourceVersion": scale.metadata.resource_version},
                    "spec": {"replicas": target},
                });
                let written = match t.kind {
                    ObjectKind::StatefulSet => {
                        Api::<StatefulSet>::namespaced(self.client.clone(), &t.namespace)
                            .patch_scale(&t.name, &params, &Patch::Merge(&patch))
                            .await
                    }
                    _ => {
                        Api::<Deployment>::namespaced(self.client.clone(), &t.namespace)
                            .patch_scale(&t.name, &params, &Patch::Merge(&patch))
                            .await
                    }
                };
                match written {
                    Ok(_) => break previous,
                    Err(e) if status(&e) == Some(409) && attempt < CONFLICT_ATTEMPTS => {
                        debug!(object = %what, attempt, "the object changed meanwhile; reading it again");
                    }
                    Err(e) => return Err(self.error(format!("scale {what} to {target}"), e)),
                }
            };
            info!(instance = %self.instance, service = %service.name, object = %what, previous, target, "scaled");
            if target < previous {
                // A scale-down is done when its pods are gone (their capacity is free then,
                // to the scheduler too): the control loop starts the higher priorities' pods
                // after it, as the seeds' order asks.
                self.await_pods_at_most(&t, target, service.stop_grace + STOP_SLACK)
                    .await;
            }
            Ok(ScaleOutcome {
                started: target.saturating_sub(previous),
                stopped: previous.saturating_sub(target),
                ..ScaleOutcome::default()
            })
        }

        fn leading(&self) -> bool {
            self.elector.as_ref().is_none_or(|e| e.leading())
        }

        async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
            let result = self.shutdown_objects(services, remove).await;
            if let Some(e) = &self.elector {
                e.release().await;
            }
            result
        }
    }

    impl KubernetesBackend {
        async fn shutdown_objects(
            &self,
            services: &[Service],
            remove: bool,
        ) -> Result<(), BackendError> {
            if !remove {
                info!(instance = %self.instance, services = services.len(), "leaving the Deployments as they are for the next start to adopt");
                return Ok(());
            }
            let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
            let selector = format!("{}={}", labels::INSTANCE, self.instance);
            let list = api
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| {
                    self.error(
                        format!(
                            "list the Deployments of instance {} in {}",
                            self.instance, self.namespace
                        ),
                        e,
                    )
                })?;
            let mut first_error = None;
            for d in list {
                let name = d.name_any();
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => {
                        info!(instance = %self.instance, deployment = %name, "removed Deployment")
                    }
                    Err(e) if status(&e) == Some(404) => {}
                    Err(e) => {
                        warn!(deployment = %name, error = %e, "removing a Deployment failed");
                        first_error.get_or_insert(
                            self.error(format!("remove Deployment {}/{name}", self.namespace), e),
                        );
                    }
                }
            }
            if let Err(e) = self.remove_priority_classes().await {
                first_error.get_or_insert(e);
            }
            first_error.map_or(Ok(()), Err)
        }
    }

    impl KubernetesBackend {
        /// Removes the PriorityClasses microscaler made for this instance (pods that use one
        /// keep the priority they were given).
        async fn remove_priority_classes(&self) -> Result<(), BackendError> {
            if self.priority_classes != PriorityClasses::Create {
                return Ok(());
            }
            let api: Api<PriorityClass> = Api::all(self.client.clone());
            let selector = format!("{}={}", labels::INSTANCE, self.instance);
            let list = api
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| {
                    self.error(
                        format!("list the PriorityClasses of instance {}", self.instance),
                        e,
                    )
                })?;
            for c in list {
                let name = c.name_any();
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {
                        info!(instance = %self.instance, class = %name, "removed PriorityClass")
                    }
                    Err(e) if status(&e) == Some(404) => {}
                    Err(e) => return Err(self.error(format!("remove PriorityClass {name}"), e)),
                }
            }
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A pod spec from JSON.
        fn spec(v: serde_json::Value) -> PodSpec {
            serde_json::from_value(v).expect("a pod spec")
        }

        fn asks(cpu: &str, memory: &str) -> serde_json::Value {
            json!({"requests": {"cpu": cpu, "memory": memory}})
        }

        #[test]
        fn a_pods_requests_are_counted_as_the_scheduler_counts_them() {
            let r = |cpu_milli, memory| Resources { cpu_milli, memory };
            // Containers add up; a request not given counts as nothing.
            let two = spec(json!({"containers": [
                {"name": "a", "resources": asks("250m", "256Mi")},
                {"name": "b", "resources": asks("1", "1Gi")},
                {"name": "c"},
            ]}));
            assert_eq!(requests(&two), r(1250, 1280 << 20));
            // An init container runs alone: only the largest one counts, if it is more, each
            // dimension on its own; a sidecar (restartPolicy Always) runs beside the rest.
            let init = spec(json!({
                "containers": [{"name": "a", "resources": asks("500m", "128Mi")}],
                "initContainers": [
                    {"name": "big-cpu", "resources": asks("2", "64Mi")},
                    {"name": "sidecar", "restartPolicy": "Always", "resources": asks("100m", "64Mi")},
                ],
                "overhead": {"cpu": "10m", "memory": "1Mi"},
            }));
            assert_eq!(requests(&init), r(2000 + 10, (192 << 20) + (1 << 20)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::config;

    const BACKEND: &str = "type = \"kubernetes\"\nnamespace = \"shop\"";

    #[test]
    fn references_default_to_the_backends_namespace() {
        let c = config(BACKEND, "[services.reference]\ndeployment = \"web\"").unwrap();
        let r = c.services[0].workload.reference().unwrap();
        assert_eq!(r.to_string(), "Deployment shop/web");
        let c = config(BACKEND, "[services.reference]\nstatefulset = \"db/pg\"").unwrap();
        assert_eq!(
            c.services[0].workload.reference().unwrap().to_string(),
            "StatefulSet db/pg"
        );
    }

    #[test]
    fn bad_references_name_their_paths() {
        let e = config(
            BACKEND,
            "[services.reference]\ndeployment = \"a\"\nstatefulset = \"b\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "services[0].reference: give exactly one of deployment, statefulset or \
                 daemonset, got 2"
            ]
        );
        let e = config(BACKEND, "[services.reference]\ndeployment = \"Web/x\"").unwrap_err();
        assert!(
            e[0].starts_with("services[0].reference.deployment: \"Web/x\" is not"),
            "{e:?}"
        );
        let e = config(BACKEND, "[services.reference]\ndaemonset = \"agent\"").unwrap_err();
        assert!(e[0].contains("only a per-host service"), "{e:?}");
    }

    #[test]
    fn managed_services_need_an_image() {
        let e = config(BACKEND, "command = [\"x\"]").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("services[0].image: missing: the image the pods run"),
            "{e:?}"
        );
        let c = config(BACKEND, "image = \"registry.k8s.io/pause:3.10\"").unwrap();
        assert!(c.services[0].workload.run().is_some());
    }

    #[test]
    fn leader_election_is_checked() {
        let e = config(
            "type = \"kubernetes\"\n[backend.leader_election]\nlease_duration = \"5s\"\nrenew_deadline = \"5s\"\nretry_period = \"6s\"\nlease = \"A_b\"\nttl = 3",
            "image = \"x\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "backend.leader_election.ttl: unknown key",
                "backend.leader_election.renew_deadline: must be less than lease_duration: a leader must stop acting before the others may take the Lease",
                "backend.leader_election.retry_period: must be less than renew_deadline: a leader must get several tries to renew",
                "backend.leader_election.lease: \"A_b\" is not an object name",
            ]
        );
        let c = config(
            "type = \"kubernetes\"\nnamespace = \"shop\"\n[backend.leader_election]",
            "image = \"x\"",
        )
        .unwrap();
        let crate::BackendConfig::Kubernetes(k) = &c.backend else {
            panic!("{:?}", c.backend);
        };
        let le = k.leader_election.as_ref().expect("leader election");
        assert_eq!(
            (
                le.namespace.as_str(),
                le.lease_duration,
                le.renew_deadline,
                le.retry_period
            ),
            (
                "shop",
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
    }

    #[test]
    fn backend_options_are_checked() {
        let e = config(
            "type = \"kubernetes\"\nnamespace = \"No\"\ntolerations = [{ key = \"a\", operator = \"Maybe\" }, { effect = \"Never\" }, { keyy = \"x\" }]",
            "image = \"x\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "backend.namespace: \"No\" is not a namespace name (1-63 of a-z, 0-9 and '-')",
                "backend.tolerations[0].operator: must be \"Equal\" or \"Exists\", got \"Maybe\"",
                "backend.tolerations[1].key: missing: a toleration without a key needs operator = \"Exists\"",
                "backend.tolerations[1].effect: must be NoSchedule, PreferNoSchedule or NoExecute, got \"Never\"",
                "backend.tolerations[2].keyy: unknown key",
                "backend.tolerations[2].key: missing: a toleration without a key needs operator = \"Exists\"",
            ]
        );
    }

    #[test]
    fn priority_classes_are_checked() {
        let backend = |c: &crate::config::Config| match &c.backend {
            crate::BackendConfig::Kubernetes(k) => k.priority_classes.clone(),
            other => panic!("{other:?}"),
        };
        let c = config(
            &format!("{BACKEND}\npriority_classes = true"),
            "image = \"x\"",
        )
        .unwrap();
        assert_eq!(backend(&c), PriorityClasses::Create);
        let c = config(BACKEND, "image = \"x\"").unwrap();
        assert_eq!(backend(&c), PriorityClasses::None);
        let c = config(
            &format!("{BACKEND}\npriority_classes = {{ \"1\" = \"critical\", \"3\" = \"batch\" }}"),
            "image = \"x\"",
        )
        .unwrap();
        assert_eq!(
            backend(&c),
            PriorityClasses::Names(BTreeMap::from([
                (1, "critical".to_string()),
                (3, "batch".to_string())
            ]))
        );
        let e = config(
            &format!("{BACKEND}\npriority_classes = {{ \"0\" = \"a\", \"high\" = \"b\", \"2\" = \"Not_A_Name\" }}"),
            "image = \"x\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "backend.priority_classes.0: \"0\" is not a priority (a number, 1 the highest)",
                "backend.priority_classes.2: must be the name of a PriorityClass, got \"Not_A_Name\"",
                "backend.priority_classes.high: \"high\" is not a priority (a number, 1 the highest)",
            ]
        );
        let e = config(
            &format!("{BACKEND}\npriority_classes = \"yes\""),
            "image = \"x\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec!["backend.priority_classes: must be true (microscaler makes a class per priority) or a table of priority = \"PriorityClass name\", got \"yes\""]
        );
        assert_eq!(PriorityClasses::value_of(1), 999);
        assert_eq!(PriorityClasses::value_of(u32::MAX), i32::MIN);
        assert_eq!(
            PriorityClasses::created_name("demo", 2, true),
            "microscaler-demo-p2-remainder"
        );
    }

    #[test]
    fn tolerations_match_taints_as_kubernetes_does() {
        let t =
            |key: Option<&str>, op: &str, value: Option<&str>, effect: Option<&str>| Toleration {
                key: key.map(Into::into),
                operator: op.into(),
                value: value.map(Into::into),
                effect: effect.map(Into::into),
            };
        let kwok = t(
            Some("kwok.x-k8s.io/node"),
            "Exists",
            None,
            Some("NoSchedule"),
        );
        assert!(kwok.tolerates("kwok.x-k8s.io/node", Some("fake"), "NoSchedule"));
        assert!(!kwok.tolerates("kwok.x-k8s.io/node", Some("fake"), "NoExecute"));
        assert!(!kwok.tolerates("other", None, "NoSchedule"));
        let eq = t(Some("team"), "Equal", Some("a"), None);
        assert!(eq.tolerates("team", Some("a"), "NoExecute"));
        assert!(!eq.tolerates("team", Some("b"), "NoExecute"));
        assert!(t(None, "Exists", None, None).tolerates("anything", None, "NoSchedule"));
    }
}
