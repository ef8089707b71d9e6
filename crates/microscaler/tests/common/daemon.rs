//! `microscaler run` as a child process: its JSON tick lines, its API, and signals to it.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// A running daemon and its tick lines.
pub struct Daemon {
    child: Child,
    ticks: mpsc::Receiver<Value>,
}

impl Daemon {
    /// `microscaler run --json -c <config> --state-dir <state>` with `args` after them and the
    /// API token `token`; stderr (the logs) goes to `log` when given.
    pub fn start(
        config: &Path,
        state: &Path,
        args: &[String],
        token: &str,
        log: Option<&Path>,
    ) -> Daemon {
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("the daemon's log file")),
            None => Stdio::null(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_microscaler"))
            .args(["run", "--json", "-c"])
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .env("MICROSCALER_TOKEN", token)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start microscaler run");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, ticks) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Daemon { child, ticks }
    }

    /// The next tick line.
    pub fn tick(&self) -> Value {
        self.ticks
            .recv_timeout(Duration::from_secs(30))
            .expect("a tick line within 30 s")
    }

    /// The tick lines printed so far and not read yet.
    pub fn pending_ticks(&self) -> Vec<Value> {
        self.ticks.try_iter().collect()
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we started and have not waited for.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Kills it with SIGKILL and waits for it.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each service's (name, target, running, pending) in a tick line.
pub fn services(tick: &Value) -> Vec<(String, u64, u64, u64)> {
    tick["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            (
                s["name"].as_str().unwrap_or("").to_string(),
                n("target"),
                n("running"),
                n("pending"),
            )
        })
        .collect()
}

/// Sets `service`'s manual demand through the API on `port`.
pub fn set_demand(port: u16, token: &str, service: &str, value: u64) {
    let body = format!("{{\"value\": {value}}}");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the API");
    write!(
        s,
        "PUT /api/v1/services/{service}/demand HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A free port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a port")
        .local_addr()
        .expect("its address")
        .port()
}

/// `(service, state)` of every container of `instance`, on the engine `docker <engine>` talks
/// to (`[]`: the default one, `["-H", socket]`: another).
pub fn containers_on(engine: &[&str], instance: &str) -> Vec<(String, String)> {
    let out = Command::new("docker")
        .args(engine)
        .args(["ps", "-a", "--filter"])
        .arg(format!("label=io.microscaler.instance={instance}"))
        .args([
            "--format",
            "{{.Label \"io.microscaler.service\"}} {{.State}}",
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(s, st)| (s.to_string(), st.to_string()))
        .collect()
}

/// `(service, state)` of every container of `instance` on the default engine.
pub fn containers(instance: &str) -> Vec<(String, String)> {
    containers_on(&[], instance)
}

/// Whether the Docker engine does not answer (`docker info`): under `CI=true` the test fails,
/// elsewhere it says why it is skipped (see `missing_service`).
pub fn docker_missing() -> bool {
    match Command::new("docker").arg("info").output() {
        Ok(o) if o.status.success() => false,
        other => {
            microscaler_testkit::missing_service(
                "the Docker engine",
                format!("docker info: {other:?}"),
            );
            true
        }
    }
}
