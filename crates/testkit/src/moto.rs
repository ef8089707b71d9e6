//! moto server (an AWS emulator from PyPI, started on 127.0.0.1:5000 by
//! scripts/source-services.sh) for the ECS tests: fake credentials, clients, and clusters of
//! container instances.
//!
//! What moto does not simulate, and the tests therefore cannot prove: it starts no task for a
//! service (`runningCount` jumps to `desiredCount` on `UpdateService`, `pendingCount` is 0), so
//! placement, capacity on the instances and tasks stopping are not exercised; it emits no
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
    let td = ecs
        .register_task_definition()
        .family(name)
        .container_definitions(
            aws_sdk_ecs::types::ContainerDefinition::builder()
                .name(name)
                .image("busybox")
                .memory(64)
                .build(),
        )
        .send()
        .await
        .expect("RegisterTaskDefinition")
        .task_definition()
        .and_then(|t| t.task_definition_arn())
        .expect("task definition ARN")
        .to_string();
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
