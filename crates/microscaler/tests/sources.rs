//! Start-up checks of network sources through the binary: an unreachable server stops the
//! start with exit 1 and names it, before any replica is created; `required = false` starts
//! anyway and reports the trigger as failing.

use std::process::{Command, Output};

fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn run(config: &str, extra: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, config).unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(["run", "--config", f.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .expect("run microscaler");
    (out, dir)
}

fn config(port: u16, required: bool) -> String {
    format!(
        r#"
instance = "srccheck-{pid}"
tick = "200ms"
on_exit = "stop"
[capacity]
slots = 4
[backend]
type = "process"
[[services]]
name = "worker"
priority = 1
min = 1
[[services.triggers]]
name = "queue"
type = "redis_list"
url = "redis://127.0.0.1:{port}"
key = "jobs"
timeout = "300ms"
required = {required}
"#,
        pid = std::process::id()
    )
}

#[test]
fn unreachable_required_source_exits_1_naming_the_server_and_starts_nothing() {
    let port = dead_port();
    let (out, dir) = run(&config(port, true), &["--duration", "5s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    for expected in [
        "trigger \"queue\" of service \"worker\" failed its start-up check",
        &format!("cannot connect to Redis at redis://127.0.0.1:{port}"),
        "set required = false",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // Nothing was started: the process backend recorded no replica.
    let state = dir.path().join("state");
    let replicas = std::fs::read_dir(&state).map_or(0, |d| {
        d.filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().contains("worker"))
        })
        .count()
    });
    assert_eq!(replicas, 0, "replica records in {state:?}");
}

#[test]
fn unrequired_source_starts_and_reports_the_trigger_failing() {
    let port = dead_port();
    let (out, _dir) = run(&config(port, false), &["--duration", "1s", "--ticks"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{err}\nstdout:\n{stdout}"
    );
    let all = format!("{err}{stdout}");
    assert!(
        all.contains("start-up check failed; starting anyway"),
        "no start-up warning in:\n{all}"
    );
    assert!(
        all.contains(&format!(
            "cannot connect to Redis at redis://127.0.0.1:{port}"
        )),
        "no failing trigger reported in:\n{all}"
    );
}

#[test]
fn the_queue_example_is_valid() {
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/queue.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(["validate", f.to_str().unwrap()])
        .output()
        .expect("run microscaler");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
