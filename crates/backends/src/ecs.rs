//! AWS ECS backend (service-level): microscaler sets each ECS service's `desiredCount` with
//! `UpdateService`, and ECS places the tasks on the cluster's container instances.
//!
//! - A service references an existing ECS service (`[services.reference] service = "web"`,
//!   `cluster`), whose `desiredCount` is the only thing microscaler ever changes; or, managed
//!   (the demo, the tests), is an ECS service `{instance}-{service}` that microscaler creates
//!   (with a task definition of that family, from the service's `image`, `command` and `env`),
//!   tagged [`TAG_INSTANCE`] and [`TAG_SERVICE`], and deletes with `on_exit = "stop"`. A service
//!   of that name without both tags is never touched (that is an error).
//! - At most one `UpdateService` per service per tick, and none when the count is already what
//!   the plan asks (the last count seen by `DescribeServices` or returned by `UpdateService`).
//! - Observation per tick, all at once: `DescribeServices` in batches of 10 (desired, running,
//!   pending, the primary deployment's rollout state) and the cluster's container instances as
//!   hosts (`ListContainerInstances` ACTIVE and DRAINING): an ACTIVE instance with its agent
//!   connected is ready, a DRAINING one is not. `DescribeContainerInstances` (the agent's
//!   connection, registered CPU and memory, kept on the host) runs in the background. With
//!   capacity in slots ECS tasks are not listed (more calls per tick): the per-host view has
//!   no replicas on ECS then.
//! - Capacity in CPU and memory ([`EcsBackend::count_resources`], `[capacity] resources =
//!   true`): each tick also describes every listed container instance (`remainingResources`
//!   changes with each task placed or stopped) and lists the services' tasks (`ListTasks` per
//!   service, desiredStatus RUNNING; `DescribeTasks` 100 at a time), which are the replicas on
//!   their instances. A host's room is what remains on it plus what the services' own tasks
//!   there reserve: its registered CPU and memory less what every other task reserves. Managed
//!   task definitions reserve the services' `resources` (CPU units = millicores x 1024 / 1000,
//!   rounded; MiB rounded up); a referenced service's task definition must reserve the same.
//! - One-per-host services (seed 004): a `per_host` service that references a REPLICA service
//!   has its `desiredCount` kept equal to the number of ready container instances, like any
//!   service the loop scales; one that references a DAEMON service (ECS keeps one task per
//!   instance itself and refuses a `desiredCount`) is observed and counted, never updated.
//! - Container-instance events: with `[backend] events_queue`, an SQS queue that receives the
//!   EventBridge rule `{"source": ["aws.ecs"], "detail-type": ["ECS Container Instance State
//!   Change"]}`, each event wakes the control loop at once (the message is read and deleted);
//!   the per-tick observation stays the safety net.
//! - Errors: the SDK does not retry (the control loop backs off per service, with jitter for
//!   throttling, and reports); `ThrottlingException` is [`BackendError::Throttled`],
//!   `ServiceNotActiveException` and missing services or clusters are not-found errors naming
//!   them, `AccessDeniedException` names the IAM action, an endpoint that does not answer is
//!   unreachable.

use std::time::Duration;

use microscaler_core::plugin::{Capabilities, ServiceContext, StopCompletion};
use microscaler_core::validate::join;
use microscaler_core::Validator;
use serde::Deserialize;

use crate::config::{Reference, Workload};

mod query;
pub use query::{InstanceFacts, Query};

/// What the ecs backend can do: per-host services are kept at one task per container instance
/// by count (DAEMON services by ECS itself), no pause, tasks stop after the update returns,
/// and services may reference existing ECS services.
pub const CAPABILITIES: Capabilities = Capabilities {
    native_per_host: false,
    pause: false,
    host_resources: true,
    stops: StopCompletion::Converges,
    references: true,
};

/// Tag on managed ECS services and task definitions: the owning microscaler instance.
pub const TAG_INSTANCE: &str = "microscaler.instance";
/// Tag on managed ECS services and task definitions: the microscaler service.
pub const TAG_SERVICE: &str = "microscaler.service";

/// The `detail-type` of the EventBridge events that wake the loop.
pub const INSTANCE_EVENT: &str = "ECS Container Instance State Change";

// ---------------------------------------------------------------------------------------------
// Configuration.

/// `[backend] type = "ecs"`: an ECS cluster, through the AWS API.
#[derive(Debug, Clone, PartialEq)]
pub struct EcsConfig {
    /// The cluster whose container instances are the hosts, where managed services are
    /// created, and of references that name none. Default `default` (ECS's own default).
    pub cluster: String,
    /// The AWS region; `None` means the standard chain (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// An endpoint instead of AWS's (an emulator such as moto, a VPC endpoint).
    pub endpoint_url: Option<String>,
    /// A profile of the shared AWS files; `None` means the standard chain.
    pub profile: Option<String>,
    /// An SQS queue URL that receives the container-instance events of an EventBridge rule.
    pub events_queue: Option<String>,
    /// The launch type of managed services: `EC2` (default) or `FARGATE`.
    pub launch_type: String,
    /// CPU units (1024 = one vCPU) of each task of a managed service. Default 128.
    pub cpu: u32,
    /// Memory (MiB) of each task of a managed service. Default 128.
    pub memory: u32,
    /// How long one API call may take. Default 10 s.
    pub timeout: Duration,
}

impl Default for EcsConfig {
    fn default() -> Self {
        EcsConfig {
            cluster: "default".into(),
            region: None,
            endpoint_url: None,
            profile: None,
            events_queue: None,
            launch_type: "EC2".into(),
            cpu: 128,
            memory: 128,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Deserialize)]
struct RawEcs {
    cluster: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    profile: Option<String>,
    events_queue: Option<String>,
    launch_type: Option<String>,
    cpu: Option<u32>,
    memory: Option<u32>,
    timeout: Option<String>,
}

/// Whether `s` is an ECS cluster or service name: 1-255 letters, digits, '-' and '_'.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl EcsConfig {
    /// Validates the `[backend]` section (without `type`) at `path`. Nothing is read and no
    /// AWS call is made here: that happens when the backend connects.
    pub fn validate(options: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawEcs = v.part(options, path)?;
        let d = EcsConfig::default();
        let cluster = r.cluster.unwrap_or(d.cluster);
        if !is_name(&cluster) {
            v.err(
                join(path, "cluster"),
                format!("{cluster:?} is not an ECS cluster name (letters, digits, '-', '_')"),
            );
        }
        for (key, value) in [
            ("region", &r.region),
            ("profile", &r.profile),
            ("endpoint_url", &r.endpoint_url),
            ("events_queue", &r.events_queue),
        ] {
            if value.as_deref().is_some_and(|s| s.trim().is_empty()) {
                v.err(join(path, key), "must not be empty");
            }
        }
        for (key, value) in [
            ("endpoint_url", &r.endpoint_url),
            ("events_queue", &r.events_queue),
        ] {
            if let Some(u) = value {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    v.err(
                        join(path, key),
                        format!("{u:?} is not an http:// or https:// URL"),
                    );
                }
            }
        }
        let launch_type = r.launch_type.unwrap_or(d.launch_type);
        if !matches!(launch_type.as_str(), "EC2" | "FARGATE") {
            v.err(
                join(path, "launch_type"),
                format!("must be EC2 or FARGATE, got {launch_type:?}"),
            );
        }
        let cpu = r.cpu.unwrap_or(d.cpu);
        if !(2..=196_608).contains(&cpu) {
            v.err(
                join(path, "cpu"),
                "must be CPU units from 2 to 196608 (1024 = one vCPU)",
            );
        }
        let memory = r.memory.unwrap_or(d.memory);
        if memory < 6 {
            v.err(join(path, "memory"), "must be MiB of memory, at least 6");
        }
        let timeout = v.duration(
            r.timeout.as_deref(),
            &join(path, "timeout"),
            d.timeout,
            (Duration::from_millis(100), Duration::from_secs(120)),
        );
        Some(EcsConfig {
            cluster,
            region: r.region,
            endpoint_url: r.endpoint_url,
            profile: r.profile,
            events_queue: r.events_queue,
            launch_type,
            cpu,
            memory,
            timeout,
        })
    }

    /// Validates a service's own keys for this backend: `image` (required), `command` and
    /// `env`; or a `[services.reference]` naming an existing ECS service.
    pub fn workload(
        &self,
        options: toml::Table,
        cx: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Workload> {
        let w = Workload::managed_or_reference(options, v, path, |table, v, path| {
            EcsReference::validate(table, v, path).map(Reference::Ecs)
        })?;
        if let Workload::Reference(Reference::Ecs(r)) = &w {
            if r.instances.is_some() && !cx.per_host {
                v.err(
                    join(&join(path, "reference"), "instances"),
                    "only a per-host service (per_host = true) runs on some container                      instances: its count follows the matching ones",
                );
            }
        }
        if let Workload::Managed(run) = &w {
            if cx.per_host {
                v.err(
                    join(path, "per_host"),
                    "a per-host service on ecs is an existing ECS service (a REPLICA one, whose \
                     desiredCount microscaler keeps at the number of container instances, or a \
                     DAEMON one): reference it with [services.reference] service = \"name\"",
                );
            }
            if run.image.is_none() {
                v.err(
                    join(path, "image"),
                    "missing: the image the tasks run (there is no built-in one on a cluster), \
                     or reference an existing ECS service with [services.reference]",
                );
            }
        }
        Some(w)
    }
}

/// `[services.reference]` on the ecs backend: an existing ECS service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EcsReference {
    /// The ECS service's name.
    pub service: String,
    /// Its cluster; `None` means the backend's.
    pub cluster: Option<String>,
    /// For a per-host service: the container instances it runs on (a cluster query such as
    /// `attribute:role == web`); its count follows the ACTIVE ones that match. `None`: all.
    pub instances: Option<Query>,
}

impl std::fmt::Display for EcsReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ECS service {}", self.service)?;
        if let Some(c) = &self.cluster {
            write!(f, " in cluster {c}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct RawReference {
    service: Option<String>,
    cluster: Option<String>,
    instances: Option<String>,
}

impl EcsReference {
    /// Validates the reference table at `path`.
    pub fn validate(table: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawReference = v.part(table, path)?;
        let Some(service) = r.service else {
            v.err(
                join(path, "service"),
                "missing: the name of an existing ECS service",
            );
            return None;
        };
        for (key, value) in [("service", Some(&service)), ("cluster", r.cluster.as_ref())] {
            if let Some(s) = value {
                if !is_name(s) {
                    v.err(
                        join(path, key),
                        format!("{s:?} is not an ECS {key} name (letters, digits, '-', '_')"),
                    );
                }
            }
        }
        let instances = r.instances.and_then(|q| match Query::parse(&q) {
            Ok(q) => Some(q),
            Err(e) => {
                v.err(join(path, "instances"), e);
                None
            }
        });
        Some(EcsReference {
            service,
            cluster: r.cluster,
            instances,
        })
    }
}

/// ECS CPU units (1024 = one vCPU) of `cpu_milli` thousandths of a CPU, rounded to the
/// nearest unit.
pub fn cpu_units(cpu_milli: u64) -> u64 {
    (cpu_milli.saturating_mul(1024) + 500) / 1000
}

/// Whole MiB of `bytes`, rounded up (ECS reserves memory in MiB).
pub fn mebibytes(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// A task definition's task-level `cpu` or `memory` as ECS takes it: a number of units
/// (`"1024"`), or with `unit` (`"0.5 vCPU"`, `"2 GB"`, `"2GB"`) times `per` units.
pub fn task_level(value: &str, unit: &str, per: f64) -> Option<u64> {
    let v = value.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    let n = v
        .get(..v.len().checked_sub(unit.len())?)
        .filter(|_| v[v.len() - unit.len()..].eq_ignore_ascii_case(unit))?;
    let n: f64 = n.trim().parse().ok()?;
    (n >= 0.0).then(|| (n * per).round() as u64)
}

/// Whether an EventBridge event (an SQS message's body) is a container instance's state
/// change, which changes the hosts.
pub fn is_instance_event(body: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return false;
    };
    v["source"].as_str() == Some("aws.ecs") && v["detail-type"].as_str() == Some(INSTANCE_EVENT)
}

// ---------------------------------------------------------------------------------------------
// The live backend.

#[cfg(feature = "ecs")]
pub use live::{create_demo_cluster, delete_demo_cluster, emulator_ec2_instance, EcsBackend};

#[cfg(feature = "ecs")]
mod live {
    use super::*;

    use std::collections::{BTreeMap, HashMap};
    use std::sync::{Arc, Mutex, OnceLock, RwLock};

    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    use aws_config::{BehaviorVersion, Region};
    use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
    use aws_sdk_ecs::types::{
        ContainerDefinition, ContainerInstanceStatus, DeploymentRolloutState, KeyValuePair,
        LaunchType, SchedulingStrategy, ServiceField, Tag,
    };
    use microscaler_core::{Host, HostId, ServiceKind, ServiceName, ServiceObservation};
    use tokio::sync::Notify;

    use crate::{
        resolved, Apply, Backend, BackendError, Observation, Replica, ReplicaState, ScaleOutcome,
        Service,
    };

    /// Whether a service is per-host.
    fn per_host<S>(kind: &ServiceKind<S>) -> bool {
        matches!(kind, ServiceKind::PerHost)
    }

    /// How often every container instance is described again (its agent's connection, its
    /// resources); new ones are described when first listed.
    const DESCRIBE_EVERY: Duration = Duration::from_secs(10);

    /// CPU units and MiB, as ECS counts them.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    struct Units {
        cpu: u64,
        mib: u64,
    }

    impl Units {
        /// What a task of `resources` reserves.
        fn of(r: microscaler_core::Resources) -> Units {
            Units {
                cpu: cpu_units(r.cpu_milli),
                mib: mebibytes(r.memory),
            }
        }
    }

    impl std::fmt::Display for Units {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} CPU units and {} MiB", self.cpu, self.mib)
        }
    }

    /// What a description of a container instance told.
    #[derive(Debug, Clone)]
    struct Instance {
        name: String,
        agent_connected: bool,
        /// `registeredResources`: CPU units and MiB, if given.
        registered: (Option<u64>, Option<u64>),
        /// `remainingResources`: what the tasks placed on it (anyone's) leave.
        remaining: (Option<u64>, Option<u64>),
        /// Its attributes and EC2 id, for the per-host services' `instances` queries.
        facts: InstanceFacts,
    }

    /// The container instances described so far, by ARN.
    #[derive(Debug, Default)]
    struct Instances {
        info: HashMap<String, Instance>,
        /// When all were last described.
        described: Option<std::time::Instant>,
        /// A description is under way.
        describing: bool,
    }

    /// What a service is on ECS, resolved at `prepare`.
    #[derive(Debug, Clone)]
    struct Target {
        cluster: String,
        service: String,
        managed: bool,
        /// A DAEMON service: counted, never updated.
        daemon: bool,
        /// What each of its tasks reserves, with capacity counted in resources: its
        /// service's `resources` (set on a managed task definition, checked on a referenced
        /// one).
        reserves: Option<Units>,
        /// A per-host service's `instances`: the container instances it runs on.
        instances: Option<Query>,
    }

    /// The ECS backend.
    pub struct EcsBackend {
        ecs: aws_sdk_ecs::Client,
        /// Where the API is, for messages.
        endpoint: String,
        instance: String,
        cfg: EcsConfig,
        targets: RwLock<HashMap<ServiceName, Target>>,
        /// Each service's `desiredCount` as last seen (observed or returned by an update).
        desired: Mutex<HashMap<ServiceName, u32>>,
        /// The container instances' descriptions.
        instances: Arc<Mutex<Instances>>,
        /// The control loop's waker, given once; container-instance events ring it.
        waker: Arc<OnceLock<Arc<Notify>>>,
        /// Events read from `events_queue` so far.
        events: Arc<std::sync::atomic::AtomicU64>,
        events_task: Option<tokio::task::JoinHandle<()>>,
        /// Capacity is counted in resources ([`EcsBackend::count_resources`]).
        resources: bool,
    }

    impl Drop for EcsBackend {
        fn drop(&mut self) {
            if let Some(t) = &self.events_task {
                t.abort();
            }
        }
    }

    /// The AWS configuration of `cfg`: the standard chain, with the region, profile and
    /// endpoint given, no SDK retries (the control loop retries with backoff), and the
    /// configured timeout on every call.
    pub(super) async fn aws_config(cfg: &EcsConfig, timeout: Duration) -> aws_config::SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5).min(timeout))
                    .operation_attempt_timeout(timeout)
                    .operation_timeout(timeout)
                    .build(),
            );
        if let Some(r) = &cfg.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(p) = &cfg.profile {
            loader = loader.profile_name(p);
        }
        if let Some(e) = &cfg.endpoint_url {
            loader = loader.endpoint_url(e);
        }
        loader.load().await
    }

    /// Maps an SDK error of `op` to a backend error: the class decides how the loop retries.
    fn error<E>(endpoint: &str, op: &str, e: SdkError<E>) -> BackendError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = e.code().unwrap_or("").to_string();
        let message = e.message().unwrap_or("").to_string();
        match &e {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                return BackendError::Unreachable {
                    what: format!("the ECS API at {endpoint}"),
                    hint: format!(
                        "{op}: {}; check the region, endpoint_url and the network",
                        aws_sdk_ecs::error::DisplayErrorContext(&e)
                    ),
                    source: Some(Box::new(e)),
                };
            }
            SdkError::ConstructionFailure(_) => {
                return BackendError::Unreachable {
                    what: format!("the ECS API at {endpoint}"),
                    hint: format!(
                        "{op}: {}; are AWS credentials and a region set (environment, profile \
                         or role)?",
                        aws_sdk_ecs::error::DisplayErrorContext(&e)
                    ),
                    source: Some(Box::new(e)),
                };
            }
            _ => {}
        }
        let op = op.to_string();
        let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
        let said = if message.is_empty() {
            code.clone()
        } else {
            format!("{code}: {message}")
        };
        match code.as_str() {
            "ThrottlingException"
            | "Throttling"
            | "TooManyRequestsException"
            | "RequestLimitExceeded" => BackendError::Throttled { op, message: said },
            _ if message.contains("Rate exceeded") => BackendError::Throttled { op, message: said },
            "ServiceNotActiveException"
            | "ServiceNotFoundException"
            | "ClusterNotFoundException" => BackendError::NotFound {
                what: op,
                hint: said,
            },
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException" => BackendError::Unsupported(format!(
                "{op}: refused by AWS ({said}): the role or user needs the IAM actions listed in \
                 docs/backends.md (ecs backend)"
            )),
            "InvalidParameterException" | "ClientException" => {
                BackendError::Invalid { op, message: said }
            }
            _ => BackendError::Api {
                op,
                message: if status >= 500 {
                    format!("{status} {said}")
                } else {
                    said
                },
            },
        }
    }

    impl EcsBackend {
        /// Connects: builds the client from the standard AWS chain and checks that the
        /// cluster exists (`DescribeClusters`); with `events_queue`, starts reading it.
        pub async fn connect(cfg: &EcsConfig, instance: &str) -> Result<Self, BackendError> {
            let conf = aws_config(cfg, cfg.timeout).await;
            let endpoint = cfg.endpoint_url.clone().unwrap_or_else(|| {
                format!(
                    "ecs.{}.amazonaws.com",
                    conf.region().map(|r| r.as_ref()).unwrap_or("<no region>")
                )
            });
            if conf.region().is_none() {
                return Err(BackendError::Unreachable {
                    what: format!("the ECS API at {endpoint}"),
                    hint: "no AWS region: set [backend] region, AWS_REGION or the profile's \
                           region"
                        .into(),
                    source: None,
                });
            }
            let ecs = aws_sdk_ecs::Client::new(&conf);
            let op = format!("DescribeClusters {}", cfg.cluster);
            let out = ecs
                .describe_clusters()
                .clusters(&cfg.cluster)
                .send()
                .await
                .map_err(|e| error(&endpoint, &op, e))?;
            let active = out.clusters().iter().any(|c| c.status() == Some("ACTIVE"));
            if !active {
                return Err(BackendError::NotFound {
                    what: format!("ECS cluster {}", cfg.cluster),
                    hint: format!(
                        "no ACTIVE cluster of that name at {endpoint}; check [backend] cluster \
                         and region"
                    ),
                });
            }
            tracing::info!(endpoint = %endpoint, cluster = %cfg.cluster, "connected to ECS");
            let waker: Arc<OnceLock<Arc<Notify>>> = Arc::new(OnceLock::new());
            let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let events_task = match &cfg.events_queue {
                Some(queue) => {
                    // Long polls wait up to 20 s: the queue's client allows for it.
                    let conf = aws_config(cfg, Duration::from_secs(30)).await;
                    let sqs = aws_sdk_sqs::Client::new(&conf);
                    Some(tokio::spawn(read_events(
                        sqs,
                        queue.clone(),
                        Arc::clone(&waker),
                        Arc::clone(&events),
                    )))
                }
                None => None,
            };
            Ok(EcsBackend {
                ecs,
                endpoint,
                instance: instance.to_string(),
                cfg: cfg.clone(),
                targets: RwLock::new(HashMap::new()),
                desired: Mutex::new(HashMap::new()),
                instances: Arc::new(Mutex::new(Instances::default())),
                waker,
                events,
                events_task,
                resources: false,
            })
        }

        /// Capacity is counted in CPU and memory (`[capacity] resources = true`): each tick
        /// describes the container instances (their remaining resources) and lists the
        /// services' tasks, so that a host's room is its registered CPU and memory less what
        /// the tasks that are not the services' reserve, and the services' tasks are replicas
        /// on their instances. Managed task definitions reserve the services' `resources`;
        /// referenced services must reserve the same, and be in the backend's cluster (whose
        /// container instances are the hosts). Refused with `launch_type = "FARGATE"`: Fargate
        /// tasks run on no container instance.
        pub fn count_resources(&mut self) -> Result<(), BackendError> {
            if self.cfg.launch_type == "FARGATE" {
                return Err(BackendError::Unsupported(
                    "[capacity] resources = true counts the CPU and memory of the cluster's \
                     container instances, and Fargate tasks run on none: use launch_type = \
                     \"EC2\", or count capacity in slots"
                        .into(),
                ));
            }
            self.resources = true;
            Ok(())
        }

        /// The ECS service name of managed `service`.
        pub fn service_name(instance: &str, service: &str) -> String {
            format!("{instance}-{service}")
        }

        /// Container-instance events read from `events_queue` so far.
        pub fn events_read(&self) -> u64 {
            self.events.load(std::sync::atomic::Ordering::Relaxed)
        }

        fn err<E>(&self, op: &str, e: SdkError<E>) -> BackendError
        where
            E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        {
            error(&self.endpoint, op, e)
        }

        fn target(&self, service: &Service) -> Option<Target> {
            self.targets
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&service.name)
                .cloned()
        }

        fn remember(&self, name: &ServiceName, desired: u32) {
            self.desired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), desired);
        }

        /// The ECS service `name` in `cluster`, with its tags; `None` when it is missing or
        /// no longer ACTIVE (deleted: INACTIVE, being deleted: DRAINING).
        async fn describe(
            &self,
            cluster: &str,
            name: &str,
        ) -> Result<Option<aws_sdk_ecs::types::Service>, BackendError> {
            let op = format!("DescribeServices {name} in cluster {cluster}");
            let out = self
                .ecs
                .describe_services()
                .cluster(cluster)
                .services(name)
                .include(ServiceField::Tags)
                .send()
                .await
                .map_err(|e| self.err(&op, e))?;
            Ok(out
                .services()
                .iter()
                .find(|s| s.service_name() == Some(name) && s.status() == Some("ACTIVE"))
                .cloned())
        }

        /// `prepare`, or with [`Apply::No`] its checks only.
        async fn prepare_as(&self, services: &[Service], apply: Apply) -> Result<(), BackendError> {
            for s in services {
                let Some(t) = self.resolve(s, apply).await? else {
                    continue;
                };
                tracing::info!(service = %s.name, ecs_service = %t.service, cluster = %t.cluster,
                    managed = t.managed, daemon = t.daemon, "following the ECS service");
                self.targets
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(s.name.clone(), t);
            }
            Ok(())
        }

        /// Resolves what `service` is on ECS: a referenced service exists and is ACTIVE, a
        /// managed one is created when it does not exist and adopted when it carries our tags.
        /// With [`Apply::No`], a managed object that does not exist yet is not created: `None`.
        async fn resolve(
            &self,
            service: &Service,
            apply: Apply,
        ) -> Result<Option<Target>, BackendError> {
            let (cluster, name, managed) = match service.workload.reference() {
                Some(Reference::Ecs(r)) => (
                    r.cluster
                        .clone()
                        .unwrap_or_else(|| self.cfg.cluster.clone()),
                    r.service.clone(),
                    false,
                ),
                Some(other) => {
                    return Err(BackendError::Unsupported(format!(
                        "service {}: the ecs backend cannot reference a {other}",
                        service.name
                    )))
                }
                None => (
                    self.cfg.cluster.clone(),
                    Self::service_name(&self.instance, service.name.as_str()),
                    true,
                ),
            };
            if self.resources && cluster != self.cfg.cluster {
                return Err(BackendError::Unsupported(format!(
                    "service {}: with [capacity] resources = true the hosts are the container \
                     instances of cluster {}, and ECS service {name} is in cluster {cluster}: \
                     reference a service of cluster {}, or count capacity in slots",
                    service.name, self.cfg.cluster, self.cfg.cluster
                )));
            }
            let reserves = self
                .resources
                .then_some(service.resources)
                .flatten()
                .map(Units::of);
            let found = self.describe(&cluster, &name).await?;
            let Some(found) = found else {
                if !managed {
                    return Err(BackendError::NotFound {
                        what: format!("ECS service {name} in cluster {cluster}"),
                        hint: format!(
                            "service {} references it and it is missing or not ACTIVE; check \
                             [services.reference] service and cluster",
                            service.name
                        ),
                    });
                }
                if apply == Apply::No {
                    tracing::info!(service = %service.name, ecs_service = %name, cluster = %cluster, "dry run: would register a task definition and create the ECS service (0 tasks)");
                    return Ok(None);
                }
                self.create(service, &cluster, &name).await?;
                self.remember(&service.name, 0);
                return Ok(Some(Target {
                    cluster,
                    service: name,
                    managed: true,
                    daemon: false,
                    reserves,
                    instances: None,
                }));
            };
            if managed {
                let tag = |k: &str| {
                    found
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(k))
                        .and_then(|t| t.value())
                        .map(str::to_string)
                };
                if tag(TAG_INSTANCE).as_deref() != Some(self.instance.as_str())
                    || tag(TAG_SERVICE).as_deref() != Some(service.name.as_str())
                {
                    return Err(BackendError::Unsupported(format!(
                        "service {}: the ECS service {name} in cluster {cluster} exists and is \
                         not this microscaler's (its tags lack {TAG_INSTANCE} = {:?} and \
                         {TAG_SERVICE} = {:?}); rename the service or the instance, or \
                         reference it with [services.reference]",
                        service.name, self.instance, service.name
                    )));
                }
            }
            let daemon = found.scheduling_strategy() == Some(&SchedulingStrategy::Daemon);
            if daemon && !per_host(&service.kind) {
                return Err(BackendError::Unsupported(format!(
                    "service {}: ECS service {name} is a DAEMON service (one task per container \
                     instance, kept by ECS): mark the service per_host = true",
                    service.name
                )));
            }
            if let Some(want) = reserves {
                self.check_reserves(service, &found, &cluster, want, managed)
                    .await?;
            }
            self.remember(&service.name, found.desired_count().max(0) as u32);
            let instances = match service.workload.reference() {
                Some(Reference::Ecs(r)) => r.instances.clone(),
                _ => None,
            };
            Ok(Some(Target {
                cluster,
                service: name,
                managed,
                daemon,
                reserves,
                instances,
            }))
        }

        /// With capacity counted in resources: checks that ECS service `found`'s task
        /// definition reserves what `service`'s `resources` say (`want`), since the plan
        /// places each task by those (`DescribeTaskDefinition`, once at the start).
        async fn check_reserves(
            &self,
            service: &Service,
            found: &aws_sdk_ecs::types::Service,
            cluster: &str,
            want: Units,
            managed: bool,
        ) -> Result<(), BackendError> {
            let name = found.service_name().unwrap_or_default();
            let td = found.task_definition().unwrap_or_default();
            let op = format!("DescribeTaskDefinition {td} (of ECS service {name})");
            let out = self
                .ecs
                .describe_task_definition()
                .task_definition(td)
                .send()
                .await
                .map_err(|e| self.err(&op, e))?;
            let has = out.task_definition().map(reservation).unwrap_or_default();
            if has == want {
                return Ok(());
            }
            let what = if managed {
                format!("the ECS service {name} in cluster {cluster}, made by this microscaler")
            } else {
                format!(
                    "ECS service {name} in cluster {cluster} (the [services.reference] of \
                     service {})",
                    service.name
                )
            };
            let fix = if managed {
                "delete the ECS service (on_exit = \"stop\" does) so that it is made again \
                 with these resources"
            } else {
                "make them equal"
            };
            Err(BackendError::Invalid {
                op: format!("check {what}"),
                message: format!(
                    "its task definition {td} reserves {has} but service {}'s resources are {} \
                     ({want}): with [capacity] resources = true the plan places each task by \
                     the service's resources; {fix}",
                    service.name,
                    service.resources.unwrap_or_default(),
                ),
            })
        }

        /// Registers managed `service`'s task definition and creates its ECS service with
        /// desiredCount 0, both tagged.
        async fn create(
            &self,
            service: &Service,
            cluster: &str,
            name: &str,
        ) -> Result<(), BackendError> {
            let run = crate::managed(service);
            let tags = vec![
                Tag::builder()
                    .key(TAG_INSTANCE)
                    .value(&self.instance)
                    .build(),
                Tag::builder()
                    .key(TAG_SERVICE)
                    .value(service.name.as_str())
                    .build(),
            ];
            // A task reserves its service's resources when it has them (what the plan places
            // it by, with capacity in resources), else the backend's cpu and memory.
            let reserves = match service.resources.map(Units::of) {
                Some(u) if u.mib < 6 => {
                    return Err(BackendError::Invalid {
                        op: format!("RegisterTaskDefinition {name}"),
                        message: format!(
                            "service {}: an ECS task reserves at least 6 MiB of memory; give \
                             resources.memory",
                            service.name
                        ),
                    })
                }
                Some(u) => u,
                None => Units {
                    cpu: u64::from(self.cfg.cpu),
                    mib: u64::from(self.cfg.memory),
                },
            };
            let mut container = ContainerDefinition::builder()
                .name(service.name.as_str())
                .set_image(run.image.clone())
                .cpu(reserves.cpu.min(i32::MAX as u64) as i32)
                .memory(reserves.mib.min(i32::MAX as u64) as i32)
                .essential(true)
                .stop_timeout(service.stop_grace.as_secs().clamp(2, 120) as i32);
            if !run.command.is_empty() {
                container = container.set_command(Some(run.command.clone()));
            }
            for (k, v) in &run.env {
                container = container.environment(KeyValuePair::builder().name(k).value(v).build());
            }
            let op = format!("RegisterTaskDefinition {name}");
            let td = self
                .ecs
                .register_task_definition()
                .family(name)
                .container_definitions(container.build())
                .set_tags(Some(tags.clone()))
                .send()
                .await
                .map_err(|e| self.err(&op, e))?;
            let arn = td
                .task_definition()
                .and_then(|t| t.task_definition_arn())
                .unwrap_or(name)
                .to_string();
            let op = format!("CreateService {name} in cluster {cluster}");
            self.ecs
                .create_service()
                .cluster(cluster)
                .service_name(name)
                .task_definition(&arn)
                .desired_count(0)
                .launch_type(LaunchType::from(self.cfg.launch_type.as_str()))
                .set_tags(Some(tags))
                .send()
                .await
                .map_err(|e| self.err(&op, e))?;
            tracing::info!(service = %service.name, ecs_service = name, cluster, task_definition = %arn,
                "created the ECS service (desiredCount 0)");
            Ok(())
        }

        /// The ARNs of the cluster's container instances of `status` (all pages).
        async fn list_instances(
            &self,
            status: ContainerInstanceStatus,
        ) -> Result<Vec<String>, BackendError> {
            let cluster = &self.cfg.cluster;
            let op = format!(
                "ListContainerInstances {} in cluster {cluster}",
                status.as_str()
            );
            all_pages(|next| async {
                let out = self
                    .ecs
                    .list_container_instances()
                    .cluster(cluster)
                    .status(status.clone())
                    .set_next_token(next)
                    .send()
                    .await
                    .map_err(|e| self.err(&op, e))?;
                Ok((
                    out.container_instance_arns().to_vec(),
                    out.next_token().map(str::to_string),
                ))
            })
            .await
        }

        /// The cluster's container instances as hosts. Their status comes from two lists
        /// (ACTIVE and DRAINING, at once) every tick. What only a description gives (the EC2
        /// id, registered CPU and memory, whether the agent is connected) is fetched in the
        /// background, for instances not seen before and for all every [`DESCRIBE_EVERY`], so
        /// a tick never waits for it: a new ACTIVE instance counts as ready at once (it
        /// registered through its connected agent), with its resources known a tick later.
        async fn hosts(
            &self,
            targets: &[(ServiceName, Target)],
        ) -> Result<(Vec<Host>, BTreeMap<ServiceName, Vec<HostId>>), BackendError> {
            let (active, draining) = futures::try_join!(
                self.list_instances(ContainerInstanceStatus::Active),
                self.list_instances(ContainerInstanceStatus::Draining),
            )?;
            // A per-host service limited by a query needs a new instance's attributes in
            // this tick, not the next: new ACTIVE instances are described now then.
            if targets.iter().any(|(_, t)| t.instances.is_some()) {
                let new: Vec<String> = {
                    let known = self.instances.lock().unwrap_or_else(|e| e.into_inner());
                    active
                        .iter()
                        .filter(|a| !known.info.contains_key(*a))
                        .cloned()
                        .collect()
                };
                if !new.is_empty() {
                    let mut described = Vec::new();
                    for batch in
                        describe_batches(&self.ecs, &self.endpoint, &self.cfg.cluster, &new).await
                    {
                        described.extend(batch?);
                    }
                    self.instances
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .info
                        .extend(described);
                }
            }
            let mut known = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            let listed: std::collections::HashSet<&String> =
                active.iter().chain(&draining).collect();
            known.info.retain(|arn, _| listed.contains(arn));
            if !known.describing {
                let due = known
                    .described
                    .is_none_or(|at| at.elapsed() >= DESCRIBE_EVERY);
                let stale: Vec<String> = listed
                    .iter()
                    .filter(|arn| due || !known.info.contains_key(**arn))
                    .map(|arn| arn.to_string())
                    .collect();
                if !stale.is_empty() {
                    known.describing = true;
                    tokio::spawn(describe_instances(
                        self.ecs.clone(),
                        self.endpoint.clone(),
                        self.cfg.cluster.clone(),
                        stale,
                        due,
                        Arc::clone(&self.instances),
                        // New instances described: a per-host service limited to some counts
                        // them only then, so the loop looks again at once.
                        targets
                            .iter()
                            .any(|(_, t)| t.instances.is_some())
                            .then(|| Arc::clone(&self.waker)),
                    ));
                }
            }
            let hosts = as_hosts(&active, &draining, &known.info, None);
            let runs_on = runs_on(&hosts, &known.info, targets);
            Ok((hosts, runs_on))
        }

        /// With capacity counted in resources: the container instances, all described now
        /// (their remaining resources change with every task placed or stopped), and the
        /// services' tasks on them as replicas; each host's room is what remains on it plus
        /// what the services' own tasks there reserve, i.e. its registered CPU and memory
        /// less what the other tasks reserve.
        async fn hosts_with_room(
            &self,
            targets: &[(ServiceName, Target)],
        ) -> Result<Observation, BackendError> {
            let cluster = &self.cfg.cluster;
            let instances = async {
                let (active, draining) = futures::try_join!(
                    self.list_instances(ContainerInstanceStatus::Active),
                    self.list_instances(ContainerInstanceStatus::Draining),
                )?;
                let all: Vec<String> = active.iter().chain(&draining).cloned().collect();
                let mut info = HashMap::new();
                for batch in describe_batches(&self.ecs, &self.endpoint, cluster, &all).await {
                    info.extend(batch?);
                }
                Ok::<_, BackendError>((active, draining, info))
            };
            let ((active, draining, info), replicas) =
                futures::try_join!(instances, self.tasks(targets))?;
            let reserves: HashMap<&ServiceName, Units> = targets
                .iter()
                .map(|(name, t)| (name, t.reserves.unwrap_or_default()))
                .collect();
            let mut ours: HashMap<String, Units> = HashMap::new();
            for r in &replicas {
                let u = reserves.get(&r.service).copied().unwrap_or_default();
                let e = ours.entry(r.host.0.clone()).or_default();
                e.cpu += u.cpu;
                e.mib += u.mib;
            }
            let hosts = as_hosts(&active, &draining, &info, Some(&ours));
            Ok(Observation {
                runs_on: runs_on(&hosts, &info, targets),
                hosts,
                replicas,
                ..Observation::default()
            })
        }

        /// The ARNs of ECS service `service`'s tasks that are to run (desiredStatus RUNNING),
        /// in the backend's cluster (all pages of 100).
        async fn list_tasks(&self, service: &str) -> Result<Vec<String>, BackendError> {
            let cluster = &self.cfg.cluster;
            let op = format!("ListTasks of ECS service {service} in cluster {cluster}");
            all_pages(|next| async {
                let out = self
                    .ecs
                    .list_tasks()
                    .cluster(cluster)
                    .service_name(service)
                    .desired_status(aws_sdk_ecs::types::DesiredStatus::Running)
                    .max_results(100)
                    .set_next_token(next)
                    .send()
                    .await
                    .map_err(|e| self.err(&op, e))?;
                Ok((
                    out.task_arns().to_vec(),
                    out.next_token().map(str::to_string),
                ))
            })
            .await
        }

        /// The services' tasks that are to run, as replicas on their container instances:
        /// `ListTasks` per service and `DescribeTasks` 100 at a time, all at once. A task is a
        /// service's by its `group` (`service:<name>`).
        async fn tasks(
            &self,
            targets: &[(ServiceName, Target)],
        ) -> Result<Vec<Replica>, BackendError> {
            let cluster = &self.cfg.cluster;
            let lists = futures::future::try_join_all(
                targets.iter().map(|(_, t)| self.list_tasks(&t.service)),
            )
            .await?;
            let mut arns: Vec<String> = lists.into_iter().flatten().collect();
            arns.sort();
            arns.dedup();
            let by_group: HashMap<String, &ServiceName> = targets
                .iter()
                .map(|(name, t)| (format!("service:{}", t.service), name))
                .collect();
            let op = format!("DescribeTasks in cluster {cluster}");
            let calls = arns.chunks(100).map(|batch| {
                self.ecs
                    .describe_tasks()
                    .cluster(cluster)
                    .set_tasks(Some(batch.to_vec()))
                    .send()
            });
            let mut replicas = Vec::new();
            for answer in futures::future::join_all(calls).await {
                let answer = answer.map_err(|e| self.err(&op, e))?;
                for task in answer.tasks() {
                    let Some(service) = task.group().and_then(|g| by_group.get(g)) else {
                        continue;
                    };
                    replicas.push(Replica {
                        id: task.task_arn().unwrap_or_default().to_string(),
                        service: (*service).clone(),
                        host: HostId(task.container_instance_arn().unwrap_or_default().into()),
                        state: task_state(task.last_status()),
                    });
                }
            }
            replicas.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(replicas)
        }

        /// `DescribeServices` of `targets` (all in `cluster`), 10 at a time, all at once; what
        /// each service runs.
        async fn observe_cluster(
            &self,
            cluster: &str,
            targets: &[(ServiceName, Target)],
        ) -> Result<Vec<(ServiceName, ServiceObservation)>, BackendError> {
            let mut out = Vec::new();
            let op = format!("DescribeServices in cluster {cluster}");
            let calls = targets.chunks(10).map(|batch| {
                self.ecs
                    .describe_services()
                    .cluster(cluster)
                    .set_services(Some(batch.iter().map(|(_, t)| t.service.clone()).collect()))
                    .send()
            });
            let answers = futures::future::join_all(calls).await;
            let mut by_name = HashMap::new();
            for a in answers {
                let a = a.map_err(|e| self.err(&op, e))?;
                for s in a.services() {
                    if let Some(n) = s.service_name() {
                        by_name.insert(n.to_string(), s.clone());
                    }
                }
            }
            for (name, t) in targets {
                // Missing or no longer ACTIVE: nothing runs (deleted by our shutdown, or by
                // someone; a scale says which).
                let Some(s) = by_name
                    .get(&t.service)
                    .filter(|s| s.status() == Some("ACTIVE"))
                else {
                    continue;
                };
                let desired = s.desired_count().max(0) as u32;
                self.remember(name, desired);
                let primary = s
                    .deployments()
                    .iter()
                    .find(|d| d.status() == Some("PRIMARY"));
                let rolling = primary.is_some_and(|d| {
                    d.rollout_state() == Some(&DeploymentRolloutState::InProgress)
                }) || s.deployments().len() > 1;
                out.push((
                    name.clone(),
                    ServiceObservation {
                        running: s.running_count().max(0) as u32,
                        pending: s.pending_count().max(0) as u32,
                        orchestrator_wants: (!t.daemon).then_some(desired),
                        caught_up: !rolling,
                        ..ServiceObservation::default()
                    },
                ));
            }
            Ok(out)
        }
    }

    /// Starts an EC2 instance on an emulator's EC2 API at `endpoint` (moto: it registers a
    /// container instance only for an instance it runs) and returns its id. The request is
    /// not signed: this works on an emulator only, never on AWS.
    pub async fn emulator_ec2_instance(
        endpoint: &str,
        region: &str,
    ) -> Result<String, BackendError> {
        let what = format!("the EC2 API at {endpoint}");
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=demo/20260101/{region}/ec2/aws4_request, \
             SignedHeaders=host, Signature=0"
        );
        let body = reqwest::Client::new()
            .post(format!("{}/", endpoint.trim_end_matches('/')))
            .header("Authorization", auth)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(
                "Action=RunInstances&Version=2016-11-15&ImageId=ami-12c6146b&MinCount=1&MaxCount=1",
            )
            .send()
            .await
            .map_err(|e| crate::http::unreachable(&what, format!("RunInstances: {e}")))?
            .text()
            .await
            .map_err(|e| crate::http::unreachable(&what, format!("RunInstances: {e}")))?;
        let id = body
            .split_once("<instanceId>")
            .and_then(|(_, rest)| rest.split_once('<'))
            .map(|(id, _)| id.to_string());
        id.ok_or_else(|| BackendError::Api {
            op: "RunInstances".into(),
            message: format!(
                "no instance id in the answer (an emulator such as moto is needed): {}",
                crate::http::clip(&body)
            ),
        })
    }

    /// The demo's cluster on an emulator: creates cluster `cfg.cluster` and registers
    /// `instances` container instances in it (each for an EC2 instance the emulator runs).
    /// Refused without `endpoint_url`: on AWS a container instance is a real machine with the
    /// ECS agent, which the demo cannot make.
    pub async fn create_demo_cluster(
        cfg: &EcsConfig,
        instances: usize,
    ) -> Result<(), BackendError> {
        let Some(endpoint) = &cfg.endpoint_url else {
            return Err(BackendError::Unsupported(
                "the demo makes container instances only on an emulator (--address, e.g. moto \
                 server); on AWS give --cluster, a cluster with container instances"
                    .into(),
            ));
        };
        let conf = aws_config(cfg, cfg.timeout).await;
        let region = conf
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".into());
        let ecs = aws_sdk_ecs::Client::new(&conf);
        let cluster = &cfg.cluster;
        ecs.create_cluster()
            .cluster_name(cluster)
            .send()
            .await
            .map_err(|e| error(endpoint, &format!("CreateCluster {cluster}"), e))?;
        for _ in 0..instances {
            let id = emulator_ec2_instance(endpoint, &region).await?;
            let doc = serde_json::json!({"instanceId": id, "region": region}).to_string();
            ecs.register_container_instance()
                .cluster(cluster)
                .instance_identity_document(doc)
                .send()
                .await
                .map_err(|e| {
                    error(
                        endpoint,
                        &format!("RegisterContainerInstance in {cluster}"),
                        e,
                    )
                })?;
        }
        tracing::info!(cluster = %cluster, instances, endpoint = %endpoint, "created the demo's cluster");
        Ok(())
    }

    /// Removes the demo's cluster: deregisters its container instances, then deletes it (its
    /// services are deleted by the demo's `on_exit = "stop"` before).
    pub async fn delete_demo_cluster(cfg: &EcsConfig) -> Result<(), BackendError> {
        let conf = aws_config(cfg, cfg.timeout).await;
        let endpoint = cfg.endpoint_url.clone().unwrap_or_else(|| "AWS".into());
        let ecs = aws_sdk_ecs::Client::new(&conf);
        let cluster = &cfg.cluster;
        let arns = ecs
            .list_container_instances()
            .cluster(cluster)
            .send()
            .await
            .map_err(|e| {
                error(
                    &endpoint,
                    &format!("ListContainerInstances in {cluster}"),
                    e,
                )
            })?
            .container_instance_arns()
            .to_vec();
        for arn in arns {
            ecs.deregister_container_instance()
                .cluster(cluster)
                .container_instance(&arn)
                .force(true)
                .send()
                .await
                .map_err(|e| error(&endpoint, &format!("DeregisterContainerInstance {arn}"), e))?;
        }
        ecs.delete_cluster()
            .cluster(cluster)
            .send()
            .await
            .map_err(|e| error(&endpoint, &format!("DeleteCluster {cluster}"), e))?;
        tracing::info!(cluster = %cluster, "deleted the demo's cluster");
        Ok(())
    }

    /// Every page of a listing: `page` is called with the last page's next token (none the
    /// first time) and gives its items and the next token, until there is none.
    async fn all_pages<F, Fut>(mut page: F) -> Result<Vec<String>, BackendError>
    where
        F: FnMut(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<String>, Option<String>), BackendError>>,
    {
        let mut items = Vec::new();
        let mut next = None;
        loop {
            let (got, token) = page(next).await?;
            items.extend(got);
            if token.is_none() {
                return Ok(items);
            }
            next = token;
        }
    }

    /// Container instances `active` and `draining` as hosts, with what their descriptions
    /// `info` told. With `ours` (capacity in resources: what the services' tasks reserve on
    /// each), a host's CPU and memory are its room: what remains on it plus `ours`, at most
    /// what it registered; else what it registered.
    fn as_hosts(
        active: &[String],
        draining: &[String],
        info: &HashMap<String, Instance>,
        ours: Option<&HashMap<String, Units>>,
    ) -> Vec<Host> {
        let mut hosts: Vec<Host> = active
            .iter()
            .map(|a| (a, true))
            .chain(draining.iter().map(|a| (a, false)))
            .map(|(arn, is_active)| {
                let i = info.get(arn);
                let (cpu, mib) = match (i, ours) {
                    (Some(i), Some(ours)) => {
                        let o = ours.get(arn).copied().unwrap_or_default();
                        let room = |remaining: Option<u64>, ours: u64, registered: Option<u64>| {
                            remaining.map(|r| (r + ours).min(registered.unwrap_or(u64::MAX)))
                        };
                        (
                            room(i.remaining.0, o.cpu, i.registered.0),
                            room(i.remaining.1, o.mib, i.registered.1),
                        )
                    }
                    (Some(i), None) => i.registered,
                    (None, _) => (None, None),
                };
                Host {
                    id: HostId(arn.clone()),
                    name: i.map_or_else(|| arn.clone(), |i| i.name.clone()),
                    ready: is_active && i.is_none_or(|i| i.agent_connected),
                    cpus: cpu.map(|u| u as f64 / 1024.0),
                    memory_bytes: mib.map(|m| m << 20),
                }
            })
            .collect();
        hosts.sort_by(|a, b| a.id.0.cmp(&b.id.0));
        hosts
    }

    /// The hosts each per-host service with an `instances` query runs on: the hosts whose
    /// instance's description matches (an instance not described yet matches nothing).
    fn runs_on(
        hosts: &[Host],
        info: &HashMap<String, Instance>,
        targets: &[(ServiceName, Target)],
    ) -> BTreeMap<ServiceName, Vec<HostId>> {
        targets
            .iter()
            .filter_map(|(name, t)| {
                let q = t.instances.as_ref()?;
                let on = hosts
                    .iter()
                    .filter(|h| info.get(&h.id.0).is_some_and(|i| q.matches(&i.facts)))
                    .map(|h| h.id.clone())
                    .collect();
                Some((name.clone(), on))
            })
            .collect()
    }

    /// What a task definition reserves on a container instance, as ECS counts it: its
    /// task-level `cpu` and `memory` when given, else its containers' `cpu` and
    /// `memoryReservation` (or `memory`) added up.
    fn reservation(td: &aws_sdk_ecs::types::TaskDefinition) -> Units {
        let containers = td.container_definitions();
        Units {
            cpu: td
                .cpu()
                .and_then(|c| task_level(c, "vCPU", 1024.0))
                .unwrap_or_else(|| containers.iter().map(|c| c.cpu().max(0) as u64).sum()),
            mib: td
                .memory()
                .and_then(|m| task_level(m, "GB", 1024.0))
                .unwrap_or_else(|| {
                    containers
                        .iter()
                        .map(|c| c.memory_reservation().or(c.memory()).unwrap_or(0).max(0) as u64)
                        .sum()
                }),
        }
    }

    /// How a task counts, by its `lastStatus`.
    fn task_state(last_status: Option<&str>) -> ReplicaState {
        match last_status {
            Some("RUNNING") => ReplicaState::Running,
            None | Some("PROVISIONING" | "PENDING" | "ACTIVATING") => ReplicaState::Pending,
            Some(_) => ReplicaState::Stopping,
        }
    }

    /// Describes container instances `arns` of `cluster`, 100 a call, all at once.
    async fn describe_batches(
        ecs: &aws_sdk_ecs::Client,
        endpoint: &str,
        cluster: &str,
        arns: &[String],
    ) -> Vec<Result<Vec<(String, Instance)>, BackendError>> {
        let op = format!("DescribeContainerInstances in cluster {cluster}");
        let batches = arns.chunks(100).map(|batch| {
            ecs.describe_container_instances()
                .cluster(cluster)
                .set_container_instances(Some(batch.to_vec()))
                .send()
        });
        let answers = futures::future::join_all(batches).await;
        answers
            .into_iter()
            .map(|out| {
                let out = out.map_err(|e| error(endpoint, &op, e))?;
                Ok(out
                    .container_instances()
                    .iter()
                    .map(|ci| {
                        let of = |list: &[aws_sdk_ecs::types::Resource], name: &str| {
                            list.iter()
                                .find(|r| r.name() == Some(name))
                                .map(|r| r.integer_value().max(0) as u64)
                        };
                        let (registered, remaining) =
                            (ci.registered_resources(), ci.remaining_resources());
                        let arn = ci.container_instance_arn().unwrap_or("").to_string();
                        let info = Instance {
                            name: ci.ec2_instance_id().unwrap_or(&arn).to_string(),
                            agent_connected: ci.agent_connected(),
                            registered: (of(registered, "CPU"), of(registered, "MEMORY")),
                            remaining: (of(remaining, "CPU"), of(remaining, "MEMORY")),
                            facts: InstanceFacts {
                                attributes: ci
                                    .attributes()
                                    .iter()
                                    .map(|a| (a.name().to_string(), a.value().map(str::to_string)))
                                    .collect(),
                                ec2_instance_id: ci.ec2_instance_id().map(str::to_string),
                            },
                        };
                        (arn, info)
                    })
                    .collect())
            })
            .collect()
    }

    /// Describes container instances `arns` of `cluster` in the background into
    /// `instances`; `all` when these are every listed instance (the periodic refresh). A
    /// failure is logged and tried again on a later tick. With `waker`, it is rung when an
    /// instance's attributes or EC2 id are new or changed (a per-host service's `instances`
    /// query may match differently).
    async fn describe_instances(
        ecs: aws_sdk_ecs::Client,
        endpoint: String,
        cluster: String,
        arns: Vec<String>,
        all: bool,
        instances: Arc<Mutex<Instances>>,
        waker: Option<Arc<OnceLock<Arc<Notify>>>>,
    ) {
        let mut described = Vec::new();
        let mut failed = false;
        for batch in describe_batches(&ecs, &endpoint, &cluster, &arns).await {
            match batch {
                Ok(batch) => described.extend(batch),
                Err(e) => {
                    tracing::warn!(error = %e, "describing the container instances failed; trying again next tick");
                    failed = true;
                }
            }
        }
        let mut known = instances.lock().unwrap_or_else(|e| e.into_inner());
        let changed = described
            .iter()
            .any(|(arn, i)| known.info.get(arn).is_none_or(|old| old.facts != i.facts));
        known.info.extend(described);
        if changed {
            if let Some(w) = waker.as_ref().and_then(|w| w.get()) {
                w.notify_one();
            }
        }
        if all && !failed {
            known.described = Some(std::time::Instant::now());
        }
        known.describing = false;
    }

    /// Reads the events queue until the backend is dropped: each container-instance event
    /// wakes the loop; every message is deleted once read (events of other kinds too, so the
    /// queue does not fill). Errors are logged and retried with backoff.
    async fn read_events(
        sqs: aws_sdk_sqs::Client,
        queue: String,
        waker: Arc<OnceLock<Arc<Notify>>>,
        events: Arc<std::sync::atomic::AtomicU64>,
    ) {
        let mut wait = Duration::from_millis(500);
        loop {
            let got = sqs
                .receive_message()
                .queue_url(&queue)
                .max_number_of_messages(10)
                .wait_time_seconds(20)
                .send()
                .await;
            let out = match got {
                Ok(out) => {
                    wait = Duration::from_millis(500);
                    out
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %aws_sdk_sqs::error::DisplayErrorContext(&e),
                        "reading the ECS events queue failed; retrying (the per-tick observation goes on)");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            let mut woke = false;
            for m in out.messages() {
                if m.body().is_some_and(is_instance_event) {
                    events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if !woke {
                        if let Some(w) = waker.get() {
                            w.notify_one();
                        }
                        woke = true;
                    }
                }
            }
            for m in out.messages() {
                let Some(handle) = m.receipt_handle() else {
                    continue;
                };
                if let Err(e) = sqs
                    .delete_message()
                    .queue_url(&queue)
                    .receipt_handle(handle)
                    .send()
                    .await
                {
                    tracing::warn!(queue = %queue, error = %aws_sdk_sqs::error::DisplayErrorContext(&e),
                        "deleting an ECS event from the queue failed; it will be read again");
                }
            }
            if woke {
                tracing::debug!(queue = %queue, "a container instance changed; woke the loop");
            }
        }
    }

    impl Backend for EcsBackend {
        fn kind(&self) -> &'static str {
            "ecs"
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
            let targets: Vec<(ServiceName, Target)> = self
                .targets
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut by_cluster: BTreeMap<String, Vec<(ServiceName, Target)>> = BTreeMap::new();
            for (name, t) in targets {
                by_cluster
                    .entry(t.cluster.clone())
                    .or_default()
                    .push((name, t));
            }
            // The hosts and every cluster's services at once: a tick waits for the slowest
            // call, not for their sum.
            let services = futures::future::try_join_all(
                by_cluster
                    .iter()
                    .map(|(cluster, targets)| self.observe_cluster(cluster, targets)),
            );
            if self.resources {
                // Every target is in the backend's cluster then (checked at `prepare`).
                let all: Vec<(ServiceName, Target)> =
                    by_cluster.values().flatten().cloned().collect();
                let (obs, services) = futures::try_join!(self.hosts_with_room(&all), services)?;
                return Ok(Observation {
                    services: services.into_iter().flatten().collect(),
                    ..obs
                });
            }
            let all: Vec<(ServiceName, Target)> = by_cluster.values().flatten().cloned().collect();
            let ((hosts, runs_on), services) = futures::try_join!(self.hosts(&all), services)?;
            Ok(Observation {
                hosts,
                runs_on,
                services: services.into_iter().flatten().collect(),
                ..Observation::default()
            })
        }

        async fn scale(
            &self,
            service: &Service,
            target: u32,
        ) -> Result<ScaleOutcome, BackendError> {
            let t = match self.target(service) {
                Some(t) => t,
                None => resolved(self.resolve(service, Apply::Yes).await?)?,
            };
            if t.daemon {
                tracing::debug!(service = %service.name, "a DAEMON service keeps one task per container instance; nothing to scale");
                return Ok(ScaleOutcome::default());
            }
            let known = self
                .desired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&service.name)
                .copied();
            let from = match known {
                Some(d) => d,
                None => match self.describe(&t.cluster, &t.service).await? {
                    Some(s) => s.desired_count().max(0) as u32,
                    None => 0,
                },
            };
            if from == target {
                return Ok(ScaleOutcome::default());
            }
            let op = format!("UpdateService {} in cluster {}", t.service, t.cluster);
            let out = self
                .ecs
                .update_service()
                .cluster(&t.cluster)
                .service(&t.service)
                .desired_count(target as i32)
                .send()
                .await
                .map_err(|e| match self.err(&op, e) {
                    BackendError::NotFound { hint, .. } => BackendError::NotFound {
                        what: format!("ECS service {} in cluster {}", t.service, t.cluster),
                        hint: format!(
                            "{hint}; service {} is that ECS service: was it deleted?",
                            service.name
                        ),
                    },
                    other => other,
                })?;
            let now = out
                .service()
                .map(|s| s.desired_count().max(0) as u32)
                .unwrap_or(target);
            self.remember(&service.name, now);
            tracing::debug!(service = %service.name, ecs_service = %t.service, from, target, "updated the ECS service's desiredCount");
            Ok(if target > from {
                ScaleOutcome {
                    started: target - from,
                    ..ScaleOutcome::default()
                }
            } else {
                ScaleOutcome {
                    stopped: from - target,
                    ..ScaleOutcome::default()
                }
            })
        }

        fn wake_on_change(&self, waker: Arc<Notify>) {
            let _ = self.waker.set(waker);
        }

        async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
            if !remove {
                return Ok(());
            }
            // A referenced service is never deleted.
            crate::remove_each(services, |s| {
                let t = self.target(s).filter(|t| t.managed)?;
                Some(async move {
                    let op = format!("DeleteService {} in cluster {}", t.service, t.cluster);
                    let done = self
                        .ecs
                        .delete_service()
                        .cluster(&t.cluster)
                        .service(&t.service)
                        .force(true)
                        .send()
                        .await
                        .map(|_| self.remember(&s.name, 0))
                        .map_err(|e| self.err(&op, e));
                    (
                        format!("the ECS service {} in cluster {}", t.service, t.cluster),
                        done,
                    )
                })
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::config;
    use crate::config::{BackendConfig, Reference, Workload};

    use super::*;

    #[test]
    fn options_and_references_are_checked_with_paths() {
        let e = config(
            "type = \"ecs\"\ncluster = \"a b\"\nlaunch_type = \"LAMBDA\"\ncpu = 1\nendpoint_url = \"moto:5000\"\ncolour = 1",
            "image = \"x\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "backend.colour: unknown key",
                "backend.cluster: \"a b\" is not an ECS cluster name (letters, digits, '-', '_')",
                "backend.endpoint_url: \"moto:5000\" is not an http:// or https:// URL",
                "backend.launch_type: must be EC2 or FARGATE, got \"LAMBDA\"",
                "backend.cpu: must be CPU units from 2 to 196608 (1024 = one vCPU)",
            ]
        );
        let e = config("type = \"ecs\"", "[services.reference]\ncluster = \"prod\"").unwrap_err();
        assert_eq!(
            e,
            vec!["services[0].reference.service: missing: the name of an existing ECS service"]
        );
        let c = config(
            "type = \"ecs\"\ntimeout = \"3s\"",
            "[services.reference]\nservice = \"web\"\ncluster = \"prod\"",
        )
        .unwrap();
        let BackendConfig::Ecs(b) = &c.backend else {
            panic!("ecs: {:?}", c.backend)
        };
        assert_eq!(
            (b.cluster.as_str(), b.timeout),
            ("default", Duration::from_secs(3))
        );
        let Workload::Reference(Reference::Ecs(r)) = &c.services[0].workload else {
            panic!("a reference: {:?}", c.services[0].workload)
        };
        assert_eq!(r.to_string(), "ECS service web in cluster prod");
    }

    #[test]
    fn managed_services_need_an_image_and_per_host_ones_a_reference() {
        let e = config("type = \"ecs\"", "").unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("services[0].image: missing"), "{e:?}");
        let per_host = |keys: &str| {
            crate::Config::from_toml(&format!(
                "instance = \"t\"\n[capacity]\nslots = 4\n[backend]\ntype = \"ecs\"\n\
                 [[services]]\nname = \"agent\"\nper_host = true\n{keys}\n"
            ))
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())
        };
        let e = per_host("image = \"agent:1\"").unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("services[0].per_host: a per-host service on ecs"),
            "{e:?}"
        );
        per_host("[services.reference]\nservice = \"agent\"").unwrap();
        let c = per_host(
            "[services.reference]\nservice = \"agent\"\ninstances = \"attribute:role == web\"",
        )
        .unwrap();
        let Workload::Reference(Reference::Ecs(r)) = &c.services[0].workload else {
            panic!()
        };
        assert_eq!(
            r.instances,
            Some(Query::Equals(
                query::Subject::Attribute("role".into()),
                "web".into()
            ))
        );
        let e = per_host("[services.reference]\nservice = \"agent\"\ninstances = \"role == web\"")
            .unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("services[0].reference.instances: \"role\" is not a subject"),
            "{e:?}"
        );
        // Only a per-host service runs on some instances.
        let e = crate::Config::from_toml(
            "instance = \"t\"\n[capacity]\nslots = 4\n[backend]\ntype = \"ecs\"\n\
             [[services]]\nname = \"web\"\n[services.reference]\nservice = \"web\"\n\
             instances = \"attribute:role == web\"\n",
        )
        .map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())
        .unwrap_err();
        assert!(
            e.iter()
                .any(|e| e.starts_with("services[0].reference.instances: only a per-host service")),
            "{e:?}"
        );
    }

    #[test]
    fn only_container_instance_events_count() {
        assert!(is_instance_event(
            r#"{"version":"0","source":"aws.ecs","detail-type":"ECS Container Instance State Change","detail":{}}"#
        ));
        assert!(!is_instance_event(
            r#"{"source":"aws.ecs","detail-type":"ECS Task State Change"}"#
        ));
        assert!(!is_instance_event("not json"));
    }

    #[test]
    fn resources_in_ecs_units() {
        assert_eq!(cpu_units(1000), 1024);
        assert_eq!(cpu_units(250), 256);
        assert_eq!(cpu_units(100), 102);
        assert_eq!(cpu_units(700), 717);
        assert_eq!(mebibytes(1 << 30), 1024);
        assert_eq!(mebibytes((256 << 20) + 1), 257);
        assert_eq!(task_level("1024", "vCPU", 1024.0), Some(1024));
        assert_eq!(task_level("0.5 vCPU", "vCPU", 1024.0), Some(512));
        assert_eq!(task_level("2 GB", "GB", 1024.0), Some(2048));
        assert_eq!(task_level("2gb", "GB", 1024.0), Some(2048));
        assert_eq!(task_level("lots", "GB", 1024.0), None);
    }
}
