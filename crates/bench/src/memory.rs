//! Resident memory of the real `microscaler run` binary while it manages N replicas on the
//! process backend (1,000 containers would not fit this 2-core machine next to the other
//! engineers' tests), against the same daemon managing none.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::report::{ratio, Row};

/// The target, in MiB.
const TARGET_MB: f64 = 30.0;

fn status_kb(pid: u32, key: &str) -> Option<u64> {
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

struct Daemon {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon finishes its tick and, with on_exit = "stop", removes its replicas.
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(bin: &Path, replicas: u32, tick: Duration) -> Result<Daemon> {
    let dir = std::env::temp_dir().join(format!("bench-mem-{}-{replicas}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("bench.toml");
    let slots = replicas.max(1);
    std::fs::write(
        &cfg,
        format!(
            "instance = \"bench-mem-{replicas}\"\ntick = \"{}ms\"\non_exit = \"stop\"\n\
             [capacity]\nslots = {slots}\n[backend]\ntype = \"process\"\n\
             [[services]]\nname = \"worker\"\npriority = 1\nmax = {slots}\nstop_grace = \"2s\"\n\
             [[services.triggers]]\ntype = \"manual\"\ninitial = {replicas}\n",
            tick.as_millis()
        ),
    )?;
    let child = Command::new(bin)
        .arg("run")
        .arg("-c")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(Daemon { child, dir })
}

/// Runs the daemon with `replicas`, waits until they all run, then samples VmRSS for `hold`.
/// Returns (max VmRSS, VmHWM) in KiB and the time to reach the count.
fn measure(
    bin: &Path,
    replicas: u32,
    tick: Duration,
    hold: Duration,
) -> Result<(u64, u64, Duration)> {
    let mut d = start(bin, replicas, tick)?;
    let pid = d.child.id();
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = d.child.try_wait() {
            bail!("microscaler exited early ({st}) with {replicas} replicas");
        }
        if children(pid) >= replicas as usize {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("{} of {replicas} replicas after 300 s", children(pid));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready = t0.elapsed();
    let mut rss = 0;
    let end = Instant::now() + hold;
    while Instant::now() < end {
        rss = rss.max(status_kb(pid, "VmRSS:").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    let hwm = status_kb(pid, "VmHWM:").unwrap_or(0);
    Ok((rss, hwm, ready))
}

/// Resident memory at `replicas` and at 0.
pub fn run(bin: &Path, replicas: u32, tick: Duration) -> Result<(Value, Vec<Row>)> {
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p microscaler) or pass --microscaler",
            bin.display()
        );
    }
    let hold = Duration::from_secs(10);
    let (idle_rss, idle_hwm, _) = measure(bin, 0, tick, hold)?;
    let (rss, hwm, ready) = measure(bin, replicas, tick, hold)?;
    let mb = |kb: u64| kb as f64 / 1024.0;
    let rows = vec![Row::values(
        &format!("resident memory, {replicas} replicas (process backend)"),
        format!("{:.1} MiB (peak {:.1})", mb(rss), mb(hwm)),
        format!("{:.1} MiB with 0 replicas", mb(idle_rss)),
        ratio(mb(rss), mb(idle_rss)),
        "< 30 MiB",
    )];
    let v = json!({
        "binary": bin.display().to_string(), "backend": "process", "replicas": replicas,
        "tick_ms": tick.as_secs_f64() * 1e3,
        "vm_rss_mib": mb(rss), "vm_hwm_mib": mb(hwm), "idle_vm_rss_mib": mb(idle_rss),
        "idle_vm_hwm_mib": mb(idle_hwm), "ratio_to_idle": ratio(mb(rss), mb(idle_rss)),
        "target_mib": TARGET_MB, "seconds_to_all_running": ready.as_secs_f64(),
    });
    Ok((v, rows))
}
