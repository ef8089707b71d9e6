//! Faults on the real Docker engine (issue 14): `microscaler run` killed with SIGKILL at
//! random moments while it scales, 20 times in a row, each time restarted with another demand.
//! After every restart: its first tick plans the right targets; then every service runs its
//! target with nothing pending, for three ticks in a row (as fast as the engine starts
//! containers, and a stop the killed daemon asked for may still end in the engine and be
//! replaced: the slowest restart is printed), no tick reports an error, every container of the
//! instance is running (no orphan left created or exited, no duplicate: the containers are
//! exactly the targets), and, sampled every 50 ms from the engine through the whole test,
//! never more replicas run than the capacity. The moments and demands come from a seeded
//! generator; the seed is printed (set `FAULT_SEED` to replay one).
//!
//! And, under a running control loop: a container killed behind microscaler's back, a demand
//! source's server (a real redis-server) killed, and the Docker engine (a private dockerd)
//! stopped and started while it scales.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use microscaler_testkit::{missing_service, unique, Leftovers, Rng};

mod common;
use common::daemon::{
    containers, containers_on, docker_missing, free_port, services, set_demand, Daemon,
};
use serde_json::Value;

const CAPACITY: u32 = 6;
const TOKEN: &str = "fault-token-0123456789";
const RESTARTS: u32 = 20;

#[test]
fn killed_while_scaling_twenty_times_nothing_is_lost_or_doubled() {
    if docker_missing() {
        return;
    }
    let mut rng = Rng::from_env("FAULT_SEED");
    let seed = rng.seed();
    let instance = unique("fault");
    let _cleanup = Leftovers::containers(&instance);
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = dir.path().join("faults.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            instance = "{instance}"
            tick = "1s"
            on_exit = "leave"
            [capacity]
            slots = {CAPACITY}
            [backend]
            type = "docker"
            [server]
            listen = "127.0.0.1:{port}"
            [[services]]
            name = "web"
            priority = 1
            stop_grace = "1s"
            [[services.triggers]]
            type = "manual"
            initial = 0
            [[services]]
            name = "batch"
            priority = 2
            remainder = true
            stop_grace = "1s"
            "#
        ),
    )
    .expect("write the configuration");
    let state = dir.path().join("state");

    // Never more running than the capacity, whatever happens, as the engine sees it.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicU32::new(0));
    let sampler = {
        let (stop, most, instance) = (stop.clone(), most.clone(), instance.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let running = containers(&instance)
                    .iter()
                    .filter(|c| c.1 == "running")
                    .count() as u32;
                most.fetch_max(running, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let mut slowest = 0;
    for restart in 0..=RESTARTS {
        let demand = rng.below(u64::from(CAPACITY) + 1);
        let daemon = Daemon::start(
            &config,
            &state,
            &["--set-demand".into(), format!("web={demand}")],
            TOKEN,
            None,
        );
        // From its first tick the restarted daemon plans the right targets, then the targets
        // run with nothing pending and stay so for two more ticks (a stop the killed daemon
        // asked for may still be under way in the engine: the container it stops counts as
        // running until it exits, and is then replaced). No tick reports an error.
        let mut lines: Vec<Value> = Vec::new();
        let mut stable = 0;
        let settled = loop {
            let line = daemon.tick();
            let now = services(&line);
            assert!(
                line["errors"].as_array().is_none_or(|e| e.is_empty()),
                "restart {restart} (seed {seed}): tick {} had errors: {line}",
                lines.len()
            );
            lines.push(line);
            let done = now
                .iter()
                .all(|(_, target, running, pending)| running == target && *pending == 0);
            stable = if done { stable + 1 } else { 0 };
            if stable == 3 {
                break now;
            }
            assert!(
                lines.len() < 30,
                "restart {restart} (seed {seed}): not settled in 30 ticks: {lines:?}"
            );
        };
        let first: Vec<(String, u64)> = services(&lines[0])
            .into_iter()
            .map(|s| (s.0, s.1))
            .collect();
        let last: Vec<(String, u64)> = settled.iter().map(|s| (s.0.clone(), s.1)).collect();
        assert_eq!(
            first, last,
            "restart {restart} (seed {seed}): the first tick planned the targets"
        );
        slowest = slowest.max(lines.len() - 3);
        let web = settled.iter().find(|s| s.0 == "web").map_or(0, |s| s.1);
        assert_eq!(web, demand, "restart {restart}: web's target is its demand");
        // The engine agrees: exactly the targets run, nothing else is left.
        let left = containers(&instance);
        for (name, target, ..) in &settled {
            let n = left.iter().filter(|c| &c.0 == name).count() as u64;
            assert_eq!(
                n, *target,
                "restart {restart}: {name}'s containers: {left:?}"
            );
        }
        assert!(
            left.iter().all(|c| c.1 == "running"),
            "restart {restart}: a container not running is left: {left:?}"
        );
        if restart == RESTARTS {
            break;
        }
        // Another demand, and a kill at a random moment of the change.
        let next = (demand + 1 + rng.below(u64::from(CAPACITY))) % (u64::from(CAPACITY) + 1);
        set_demand(port, TOKEN, "web", next);
        std::thread::sleep(Duration::from_millis(rng.below(1200)));
        daemon.kill();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("the sampler");
    let most = most.load(Ordering::Relaxed);
    assert!(
        most <= CAPACITY,
        "{most} replicas ran at once, over the capacity of {CAPACITY} (seed {seed})"
    );
    eprintln!(
        "{RESTARTS} kills while scaling; at most {most} replicas ran at once; settled at the latest {slowest} ticks after a restart"
    );
}

/// A private redis-server on `port` (no persistence), killed when dropped.
struct Redis(Child);

impl Redis {
    fn start(port: u16) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = Redis(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(r);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// `RPUSH jobs` `n` items, through redis-cli.
    fn push(port: u16, n: u32) {
        let items: Vec<String> = (0..n).map(|i| format!("job-{i}")).collect();
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "RPUSH", "jobs"])
            .args(&items)
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "{out:?}");
    }

    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A container killed behind microscaler's back (issue 14), on the real Docker engine under a
/// running control loop: the first tick after the kill sees one replica fewer and starts its
/// replacement, and once that change is done exactly the target runs again (the dead container
/// removed, nothing else left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_behind_its_back_is_replaced_by_the_next_tick() {
    use microscaler::control::Controller;
    use microscaler::wiring::build_backend;
    use microscaler_backends::Config;

    if docker_missing() {
        return;
    }
    let instance = unique("killed");
    let _cleanup = Leftovers::containers(&instance);
    let cfg = Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "500ms"
        on_exit = "stop"
        [capacity]
        slots = 3
        [backend]
        type = "docker"
        [[services]]
        name = "web"
        priority = 1
        stop_grace = "1s"
        [[services.triggers]]
        type = "manual"
        initial = 3
        "#
    ))
    .expect("config");
    let state = tempfile::tempdir().expect("state dir");
    let backend = build_backend(&cfg, state.path()).await.expect("backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let running = |instance: &str| {
        containers(instance)
            .iter()
            .filter(|c| c.1 == "running")
            .count()
    };
    for _ in 0..60 {
        let r = ctl.tick().await;
        if r.observed_of("web").running == 3 && ctl.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(running(&instance), 3, "web runs its 3 replicas");

    // One of them killed by someone else.
    let ids = Command::new("docker")
        .args(["ps", "-q", "--filter"])
        .arg(format!("label=io.microscaler.instance={instance}"))
        .output()
        .expect("docker ps");
    let victim = String::from_utf8_lossy(&ids.stdout)
        .lines()
        .next()
        .expect("a container")
        .to_string();
    let killed = Command::new("docker")
        .args(["kill", &victim])
        .output()
        .expect("docker kill");
    assert!(killed.status.success(), "{killed:?}");
    // Until the engine has seen it exit (`docker kill` returns once the signal is sent).
    let waited = Command::new("docker")
        .args(["wait", &victim])
        .output()
        .expect("docker wait");
    assert!(waited.status.success(), "{waited:?}");

    let r = ctl.tick().await;
    assert_eq!(
        r.observed_of("web").running,
        2,
        "the next tick sees the kill"
    );
    assert_eq!(r.target_of("web"), Some(3));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let mut started: u32 = r
        .executions
        .iter()
        .filter_map(|e| e.result.as_ref().ok())
        .map(|o| o.started)
        .sum();
    for e in ctl.drain(Duration::from_secs(30)).await {
        started += e.result.as_ref().map_or(0, |o| o.started);
    }
    assert_eq!(started, 1, "that tick started one replacement");
    let left = containers(&instance);
    assert_eq!(
        left.len(),
        3,
        "exactly the target, the dead one removed: {left:?}"
    );
    assert!(left.iter().all(|c| c.1 == "running"), "{left:?}");
    ctl.shutdown().await.expect("shutdown");
}

/// A demand source's server killed (issue 14): a worker pool scaled on the length of a Redis
/// list (a private redis-server, local processes as replicas). With the server gone, every tick
/// reports the trigger failing and the service is never scaled down (it holds its 3 replicas,
/// though the list it was reading is gone with the server); the server back with 1 item, the
/// service follows it on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_server_killed_holds_its_service_until_it_is_back() {
    use microscaler::control::{Controller, TickError};
    use microscaler::wiring::build_backend;
    use microscaler_backends::Config;

    let port = free_port();
    let Some(redis) = Redis::start(port) else {
        missing_service(
            "redis-server (Debian's redis-server package)",
            "it did not start",
        );
        return;
    };
    Redis::push(port, 3);
    let cfg = Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "200ms"
        on_exit = "stop"
        [capacity]
        slots = 8
        [backend]
        type = "process"
        [[services]]
        name = "worker"
        priority = 1
        [[services.triggers]]
        name = "queue"
        type = "redis_list"
        url = "redis://127.0.0.1:{port}"
        key = "jobs"
        timeout = "200ms"
        "#,
        instance = unique("srcfault"),
    ))
    .expect("config");
    let state = tempfile::tempdir().expect("state dir");
    let backend = build_backend(&cfg, state.path()).await.expect("backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let settle = async |ctl: &mut Controller<_>, want: u32| {
        for _ in 0..100 {
            let r = ctl.tick().await;
            if r.observed_of("worker").running == want && ctl.in_flight() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("worker never ran {want}");
    };
    settle(&mut ctl, 3).await;

    redis.kill();
    for i in 0..15 {
        let r = ctl.tick().await;
        assert!(
            r.errors
                .iter()
                .any(|e| matches!(e, TickError::Sample { trigger, .. } if &**trigger == "queue")),
            "tick {i} without its server: the trigger is reported failing: {:?}",
            r.errors
        );
        assert_eq!(
            r.target_of("worker"),
            Some(3),
            "tick {i}: never scaled down while missing"
        );
        assert_eq!(r.observed_of("worker").running, 3, "tick {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let _redis = Redis::start(port).expect("redis-server again on its port");
    Redis::push(port, 1);
    settle(&mut ctl, 1).await;
    let r = ctl.tick().await;
    assert!(r.errors.is_empty(), "recovered on its own: {:?}", r.errors);
    ctl.shutdown().await.expect("shutdown");
}

/// A private Docker engine (its own socket, data and exec roots, and containerd; no bridge, no
/// iptables), so a test can stop and start it without touching the engine the other tests use.
struct PrivateEngine {
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl PrivateEngine {
    fn socket(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.display())
    }

    fn start(dir: &std::path::Path) -> Result<PrivateEngine, String> {
        let mut e = PrivateEngine {
            dir: dir.to_path_buf(),
            child: None,
        };
        e.up()?;
        Ok(e)
    }

    fn up(&mut self) -> Result<(), String> {
        let d = &self.dir;
        let log = std::fs::File::create(d.join("dockerd.log")).map_err(|e| e.to_string())?;
        // In a network namespace of its own: a dockerd started with `--bridge none` deletes
        // the host's docker0 (libnetwork removes the default bridge it will not use), which
        // took the bridge from every other test's containers and from Swarm's tasks. Its
        // replicas need no network (the backend's default network is "none").
        let child = Command::new("unshare")
            .args(["--net", "--", "dockerd"])
            .arg("--host")
            .arg(self.socket())
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("dockerd: {e}"))?;
        self.child = Some(child);
        for _ in 0..300 {
            let ok = Command::new("docker")
                .args(["-H", &self.socket(), "version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "a private dockerd did not answer within 30 s (as root?): {}",
            std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
        ))
    }

    /// Stops the engine as `systemctl stop docker` does (SIGTERM, then its containers stop).
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// `(service, state)` of every container of `instance` on this engine.
    fn containers(&self, instance: &str) -> Vec<(String, String)> {
        containers_on(&["-H", &self.socket()], instance)
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args(["-H", &self.socket(), "ps", "-aq"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["-H", &self.socket(), "rm", "-f"])
                .args(&ids)
                .output();
        }
        self.down();
    }
}

/// The Docker engine stopped and started while microscaler scales (a private dockerd, so the
/// other tests keep theirs): while it is away every tick reports the observation failing and
/// is skipped (nothing decided on stale data, nothing dispatched); its containers stop with it;
/// once it is back the loop recovers on its own: the stopped containers are replaced, each
/// service runs its target, and nothing is left behind (every container of the instance runs,
/// as many as the targets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_stopped_and_started_while_scaling() {
    use microscaler::control::{Controller, TickError};
    use microscaler::wiring::build_backend;
    use microscaler_backends::Config;

    let dir = tempfile::tempdir().expect("dir");
    let mut engine = match PrivateEngine::start(dir.path()) {
        Ok(e) => e,
        Err(e) => {
            missing_service("a private dockerd (Debian's docker.io, run as root)", e);
            return;
        }
    };
    let instance = unique("engfault");
    let cfg = Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "200ms"
        on_exit = "stop"
        [capacity]
        slots = 6
        [backend]
        type = "docker"
        host = "{socket}"
        [[services]]
        name = "web"
        priority = 1
        stop_grace = "1s"
        [[services.triggers]]
        type = "manual"
        initial = 2
        [[services]]
        name = "batch"
        priority = 2
        remainder = true
        stop_grace = "1s"
        "#,
        socket = engine.socket(),
    ))
    .expect("config");
    let state = tempfile::tempdir().expect("state dir");
    let backend = build_backend(&cfg, state.path()).await.expect("backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let web = ctl.controls().manual_of("web").expect("web").clone();
    let settle = async |ctl: &mut Controller<_>, want: (u32, u32), what: &str| {
        let mut last = String::new();
        let mut failed = Vec::new();
        for _ in 0..300 {
            let r = ctl.tick().await;
            let have = (r.observed_of("web").running, r.observed_of("batch").running);
            if have == want && ctl.in_flight() == 0 && r.errors.is_empty() {
                return;
            }
            for e in &r.executions {
                if e.result.is_err() || e.result.as_ref().is_ok_and(|o| !o.failures.is_empty()) {
                    failed.push(format!("{e:?}"));
                }
            }
            let plan = r.plan.as_ref().map(|p| {
                p.services
                    .iter()
                    .map(|s| format!("{} {} {:?}: {}", s.service, s.target, s.bound, &*s.reason))
                    .collect::<Vec<_>>()
            });
            last = format!(
                "{have:?}, errors {:?}, in flight {}, failed changes {failed:?}, plan {plan:?}",
                r.errors,
                ctl.in_flight()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{what}: never settled at {want:?}; last tick: {last}");
    };
    settle(&mut ctl, (2, 4), "before").await;

    // Demand rises, the change starts, and the engine goes away under it.
    web.set(5.0).expect("set demand");
    let r = ctl.tick().await;
    assert_eq!(r.target_of("web"), Some(5));
    engine.down();
    for i in 0..5 {
        let r = ctl.tick().await;
        assert!(
            r.errors
                .iter()
                .any(|e| matches!(e, TickError::Observe { .. })),
            "tick {i} without the engine reports the observation failing: {:?}",
            r.errors
        );
        assert!(
            r.plan.is_none(),
            "tick {i} without the engine decides nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    engine.up().expect("the engine back");
    settle(&mut ctl, (5, 1), "after the engine came back").await;
    let left = engine.containers(&instance);
    assert_eq!(left.len(), 6, "as many containers as the targets: {left:?}");
    assert!(
        left.iter().all(|c| c.1 == "running"),
        "nothing left behind: {left:?}"
    );
    ctl.shutdown().await.expect("shutdown");
    assert!(
        engine.containers(&instance).is_empty(),
        "on_exit = \"stop\" removed them"
    );
}
