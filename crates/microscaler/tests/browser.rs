//! A real browser on the dashboard: headless Chromium (Debian's `chromium`), driven through
//! `chromedriver` with a small WebDriver client over HTTP, opens the dashboard of a running
//! `microscaler demo --backend process`, sees the live chart update as the demand moves, sets
//! the manual demand through the dashboard's control and sees priority 1 follow it, and saves
//! screenshots (laptop and phone sizes) under the target directory.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`scripts/services.sh` installs them).
//! Under CI=true a missing browser fails the test; elsewhere the test says so and passes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Kills a child process (by its own pid) when dropped.
struct Guard(Child, i32);

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we started.
        unsafe { libc::kill(self.0.id() as i32, self.1) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns the JSON body.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to chromedriver");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // chromedriver may keep the connection open: read the head, then Content-Length bytes.
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok());
    let payload = match len {
        Some(n) => {
            let mut buf = vec![0; n];
            r.read_exact(&mut buf).unwrap();
            String::from_utf8_lossy(&buf).into_owned()
        }
        None => {
            let mut rest = String::new();
            r.read_to_string(&mut rest).unwrap();
            if head.contains("transfer-encoding: chunked") {
                dechunk(&rest)
            } else {
                rest
            }
        }
    };
    serde_json::from_str(&payload).unwrap_or(Value::Null)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// A WebDriver session.
struct Session {
    port: u16,
    id: String,
}

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let v = http(
            self.port,
            method,
            &format!("/session/{}{path}", self.id),
            body.as_ref(),
        );
        if let Some(err) = v["value"].get("error") {
            panic!(
                "WebDriver {method} {path}: {err}: {}",
                v["value"]["message"]
            );
        }
        v["value"].clone()
    }
    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }
    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element id for {css}: {v}"))
            .to_string()
    }
    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
    }
    /// Polls `script` until `ok` holds for its value, or panics after `secs` with `what`.
    fn wait(&self, secs: u64, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.js(script);
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: last seen {v}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Session {
    /// Ends the browser even when an assertion failed: killing chromedriver alone would leave
    /// Chromium running.
    fn drop(&mut self) {
        http(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= (val(*c) as u32) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether Chromium and chromedriver are here; under CI=true a missing one fails.
fn have_browser() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    for bin in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(bin).exists() {
            assert!(
                !ci,
                "{bin} is missing: install Debian's chromium and chromium-driver (scripts/services.sh does)"
            );
            eprintln!("SKIPPED (not CI): {bin} is missing");
            return false;
        }
    }
    true
}

/// chromedriver, and a headless Chromium session on `url` with its profile in `dir`.
fn open_browser(dir: &Path, url: &str) -> (Guard, Session) {
    let port = free_port();
    let driver = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Guard(driver, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err()
        || http(port, "GET", "/status", None)["value"]["ready"] != true
    {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not become ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let profile = dir.join("profile");
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-dev-shm-usage", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    }}});
    let v = http(port, "POST", "/session", Some(&caps));
    let id = v["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
        .to_string();
    let s = Session { port, id };
    s.cmd("POST", "/url", Some(json!({ "url": url })));
    (driver, s)
}

#[test]
fn dashboard_in_a_real_browser() {
    if !have_browser() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&out_dir).unwrap();

    // The demo, with a demand that moves every second.
    let mut demo = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args([
            "demo",
            "--backend",
            "process",
            "--listen",
            "127.0.0.1:0",
            "--interval",
            "1s",
            "--seed",
            "11",
            "--duration",
            "180s",
            "--instance",
            "browser-test",
            "--state-dir",
        ])
        .arg(tmp.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let stdout = demo.stdout.take().unwrap();
    let demo = Guard(demo, libc::SIGTERM);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("Dashboard: ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the demo prints its dashboard URL");
    assert!(url.contains("#token="), "{url}");

    let (_driver, s) = open_browser(tmp.path(), &url);

    // Live: ticks arrive over the stream and the chart draws them.
    s.wait(
        30,
        "live ticks and chart points",
        "return [Number(document.body.dataset.ticks || 0), Number(document.getElementById('chart').dataset.points || 0), document.getElementById('live').textContent]",
        |v| v[0].as_u64() >= Some(3) && v[1].as_u64() >= Some(3) && v[2] == "live",
    );
    // The demand moves (every second): the chart's points show more than one demand value,
    // and the canvas is redrawn as ticks arrive.
    s.js("window.firstChart = document.getElementById('chart').toDataURL(); return null");
    s.wait(
        40,
        "the demand to move on the chart",
        "const d = new Set(window.microscaler.points.map(p => (p.services.priority1 || {}).demand)); return d.size",
        |v| v.as_u64() >= Some(2),
    );
    s.wait(
        10,
        "the chart to be redrawn",
        "return document.getElementById('chart').toDataURL() !== window.firstChart",
        |v| *v == Value::Bool(true),
    );
    // The token reached the page through the URL fragment, and left the address bar.
    let stored = s.js("return [localStorage.getItem('microscaler-token'), location.hash]");
    assert!(
        stored[0].as_str().is_some_and(|t| url.ends_with(t)),
        "{stored}"
    );
    assert_eq!(stored[1], "");
    // Hosts and decisions are shown.
    s.wait(
        10,
        "hosts and decisions",
        "return [document.querySelectorAll('#hosts .rep').length, document.querySelectorAll('#decisions li .r').length]",
        |v| v[0].as_u64() >= Some(1) && v[1].as_u64() >= Some(1),
    );
    s.screenshot(&out_dir.join("dashboard-live.png"));

    // A control: the manual demand of priority1 to 9 (the capacity). Demand is the max over
    // the triggers, so priority1 must reach 9 running, and priority2 give up its slots.
    let input = s.find(".svc[data-service=priority1] input.manual");
    s.cmd("POST", &format!("/element/{input}/clear"), Some(json!({})));
    s.cmd(
        "POST",
        &format!("/element/{input}/value"),
        Some(json!({"text": "9"})),
    );
    let button = s.find(".svc[data-service=priority1] button.set-manual");
    s.cmd("POST", &format!("/element/{button}/click"), Some(json!({})));
    s.wait(
        10,
        "the control to answer",
        "return document.getElementById('control-msg').textContent",
        |v| v.as_str().is_some_and(|t| t.starts_with("done")),
    );
    s.wait(
        30,
        "priority1 to run 9 replicas after the manual demand of 9",
        "return [document.body.dataset.demand, document.body.dataset.running, document.getElementById('success').textContent]",
        |v| v[0] == "9" && v[1] == "9" && v[2] == "demand met, capacity full",
    );
    s.screenshot(&out_dir.join("dashboard-manual-9.png"));

    // Readable on a phone: no horizontal scrolling at 390 px.
    s.cmd(
        "POST",
        "/window/rect",
        Some(json!({"width": 390, "height": 1400})),
    );
    std::thread::sleep(Duration::from_millis(800));
    let overflow =
        s.js("return document.documentElement.scrollWidth - document.documentElement.clientWidth");
    assert!(
        overflow.as_i64() <= Some(0),
        "the page scrolls sideways on a phone by {overflow} px"
    );
    s.screenshot(&out_dir.join("dashboard-phone.png"));
    eprintln!("screenshots in {}", out_dir.display());

    drop(s);
    drop(demo);
}

/// Capacity in CPU and memory on the dashboard: `microscaler run` on the process backend with
/// a machine of 1 CPU and 1 GiB (`allocatable`), web (2 x 250m, 128 MiB) and the remainder
/// batch (250m, 512 MiB: 1 fits by memory). The host's card shows a bar per resource, a
/// segment per service, and what they take of the host's room.
#[test]
fn resource_bars_in_a_real_browser() {
    if !have_browser() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("resources.toml");
    std::fs::write(
        &config,
        r#"
        instance = "browser-resources"
        tick = "200ms"
        on_exit = "stop"
        [capacity]
        resources = true
        [backend]
        type = "process"
        allocatable = { cpu = "1", memory = "1Gi" }
        [[services]]
        name = "web"
        priority = 1
        resources = { cpu = "250m", memory = "128Mi" }
        [[services.triggers]]
        type = "manual"
        initial = 2
        [[services]]
        name = "batch"
        priority = 2
        remainder = true
        resources = { cpu = "250m", memory = "512Mi" }
        "#,
    )
    .unwrap();
    let mut run = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(["run", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(tmp.path().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start microscaler run");
    let stderr = run.stderr.take().unwrap();
    let _run = Guard(run, libc::SIGTERM);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("dashboard and API on ").nth(1) {
                let url = rest.split_whitespace().next().unwrap_or_default();
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("microscaler run prints its dashboard's address");
    let (_driver, s) = open_browser(tmp.path(), &url);
    let bars = s.wait(
        30,
        "the host's resource bars",
        "return [...document.querySelectorAll('#hosts .res .rlabel')].map(e => e.textContent).concat([document.querySelectorAll('#hosts .rbar i').length])",
        |v| {
            v[0] == "cpu 0.75 CPU of 1 CPU"
                && v[1] == "memory 768 MiB of 1 GiB"
                && v[2].as_u64() == Some(4)
        },
    );
    eprintln!("{bars}");
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&out_dir).unwrap();
    s.screenshot(&out_dir.join("dashboard-resources.png"));
}
