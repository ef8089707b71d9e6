//! `microscaler run --dry-run` on the real Docker engine: it observes, samples, decides and
//! reports every change it would make, and the engine's containers are exactly as they were.
//! (The same on the real Kubernetes control plane is in tests/kubernetes.rs.)

use std::process::{Command, Output};

use microscaler_testkit::{missing_service, unique};
use serde_json::Value;

/// This instance's containers on the engine: `id state` lines, sorted.
fn containers(instance: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=io.microscaler.instance={instance}"),
            "--format",
            "{{.ID}} {{.State}} {{.Label \"io.microscaler.service\"}}",
        ])
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "docker ps: {out:?}");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn run(config: &std::path::Path, state: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microscaler"))
        .args(["run", "--listen", "off", "--log-level", "info", "--json"])
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .output()
        .expect("run microscaler")
}

/// The JSON tick lines of a run.
fn ticks(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn service<'a>(tick: &'a Value, name: &str) -> Option<&'a Value> {
    tick["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// A real run leaves web at 1 and batch filling the rest (4 slots); a dry run with web's
/// demand at 3 then plans web 1 -> 3 and batch 3 -> 1, logs them as changes it would make,
/// and leaves every container as it was (same ids, same states), even with
/// `on_exit = "stop"` at its end.
#[test]
fn dry_run_on_docker_plans_and_changes_nothing() {
    if let Err(e) = Command::new("docker")
        .arg("info")
        .output()
        .map_err(|e| e.to_string())
        .and_then(|o| {
            o.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
        })
    {
        if missing_service("the Docker engine", e) {
            return;
        }
    }
    let instance = unique("dry");
    let _cleanup = microscaler_testkit::Leftovers::containers(&instance);
    let dir = tempfile::tempdir().expect("dir");
    let write = |on_exit: &str| {
        let path = dir.path().join(format!("{on_exit}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"
                instance = "{instance}"
                tick = "200ms"
                on_exit = "{on_exit}"
                [capacity]
                slots = 4
                [backend]
                type = "docker"
                network = "none"
                [[services]]
                name = "web"
                priority = 1
                stop_grace = "1s"
                [[services.triggers]]
                type = "manual"
                [[services]]
                name = "batch"
                priority = 2
                remainder = true
                stop_grace = "1s"
                "#
            ),
        )
        .expect("write the configuration");
        path
    };

    let real = run(
        &write("leave"),
        dir.path(),
        &["--set-demand", "web=1", "--duration", "4s"],
    );
    assert!(real.status.success(), "{real:?}");
    let before = containers(&instance);
    let running = |svc: &str| {
        before
            .iter()
            .filter(|l| l.ends_with(&format!(" running {svc}")))
            .count()
    };
    assert_eq!(
        (running("web"), running("batch"), before.len()),
        (1, 3, 4),
        "{before:?}"
    );

    let dry = run(
        &write("stop"),
        dir.path(),
        &["--dry-run", "--set-demand", "web=3", "--duration", "3s"],
    );
    let stderr = String::from_utf8_lossy(&dry.stderr);
    assert!(dry.status.success(), "{stderr}");
    let ticks = ticks(&dry);
    let planned = ticks.iter().any(|t| {
        service(t, "web").is_some_and(|s| s["target"] == 3 && s["running"] == 1)
            && service(t, "batch").is_some_and(|s| s["target"] == 1 && s["running"] == 3)
    });
    assert!(
        planned,
        "no tick planned web 1 -> 3, batch 3 -> 1: {ticks:?}"
    );
    // Nothing moves, so every tick observes what the real run left.
    assert!(
        ticks.iter().all(|t| {
            service(t, "web").is_some_and(|s| s["running"] == 1)
                && service(t, "batch").is_some_and(|s| s["running"] == 3)
        }),
        "{ticks:?}"
    );
    assert!(stderr.contains("dry run: would scale"), "{stderr}");
    assert!(stderr.contains("dry run: changed nothing"), "{stderr}");
    assert_eq!(
        containers(&instance),
        before,
        "the dry run changed containers"
    );
}
