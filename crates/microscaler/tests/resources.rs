//! Capacity in CPU and memory on the real Docker engine: two services of different sizes on a
//! host whose allocatable is configured (`[backend] allocatable`, 1 CPU and 1 GiB). At every
//! tick the plan stays within it, and once each change is done so do the containers; the plan
//! follows priority 1's demand and the remainder fills what fits; every container carries its
//! service's limits (NanoCpus, Memory).

use std::process::Command;
use std::time::{Duration, Instant};

use microscaler::control::Controller;
use microscaler::wiring::build_backend;
use microscaler_backends::Config;
use microscaler_testkit::{instance_ids, missing_service, unique, Leftovers};

const MIB: i64 = 1024 * 1024;

/// `(service, NanoCpus, Memory)` of every container of `instance` that is not gone.
fn containers(instance: &str) -> Vec<(String, i64, i64)> {
    let ids = instance_ids(&["ps", "-aq"], instance);
    if ids.is_empty() {
        return Vec::new();
    }
    let out = Command::new("docker")
        .arg("inspect")
        .args(&ids)
        .args([
            "--format",
            "{{index .Config.Labels \"io.microscaler.service\"}} {{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.State.Status}}",
        ])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            // Removed between the listing and the inspection, or exited: holds nothing.
            if f.len() < 4 || f[3] == "exited" || f[3] == "dead" {
                return None;
            }
            Some((f[0].to_string(), f[1].parse().ok()?, f[2].parse().ok()?))
        })
        .collect()
}

/// Two services on `backend` (its `[backend]` keys), counted in CPU and memory: `web`
/// (priority 1, manual demand from `initial`) and the remainder `batch`, each of its
/// `(cpu, memory)`.
fn two_services(
    instance: &str,
    backend: &str,
    web: (&str, &str),
    batch: (&str, &str),
    initial: u32,
) -> Config {
    Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "200ms"
        on_exit = "stop"
        [capacity]
        resources = true
        [backend]
        {backend}
        [[services]]
        name = "web"
        priority = 1
        stop_grace = "1s"
        resources = {{ cpu = "{}", memory = "{}" }}
        [[services.triggers]]
        type = "manual"
        initial = {initial}
        [[services]]
        name = "batch"
        priority = 2
        remainder = true
        stop_grace = "1s"
        resources = {{ cpu = "{}", memory = "{}" }}
        "#,
        web.0, web.1, batch.0, batch.1,
    ))
    .expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sizes_fit_a_configured_allocatable_and_carry_their_limits() {
    let instance = unique("res");
    let _cleanup = Leftovers::containers(&instance);
    let cfg = two_services(
        &instance,
        "type = \"docker\"\nallocatable = { cpu = \"1\", memory = \"1Gi\" }",
        ("250m", "128Mi"),
        ("500m", "256Mi"),
        3,
    );
    let backend = match build_backend(&cfg, &std::env::temp_dir()).await {
        Ok(b) => b,
        Err(e) => {
            missing_service("the Docker engine", e);
            return;
        }
    };
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let web = ctl.controls().manual_of("web").expect("web").clone();

    // Every container carries its service's limits; once a change is done, what the
    // containers ask for is within 1 CPU and 1 GiB.
    let check = |instance: &str, settled: bool| -> (usize, usize) {
        let cs = containers(instance);
        for (svc, nano, mem) in &cs {
            let want = match svc.as_str() {
                "web" => (250_000_000, 128 * MIB),
                "batch" => (500_000_000, 256 * MIB),
                other => panic!("unknown service {other}"),
            };
            assert_eq!((*nano, *mem), want, "{svc}'s limits");
        }
        if settled {
            let cpu: i64 = cs.iter().map(|c| c.1).sum();
            let memory: i64 = cs.iter().map(|c| c.2).sum();
            assert!(cpu <= 1_000_000_000, "over 1 CPU: {cs:?}");
            assert!(memory <= 1024 * MIB, "over 1 GiB: {cs:?}");
        }
        let n = |s: &str| cs.iter().filter(|c| c.0 == s).count();
        (n("web"), n("batch"))
    };
    // The plan never asks for more than the allocatable, at any tick. (While a stop runs past
    // half a tick the scale-ups go ahead, so the containers may overlap for that long: see
    // docs/notes.md.)
    let converge = async |ctl: &mut Controller<_>, want: (usize, usize), what: &str| {
        let t0 = Instant::now();
        loop {
            let r = ctl.tick().await;
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            let plan = r.plan.as_ref().expect("plan");
            let (web, batch) = (plan.target("web") as i64, plan.target("batch") as i64);
            assert!(web * 250 + batch * 500 <= 1000, "plan over 1 CPU: {plan:?}");
            assert!(web * 128 + batch * 256 <= 1024, "plan over 1 GiB: {plan:?}");
            let idle = ctl.in_flight() == 0
                && r.observed_of("web").pending + r.observed_of("batch").pending == 0;
            let have = check(&instance, idle);
            if have == want && idle {
                return r;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{what}: {have:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // web 3 x 0.25 CPU; batch's 0.5 CPU does not fit in the 0.25 left.
    let r = converge(&mut ctl, (3, 0), "web at 3").await;
    let plan = r.plan.expect("plan");
    assert_eq!(plan.target("batch"), 0, "{plan:?}");
    // web down to 1: batch fits once (0.25 + 0.5), not twice.
    web.set(1.0).expect("set web's demand");
    converge(&mut ctl, (1, 1), "web at 1, batch at 1").await;
    // web back to 3: batch gives its room up first.
    web.set(3.0).expect("set web's demand");
    converge(&mut ctl, (3, 0), "web at 3 again").await;
    ctl.shutdown().await.expect("shutdown");
    assert!(containers(&instance).is_empty());
}

/// Removes the Swarm service of this name when dropped, so a failed test leaves it behind no
/// more than a passed one.
struct RemoveService(String);

impl Drop for RemoveService {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["service", "rm", &self.0])
            .output();
    }
}

/// `docker <args>`'s output, trimmed; panics when it fails.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The same on the real single-node Swarm, whose node has the machine's CPUs: the tasks are
/// sized in eighths of them (web two eighths, the remainder batch one), so the plan never reserves
/// more than the node has; each Swarm service's tasks reserve, and are limited to, their
/// service's resources (what Swarm's scheduler places them by); web follows its demand and batch
/// fills what is left, once the stops have converged. A Swarm service that is not microscaler's
/// reserves two eighths and 256 MiB on the node: while it runs the host is the node less that,
/// and the plan fits beside it; once it is removed its room is planned again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_tasks_reserve_their_resources_within_the_nodes() {
    let node = Command::new("docker")
        .args([
            "node",
            "inspect",
            "self",
            "--format",
            "{{.ID}} {{.Description.Resources.NanoCPUs}} {{.Description.Resources.MemoryBytes}}",
        ])
        .output();
    let (node, nano, memory): (String, i64, i64) = match node {
        Ok(o) if o.status.success() => {
            let out = String::from_utf8_lossy(&o.stdout);
            let f: Vec<&str> = out.split_whitespace().collect();
            let number = |s: &str| s.parse().expect("the node's resources");
            (f[0].to_string(), number(f[1]), number(f[2]))
        }
        other => {
            missing_service("Docker Swarm (docker swarm init)", format!("{other:?}"));
            return;
        }
    };
    let eighth = nano / 8 / 1_000_000; // millicores
    let instance = unique("sres");
    let _cleanup = Leftovers::swarm_services(&instance);
    let foreign = RemoveService(format!("{instance}-foreign"));
    let cfg = two_services(
        &instance,
        "type = \"swarm\"",
        (&format!("{}m", 2 * eighth), "64Mi"),
        (&format!("{eighth}m"), "32Mi"),
        1,
    );
    let backend = build_backend(&cfg, &std::env::temp_dir())
        .await
        .expect("the swarm backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let web = ctl.controls().manual_of("web").expect("web").clone();

    // What each Swarm service's tasks reserve and are limited to.
    for (service, cpu, memory) in [("web", 2 * eighth, 64 * MIB), ("batch", eighth, 32 * MIB)] {
        let out = Command::new("docker")
            .args([
                "service",
                "inspect",
                &format!("{instance}-{service}"),
                "--format",
                "{{json .Spec.TaskTemplate.Resources}}",
            ])
            .output()
            .expect("docker service inspect");
        let r: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("the task template's resources");
        for part in ["Reservations", "Limits"] {
            assert_eq!(
                (
                    r[part]["NanoCPUs"].as_i64(),
                    r[part]["MemoryBytes"].as_i64()
                ),
                (Some(cpu * 1_000_000), Some(memory)),
                "{service}'s {part}: {r}"
            );
        }
    }

    // Another Swarm service, without microscaler's labels, on the image web runs (no pull),
    // started before the first tick so that it finds room.
    let image = docker(&[
        "service",
        "inspect",
        &format!("{instance}-web"),
        "--format",
        "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
    ]);
    docker(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &foreign.0,
        "--reserve-cpu",
        &format!("{}", (2 * eighth) as f64 / 1000.0),
        "--reserve-memory",
        "256m",
        "--stop-grace-period",
        "1s",
        &image,
    ]);
    let t0 = Instant::now();
    while docker(&[
        "service",
        "ls",
        "--filter",
        &format!("name={}", foreign.0),
        "--format",
        "{{.Replicas}}",
    ]) != "1/1"
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the foreign task does not run"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let less_foreign = (nano - 2 * eighth * 1_000_000, memory - 256 * MIB);

    // Until `want` runs and nothing is pending: the plan never reserves more than the node
    // less the foreign service's reservation while it runs (`foreign`), when the host is that
    // at every tick; without it, until the host is the whole node again.
    let mut converge = async |want: (u32, u32), foreign: bool| {
        let t0 = Instant::now();
        loop {
            let r = ctl.tick().await;
            let plan = r.plan.as_ref().expect("plan");
            let eighths = 2 * plan.target("web") + plan.target("batch");
            let room = if foreign { 6 } else { 8 };
            assert!(
                eighths <= room,
                "the plan reserves more than the node has (foreign service: {foreign}): {plan:?}"
            );
            let observed = r.observed.as_ref().expect("observed");
            let host = observed
                .hosts
                .iter()
                .find(|h| h.id.0 == node)
                .expect("the node's host");
            let have = (
                host.cpus.map(|c| (c * 1e9).round() as i64),
                host.memory_bytes.map(|m| m as i64),
            );
            if foreign {
                assert_eq!(
                    have,
                    (Some(less_foreign.0), Some(less_foreign.1)),
                    "the host is the node less the foreign reservation"
                );
            }
            let whole = have == (Some(nano), Some(memory));
            let (o1, o2) = (r.observed_of("web"), r.observed_of("batch"));
            if (o1.running, o2.running) == want
                && o1.pending + o2.pending == 0
                && (foreign || whole)
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "{want:?} not reached: web {o1:?}, batch {o2:?}, host {have:?}, errors {:?}",
                r.errors
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    converge((1, 4), true).await;
    web.set(3.0).expect("set web's demand");
    converge((3, 0), true).await;
    web.set(0.0).expect("set web's demand");
    converge((0, 6), true).await;
    // The foreign service goes: its room is planned again.
    docker(&["service", "rm", &foreign.0]);
    converge((0, 8), false).await;
    web.set(1.0).expect("set web's demand");
    converge((1, 6), false).await;
    ctl.shutdown().await.expect("shutdown");
}

/// The same with local processes, on a machine whose allocatable is configured (1 CPU,
/// 1 GiB): the plan never counts more, priority 1 follows its demand and the remainder fills
/// what fits, in the processes that run (processes are counted, not limited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_fit_a_configured_allocatable() {
    let state = tempfile::tempdir().expect("state dir");
    let cfg = two_services(
        &unique("pres"),
        "type = \"process\"\nallocatable = { cpu = \"1\", memory = \"1Gi\" }",
        ("250m", "128Mi"),
        ("250m", "512Mi"),
        2,
    );
    let backend = build_backend(&cfg, state.path())
        .await
        .expect("process backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let web = ctl.controls().manual_of("web").expect("web").clone();
    let mut converge = async |want: (u32, u32)| {
        let t0 = Instant::now();
        loop {
            let r = ctl.tick().await;
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            let plan = r.plan.as_ref().expect("plan");
            let (w, b) = (plan.target("web"), plan.target("batch"));
            assert!(w * 250 + b * 250 <= 1000, "plan over 1 CPU: {plan:?}");
            assert!(w * 128 + b * 512 <= 1024, "plan over 1 GiB: {plan:?}");
            let have = (r.observed_of("web").running, r.observed_of("batch").running);
            if have == want && ctl.in_flight() == 0 {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{want:?}: {have:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // web 2 x (0.25 CPU, 128 MiB); batch is bound by memory: 768 MiB left, one of 512 MiB.
    converge((2, 1)).await;
    // web 4: the CPU is all web's; batch gives its room up.
    web.set(4.0).expect("set web's demand");
    converge((4, 0)).await;
    // web 0: batch by memory, 2 of 512 MiB (CPU would allow 4).
    web.set(0.0).expect("set web's demand");
    converge((0, 2)).await;
    ctl.shutdown().await.expect("shutdown");
}
