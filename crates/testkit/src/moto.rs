//! moto server (an AWS emulator from PyPI, started on 127.0.0.1:5000 by
//! scripts/source-services.sh) for the ECS tests: fake credentials, clients, and clusters of
//! container instances.
//!
//! What moto does not simulate, and the tests therefore cannot prove: it starts no task for a
//! service (`runningCount` jumps to `desiredCount` on `UpdateService`, `pendingCount` is 0), so
//! ECS's own placement and tasks stopping are not exercised (the resources tests start and stop
//! the services' tasks themselves, [`schedule`], in the services' task groups: moto places a
//! `RunTask` first fit and keeps `remainingResources` by the containers' `cpu` and `memory`);
//! it registers every container instance with 4096 CPU units and 7482 MiB; it ignores
//! `ListTasks`' `serviceName` and moves a task's `lastStatus` past RUNNING on each
//! `DescribeTasks`; it emits no
//! EventBridge event (the tests publish the container-instance event themselves); it does not
//! throttle (a [`crate::fault_proxy`] in front of it does); it ignores `ListContainerInstances`'
//! cluster-query `filter`; and it checks no credentials or IAM policy.

use std::time::Duration;

/// Where moto listens.
pub const ENDPOINT: &str = "http://127.0.0.1:5000";
/// The region the tests use (moto keeps each region apart).
pub const REGION: &str = "us-east-1";

/// Fake credentials for moto, the same in every test (set before any client is made), and
/// nothing from this machine's AWS profile or instance metadata.
pub fn fake_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent");
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent");
    });
}

/// Whether moto answers; when it does not, [`crate::missing_service`] decides (a failure
/// under `CI=true`, a skip elsewhere) and this returns false.
pub async fn available() -> bool {
    fake_credentials();
    let up = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", 5000)),
    )
    .await;
    match up {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => !crate::missing_service("moto server on 127.0.0.1:5000", e),
        Err(_) => !crate::missing_service("moto server on 127.0.0.1:5000", "connect timed out"),
    }
}

/// The SDK configuration of the tests' own clients, against `endpoint`.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    fake_credentials();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// An ECS client on moto.
pub async fn ecs() -> aws_sdk_ecs::Client {
    aws_sdk_ecs::Client::new(&sdk_config(ENDPOINT).await)
}

/// An SQS client on moto.
pub async fn sqs() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&sdk_config(ENDPOINT).await)
}

/// Starts an EC2 instance in moto (moto registers a container instance only for an instance
/// it knows) and returns its id.
pub async fn ec2_instance() -> String {
    microscaler_backends::ecs::emulator_ec2_instance(ENDPOINT, REGION)
        .await
        .expect("moto RunInstances")
}

/// The ECS client the helpers take, for test crates that do not depend on the SDK.
pub type EcsClient = aws_sdk_ecs::Client;

/// Registers a new container instance in `cluster` (ACTIVE, agent connected) and returns its
/// ARN.
pub async fn add_instance(ecs: &aws_sdk_ecs::Client, cluster: &str) -> String {
    let id = ec2_instance().await;
    let doc = serde_json::json!({"instanceId": id, "region": REGION}).to_string();
    ecs.register_container_instance()
        .cluster(cluster)
        .instance_identity_document(doc)
        .send()
        .await
        .expect("RegisterContainerInstance")
        .container_instance()
        .and_then(|c| c.container_instance_arn())
        .expect("a container instance ARN")
        .to_string()
}

/// Sets the custom attribute `name` = `value` on container instance `arn` (`PutAttributes`).
pub async fn set_attribute(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    arn: &str,
    name: &str,
    value: &str,
) {
    let attribute = aws_sdk_ecs::types::Attribute::builder()
        .name(name)
        .value(value)
        .target_id(arn)
        .build()
        .expect("an attribute");
    ecs.put_attributes()
        .cluster(cluster)
        .attributes(attribute)
        .send()
        .await
        .expect("PutAttributes");
}

/// A new cluster named `name` with `instances` container instances; their ARNs.
pub async fn cluster(ecs: &aws_sdk_ecs::Client, name: &str, instances: usize) -> Vec<String> {
    ecs.create_cluster()
        .cluster_name(name)
        .send()
        .await
        .expect("CreateCluster");
    let mut arns = Vec::new();
    for _ in 0..instances {
        arns.push(add_instance(ecs, name).await);
    }
    arns
}

/// Sets container instance `arn` of `cluster` DRAINING (`true`) or ACTIVE again.
pub async fn drain(ecs: &aws_sdk_ecs::Client, cluster: &str, arn: &str, draining: bool) {
    ecs.update_container_instances_state()
        .cluster(cluster)
        .container_instances(arn)
        .status(if draining {
            aws_sdk_ecs::types::ContainerInstanceStatus::Draining
        } else {
            aws_sdk_ecs::types::ContainerInstanceStatus::Active
        })
        .send()
        .await
        .expect("UpdateContainerInstancesState");
}

/// Deregisters container instance `arn` of `cluster`.
pub async fn deregister(ecs: &aws_sdk_ecs::Client, cluster: &str, arn: &str) {
    ecs.deregister_container_instance()
        .cluster(cluster)
        .container_instance(arn)
        .force(true)
        .send()
        .await
        .expect("DeregisterContainerInstance");
}

/// Creates an ECS service microscaler does not own (no tags) in `cluster`, with a task
/// definition of its own, `desired` tasks, and `strategy` (`REPLICA` or `DAEMON`).
pub async fn plain_service(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    name: &str,
    desired: u32,
    strategy: &str,
) {
    let td = task_definition(ecs, name, 0, 64).await;
    ecs.create_service()
        .cluster(cluster)
        .service_name(name)
        .task_definition(td)
        .desired_count(desired as i32)
        .scheduling_strategy(aws_sdk_ecs::types::SchedulingStrategy::from(strategy))
        .send()
        .await
        .expect("CreateService");
    if strategy == "REPLICA" {
        // moto counts a new service's tasks running only from an update on (at creation it
        // reads MOTO_ECS_SERVICE_RUNNING, 0 by default): set the count again so they run.
        ecs.update_service()
            .cluster(cluster)
            .service(name)
            .desired_count(desired as i32)
            .send()
            .await
            .expect("UpdateService");
    }
}

/// The ECS service `name` of `cluster` as moto holds it, if ACTIVE.
pub async fn service(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    name: &str,
) -> Option<aws_sdk_ecs::types::Service> {
    ecs.describe_services()
        .cluster(cluster)
        .services(name)
        .include(aws_sdk_ecs::types::ServiceField::Tags)
        .send()
        .await
        .expect("DescribeServices")
        .services()
        .iter()
        .find(|s| s.status() == Some("ACTIVE"))
        .cloned()
}

/// The `desiredCount` of ECS service `name`, if ACTIVE.
pub async fn desired(ecs: &aws_sdk_ecs::Client, cluster: &str, name: &str) -> Option<u32> {
    service(ecs, cluster, name)
        .await
        .map(|s| s.desired_count().max(0) as u32)
}

/// Deletes ECS service `name` (forced, whatever its count).
pub async fn delete_service(ecs: &aws_sdk_ecs::Client, cluster: &str, name: &str) {
    ecs.delete_service()
        .cluster(cluster)
        .service(name)
        .force(true)
        .send()
        .await
        .expect("DeleteService");
}

/// The EventBridge event of a container instance's state change, as the rule of seed 004
/// delivers it to an SQS queue.
pub fn instance_event(cluster_arn: &str, instance_arn: &str, status: &str) -> String {
    serde_json::json!({
        "version": "0",
        "id": "8952ba83-7be2-4ab5-9c32-6687532d15a2",
        "detail-type": "ECS Container Instance State Change",
        "source": "aws.ecs",
        "account": "123456789012",
        "time": "2026-12-05T00:00:00Z",
        "region": REGION,
        "resources": [instance_arn],
        "detail": {
            "clusterArn": cluster_arn,
            "containerInstanceArn": instance_arn,
            "status": status,
            "agentConnected": true,
        }
    })
    .to_string()
}

/// Registers a task definition of family `family` whose one container reserves `cpu` units
/// and `memory` MiB (moto places tasks by containers' `cpu` and `memory` only); its ARN.
pub async fn task_definition(
    ecs: &aws_sdk_ecs::Client,
    family: &str,
    cpu: i32,
    memory: i32,
) -> String {
    ecs.register_task_definition()
        .family(family)
        .container_definitions(
            aws_sdk_ecs::types::ContainerDefinition::builder()
                .name(family)
                .image("busybox")
                .cpu(cpu)
                .memory(memory)
                .build(),
        )
        .send()
        .await
        .expect("RegisterTaskDefinition")
        .task_definition()
        .and_then(|t| t.task_definition_arn())
        .expect("task definition ARN")
        .to_string()
}

/// Starts a task of `td` on container instance `instance` of `cluster` in task group `group`
/// (a service's tasks are in `service:<name>`; moto starts none for its services); its ARN.
/// moto takes what it reserves off the instance's `remainingResources`.
pub async fn start_task(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    td: &str,
    instance: &str,
    group: &str,
) -> String {
    ecs.start_task()
        .cluster(cluster)
        .task_definition(td)
        .container_instances(instance)
        .group(group)
        .send()
        .await
        .expect("StartTask")
        .tasks()
        .first()
        .and_then(|t| t.task_arn())
        .expect("a task ARN")
        .to_string()
}

/// Runs `count` tasks of `td` in `cluster` in task group `group`, placed as moto places them
/// (first fit over the ACTIVE instances in the order they registered, by CPU and memory); the
/// ARNs of those placed: fewer than `count` when no instance has room for the rest.
pub async fn run_tasks(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    td: &str,
    group: &str,
    count: u32,
) -> Vec<String> {
    ecs.run_task()
        .cluster(cluster)
        .task_definition(td)
        .group(group)
        .count(count as i32)
        .send()
        .await
        .expect("RunTask")
        .tasks()
        .iter()
        .filter_map(|t| t.task_arn().map(str::to_string))
        .collect()
}

/// The tasks of `cluster` to run (desiredStatus RUNNING) in task group `group`, in the order
/// they were started: (task ARN, container instance ARN).
pub async fn tasks(ecs: &aws_sdk_ecs::Client, cluster: &str, group: &str) -> Vec<(String, String)> {
    let arns = ecs
        .list_tasks()
        .cluster(cluster)
        .desired_status(aws_sdk_ecs::types::DesiredStatus::Running)
        .send()
        .await
        .expect("ListTasks")
        .task_arns()
        .to_vec();
    if arns.is_empty() {
        return Vec::new();
    }
    let out = ecs
        .describe_tasks()
        .cluster(cluster)
        .set_tasks(Some(arns.clone()))
        .send()
        .await
        .expect("DescribeTasks");
    let mut found: Vec<(String, String)> = out
        .tasks()
        .iter()
        .filter(|t| t.group() == Some(group))
        .map(|t| {
            (
                t.task_arn().unwrap_or_default().to_string(),
                t.container_instance_arn().unwrap_or_default().to_string(),
            )
        })
        .collect();
    found.sort_by_key(|(arn, _)| arns.iter().position(|a| a == arn));
    found
}

/// Stops task `arn` of `cluster` (moto gives back what it reserved at once).
pub async fn stop_task(ecs: &aws_sdk_ecs::Client, cluster: &str, arn: &str) {
    ecs.stop_task()
        .cluster(cluster)
        .task(arn)
        .send()
        .await
        .expect("StopTask");
}

/// Container instance `arn`'s `remainingResources`: (CPU units, MiB).
pub async fn remaining(ecs: &aws_sdk_ecs::Client, cluster: &str, arn: &str) -> (i32, i32) {
    let out = ecs
        .describe_container_instances()
        .cluster(cluster)
        .container_instances(arn)
        .send()
        .await
        .expect("DescribeContainerInstances");
    let ci = out
        .container_instances()
        .first()
        .expect("the container instance");
    let of = |name: &str| {
        ci.remaining_resources()
            .iter()
            .find(|r| r.name() == Some(name))
            .map_or(0, |r| r.integer_value())
    };
    (of("CPU"), of("MEMORY"))
}

/// What moto does not: the tasks of services `ecs_services` (ECS name, task definition, in
/// priority order) in `cluster` follow their `desiredCount`, as ECS's scheduler would have
/// them. Stops first (the newest tasks), then starts, placed by moto's `RunTask` (first fit
/// over the instances, by CPU and memory) in the service's task group. Returns, per service,
/// the tasks no instance could take.
pub async fn schedule(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    ecs_services: &[(String, String)],
) -> Vec<u32> {
    let mut counts = Vec::new();
    for (name, _) in ecs_services {
        let want = desired(ecs, cluster, name).await.unwrap_or(0) as usize;
        let have = tasks(ecs, cluster, &format!("service:{name}")).await;
        for (arn, _) in have.iter().skip(want) {
            stop_task(ecs, cluster, arn).await;
        }
        counts.push((want, have.len().min(want)));
    }
    let mut short = Vec::new();
    for ((name, td), (want, have)) in ecs_services.iter().zip(counts) {
        let missing = (want - have) as u32;
        let placed = if missing > 0 {
            run_tasks(ecs, cluster, td, &format!("service:{name}"), missing).await
        } else {
            Vec::new()
        };
        short.push(missing - placed.len() as u32);
    }
    short
}
