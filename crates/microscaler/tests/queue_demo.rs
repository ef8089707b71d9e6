//! End to end: `microscaler demo --scenario queue` against the real redis-server (started by
//! `scripts/services.sh`), on local processes and on the real Docker engine, and the built-in
//! replica's worker mode on its own. Checks that the workers really consume (the queue drains
//! when the rate drops, its length stays near the target per worker), that priority 1 follows
//! the rate up and back down, and that priority 1 + priority 2 == capacity once converged.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const REDIS: &str = "redis://127.0.0.1:6379";

use microscaler_testkit::missing_service;

/// A synchronous connection to the real Redis, or None (the test skips; fails under CI).
fn redis() -> Option<redis::Connection> {
    let conn = redis::Client::open(REDIS)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)));
    match conn {
        Ok(mut c) => match redis::cmd("PING").query::<String>(&mut c) {
            Ok(_) => Some(c),
            Err(e) => {
                missing_service(
                    "redis-server on 127.0.0.1:6379 (start it: redis-server --daemonize yes)",
                    e,
                );
                None
            }
        },
        Err(e) => {
            missing_service(
                "redis-server on 127.0.0.1:6379 (start it: redis-server --daemonize yes)",
                e,
            );
            None
        }
    }
}

fn llen(c: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query(c).unwrap()
}

struct Tick {
    t: f64,
    len: f64,
    rate: f64,
    produced: u64,
    p1: u32,
    p1_target: u32,
    p2: u32,
    p2_target: u32,
    pending: u32,
    capacity: u32,
}

fn run_queue_demo(
    backend: &str,
    extra: &[&str],
    instance: &str,
    key: &str,
    state: &std::path::Path,
) -> Vec<Tick> {
    let out = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args([
            "demo",
            "--scenario",
            "queue",
            "--backend",
            backend,
            "--json",
            "--listen",
            "off",
        ])
        .args(["--instance", instance, "--queue", key, "--redis", REDIS])
        .args([
            "--per-worker",
            "5",
            "--job-time",
            "200ms",
            "--rate-max",
            "40",
        ])
        .args(extra)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("run microscaler demo");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "demo failed: {stderr}");
    assert!(
        stderr.contains(&format!("deleted the list {key:?}")),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut ticks = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(
            v["errors"].as_array().unwrap().is_empty(),
            "errors in tick: {line}"
        );
        let svc = |name: &str| {
            v["services"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == name)
                .cloned()
                .unwrap()
        };
        let (w, b) = (svc("workers"), svc("batch"));
        let n = |s: &Value, f: &str| s[f].as_u64().unwrap() as u32;
        let q = &v["queue"];
        assert_eq!(q["key"], key, "{line}");
        assert_eq!(q["target"].as_f64(), Some(5.0), "{line}");
        ticks.push(Tick {
            t: v["t_ms"].as_u64().unwrap() as f64 / 1000.0,
            len: q["length"]
                .as_f64()
                .unwrap_or_else(|| panic!("no queue length: {line}")),
            rate: q["rate"].as_f64().unwrap(),
            produced: q["produced"].as_u64().unwrap(),
            p1: n(&w, "running"),
            p1_target: n(&w, "target"),
            p2: n(&b, "running"),
            p2_target: n(&b, "target"),
            pending: n(&w, "pending") + n(&b, "pending"),
            capacity: v["capacity"].as_u64().unwrap() as u32,
        });
    }
    ticks
}

/// The checks both backends share, for a sine of `period` seconds.
fn check_queue_run(ticks: &[Tick], period: f64) {
    assert!(ticks.len() >= 30, "too few ticks: {}", ticks.len());
    let window = |from: f64, to: f64| {
        ticks
            .iter()
            .filter(move |k| k.t >= from * period && k.t <= to * period)
    };
    // The producer follows the sine.
    let peak_rate = window(0.4, 0.6).map(|k| k.rate).fold(0.0, f64::max);
    assert!(peak_rate > 35.0, "peak rate {peak_rate}");
    // Priority 1 grows with the rate...
    let p1_peak = window(0.35, 0.75).map(|k| k.p1).max().unwrap();
    assert!(
        p1_peak >= 5,
        "priority 1 should grow to >= 5 workers near the peak, got {p1_peak}"
    );
    assert_eq!(ticks[0].p1, 0, "no jobs, no workers at the start");
    // ...and the workers drain the queue and give the slots back when it drops.
    let trough_len = window(0.85, 1.1).map(|k| k.len).fold(f64::MAX, f64::min);
    assert!(
        trough_len <= 5.0,
        "the queue must drain near the trough, shortest {trough_len}"
    );
    let trough_p1 = window(0.85, 1.1).map(|k| k.p1).min().unwrap();
    assert!(
        trough_p1 <= 1,
        "priority 1 should shrink near the trough, got {trough_p1}"
    );
    // The queue stays bounded near the target per worker.
    let max_len = ticks.iter().map(|k| k.len).fold(0.0, f64::max);
    assert!(max_len <= 5.0 * 9.0 + 15.0, "queue grew to {max_len}");
    let near = ticks
        .iter()
        .filter(|k| k.len <= 5.0 * (k.p1 as f64 + 2.0) + 5.0)
        .count();
    assert!(
        near * 10 >= ticks.len() * 9,
        "queue near 5 per worker in only {near} of {} ticks",
        ticks.len()
    );
    // Never over capacity; once converged, priority 1 + priority 2 == capacity.
    let mut converged = 0;
    for (i, k) in ticks.iter().enumerate() {
        assert!(
            k.p1_target + k.p2_target <= k.capacity,
            "tick {i} over capacity"
        );
        if k.pending == 0 && k.p1 == k.p1_target && k.p2 == k.p2_target {
            assert_eq!(
                k.p1 + k.p2,
                9,
                "tick {i} at {:.1}s: priority 1 + priority 2 must fill the capacity",
                k.t
            );
            converged += 1;
        }
    }
    assert!(
        converged * 2 >= ticks.len(),
        "converged in only {converged} of {} ticks",
        ticks.len()
    );
}

/// Jobs the workers finished, from their "exiting after N jobs" lines.
fn jobs_done(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("exiting after ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn queue_demo_on_processes_workers_keep_the_queue_near_its_target() {
    let Some(mut conn) = redis() else { return };
    let dir = tempfile::tempdir().unwrap();
    let instance = format!("e2e-queue-proc-{}", std::process::id());
    let key = format!("{instance}:jobs");
    let period = 20.0;
    let ticks = run_queue_demo(
        "process",
        &[
            "--duration",
            "25s",
            "--tick",
            "250ms",
            "--rate-period",
            "20s",
        ],
        &instance,
        &key,
        dir.path(),
    );
    check_queue_run(&ticks, period);
    // The workers really consumed: the jobs they report add up to nearly all that was pushed.
    let last = ticks.last().unwrap();
    let log = std::fs::read_to_string(dir.path().join("workers.log")).unwrap();
    let done = jobs_done(&log);
    assert!(last.produced >= 300, "produced only {}", last.produced);
    assert!(
        done as f64 >= 0.8 * last.produced as f64,
        "workers finished {done} of {} jobs:\n{log}",
        last.produced
    );
    // Cleaned up: the list is deleted, no replica records (hence processes) remain.
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut conn).unwrap();
    assert_eq!(exists, 0, "the list must be deleted on exit");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "replica records left behind: {left:?}");
}

#[test]
fn queue_demo_on_docker_workers_reach_redis_over_the_host_network() {
    match Command::new("docker").arg("info").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            if missing_service("Docker engine", String::from_utf8_lossy(&o.stderr)) {
                return;
            }
        }
        Err(e) => {
            if missing_service("Docker engine (docker CLI)", e) {
                return;
            }
        }
    }
    let Some(mut conn) = redis() else { return };
    let dir = tempfile::tempdir().unwrap();
    let instance = format!("e2e-queue-docker-{}", std::process::id());
    let key = format!("{instance}:jobs");
    let ticks = run_queue_demo(
        "docker",
        &[
            "--duration",
            "25s",
            "--tick",
            "250ms",
            "--rate-period",
            "20s",
        ],
        &instance,
        &key,
        dir.path(),
    );
    check_queue_run(&ticks, 20.0);
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut conn).unwrap();
    assert_eq!(exists, 0, "the list must be deleted on exit");
    std::thread::sleep(Duration::from_millis(200));
    let ps = Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=io.microscaler.instance={instance}"),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
        "the demo's containers must be gone"
    );
}

#[test]
fn queue_demo_without_redis_names_it_and_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args([
            "demo",
            "--scenario",
            "queue",
            "--backend",
            "process",
            "--listen",
            "off",
        ])
        .args([
            "--redis",
            "redis://127.0.0.1:1",
            "--duration",
            "5s",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no Redis answers at redis://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("redis-server --daemonize yes"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .all(|l| !l.starts_with('[')),
        "nothing may run"
    );
}

// ------------------------------------------------------------------------------------------
// The built-in replica in worker mode, run directly.

/// The built-in replica, written to `dir`.
fn replica_binary(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("replica");
    std::fs::write(&path, microscaler_backends::docker_api::REPLICA_BINARY).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn worker(bin: &std::path::Path, redis: &str, queue: &str, ms: u64) -> std::process::Child {
    Command::new(bin)
        .env_clear()
        .env("MICROSCALER_SERVICE", "workers")
        .env("MICROSCALER_WORK_REDIS", redis)
        .env("MICROSCALER_WORK_QUEUE", queue)
        .env("MICROSCALER_WORK_MS", ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGTERMs `child` and returns how long it took to exit, its stdout and stderr.
fn terminate(mut child: std::process::Child) -> (Duration, String, String) {
    let t = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the replica ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (took, out, err)
}

#[test]
fn worker_replica_consumes_and_exits_promptly_on_sigterm_mid_job() {
    let Some(mut conn) = redis() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bin = replica_binary(dir.path());
    let key = format!("e2e-worker-{}", std::process::id());
    let _: i64 = redis::cmd("DEL").arg(&key).query(&mut conn).unwrap();
    // Ten quick jobs: all taken and finished.
    let _: i64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg((0..10).map(|i| format!("job-{i}")).collect::<Vec<_>>())
        .query(&mut conn)
        .unwrap();
    let child = worker(&bin, "127.0.0.1:6379", &key, 10);
    let t = Instant::now();
    while llen(&mut conn, &key) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the worker did not take the jobs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let (took, out, _) = terminate(child);
    assert!(took < Duration::from_millis(500), "exit took {took:?}");
    assert!(out.contains("worker of Redis list"), "{out}");
    let done: u64 = jobs_done(&out);
    assert!(done >= 10, "{out}");

    // A 10 s job: SIGTERM in the middle of it still ends the replica at once.
    let _: i64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg("slow")
        .query(&mut conn)
        .unwrap();
    let child = worker(&bin, "redis://127.0.0.1:6379", &key, 10_000);
    let t = Instant::now();
    while llen(&mut conn, &key) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the worker did not take the job"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let (took, out, _) = terminate(child);
    assert!(
        took < Duration::from_millis(500),
        "exit mid-job took {took:?}"
    );
    assert!(out.contains("signal 15, exiting after 0 jobs"), "{out}");
    let _: i64 = redis::cmd("DEL").arg(&key).query(&mut conn).unwrap();
}

#[test]
fn worker_replica_reconnects_with_a_backoff_and_still_exits_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let bin = replica_binary(dir.path());
    // A "Redis" that accepts and hangs up at once: the worker must keep reconnecting, with a
    // short backoff (100 ms doubling to 2 s), not a tight loop.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let child = worker(&bin, &addr, "jobs", 10);
    listener.set_nonblocking(true).unwrap();
    let mut accepts = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1600) {
        match listener.accept() {
            Ok((s, _)) => {
                accepts += 1;
                drop(s);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    // 0, 0.1, 0.3, 0.7, 1.5 s: about five connections in 1.6 s.
    assert!((3..=8).contains(&accepts), "{accepts} connections in 1.6 s");
    // Then a real answer: a minimal server that hands out one job and then nil.
    listener.set_nonblocking(false).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut blpops = 0;
        let mut line = String::new();
        while blpops < 3 {
            line.clear();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if line.trim().eq_ignore_ascii_case("BLPOP") {
                blpops += 1;
                let reply: &[u8] = if blpops == 1 {
                    b"*2\r\n$4\r\njobs\r\n$5\r\njob-1\r\n"
                } else {
                    b"*-1\r\n"
                };
                w.write_all(reply).unwrap();
            }
        }
        blpops
    });
    let blpops = server.join().unwrap();
    assert_eq!(blpops, 3);
    let (took, out, err) = terminate(child);
    assert!(took < Duration::from_millis(500), "exit took {took:?}");
    assert!(out.contains("exiting after 1 jobs"), "{out}");
    assert!(err.contains("retrying"), "{err}");
}

#[test]
fn replica_without_worker_variables_behaves_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let bin = replica_binary(dir.path());
    let child = Command::new(&bin)
        .env_clear()
        .env("MICROSCALER_SERVICE", "idle")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (took, out, err) = terminate(child);
    assert!(took < Duration::from_millis(500), "exit took {took:?}");
    assert_eq!(
        out,
        "replica of \"idle\" running\nreplica of \"idle\": signal 15, exiting\n"
    );
    assert!(err.is_empty(), "{err}");
}
