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
use microscaler_testkit::{missing_service, unique};

const MIB: i64 = 1024 * 1024;

/// The ids that `docker <list> --filter label=io.microscaler.instance=<instance>` prints.
fn ids_of(list: &[&str], instance: &str) -> Vec<String> {
    let filter = format!("label=io.microscaler.instance={instance}");
    Command::new("docker")
        .args(list)
        .args(["--filter", &filter])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `(service, NanoCpus, Memory)` of every container of `instance` that is not gone.
fn containers(instance: &str) -> Vec<(String, i64, i64)> {
    let ids = ids_of(&["ps", "-aq"], instance);
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

/// Removes an instance's containers (`docker ps -aq`, `docker rm -f`) or Swarm services
/// (`docker service ls -q`, `docker service rm`) when dropped.
struct Cleanup {
    instance: String,
    list: &'static [&'static str],
    remove: &'static [&'static str],
}

impl Cleanup {
    fn containers(instance: &str) -> Cleanup {
        Cleanup {
            instance: instance.to_string(),
            list: &["ps", "-aq"],
            remove: &["rm", "-f"],
        }
    }

    fn swarm_services(instance: &str) -> Cleanup {
        Cleanup {
            instance: instance.to_string(),
            list: &["service", "ls", "-q"],
            remove: &["service", "rm"],
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = ids_of(self.list, &self.instance);
        if !ids.is_empty() {
            let _ = Command::new("docker").args(self.remove).args(&ids).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sizes_fit_a_configured_allocatable_and_carry_their_limits() {
    let instance = unique("res");
    let _cleanup = Cleanup::containers(&instance);
    let cfg = Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "200ms"
        on_exit = "stop"
        [capacity]
        resources = true
        [backend]
        type = "docker"
        allocatable = {{ cpu = "1", memory = "1Gi" }}
        [[services]]
        name = "web"
        priority = 1
        stop_grace = "1s"
        resources = {{ cpu = "250m", memory = "128Mi" }}
        [[services.triggers]]
        type = "manual"
        initial = 3
        [[services]]
        name = "batch"
        priority = 2
        remainder = true
        stop_grace = "1s"
        resources = {{ cpu = "500m", memory = "256Mi" }}
        "#
    ))
    .expect("config");
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

/// The same on the real single-node Swarm, whose node has the machine's CPUs: the tasks are
/// sized in eighths of them (p1 two eighths, the remainder p2 one), so the plan never reserves
/// more than the node has; each Swarm service's tasks reserve, and are limited to, their
/// service's resources (what Swarm's scheduler places them by); p1 follows its demand and p2
/// fills what is left, once the stops have converged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_tasks_reserve_their_resources_within_the_nodes() {
    let node = Command::new("docker")
        .args([
            "node",
            "inspect",
            "self",
            "--format",
            "{{.Description.Resources.NanoCPUs}}",
        ])
        .output();
    let nano: i64 = match node {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .expect("the node's NanoCPUs"),
        other => {
            missing_service("Docker Swarm (docker swarm init)", format!("{other:?}"));
            return;
        }
    };
    let eighth = nano / 8 / 1_000_000; // millicores
    let instance = unique("sres");
    let _cleanup = Cleanup::swarm_services(&instance);
    let cfg = Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "200ms"
        on_exit = "stop"
        [capacity]
        resources = true
        [backend]
        type = "swarm"
        [[services]]
        name = "p1"
        priority = 1
        stop_grace = "1s"
        resources = {{ cpu = "{p1}m", memory = "64Mi" }}
        [[services.triggers]]
        type = "manual"
        initial = 1
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        stop_grace = "1s"
        resources = {{ cpu = "{eighth}m", memory = "32Mi" }}
        "#,
        p1 = 2 * eighth,
    ))
    .expect("config");
    let backend = build_backend(&cfg, &std::env::temp_dir())
        .await
        .expect("the swarm backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let p1 = ctl.controls().manual_of("p1").expect("p1").clone();

    // What each Swarm service's tasks reserve and are limited to.
    for (service, cpu, memory) in [("p1", 2 * eighth, 64 * MIB), ("p2", eighth, 32 * MIB)] {
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

    let mut converge = async |want: (u32, u32)| {
        let t0 = Instant::now();
        loop {
            let r = ctl.tick().await;
            let plan = r.plan.as_ref().expect("plan");
            let eighths = 2 * plan.target("p1") + plan.target("p2");
            assert!(
                eighths <= 8,
                "the plan reserves more than the node: {plan:?}"
            );
            let (o1, o2) = (r.observed_of("p1"), r.observed_of("p2"));
            if (o1.running, o2.running) == want && o1.pending + o2.pending == 0 {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "{want:?} not reached: p1 {o1:?}, p2 {o2:?}, errors {:?}",
                r.errors
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    converge((1, 6)).await;
    p1.set(3.0).expect("set p1's demand");
    converge((3, 2)).await;
    p1.set(0.0).expect("set p1's demand");
    converge((0, 8)).await;
    ctl.shutdown().await.expect("shutdown");
}
