//! High availability off Kubernetes (issue 14): two `microscaler run` of one instance share an
//! etcd lease (a real etcd, Debian's etcd-server, private to the test) on the real Docker
//! engine, and only the holder acts.
//!
//! - Exactly one leads; the other's ticks say it is not leading, and the replicas are the
//!   leader's plan.
//! - The leader frozen with SIGSTOP: the other takes over within the lease's TTL and acts on
//!   its own demand; the frozen one, thawed, must not act on its stale leadership (it has a
//!   lower demand: had it acted, the replicas would drop), and says it is not leading. The
//!   failover time is printed.
//! - etcd frozen under the new leader: it stops acting within its renew deadline (before the
//!   lease could expire), and leads again once etcd is back.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use microscaler_testkit::{missing_service, unique, Leftovers};
use serde_json::Value;

mod common;
use common::daemon::{containers, docker_missing, free_port, set_demand, Daemon};

const TOKEN: &str = "ha-test-token-0123456789";
const TTL: Duration = Duration::from_secs(2);
/// The default renew deadline: two thirds of the TTL.
const RENEW_DEADLINE: Duration = Duration::from_millis(1333);

/// A private etcd (Debian's etcd-server) on loopback, killed when dropped.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Option<Etcd> {
        let dir = tempfile::tempdir().ok()?;
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "ha-test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("ha-test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let etcd = Etcd {
            child,
            url,
            _dir: dir,
        };
        for _ in 0..100 {
            if etcd.holder().is_some() {
                return Some(etcd);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Who holds the election's key: `Some("")` when no one does, `None` when etcd does not
    /// answer.
    fn holder(&self) -> Option<String> {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "2", "-d"])
            .arg(r#"{"key":"L21pY3Jvc2NhbGVyL2hhLWxlYWRlcg=="}"#) // "/microscaler/ha-leader"
            .arg(format!("{}/v3/kv/range", self.url))
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        // The gateway writes values in base64: "a" and "b" are the two daemons' names.
        Some(
            match v["kvs"][0]["value"].as_str() {
                None => "",
                Some("YQ==") => "a",
                Some("Yg==") => "b",
                Some(other) => panic!("an unexpected holder {other:?}"),
            }
            .to_string(),
        )
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we started and have not waited for.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(
    dir: &Path,
    name: &str,
    instance: &str,
    etcd: &str,
    port: u16,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
            instance = "{instance}"
            tick = "200ms"
            on_exit = "leave"
            [capacity]
            slots = 6
            [backend]
            type = "docker"
            [server]
            listen = "127.0.0.1:{port}"
            [ha]
            etcd = ["{etcd}"]
            ttl = "{ttl}s"
            key = "/microscaler/ha-leader"
            identity = "{name}"
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
            "#,
            ttl = TTL.as_secs()
        ),
    )
    .expect("write a configuration");
    path
}

/// Running containers per service: (web, batch).
fn running(instance: &str) -> (usize, usize) {
    let c = containers(instance);
    let n = |s: &str| {
        c.iter()
            .filter(|(svc, st)| svc == s && st == "running")
            .count()
    };
    (n("web"), n("batch"))
}

/// Waits until `f` holds, reading `daemon`'s tick lines; panics after `limit`.
fn until_tick(daemon: &Daemon, limit: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let line = daemon.tick();
        if f(&line) {
            return line;
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}: {line}");
    }
}

fn leading(line: &Value) -> bool {
    line["leading"]
        .as_bool()
        .expect("tick lines say whether they lead")
}

#[test]
fn only_the_lease_holder_acts_and_a_thawed_leader_does_not() {
    if docker_missing() {
        return;
    }
    let Some(etcd) = Etcd::start() else {
        missing_service(
            "etcd (Debian's etcd-server package)",
            "it did not start or answer on loopback",
        );
        return;
    };
    let instance = unique("ha");
    let _cleanup = Leftovers::containers(&instance);
    let dir = tempfile::tempdir().expect("dir");
    let (port_a, port_b) = (free_port(), free_port());
    let daemon = |name: &str, port: u16| {
        let config = write_config(dir.path(), name, &instance, &etcd.url, port);
        Daemon::start(
            &config,
            &dir.path().join(format!("state-{name}")),
            &["--set-demand".into(), "web=2".into()],
            TOKEN,
            Some(&dir.path().join(format!("{name}.log"))),
        )
    };
    let a = daemon("a", port_a);
    let b = daemon("b", port_b);

    // Exactly one leads, the other says it does not, and the replicas are the plan.
    let holder = {
        let t0 = Instant::now();
        loop {
            match etcd.holder().as_deref() {
                Some("a") => break "a",
                Some("b") => break "b",
                _ => {}
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "no one took the lease"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (leader, follower, follower_port) = if holder == "a" {
        (a, b, port_b)
    } else {
        (b, a, port_a)
    };
    until_tick(
        &leader,
        Duration::from_secs(20),
        "the leader's plan runs",
        |l| leading(l) && running(&instance) == (2, 4),
    );
    // For a few seconds: the follower never leads, the holder stays, the replicas stay.
    let _ = follower.pending_ticks();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let line = follower.tick();
        assert!(!leading(&line), "the follower leads too: {line}");
        assert_eq!(etcd.holder().as_deref(), Some(holder));
    }
    assert_eq!(running(&instance), (2, 4));

    // The leader frozen: the follower takes over within the TTL and acts on its own demand.
    set_demand(follower_port, TOKEN, "web", 4);
    let frozen = Instant::now();
    leader.signal(libc::SIGSTOP);
    let _ = follower.pending_ticks();
    until_tick(&follower, TTL * 4, "the follower takes over", leading);
    let failover = frozen.elapsed();
    until_tick(
        &follower,
        Duration::from_secs(20),
        "the new leader's plan runs",
        |_| running(&instance) == (4, 2),
    );

    // Thawed, the old leader has the old demand (2): it must not act on what it held.
    let _ = leader.pending_ticks();
    leader.signal(libc::SIGCONT);
    let t0 = Instant::now();
    let mut thawed_ticks = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            running(&instance),
            (4, 2),
            "the thawed leader changed the replicas"
        );
        for line in leader.pending_ticks() {
            thawed_ticks += 1;
            assert!(!leading(&line), "the thawed leader acts: {line}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(thawed_ticks > 0, "the thawed leader ticks again");
    assert_ne!(etcd.holder().as_deref(), Some(holder), "the lease moved");

    // etcd frozen: the new leader stops acting within its renew deadline, and leads again
    // once etcd is back.
    let _ = follower.pending_ticks();
    etcd.signal(libc::SIGSTOP);
    let cut = Instant::now();
    until_tick(
        &follower,
        Duration::from_secs(10),
        "the leader stops acting without etcd",
        |l| !leading(l),
    );
    let stopped_after = cut.elapsed();
    assert!(
        stopped_after < TTL,
        "a leader that cannot renew stops acting before its lease could expire ({TTL:?}): it took {stopped_after:?}"
    );
    etcd.signal(libc::SIGCONT);
    let t0 = Instant::now();
    loop {
        let (x, y) = (follower.pending_ticks(), leader.pending_ticks());
        if x.iter().chain(&y).any(leading) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no one leads once etcd is back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "failover after the leader froze: {failover:?} (TTL {TTL:?}); a leader cut off from etcd stopped acting after {stopped_after:?} (renew deadline {RENEW_DEADLINE:?})"
    );
    assert!(
        failover < TTL + Duration::from_secs(3),
        "failover took {failover:?}, over the TTL of {TTL:?} and three seconds"
    );
}
