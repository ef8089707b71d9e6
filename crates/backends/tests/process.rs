//! The process backend against real processes: the contract suite, stop with SIGTERM then
//! SIGKILL, reaping, the environment a replica sees, failed spawns, adoption after a restart and
//! the built-in replica. Nothing here needs root or a container engine.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{running, service, unique, wait_for};
use microscaler_backends::process::ProcessBackend;
use microscaler_backends::process::ProcessConfig;
use microscaler_backends::Service;
use microscaler_backends::{Backend, Observation};

const SETTLE: Duration = Duration::from_secs(10);

fn backend(state_dir: &Path, instance: &str) -> ProcessBackend {
    ProcessBackend::new(&ProcessConfig::default(), instance, state_dir.to_path_buf())
        .expect("process backend")
}

fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// Pids of the replicas of `svc` in `obs`.
fn pids(obs: &Observation, svc: &Service) -> Vec<u32> {
    obs.replicas
        .iter()
        .filter(|r| r.service == svc.name)
        .map(|r| r.id.parse().expect("a process replica's id is its pid"))
        .collect()
}

/// `(state, ppid, start time)` of `pid` from `/proc/{pid}/stat`, counting fields after the
/// last `)` because the command name may contain spaces.
fn stat(pid: u32) -> Option<(char, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f[0].chars().next()?,
        f[1].parse().ok()?,
        f[19].parse().ok()?,
    ))
}

/// True while `pid` is a live (not zombie) process.
fn live(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _, _)| state != 'Z' && state != 'X')
}

/// Children of `parent` as `(pid, state)`.
fn children_of(parent: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((state, ppid, _)) = stat(pid) {
            if ppid == parent {
                out.push((pid, state));
            }
        }
    }
    out
}

/// Waits until `check` holds, polling every 20 ms, up to `timeout`.
async fn eventually(timeout: Duration, check: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// The contract suite against real processes. The foreign object is a process the test
/// starts itself (not a replica of any instance), which the backend must never signal.
struct ProcessHarness {
    dir: tempfile::TempDir,
    instance: String,
    foreign: std::sync::Mutex<Option<std::process::Child>>,
}

impl microscaler_testkit::contract::Harness for ProcessHarness {
    type B = ProcessBackend;

    async fn connect(&self) -> ProcessBackend {
        backend(self.dir.path(), &self.instance)
    }

    async fn add_foreign(&self, _replicas: u32) {
        let child = std::process::Command::new("/bin/sleep")
            .arg("600")
            .spawn()
            .expect("spawn a foreign process");
        *self.foreign.lock().unwrap() = Some(child);
    }

    async fn foreign_running(&self) -> u32 {
        let mut f = self.foreign.lock().unwrap();
        match f.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => 1,
            _ => 0,
        }
    }

    async fn remove_foreign(&self) {
        if let Some(mut c) = self.foreign.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn unreachable(
        &self,
    ) -> Option<Result<ProcessBackend, microscaler_backends::BackendError>> {
        None // local processes have no orchestrator to lose
    }

    fn settle(&self) -> Duration {
        SETTLE
    }
}

#[tokio::test]
async fn contract_suite() {
    let h = ProcessHarness {
        dir: tempfile::tempdir().unwrap(),
        instance: unique("contract"),
        foreign: Default::default(),
    };
    let (a, b) = (service(&unique("a"), vec![]), service(&unique("b"), vec![]));
    microscaler_testkit::contract::run(&h, &a, &b).await;
}

/// True once `pid` ignores SIGTERM (bit 15, mask 0x4000 of SigIgn in /proc/{pid}/status).
fn ignores_sigterm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("SigIgn:"))?.to_string();
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|mask| mask & 0x4000 != 0)
}

#[tokio::test]
async fn sigterm_then_sigkill_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), &unique("grace"));
    let mut svc = service(
        &unique("stubborn"),
        cmd(&["/bin/sh", "-c", "trap '' TERM; sleep 60"]),
    );
    svc.stop_grace = Duration::from_millis(300);
    b.prepare(std::slice::from_ref(&svc)).await.unwrap();

    let out = b.scale(&svc, 3).await.unwrap();
    assert_eq!(out.started, 3, "{out:?}");
    let obs = wait_for(&b, SETTLE, |o| running(o, &svc) == 3).await;
    let replicas = pids(&obs, &svc);
    assert_eq!(replicas.len(), 3, "{obs:?}");
    // SIGTERM is only ignored once each shell has installed its trap.
    for &pid in &replicas {
        assert!(
            eventually(SETTLE, || ignores_sigterm(pid)).await,
            "shell {pid} never ignored SIGTERM"
        );
    }
    // The shells' `sleep` children (they inherit the ignored SIGTERM), if the shell forked one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let grandchildren: Vec<u32> = replicas
        .iter()
        .flat_map(|&pid| children_of(pid))
        .map(|(p, _)| p)
        .collect();

    let began = Instant::now();
    let out = b.scale(&svc, 0).await.unwrap();
    let took = began.elapsed();
    assert_eq!(out.stopped, 3, "{out:?}");
    assert!(
        took >= Duration::from_millis(300),
        "the stop must wait out the grace before SIGKILL, took {took:?}"
    );
    // One after another would take at least 3 x 300 ms.
    assert!(
        took < Duration::from_millis(900),
        "stops run concurrently and SIGKILL follows the grace promptly, took {took:?}"
    );
    for &pid in &replicas {
        assert!(!live(pid), "replica {pid} is gone after scale to 0");
    }
    for g in grandchildren {
        assert!(
            eventually(Duration::from_secs(2), || !live(g)).await,
            "the replica's process group is killed too (pid {g})"
        );
    }
    let obs = b.observe().await.unwrap();
    assert_eq!(running(&obs, &svc), 0, "{obs:?}");
    assert!(obs.replicas.is_empty(), "{obs:?}");
}

#[tokio::test]
async fn the_newest_replica_is_stopped_first() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), &unique("newest"));
    let svc = service(&unique("newest"), cmd(&["/bin/sleep", "60"]));
    b.prepare(std::slice::from_ref(&svc)).await.unwrap();
    b.scale(&svc, 1).await.unwrap();
    let oldest = pids(&b.observe().await.unwrap(), &svc);
    b.scale(&svc, 3).await.unwrap();
    let all = pids(&b.observe().await.unwrap(), &svc);
    assert_eq!(all.len(), 3);
    let out = b.scale(&svc, 1).await.unwrap();
    assert_eq!(out.stopped, 2, "{out:?}");
    assert_eq!(pids(&b.observe().await.unwrap(), &svc), oldest);
    b.shutdown(std::slice::from_ref(&svc), true).await.unwrap();
}

#[tokio::test]
async fn no_zombies_after_stops_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), &unique("zombie"));
    let sleeper = service(&unique("sleeper"), cmd(&["/bin/sleep", "60"]));
    let quitter = service(&unique("quitter"), cmd(&["/bin/sh", "-c", "exit 3"]));
    let services = [sleeper.clone(), quitter.clone()];
    b.prepare(&services).await.unwrap();

    b.scale(&sleeper, 3).await.unwrap();
    let out = b.scale(&quitter, 2).await.unwrap();
    assert_eq!(out.started, 2, "{out:?}");
    let obs = wait_for(&b, SETTLE, |o| running(o, &sleeper) == 3).await;
    let mut ours: BTreeSet<u32> = pids(&obs, &sleeper).into_iter().collect();
    ours.extend(pids(&obs, &quitter));

    // Replicas that exit by themselves are reaped by observe and leave the books.
    let obs = wait_for(&b, SETTLE, |o| running(o, &quitter) == 0).await;
    assert_eq!(running(&obs, &quitter), 0, "{obs:?}");
    let out = b.scale(&sleeper, 0).await.unwrap();
    assert_eq!(out.stopped, 3, "{out:?}");

    // Tests of this binary run in parallel in one process, so other tests' children may be
    // zombies for an instant; only this test's replicas are checked.
    let zombies: Vec<(u32, char)> = children_of(std::process::id())
        .into_iter()
        .filter(|(pid, state)| *state == 'Z' && ours.contains(pid))
        .collect();
    assert!(zombies.is_empty(), "unreaped replicas: {zombies:?}");
    for pid in &ours {
        assert!(
            stat(*pid).is_none_or(|(_, ppid, _)| ppid != std::process::id()),
            "replica {pid} is still our child"
        );
    }
    b.shutdown(&services, true).await.unwrap();
}

#[tokio::test]
async fn the_daemon_environment_never_reaches_a_replica() {
    // Set in this test process (the daemon); a replica must never see it.
    std::env::set_var("MICROSCALER_TEST_SECRET", "hunter2");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("env.txt");
    let instance = unique("env");
    let b = backend(dir.path(), &instance);
    let mut svc = service(
        &unique("env"),
        cmd(&[
            "/bin/sh",
            "-c",
            &format!("env > '{}'; exec sleep 60", file.display()),
        ]),
    );
    svc.workload.run_mut().unwrap().env = BTreeMap::from([
        ("APP_MODE".to_string(), "demo".to_string()),
        ("GREETING".to_string(), "hello world".to_string()),
    ]);
    b.prepare(std::slice::from_ref(&svc)).await.unwrap();
    b.scale(&svc, 1).await.unwrap();

    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        eventually(SETTLE, || read().contains("MICROSCALER_SERVICE=")).await,
        "the replica never wrote its environment"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen: BTreeMap<String, String> = read()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // A shell adds a few variables of its own: PWD (dash, bash), SHLVL and _ (bash). They come
    // from the shell, not from the daemon, so they are allowed; nothing else is.
    let shell_added = ["PWD", "SHLVL", "_"];
    let mut expected: BTreeMap<String, String> = svc.workload.run_mut().unwrap().env.clone();
    expected.insert("MICROSCALER_SERVICE".into(), svc.name.to_string());
    expected.insert("MICROSCALER_INSTANCE".into(), instance.clone());
    let from_replica: BTreeMap<String, String> = seen
        .iter()
        .filter(|(k, _)| !shell_added.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        from_replica, expected,
        "the replica's whole environment: {seen:?}"
    );
    assert!(!seen.contains_key("MICROSCALER_TEST_SECRET"));
    assert!(
        !seen.contains_key("PATH"),
        "an absolute program gets no PATH"
    );
    b.shutdown(std::slice::from_ref(&svc), true).await.unwrap();
}

#[tokio::test]
async fn a_failed_spawn_is_reported_and_others_still_scale() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), &unique("fail"));
    let missing = service(&unique("missing"), cmd(&["/nonexistent/prog"]));
    let not_exec = dir.path().join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let denied = service(
        &unique("denied"),
        vec![not_exec.to_string_lossy().into_owned()],
    );
    let good = service(&unique("good"), vec![]);
    let services = [missing.clone(), denied.clone(), good.clone()];
    b.prepare(&services).await.unwrap();

    let out = b
        .scale(&missing, 2)
        .await
        .expect("a failed spawn is not an error");
    assert_eq!(out.started, 0, "{out:?}");
    assert_eq!(out.failures.len(), 2, "{out:?}");
    for f in &out.failures {
        assert_eq!(f.service, missing.name);
        assert!(f.message.contains("/nonexistent/prog"), "{}", f.message);
        assert!(f.message.contains("os error 2"), "{}", f.message);
    }
    let out = b.scale(&denied, 1).await.unwrap();
    assert_eq!(out.failures.len(), 1, "{out:?}");
    assert!(
        out.failures[0].message.contains("not-executable"),
        "{out:?}"
    );
    assert!(out.failures[0].message.contains("os error 13"), "{out:?}");

    let out = b.scale(&good, 2).await.unwrap();
    assert_eq!((out.started, out.failures.len()), (2, 0), "{out:?}");
    let obs = wait_for(&b, SETTLE, |o| running(o, &good) == 2).await;
    assert_eq!(running(&obs, &good), 2, "{obs:?}");
    assert_eq!(running(&obs, &missing), 0, "{obs:?}");
    b.shutdown(&services, true).await.unwrap();
}

#[tokio::test]
async fn replicas_are_adopted_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let instance = unique("adopt");
    let svc = service(&unique("adopted"), vec![]);
    let services = [svc.clone()];

    let first = backend(dir.path(), &instance);
    first.prepare(&services).await.unwrap();
    first.scale(&svc, 2).await.unwrap();
    let obs = wait_for(&first, SETTLE, |o| running(o, &svc) == 2).await;
    let mut before = pids(&obs, &svc);
    before.sort();
    assert_eq!(before.len(), 2, "{obs:?}");
    first.shutdown(&services, false).await.unwrap();
    drop(first);
    for pid in &before {
        assert!(
            live(*pid),
            "shutdown without removal leaves replica {pid} running"
        );
        let record = dir.path().join(svc.name.as_str()).join(pid.to_string());
        assert!(record.exists(), "its record {} stays", record.display());
    }

    let second = backend(dir.path(), &instance);
    second.prepare(&services).await.unwrap();
    let obs = second.observe().await.unwrap();
    assert_eq!(running(&obs, &svc), 2, "{obs:?}");
    let mut after = pids(&obs, &svc);
    after.sort();
    assert_eq!(
        after, before,
        "the same processes are adopted, none started"
    );

    // Preparing again does not adopt them twice.
    second.prepare(&services).await.unwrap();
    assert_eq!(running(&second.observe().await.unwrap(), &svc), 2);

    let out = second.scale(&svc, 0).await.unwrap();
    assert_eq!(out.stopped, 2, "{out:?}");
    for pid in &before {
        // Once killed they are zombies of this test process until tokio reaps the orphans the
        // first backend dropped; under a real restart init reaps them.
        assert!(
            eventually(SETTLE, || stat(*pid).is_none()).await,
            "adopted replica {pid} is gone"
        );
        let record = dir.path().join(svc.name.as_str()).join(pid.to_string());
        assert!(
            !record.exists(),
            "its record {} is deleted",
            record.display()
        );
    }
    assert!(second.observe().await.unwrap().replicas.is_empty());
}

/// A half-written copy of the built-in replica left by a writer that crashed is removed when
/// the backend starts; one whose writer still runs (another daemon sharing the directory,
/// mid-write) and files that only look alike are left alone.
#[tokio::test]
async fn a_crashed_writers_half_written_replica_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut gone = std::process::Command::new("/bin/true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let mut writer = std::process::Command::new("/bin/sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let stale = dir.path().join(format!(".replica.tmp-{dead}-0"));
    let busy = dir.path().join(format!(".replica.tmp-{}-3", writer.id()));
    let alike = dir.path().join(format!(".replica.tmp-{dead}-notes"));
    for f in [&stale, &busy, &alike] {
        std::fs::write(f, b"half a binary").unwrap();
    }
    let svc = service(&unique("tmp"), vec![]);
    let b = backend(dir.path(), &unique("tmp"));
    b.prepare(std::slice::from_ref(&svc)).await.unwrap();
    assert!(!stale.exists(), "a dead writer's file is removed");
    assert!(busy.exists(), "a running writer's file is left alone");
    assert!(alike.exists(), "a file that only looks alike is left alone");
    assert!(
        dir.path().join("replica").exists(),
        "the built-in replica itself is written"
    );
    b.shutdown(std::slice::from_ref(&svc), true).await.unwrap();
    writer.kill().unwrap();
    writer.wait().unwrap();
}

#[tokio::test]
async fn stale_and_foreign_records_are_never_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let instance = unique("stale");
    let svc = service(&unique("victim"), vec![]);
    // A live process that is not a replica: the record claims it with the wrong start time.
    let mut bystander = std::process::Command::new("/bin/sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = bystander.id();
    let (_, _, start) = stat(pid).unwrap();
    let rec_dir = dir.path().join(svc.name.as_str());
    std::fs::create_dir_all(&rec_dir).unwrap();
    let wrong_start = rec_dir.join(pid.to_string());
    std::fs::write(
        &wrong_start,
        format!("pid {pid}\nstart_time {}\ninstance {instance}\n", start + 1),
    )
    .unwrap();
    // The same process, correctly described, but recorded by another instance.
    let other_dir = dir.path().join("other-svc");
    std::fs::create_dir_all(&other_dir).unwrap();
    let foreign = other_dir.join(pid.to_string());
    std::fs::write(
        &foreign,
        format!("pid {pid}\nstart_time {start}\ninstance someone-else\n"),
    )
    .unwrap();

    let b = backend(dir.path(), &instance);
    b.prepare(std::slice::from_ref(&svc)).await.unwrap();
    let obs = b.observe().await.unwrap();
    assert!(obs.replicas.is_empty(), "nothing adopted: {obs:?}");
    assert!(!wrong_start.exists(), "the stale record is forgotten");
    assert!(foreign.exists(), "another instance's record is left alone");
    b.shutdown(std::slice::from_ref(&svc), true).await.unwrap();
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a process outside the books is never signalled"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[tokio::test]
async fn the_built_in_replica_runs_and_stops_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), &unique("builtin"));
    let mut svc = service(&unique("builtin"), vec![]);
    svc.stop_grace = Duration::from_secs(10);
    b.prepare(std::slice::from_ref(&svc)).await.unwrap();

    let binary: PathBuf = dir.path().join("replica");
    let meta = std::fs::metadata(&binary).expect("the built-in replica is written on prepare");
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        microscaler_backends::docker_api::REPLICA_BINARY
    );

    b.scale(&svc, 1).await.unwrap();
    let obs = wait_for(&b, SETTLE, |o| running(o, &svc) == 1).await;
    let pid = pids(&obs, &svc)[0];
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        binary,
        "the replica runs the built-in binary"
    );
    let log = b.log_path(&svc.name);
    assert!(
        eventually(SETTLE, || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("running"))
        .await,
        "the replica logs to {}",
        log.display()
    );

    let began = Instant::now();
    let out = b.scale(&svc, 0).await.unwrap();
    let took = began.elapsed();
    assert_eq!(out.stopped, 1, "{out:?}");
    assert!(
        took < Duration::from_secs(2),
        "the built-in replica exits on SIGTERM at once, took {took:?} (grace 10 s)"
    );
    assert!(!live(pid));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("exiting"), "{text}");
}

/// Field 5 (process group) of `/proc/{pid}/stat`.
fn pgrp(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..]
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

#[tokio::test]
async fn each_replica_leads_its_own_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), &unique("pgrp"));
    let svc = service(&unique("pgrp"), vec![]);
    b.prepare(std::slice::from_ref(&svc)).await.unwrap();
    b.scale(&svc, 2).await.unwrap();
    let obs = wait_for(&b, SETTLE, |o| running(o, &svc) == 2).await;
    let ours = pgrp(std::process::id()).unwrap();
    for pid in pids(&obs, &svc) {
        // A Ctrl-C on the daemon's terminal goes to the daemon's group, not to this one.
        assert_eq!(pgrp(pid), Some(pid), "replica {pid} leads its own group");
        assert_ne!(pgrp(pid), Some(ours));
    }
    b.shutdown(std::slice::from_ref(&svc), true).await.unwrap();
}

#[tokio::test]
async fn work_dir_and_path_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let spec = ProcessConfig {
        work_dir: Some(work.path().to_string_lossy().into_owned()),
        ..Default::default()
    };
    let b = ProcessBackend::new(&spec, &unique("workdir"), dir.path().to_path_buf()).unwrap();
    // A bare program name is looked up on PATH: the replica gets the daemon's PATH for that.
    let svc = service(
        &unique("bare"),
        cmd(&[
            "sh",
            "-c",
            "pwd > where.txt; echo \"$PATH\" > path.txt; exec sleep 60",
        ]),
    );
    b.prepare(std::slice::from_ref(&svc)).await.unwrap();
    let out = b.scale(&svc, 1).await.unwrap();
    assert_eq!(out.started, 1, "{out:?}");
    let path_file = work.path().join("path.txt");
    assert!(
        eventually(SETTLE, || std::fs::read_to_string(&path_file)
            .is_ok_and(|t| t.ends_with('\n')))
        .await,
        "the replica runs in work_dir"
    );
    let pwd = std::fs::read_to_string(work.path().join("where.txt")).unwrap();
    assert_eq!(
        Path::new(pwd.trim()).canonicalize().unwrap(),
        work.path().canonicalize().unwrap()
    );
    let path = std::fs::read_to_string(&path_file).unwrap();
    assert_eq!(path.trim(), std::env::var("PATH").unwrap());
    b.shutdown(std::slice::from_ref(&svc), true).await.unwrap();

    let missing = ProcessConfig {
        work_dir: Some("/nonexistent/work".into()),
        ..Default::default()
    };
    let err = ProcessBackend::new(&missing, "x", dir.path().to_path_buf())
        .err()
        .expect("a missing work_dir is refused");
    assert!(err.to_string().contains("/nonexistent/work"), "{err}");
}
