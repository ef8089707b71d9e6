//! Resident memory of the real `microscaler run` binary while it manages N replicas, against the
//! same daemon managing none: on the process backend (the default: N processes of the built-in
//! replica), or on the Docker engine (`--memory-backend docker`: N containers of the built-in
//! replica image, `network = "none"`; every one a containerd shim, so it needs several GiB).
//! The daemon runs with its HTTP server on (`--listen 127.0.0.1:0`), as in production.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::engine_calls::EngineCalls;
use crate::report::{ratio, Row};

/// Where the daemon's replicas run in the memory figure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Local processes of the built-in replica.
    Process,
    /// Containers of the built-in replica image on the local Docker engine.
    Docker,
}

impl MemoryBackend {
    fn name(self) -> &'static str {
        match self {
            MemoryBackend::Process => "process",
            MemoryBackend::Docker => "docker",
        }
    }
}

/// The engine's socket the counting proxy forwards to.
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The target, in MiB.
const TARGET_MB: f64 = 30.0;

/// A `/proc/<pid>/status` field in KiB (`key` with its colon, e.g. `"VmRSS:"`).
pub(crate) fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Live child processes of `pid` (every thread's children).
fn children(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .map(|s| s.split_whitespace().count())
        .sum()
}

/// A running `microscaler run`, stopped (SIGTERM, then SIGKILL) and its directory removed on
/// drop.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    dir: std::path::PathBuf,
    backend: MemoryBackend,
    instance: String,
    /// Leave its containers for the next daemon to adopt (it runs with `on_exit = "leave"`).
    keep: bool,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon finishes its tick and, with on_exit = "stop", removes its replicas.
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.backend == MemoryBackend::Docker && !self.keep {
            // Whatever the daemon did not remove in time (1,000 containers take a while).
            let ids = docker_ids(&self.instance, false);
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The ids of the containers of microscaler instance `instance` (only running ones with
/// `running`), through the docker command line.
fn docker_ids(instance: &str, running: bool) -> Vec<String> {
    let mut cmd = Command::new("docker");
    cmd.args(["ps", "-aq", "--no-trunc", "--filter"])
        .arg(format!("label=io.microscaler.instance={instance}"));
    if running {
        cmd.args(["--filter", "status=running"]);
    }
    match cmd.stderr(Stdio::null()).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// containerd's command line on the engine's own containerd (Docker's namespace).
const CTR: &str = "ctr -a /var/run/docker/containerd/containerd.sock -n moby";

/// The tasks the engine's containerd holds for containers Docker no longer lists: what
/// Docker 20.10 leaves when it loses track of a removal. Empty when `ctr` cannot be asked
/// (another containerd layout): said on stderr, not an error.
fn lost_tasks() -> Result<Vec<String>> {
    let mut argv = CTR.split(' ');
    let ctr = Command::new(argv.next().unwrap_or("ctr"))
        .args(argv)
        .args(["tasks", "ls", "-q"])
        .stderr(Stdio::null())
        .output();
    let tasks = match ctr {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            eprintln!("bench: memory: cannot ask the engine's containerd (`{CTR}`); lost tasks not checked");
            return Ok(Vec::new());
        }
    };
    let out = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc"])
        .output()
        .context("docker ps")?;
    if !out.status.success() {
        bail!(
            "docker ps -aq failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let known = String::from_utf8_lossy(&out.stdout).into_owned();
    let known: std::collections::HashSet<&str> = known.split_whitespace().collect();
    Ok(tasks
        .split_whitespace()
        .filter(|t| !known.contains(t))
        .map(str::to_string)
        .collect())
}

/// How a Docker-backed daemon of the memory figure talks to the engine.
#[derive(Debug, Clone, Copy)]
struct DockerOpts<'a> {
    /// `[backend] host`: the counting proxy's address.
    host: Option<&'a str>,
    /// `[backend] events`.
    events: bool,
    /// `on_exit = "leave"` (the next daemon adopts the containers) instead of `"stop"`.
    leave: bool,
}

const DEFAULT_DOCKER: DockerOpts<'static> = DockerOpts {
    host: None,
    events: true,
    leave: false,
};

fn start(
    bin: &Path,
    backend: MemoryBackend,
    replicas: u32,
    tick: Duration,
    docker: DockerOpts<'_>,
) -> Result<Daemon> {
    let instance = format!("bench-mem-{}-{replicas}", std::process::id());
    let slots = replicas.max(1);
    let backend_section = match backend {
        MemoryBackend::Process => "[backend]\ntype = \"process\"\n".to_string(),
        MemoryBackend::Docker => format!(
            "[backend]\ntype = \"docker\"\nstart_parallelism = 8\nnetwork = \"none\"\n\
             events = {}\n{}",
            docker.events,
            docker
                .host
                .map(|h| format!("host = \"{h}\"\n"))
                .unwrap_or_default()
        ),
    };
    let on_exit = if docker.leave { "leave" } else { "stop" };
    let config = format!(
        "instance = \"{instance}\"\ntick = \"{}ms\"\non_exit = \"{on_exit}\"\n\
         [capacity]\nslots = {slots}\n{backend_section}\
         [[services]]\nname = \"worker\"\npriority = 1\nmax = {slots}\nstop_grace = \"2s\"\n\
         [[services.triggers]]\ntype = \"manual\"\ninitial = {replicas}\n",
        tick.as_millis()
    );
    let mut d = launch(bin, backend, instance, &config, &[], false)?;
    d.keep = docker.leave;
    Ok(d)
}

/// Starts `bin run` on `config` (instance `instance`) in a new temporary directory, with its
/// HTTP server on a free loopback port (`--listen 127.0.0.1:0`) and `env` added to its
/// environment. Its stderr goes to `<dir>/daemon.log` with `log`, else nowhere.
pub(crate) fn launch(
    bin: &Path,
    backend: MemoryBackend,
    instance: String,
    config: &str,
    env: &[(&str, &str)],
    log: bool,
) -> Result<Daemon> {
    let dir = std::env::temp_dir().join(&instance);
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("bench.toml");
    std::fs::write(&cfg, config)?;
    let stderr = if log {
        Stdio::from(std::fs::File::create(dir.join("daemon.log"))?)
    } else {
        Stdio::null()
    };
    let child = Command::new(bin)
        .arg("run")
        .arg("-c")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(Daemon {
        child,
        dir,
        backend,
        instance,
        keep: false,
    })
}

impl Daemon {
    /// Its directory (configuration, state, `daemon.log`).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Runs the daemon with `replicas`, waits until they all run, then samples VmRSS for `hold`.
/// Returns (max VmRSS, VmHWM) in KiB and the time to reach the count.
fn measure(
    bin: &Path,
    backend: MemoryBackend,
    replicas: u32,
    tick: Duration,
    hold: Duration,
) -> Result<(u64, u64, Duration)> {
    let mut d = start(bin, backend, replicas, tick, DEFAULT_DOCKER)?;
    let h = hold_at(&mut d, backend, replicas, hold, || 0)?;
    Ok((h.rss, h.hwm, h.ready))
}

/// What [`hold_at`] saw.
struct Held {
    /// The largest VmRSS sampled, KiB.
    rss: u64,
    /// Its two parts at that sample: private (RssAnon) and mapped files (RssFile: the
    /// binary's own pages, shared with the page cache), KiB.
    anon: u64,
    file: u64,
    /// VmHWM at the end, KiB.
    hwm: u64,
    /// From the start to every replica running.
    ready: Duration,
    /// How far the counter moved during the hold.
    counted: u64,
}

/// Waits until `d` runs `replicas`, then samples its VmRSS for `hold`.
fn hold_at(
    d: &mut Daemon,
    backend: MemoryBackend,
    replicas: u32,
    hold: Duration,
    count: impl Fn() -> u64,
) -> Result<Held> {
    let pid = d.child.id();
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = d.child.try_wait() {
            bail!("microscaler exited early ({st}) with {replicas} replicas");
        }
        let running = match backend {
            MemoryBackend::Process => children(pid),
            MemoryBackend::Docker => docker_ids(&d.instance, true).len(),
        };
        if running >= replicas as usize {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("{running} of {replicas} replicas after 600 s");
        }
        std::thread::sleep(Duration::from_millis(match backend {
            MemoryBackend::Process => 100,
            MemoryBackend::Docker => 500,
        }));
    }
    let ready = t0.elapsed();
    let (mut rss, mut anon, mut file) = (0, 0, 0);
    let counted = count();
    let end = Instant::now() + hold;
    while Instant::now() < end {
        let now = status_kb(pid, "VmRSS:").unwrap_or(0);
        if now > rss {
            rss = now;
            anon = status_kb(pid, "RssAnon:").unwrap_or(0);
            file = status_kb(pid, "RssFile:").unwrap_or(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Held {
        rss,
        anon,
        file,
        hwm: status_kb(pid, "VmHWM:").unwrap_or(0),
        ready,
        counted: count() - counted,
    })
}

/// Fails unless the microscaler binary `bin` exists.
pub(crate) fn require(bin: &Path) -> Result<()> {
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p microscaler) or pass --microscaler",
            bin.display()
        );
    }
    Ok(())
}

/// Resident memory at `replicas` and at 0.
pub fn run(
    bin: &Path,
    backend: MemoryBackend,
    replicas: u32,
    tick: Duration,
) -> Result<(Value, Vec<Row>)> {
    require(bin)?;
    if backend == MemoryBackend::Docker {
        return run_docker(bin, replicas, tick);
    }
    let hold = Duration::from_secs(10);
    let (idle_rss, idle_hwm, _) = measure(bin, backend, 0, tick, hold)?;
    let (rss, hwm, ready) = measure(bin, backend, replicas, tick, hold)?;
    let mb = |kb: u64| kb as f64 / 1024.0;
    let rows = vec![Row::values(
        &format!(
            "resident memory, {replicas} replicas ({} backend)",
            backend.name()
        ),
        format!("{:.1} MiB (peak {:.1})", mb(rss), mb(hwm)),
        format!("{:.1} MiB with 0 replicas", mb(idle_rss)),
        ratio(mb(rss), mb(idle_rss)),
        "< 30 MiB",
    )];
    let v = json!({
        "binary": bin.display().to_string(), "backend": backend.name(), "replicas": replicas,
        "tick_ms": tick.as_secs_f64() * 1e3,
        "vm_rss_mib": mb(rss), "vm_hwm_mib": mb(hwm), "idle_vm_rss_mib": mb(idle_rss),
        "idle_vm_hwm_mib": mb(idle_hwm), "ratio_to_idle": ratio(mb(rss), mb(idle_rss)),
        "target_mib": TARGET_MB, "seconds_to_all_running": ready.as_secs_f64(),
    });
    Ok((v, rows))
}

/// The Docker figure: the daemon talks to the engine through a counting proxy. First with 0
/// replicas (the baseline); then with `replicas`, following the engine's events (the default),
/// for a minute; then a second daemon of the same instance with `events = false` adopts the same
/// containers and runs a minute listing them every tick. Memory and container listings per
/// minute of both.
fn run_docker(bin: &Path, replicas: u32, tick: Duration) -> Result<(Value, Vec<Row>)> {
    let backend = MemoryBackend::Docker;
    let calls = EngineCalls::start(DOCKER_SOCKET)?;
    let proxied = |events: bool, leave: bool| DockerOpts {
        host: Some(calls.address()),
        events,
        leave,
    };
    let minute = Duration::from_secs(60);
    let idle = {
        let mut d = start(bin, backend, 0, tick, proxied(true, false))?;
        hold_at(&mut d, backend, 0, Duration::from_secs(10), || 0)?
    };
    let events = {
        let mut d = start(bin, backend, replicas, tick, proxied(true, true))?;
        eprintln!("bench: memory: {replicas} containers, following the engine's events");
        hold_at(&mut d, backend, replicas, minute, || calls.listings())?
    };
    let listing = {
        let mut d = start(bin, backend, replicas, tick, proxied(false, false))?;
        eprintln!("bench: memory: the same containers adopted, listing every tick");
        hold_at(&mut d, backend, replicas, minute, || calls.listings())?
    };
    // The daemon has removed its replicas (on_exit = "stop"): the engine must have let go of
    // every one, not only stopped listing it.
    let lost = lost_tasks()?;
    if !lost.is_empty() {
        bail!(
            "the engine's containerd still holds {} tasks of containers Docker no longer lists \
             after microscaler removed {replicas} replicas; clean them with `{CTR} tasks delete` \
             and `{CTR} containers delete` (docs/backends.md)",
            lost.len()
        );
    }
    let mb = |kb: u64| kb as f64 / 1024.0;
    let parts = |h: &Held| {
        format!(
            "{:.1} MiB (private {:.1} + binary and libraries {:.1}; peak {:.1})",
            mb(h.rss),
            mb(h.anon),
            mb(h.file),
            mb(h.hwm)
        )
    };
    let rows = vec![
        Row::values(
            &format!("resident memory, {replicas} replicas (docker backend, events)"),
            parts(&events),
            format!("{} with 0 replicas", parts(&idle)),
            ratio(mb(events.rss), mb(idle.rss)),
            "< 20 MiB",
        ),
        Row::values(
            "same, private memory only",
            format!("{:.1} MiB", mb(events.anon)),
            format!("{:.1} MiB with 0 replicas", mb(idle.anon)),
            ratio(mb(events.anon), mb(idle.anon)),
            "",
        ),
        Row::values(
            &format!("resident memory, {replicas} replicas (docker backend, listing)"),
            parts(&listing),
            format!("{:.1} MiB with events", mb(events.rss)),
            ratio(mb(listing.rss), mb(events.rss)),
            "",
        ),
        Row::values(
            &format!("container listings per minute at steady state, {replicas} replicas"),
            format!("{} (events)", events.counted),
            format!("{} (events = false)", listing.counted),
            ratio(events.counted as f64, listing.counted.max(1) as f64),
            "near zero",
        ),
    ];
    let figures = |h: &Held| {
        json!({"vm_rss_mib": mb(h.rss), "rss_anon_mib": mb(h.anon), "rss_file_mib": mb(h.file),
               "vm_hwm_mib": mb(h.hwm), "listings_per_minute": h.counted})
    };
    let v = json!({
        "binary": bin.display().to_string(), "backend": "docker", "replicas": replicas,
        "tick_ms": tick.as_secs_f64() * 1e3, "idle": figures(&idle),
        "events": figures(&events), "listing": figures(&listing),
        "target_mib": 20.0, "seconds_to_all_running": events.ready.as_secs_f64(),
    });
    Ok((v, rows))
}
