//! The seeds' demo, out of the box: capacity 9, one priority-1 service on random demand
//! (±3 every 3 s), one priority-2 remainder service that fills the rest.
//!
//! The demo's configuration is written as TOML and goes through the same validation as any
//! user's file, so the demo can never run a configuration `run` would refuse.

use std::time::Duration;

/// Which backend the demo runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoBackend {
    /// Docker if an engine answers, else local processes.
    Auto,
    /// The Docker engine (DOCKER_HOST or the default socket).
    Docker,
    /// Local processes.
    Process,
}

/// The demo's settings.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    /// Slots.
    pub capacity: u32,
    /// Largest demand move.
    pub delta: u32,
    /// Time between demand moves.
    pub interval: Duration,
    /// Seed of the demand (None = from the clock, printed so the run can be replayed).
    pub seed: Option<u64>,
    /// Tick.
    pub tick: Duration,
    /// Instance name (labels).
    pub instance: String,
}

/// The demo's configuration as TOML for `backend` ("docker" or "process").
pub fn config_toml(s: &DemoSettings, backend: &str) -> String {
    let seed = s.seed.map(|n| format!("seed = {n}\n")).unwrap_or_default();
    format!(
        r#"# The seeds' demo: priority 1 follows random demand, priority 2 fills what is left.
instance = "{instance}"
tick = "{tick}ms"
on_exit = "stop"

[capacity]
slots = {capacity}

[backend]
type = "{backend}"

[[services]]
name = "priority1"
priority = 1
stop_grace = "2s"
[[services.triggers]]
type = "random"
delta = {delta}
interval = "{interval}ms"
{seed}
[[services]]
name = "priority2"
priority = 2
remainder = true
stop_grace = "2s"
"#,
        instance = s.instance,
        tick = s.tick.as_millis(),
        capacity = s.capacity,
        delta = s.delta,
        interval = s.interval.as_millis(),
    )
}
