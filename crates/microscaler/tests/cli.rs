//! The command line on bad input: every configuration error with its path and exit code 2,
//! nothing started; an unreachable engine named with what to do; `--help` everywhere.

use std::process::{Command, Output};

fn microscaler(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run microscaler")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

const BAD: &str = r#"
tick = "1ms"
[capacity]
slots = 9
[backend]
type = "process"
[[services]]
name = "web"
min = 3
max = 1
[[services.triggers]]
type = "kafka"
[[services]]
name = "batch"
remainder = true
colour = "red"
"#;

#[test]
fn validate_reports_every_error_with_its_path_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "bad.toml", BAD);
    let out = microscaler(&["validate", &f]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "(4 errors)",
        "tick: must be between 100ms and 1m",
        "services[0].max: must be >= min (3), got 1",
        "services[0].triggers[0].type: unknown source type \"kafka\": valid types are random, manual",
        "services[1].colour: unknown key",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // A wrong type: one line, its path and what was expected, nothing repeated after it.
    let f = write(
        &dir,
        "types.toml",
        "[capacity]\nslots = \"nine\"\n[backend]\ntype = \"process\"\n",
    );
    let out = microscaler(&["validate", &f]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(
        lines[1..],
        [
            "  capacity.slots: invalid type: string \"nine\", expected u32",
            "  services: at least one [[services]] entry is required"
        ],
        "{err}"
    );
}

#[test]
fn validate_accepts_a_good_file() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/docker.toml");
    let out = microscaler(&["validate", dir.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (docker backend, 2 services"));
}

#[test]
fn run_with_invalid_config_starts_nothing_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "bad.toml", BAD);
    let state = dir.path().join("state");
    let out = microscaler(&["run", "-c", &f, "--state-dir", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("services[0].max"));
    assert!(
        !state.exists(),
        "nothing may be started or created for an invalid config"
    );
}

#[test]
fn missing_file_is_a_usage_error() {
    let out = microscaler(&["validate", "/nonexistent/microscaler.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/microscaler.toml")
    );
}

#[test]
fn unreachable_docker_names_the_socket_and_docker_host() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "docker.toml",
        r#"
        [capacity]
        slots = 2
        [backend]
        type = "docker"
        [[services]]
        name = "web"
        remainder = true
        "#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(["run", "-c", &f])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the Docker engine at unix:///nonexistent/docker.sock"),
        "{err}"
    );
    assert!(err.contains("DOCKER_HOST"), "{err}");
}

#[test]
fn demo_falls_back_to_processes_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(["demo", "--duration", "1s", "--instance"])
        .arg(format!("fallback-{}", std::process::id()))
        .arg("--state-dir")
        .arg(dir.path())
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Running the demo on local processes instead"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("microscaler demo on process"));
}

#[test]
fn set_demand_needs_a_manual_trigger_and_a_number() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "p.toml",
        r#"
        [capacity]
        slots = 2
        [backend]
        type = "process"
        [[services]]
        name = "web"
        remainder = true
        "#,
    );
    let state = dir.path().join("state");
    let st = state.to_str().unwrap();
    let out = microscaler(&["run", "-c", &f, "--state-dir", st, "--set-demand", "web=3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a service with a manual trigger"));
    assert!(
        !state.exists(),
        "nothing is set up before the flags are checked"
    );
    let out = microscaler(&["run", "-c", &f, "--state-dir", st, "--set-demand", "web=-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a number >= 0"));
}

#[test]
fn help_on_every_command() {
    for args in [
        &["--help"][..],
        &["demo", "--help"],
        &["run", "--help"],
        &["validate", "--help"],
        &["simulate", "--help"],
        &["status", "--help"],
        &["explain", "--help"],
    ] {
        let out = microscaler(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{args:?}"
        );
    }
}

/// A plain HTTP/1.1 request to 127.0.0.1:`port`; the whole answer.
fn http(port: u16, req: String) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Runs `run` for 4 s with `[server] token = "config-token-0123456789"` on a free port, with
/// `extra` arguments; once its API answers, `during(port)`; then checks the daemon ended well.
fn with_daemon<T>(extra: &[&str], during: impl FnOnce(u16) -> T) -> T {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "s.toml",
        &format!(
            r#"
            instance = "cli-server-{pid}-{port}"
            on_exit = "stop"
            [capacity]
            slots = 2
            [backend]
            type = "process"
            [server]
            listen = "127.0.0.1:{port}"
            token = "config-token-0123456789"
            [[services]]
            name = "web"
            [[services.triggers]]
            type = "manual"
            initial = 1
            "#,
            pid = std::process::id()
        ),
    );
    let state = dir.path().join("state");
    let child = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(["run", "-c", &f, "--duration", "4s", "--state-dir"])
        .arg(&state)
        .args(extra)
        .env_remove("MICROSCALER_TOKEN")
        .env_remove("MICROSCALER_TOKEN_FILE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..50 {
        status = http(
            port,
            // A loopback Host: without the token, no other name is served.
            "GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".into(),
        );
        if status.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = status.expect("the server listens on the configured address");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let result = during(port);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    result
}

/// The status line of a demand change made with each of `tokens` ("" for none), on a daemon
/// run with `extra`.
fn api_change_statuses(extra: &[&str], tokens: &[&str]) -> Vec<String> {
    with_daemon(extra, |port| {
        tokens
        .iter()
        .map(|token| {
            let auth = if token.is_empty() {
                String::new()
            } else {
                format!("Authorization: Bearer {token}\r\n")
            };
            let body = r#"{"value": 2}"#;
            let answer = http(port, format!(
                "PUT /api/v1/services/web/demand HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ))
            .unwrap();
            answer.lines().next().unwrap_or("").to_string()
        })
        .collect()
    })
}

/// `status` and `explain` read a running daemon's API: every service with its target and
/// reason; a service's configuration, its trigger's last value, its state and its decisions.
/// An unknown service is a usage error listing the known ones; an address where nothing
/// listens says so and what to give.
#[test]
fn status_and_explain_read_a_running_daemon() {
    let (status, explain, unknown) = with_daemon(&[], |port| {
        let address = format!("http://127.0.0.1:{port}");
        // Let the daemon tick and record its first decision.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let run = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_microscaler"))
                .args(args)
                .args(["--address", address.as_str()])
                .env_remove("MICROSCALER_TOKEN")
                .env_remove("MICROSCALER_TOKEN_FILE")
                .output()
                .unwrap()
        };
        (
            run(&["status"]),
            run(&["explain", "web"]),
            run(&["explain", "nope"]),
        )
    });
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        text.contains("backend process") && text.contains("API changes on"),
        "{text}"
    );
    let web = text
        .lines()
        .find(|l| l.starts_with("web "))
        .expect("web's line");
    assert!(web.contains("started") || web.contains("demand"), "{web}");

    let text = String::from_utf8_lossy(&explain.stdout);
    assert!(
        explain.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&explain.stderr)
    );
    for want in [
        "Service:   web",
        "Triggers:",
        "last value 1",
        "State:     demand 1, target 1",
        "Decisions (newest first):",
        "start   0 -> 1",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }

    let err = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no service \"nope\"") && err.contains("web"),
        "{err}"
    );

    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(["status", "--address", &format!("http://127.0.0.1:{dead}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach microscaler's API at http://127.0.0.1:"),
        "{err}"
    );
}

/// `run` takes the server's address and token from the configuration's `[server]` section.
#[test]
fn run_serves_on_the_configured_address_with_the_configured_token() {
    let s = api_change_statuses(&[], &["", "config-token-0123456789"]);
    assert!(s[0].starts_with("HTTP/1.1 401"), "{s:?}");
    assert!(s[1].starts_with("HTTP/1.1 2"), "{s:?}");
}

/// Token-less reads are served under a loopback name or one of `--allowed-host` (a local
/// reverse proxy's), not under any other name (DNS rebinding).
#[test]
fn token_less_reads_need_a_loopback_or_allowed_host() {
    let lines = with_daemon(&["--allowed-host", "scaler.internal"], |port| {
        [
            "127.0.0.1",
            "localhost:1",
            "Scaler.Internal:8443",
            "evil.example",
        ]
        .map(|host| {
            let answer = http(
                port,
                format!("GET /api/v1/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            )
            .unwrap();
            answer.lines().next().unwrap_or("").to_string()
        })
    });
    assert!(
        lines[..3].iter().all(|l| l.starts_with("HTTP/1.1 200")),
        "{lines:?}"
    );
    assert!(lines[3].starts_with("HTTP/1.1 401"), "{lines:?}");
}

/// `--token-file` (a systemd credential, say) gives the token from a file, trimmed, over the
/// configuration's; an empty or missing file, or `--token` beside it, is a usage error (exit
/// 2) naming the file and never printing a token.
#[test]
fn the_token_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "api-token", "file-token-9876543210\n");
    let s = api_change_statuses(
        &["--token-file", &file],
        &["", "config-token-0123456789", "file-token-9876543210"],
    );
    assert!(s[0].starts_with("HTTP/1.1 401"), "{s:?}");
    assert!(
        s[1].starts_with("HTTP/1.1 401"),
        "the file's token wins: {s:?}"
    );
    assert!(s[2].starts_with("HTTP/1.1 2"), "{s:?}");

    let config = write(
        &dir,
        "c.toml",
        "instance = \"tf\"\n[capacity]\nslots = 1\n[backend]\ntype = \"process\"\n[[services]]\nname = \"w\"\nremainder = true\n",
    );
    let empty = write(&dir, "empty", "\n");
    for (args, want) in [
        (vec!["--token-file", empty.as_str()], "the file is empty"),
        (
            vec!["--token-file", "/nonexistent/token"],
            "/nonexistent/token",
        ),
        (
            vec!["--token-file", file.as_str(), "--token", "x"],
            "cannot be used with",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_microscaler"))
            .args(["run", "-c", &config, "--duration", "1s", "--state-dir"])
            .arg(dir.path().join("state"))
            .args(&args)
            .env_remove("MICROSCALER_TOKEN")
            .env_remove("MICROSCALER_TOKEN_FILE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("file-token-9876543210"), "{err}");
    }
}

/// `simulate` with a known trace, two variants side by side (no pool, a pool of 3), the
/// figures worked out by hand (see the engine-side test in src/simulate.rs): web goes from 2
/// to 5 at 1.05 s; seen at the 1.1 s tick; batch's stops (50 ms) first; without a pool web's
/// starts (300 ms) run at 1.45 s, with one its unpauses (10 ms) at 1.16 s.
#[test]
fn simulate_a_known_trace_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "seeds.toml",
        r#"
        tick = "100ms"
        [capacity]
        slots = 9
        [backend]
        type = "docker"
        [[services]]
        name = "web"
        priority = 1
        [[services.triggers]]
        type = "manual"
        initial = 2
        [[services]]
        name = "batch"
        priority = 2
        remainder = true
        "#,
    );
    let trace = write(
        &dir,
        "trace.jsonl",
        "{\"time\": 1.05, \"service\": \"web\", \"value\": 5}\n",
    );
    let output = dir.path().join("figures.json");
    let out = microscaler(&[
        "simulate",
        &config,
        "--trace",
        &trace,
        "--vary",
        "services.web.pool.size=0,3",
        "--duration",
        "3s",
        "--warmup",
        "1s",
        "--start-latency",
        "300ms",
        "--stop-latency",
        "50ms",
        "--unpause-latency",
        "10ms",
        "--output",
        output.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("services.web.pool.size=0"), "{stdout}");
    assert!(stdout.contains("services.web.pool.size=3"), "{stdout}");
    assert!(stdout.contains("82.50%"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let f = |i: usize, k: &str| v["configurations"][i]["figures"][k].as_f64().unwrap();
    assert!((f(0, "demand_met") - 0.825).abs() < 1e-9, "{v}");
    assert!((f(0, "reaction_p50_ms") - 400.0).abs() < 0.5, "{v}");
    assert!((f(1, "demand_met") - 0.97).abs() < 1e-9, "{v}");
    assert!((f(1, "reaction_p50_ms") - 110.0).abs() < 0.5, "{v}");
    assert_eq!(f(1, "unpaused"), 3.0, "{v}");
}

/// A bad trace names every bad line, and a trigger with no values of its own and none in the
/// trace is named with its path; both exit 2.
#[test]
fn simulate_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write(&dir, "bad.csv", "time,service,value\n1,web\nx,web,1\n");
    let out = microscaler(&["simulate", "--trace", &trace]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 2:") && stderr.contains("line 3:"),
        "{stderr}"
    );
    let config = write(
        &dir,
        "redis.toml",
        r#"
        [capacity]
        slots = 4
        [backend]
        type = "docker"
        [[services]]
        name = "worker"
        [[services.triggers]]
        type = "redis_list"
        url = "redis://127.0.0.1:6379"
        key = "jobs"
        "#,
    );
    let out = microscaler(&["simulate", &config, "--duration", "10s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("services[0].triggers[0] (worker/redis_list)"),
        "{stderr}"
    );
}

/// Capacity in resources on two modelled hosts of 2 GiB: web asks for 3 replicas of 1 CPU
/// and 1 GiB. With `--host-cpu 1.5` one fits on each host and the third on none (0.5 CPU
/// left on each: 1 CPU in all, but not on one host): demand never met, capacity used all the
/// time, 2 CPU of 3 held. With 2 CPU all 3 fit (2 on host-1): demand met, but host-2 has room
/// for one more, so the capacity is never used up; 3 CPU of 4 held.
#[test]
fn simulate_capacity_in_resources_on_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "web.toml",
        r#"
        tick = "100ms"
        [capacity]
        resources = true
        [backend]
        type = "docker"
        [[services]]
        name = "web"
        resources = { cpu = 1, memory = "1Gi" }
        [[services.triggers]]
        type = "manual"
        initial = 3
        "#,
    );
    let output = dir.path().join("figures.json");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "simulate",
            &config,
            "--duration",
            "3s",
            "--warmup",
            "1s",
            "--hosts",
            "2",
        ];
        args.extend_from_slice(extra);
        microscaler(&args)
    };
    let out = run(&[
        "--host-memory",
        "2Gi",
        "--host-cpu",
        "1",
        "--vary",
        "host-cpu=1.5,2",
        "--output",
        output.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("host-cpu=1.5") && stdout.contains("host-cpu=2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cpu used") && stdout.contains("unschedulable"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let f = |i: usize, k: &str| v["configurations"][i]["figures"][k].as_f64().unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(f(0, "demand_met"), 0.0), "{v}");
    assert!(close(f(0, "capacity_used"), 1.0), "{v}");
    assert!(close(f(0, "cpu_used"), 2.0 / 3.0), "{v}");
    assert!(close(f(0, "memory_used"), 0.5), "{v}");
    assert_eq!(f(0, "capacity"), 2.0, "{v}");
    assert!(close(f(1, "demand_met"), 1.0), "{v}");
    assert!(close(f(1, "capacity_used"), 0.0), "{v}");
    assert!(close(f(1, "cpu_used"), 0.75), "{v}");
    assert_eq!(f(1, "capacity"), 3.0, "{v}");
    assert_eq!(f(1, "unschedulable"), 0.0, "{v}");
    assert_eq!(
        v["model"]["host_memory_bytes"].as_u64(),
        Some(2 << 30),
        "{v}"
    );

    // Without the hosts' size, or with a size that is not one: exit 2, the option named.
    let out = run(&["--host-cpu", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("give --host-memory ("), "{stderr}");
    let out = run(&["--host-cpu", "2", "--host-memory", "lots"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--host-memory") && stderr.contains("not a memory quantity"),
        "{stderr}"
    );
    let out = run(&["--host-memory", "8Gi", "--vary", "host-cpu=2,0.0001"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--vary host-cpu: "), "{stderr}");
}

/// A failure that goes on every tick is logged once, not once per tick: a trigger whose Redis
/// is not there (a port nothing listens on, `required = false`) fails at each of about 25
/// ticks of 100 ms, and the log says "sample failed" once (it would say it again, counted, a
/// minute later). The failure is still in every tick's report (the API and metrics count it).
#[test]
fn a_failure_that_goes_on_is_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = write(
        &dir,
        "away.toml",
        &format!(
            r#"
            instance = "repeat-{pid}"
            tick = "100ms"
            [capacity]
            slots = 2
            [backend]
            type = "process"
            [[services]]
            name = "worker"
            [[services.triggers]]
            type = "redis_list"
            url = "redis://127.0.0.1:{port}"
            key = "jobs"
            required = false
            timeout = "50ms"
            "#,
            pid = std::process::id()
        ),
    );
    let state = dir.path().join("state");
    let out = microscaler(&[
        "run",
        "-c",
        &f,
        "--duration",
        "3s",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let said = log.matches("sample failed").count();
    assert_eq!(said, 1, "logged {said} times:\n{log}");
    assert!(log.contains("logged once a minute"), "{log}");
}
