//! microscaler's test kit.
//!
//! - [`sim`]: a simulated orchestrator, in memory, that implements the backend contract with
//!   configurable start and stop latency, start failures, conflicts, an unreachable
//!   orchestrator, hosts that join and leave, replicas that ignore SIGTERM and replicas killed
//!   behind microscaler's back. The control loop's tests and benchmarks run on it; the real
//!   backends are tested against the real engines in their own crate.
//! - [`contract`]: the backend contract suite: the same cases run against every backend
//!   (docker, swarm, process, kubernetes, nomad, marathon and the simulated orchestrator).
//! - [`source_contract`]: the source contract suite, run by the network sources' tests
//!   against their real servers.
//! - [`nomad`]: a fake of Nomad's HTTP API (jobs, scaling, evaluations, deployments, nodes,
//!   blocking queries), for the Nomad backend's tests.
//! - [`marathon`]: a fake of Marathon's REST API (apps, tasks on agents, deployment locks,
//!   credentials), for the Marathon backend's tests.
//! - [`moto`] (feature `ecs`): moto server's clients, clusters of container instances and
//!   ECS services, for the ECS backend's tests (and what moto does not simulate).
//! - [`fault_proxy`]: an HTTP proxy in front of a real API that injects AWS throttling and
//!   5xx per operation, and counts the calls.
//! - [`tls`]: a real TLS server behind a private CA, for the HTTP backends' `ca_file`.
//! - [`kube_rig`] (feature `kubernetes`): helpers for tests against the Kubernetes test rig.
//! - The helpers the test crates shared by copy before: [`missing_service`], [`unique`],
//!   [`wait_for`], [`poll_until`], [`service`], and the fault tests' seeded [`Rng`].
#![deny(missing_docs)]

use std::time::Duration;

use microscaler_backends::{Backend, Observation, RunSpec, Service, Workload};
use microscaler_core::{Priority, ServiceKind, ServiceName};

pub mod contract;
pub mod fault_proxy;
#[cfg(feature = "kubernetes")]
pub mod kube_rig;
pub mod marathon;
#[cfg(feature = "ecs")]
pub mod moto;
pub mod nomad;
pub mod sim;
pub mod socket_proxy;
pub mod source_contract;
pub mod tls;

/// A small seeded generator (SplitMix64) for tests that pick faults, moments and demands at
/// random and must be replayable.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the environment variable `var` when it holds a number, else from the clock;
    /// the seed is printed (`var=seed`) so that a failure can be replayed.
    pub fn from_env(var: &str) -> Rng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{var}={seed}");
        Rng(seed)
    }

    /// The seed it started from.
    pub fn seed(&self) -> u64 {
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// Runs the future `f` makes to its end on a runtime of its own, in a thread of its own: for
/// clean-ups in `Drop`, which cannot await and may run after the test's runtime is gone.
pub fn block_on_own_runtime<F>(f: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f());
    })
    .join();
}

/// Under `CI=true` a missing service (a server a test needs) fails the test; elsewhere the
/// test says why it is skipped and returns `true`. A test never passes by skipping in CI.
pub fn missing_service(what: &str, err: impl std::fmt::Display) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{what} is required under CI=true but is not available: {err}");
    }
    eprintln!("SKIPPED: {what} not available ({err}); run the test command (scripts/test.sh) as root to start it");
    true
}

/// A redis-server of the test's own on a free loopback port, killed on drop, so a test can
/// change server settings without touching the shared server on 6379.
pub struct RedisServer {
    child: std::process::Child,
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Debian's `redis-server` with `notify-keyspace-events` set to `events` (no
/// persistence) and waits (5 s at most) until it listens. `None` when the binary is missing
/// and the test may skip ([`missing_service`]: under `CI=true` that fails instead).
pub fn redis_server(events: &str) -> Option<RedisServer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = match std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--notify-keyspace-events", events])
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            missing_service("redis-server (Debian's redis-server package)", e);
            return None;
        }
    };
    let server = RedisServer {
        child,
        url: format!("redis://127.0.0.1:{port}"),
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("redis-server did not listen on {port} within 5 s");
}

/// An image of Debian's static busybox (`/bin/busybox`, from busybox-static, which
/// scripts/services.sh installs), imported into the local Docker engine once as a one-file
/// image (no registry); its name. For containers that run a shell or a command that ignores
/// SIGTERM as PID 1 (`/bin/busybox sleep 3600`).
pub fn busybox_image() -> &'static str {
    const IMAGE: &str = "microscaler-test-busybox:1";
    let docker = |args: &[&str]| {
        std::process::Command::new("docker")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if docker(&["image", "inspect", IMAGE]) {
        return IMAGE;
    }
    let dir = std::env::temp_dir().join(unique("ms-busybox"));
    std::fs::create_dir_all(dir.join("bin")).expect("a temporary directory");
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .expect("/bin/busybox (Debian's busybox-static, installed by scripts/services.sh)");
    let imported = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {} -c . | docker import - {IMAGE} >/dev/null",
            dir.display()
        ))
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        imported.is_ok_and(|s| s.success()),
        "docker import of busybox failed"
    );
    IMAGE
}

/// A name unique to this test run, valid as an instance or service name.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{:x}-{}",
        std::process::id(),
        nanos & 0xfffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A triggered service (with no trigger: tests scale it by hand) running the built-in replica,
/// or `command` when it is not empty.
pub fn service(name: &str, command: Vec<String>) -> Service {
    Service {
        name: ServiceName::try_new(name).expect("a valid service name"),
        priority: Priority::HIGHEST,
        min: 0,
        max: 100,
        max_step: None,
        kind: ServiceKind::Triggered(vec![]),
        workload: Workload::Managed(RunSpec {
            image: None,
            command,
            env: Default::default(),
            init: false,
        }),
        stop_grace: Duration::from_secs(5),
        pool: Default::default(),
        resources: None,
    }
}

/// Polls `observe` until `check` holds or `timeout` passes (tokio's clock: virtual under a
/// paused clock, wall-clock otherwise); returns the last observation. Observe errors are
/// retried until the timeout.
pub async fn wait_for<B: Backend>(
    backend: &B,
    timeout: Duration,
    check: impl Fn(&Observation) -> bool,
) -> Observation {
    let start = tokio::time::Instant::now();
    loop {
        let obs = backend.observe().await;
        if let Ok(obs) = &obs {
            if check(obs) {
                return obs.clone();
            }
        }
        if start.elapsed() > timeout {
            return obs.unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids `docker <list> --filter label=io.microscaler.instance=<instance>` prints (through the
/// docker CLI; none when it fails).
pub fn instance_ids(list: &[&str], instance: &str) -> Vec<String> {
    let filter = format!("label=io.microscaler.instance={instance}");
    std::process::Command::new("docker")
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

/// Removes an instance's containers ([`Leftovers::containers`]) or Swarm services
/// ([`Leftovers::swarm_services`]) when dropped, so a test leaves nothing behind, passed or
/// not.
pub struct Leftovers {
    instance: String,
    list: &'static [&'static str],
    remove: &'static [&'static str],
}

impl Leftovers {
    /// The instance's containers (`docker ps -aq`, `docker rm -f`).
    pub fn containers(instance: &str) -> Leftovers {
        Leftovers {
            instance: instance.to_string(),
            list: &["ps", "-aq"],
            remove: &["rm", "-f"],
        }
    }

    /// The instance's Swarm services (`docker service ls -q`, `docker service rm`).
    pub fn swarm_services(instance: &str) -> Leftovers {
        Leftovers {
            instance: instance.to_string(),
            list: &["service", "ls", "-q"],
            remove: &["service", "rm"],
        }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let ids = instance_ids(self.list, &self.instance);
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(self.remove)
                .args(&ids)
                .output();
        }
    }
}

/// A start that must succeed when `fits`, and otherwise fail with an error that says every one
/// of `says`.
pub fn assert_start<E: std::fmt::Display>(result: Result<(), E>, fits: bool, says: &[&str]) {
    match result {
        Ok(()) => assert!(fits, "started, but it should not have"),
        Err(e) => {
            let e = e.to_string();
            assert!(!fits, "{e}");
            for s in says {
                assert!(e.contains(s), "{e:?} does not say {s:?}");
            }
        }
    }
}

/// Reads `value` every 50 ms until it gives `want` or 5 s pass; returns the last reading.
pub async fn poll_until<T: PartialEq>(mut value: impl FnMut() -> T, want: T) -> T {
    let mut got = value();
    for _ in 0..100 {
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = value();
    }
    got
}

/// Running replicas of `service` in `obs`.
pub fn running(obs: &Observation, service: &Service) -> u32 {
    obs.services.get(&service.name).map_or(0, |s| s.running)
}
