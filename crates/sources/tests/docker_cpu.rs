//! CPU use of a service's containers against the real Docker engine (started by
//! scripts/test.sh). Containers run Debian's static busybox (imported as a one-file image, no
//! registry) with no network; one of another instance with the same service name must never
//! be counted.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{dead_port, missing_service, unique};
use microscaler_sources::{
    AnySource, CpuAggregate, DockerCpuConfig, NetOptions, Source, SourceConfig, SourceError,
};
use microscaler_testkit::busybox_image;

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Removes the test's containers however the test ends.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = docker(&["rm", "-f", id]);
        }
    }
}

fn run(instance: &str, service: &str, script: &str) -> String {
    docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        &format!("io.microscaler.instance={instance}"),
        "--label",
        &format!("io.microscaler.service={service}"),
        busybox_image(),
        "/bin/busybox",
        "sh",
        "-c",
        script,
    ])
    .unwrap()
}

fn source(instance: &str, service: &str, aggregate: CpuAggregate) -> AnySource {
    AnySource::build_in(
        &SourceConfig::DockerCpu(DockerCpuConfig {
            docker_host: None,
            service: None,
            aggregate,
            net: NetOptions {
                timeout: Duration::from_secs(10),
                required: true,
            },
        }),
        9,
        1,
        instance,
        service,
    )
    .unwrap()
}

#[tokio::test]
async fn cpu_of_the_service_own_containers_only() {
    if let Err(e) = docker(&["info"]) {
        if missing_service("Docker engine", e) {
            return;
        }
    }
    busybox_image();
    let instance = unique("cpu");
    let other = unique("cpu-other");
    let busy = "trap 'exit 0' TERM; while :; do :; done";
    let idle = "trap 'exit 0' TERM; sleep 100000 & wait";
    let mut c = Cleanup(Vec::new());
    c.0.push(run(&instance, "burn", busy));
    c.0.push(run(&instance, "idle", idle));
    c.0.push(run(&other, "idle", busy)); // same service name, another instance

    let mut burn = source(&instance, "burn", CpuAggregate::Average);
    burn.check().await.unwrap();
    let v = burn.sample(Duration::ZERO).await.unwrap();
    // A busy loop uses a whole core on an idle machine; tests running beside it on a small CI
    // machine may take some, so the bound is loose.
    assert!(v > 15.0, "a busy loop uses a core, got {v}%");

    let mut quiet = source(&instance, "idle", CpuAggregate::Sum);
    let v = quiet.sample(Duration::ZERO).await.unwrap();
    assert!(
        v < 10.0,
        "an idle container (the busy one of another instance must not count), got {v}%"
    );

    // No container of the service: a failure, never 0.
    let mut none = source(&instance, "absent", CpuAggregate::Average);
    let e = none.sample(Duration::ZERO).await.unwrap_err();
    assert!(matches!(e, SourceError::Garbage { .. }), "{e:?}");
}

#[tokio::test]
async fn unreachable_engine_is_named() {
    let mut s = AnySource::build_in(
        &SourceConfig::DockerCpu(DockerCpuConfig {
            docker_host: Some("unix:///nonexistent/docker.sock".into()),
            service: None,
            aggregate: CpuAggregate::Average,
            net: NetOptions::default(),
        }),
        9,
        1,
        "i",
        "s",
    )
    .unwrap();
    let e = s.check().await.unwrap_err().to_string();
    assert!(e.contains("unix:///nonexistent/docker.sock"), "{e}");
    assert!(e.contains("is dockerd running?"), "{e}");
}

/// The source contract suite against the real engine (one idle container of the service) and
/// an engine address where nothing listens.
#[tokio::test]
async fn source_contract() {
    if let Err(e) = docker(&["info"]) {
        if missing_service("Docker engine", e) {
            return;
        }
    }
    busybox_image();
    let instance = unique("cpu-contract");
    let _c = Cleanup(vec![run(
        &instance,
        "idle",
        "trap 'exit 0' TERM; sleep 100000 & wait",
    )]);
    let config = |docker_host: Option<String>| {
        SourceConfig::DockerCpu(DockerCpuConfig {
            docker_host,
            service: None,
            aggregate: CpuAggregate::Sum,
            net: NetOptions {
                timeout: Duration::from_secs(5),
                required: true,
            },
        })
    };
    let port = dead_port();
    microscaler_testkit::source_contract::run_in(
        &config(None),
        &config(Some(format!("tcp://127.0.0.1:{port}"))),
        &format!("127.0.0.1:{port}"),
        &instance,
        "idle",
    )
    .await;
}
