//! `bench`: microscaler's benchmarks against the real local Docker engine (and, with
//! `bench kubernetes`, the Kubernetes test rig).
//!
//! Every figure is reported with a baseline measured in the same run, as a ratio, because the
//! engine is shared (other tests create containers on it) and absolute numbers are noisy.
//! Results and how to read them: BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};

mod docker;
mod ecs;
mod engine;
mod engine_calls;
mod kubernetes;
mod memory;
mod plan;
mod report;
mod soak;
mod tick;
mod wake;

/// microscaler's benchmarks: reaction, release, burst, tracking (real Docker engine), plan time
/// (engine alone) and resident memory (the real binary). Prints a table; `--json` writes JSON.
#[derive(Parser, Debug)]
#[command(name = "bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    opts: Opts,
}

/// Which figures to measure.
#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// Everything below, in this order.
    All,
    /// Demand step -> new priority-1 replica running (free capacity, and preempting a
    /// remainder), and demand drop -> remainder back; against raw Engine API calls.
    Reaction,
    /// 0 -> N replicas, against N raw create + start with the same parallelism.
    Burst,
    /// The seeds' scenario (capacity 9, ±3 every 3 s) and a faster one (±3 every 1 s).
    Tracking,
    /// Plan time of the engine alone, 10,000 services on 1,000 hosts.
    Plan,
    /// One whole control-loop tick (observe + sample + decide + dispatch) of the same
    /// 10,000 services on the simulated orchestrator, ~1,000 of them changing per tick.
    Tick,
    /// Resident memory of `microscaler run` managing N replicas (process backend, or Docker
    /// with `--memory-backend docker`).
    Memory,
    /// Demand step -> Deployment's spec.replicas patched and -> new pod Ready, against a raw
    /// PATCH /scale, on the Kubernetes test rig (scripts/k8s-rig.sh start). Not in `all`.
    Kubernetes,
    /// ECS container-instance event on SQS -> the one-per-host service's UpdateService,
    /// against a raw SQS consumer that calls UpdateService itself, on moto server. Not in `all`.
    EcsEvents,
    /// `microscaler run` (process backend) for `--soak` at `--tick` with its demand changed
    /// through the API every 300 ms and `--sse-clients` live-stream clients reconnecting:
    /// slope of resident memory and open files, ticks over twice the period. Not in `all`.
    Soak,
    /// An `RPUSH` to a Redis list (a `redis_list` trigger, rule average, target 1, keyspace
    /// notifications on) -> the new replica running on Docker, against a raw create + start
    /// (and with `--pool` a raw unpause). Needs Debian's redis-server. Not in `all`.
    Rpush,
}

/// Options shared by every figure.
#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// The control loop's tick for the Docker figures.
    #[arg(long, global = true, default_value = "100ms", value_parser = parse_duration)]
    tick: Duration,
    /// Demand steps for reaction and release (each also measures its baseline once).
    #[arg(long, global = true, default_value_t = 50)]
    steps: usize,
    /// The demand step of the free-capacity reaction: priority 1 goes from 1 to 1 + STEP
    /// replicas, against STEP raw create + starts run at once (1 to 9).
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    step: u32,
    /// Replicas of the burst.
    #[arg(long, global = true, default_value_t = 100)]
    burst: usize,
    /// Containers created and started at once (microscaler's start_parallelism and the raw
    /// baseline's).
    #[arg(long, global = true, default_value_t = 8)]
    parallelism: usize,
    /// Length of each tracking scenario (after the first convergence).
    #[arg(long, global = true, default_value = "5m", value_parser = parse_duration)]
    tracking: Duration,
    /// Replicas for the memory figure.
    #[arg(long, global = true, default_value_t = 1000)]
    replicas: u32,
    /// Where the memory figure's replicas run: local processes, or containers on the local
    /// Docker engine (every container a containerd shim: 1,000 need several GiB).
    #[arg(long, global = true, value_enum, default_value = "process")]
    memory_backend: memory::MemoryBackend,
    /// Iterations of the in-binary plan timing.
    #[arg(long, global = true, default_value_t = 200)]
    plan_iterations: usize,
    /// The microscaler binary for the memory figure (default: next to this one).
    #[arg(long, global = true)]
    microscaler: Option<PathBuf>,
    /// Warm pool of priority 1 in the Docker figures (`[services.pool] size = N`); every
    /// reaction step then waits until the pool is full, and reaction adds a raw unpause
    /// baseline. 0: no pool.
    #[arg(long, global = true, default_value_t = 0)]
    pool: u32,
    /// Warm pool of the remainder (priority 2) in the figures that have one: paused replicas
    /// kept beside what it runs, so it grows by unpausing even past its largest count so far.
    /// 0: none (it still keeps what it paused with `--preempt pause`).
    #[arg(long, global = true, default_value_t = 0)]
    pool_p2: u32,
    /// What a scale-down does to the remainder (priority 2) in the figures that have one:
    /// "stop" (remove) or "pause" (`[services.pool] preempt = "pause"`).
    #[arg(long, global = true, default_value = "stop", value_parser = ["stop", "pause"])]
    preempt: String,
    /// What a scale-down does to priority 1's replicas given up: "stop" (remove, the seeds'
    /// scenario) or "pause" (`preempt = "pause"` on priority 1 too: its surplus is frozen and
    /// kept, up to its max, for the next increase). Reported in the figures' names.
    #[arg(long, global = true, default_value = "stop", value_parser = ["stop", "pause"])]
    preempt_p1: String,
    /// Length of the soak.
    #[arg(long, global = true, default_value = "1h", value_parser = parse_duration)]
    soak: Duration,
    /// Live-stream (SSE) clients of the soak, each reconnecting every few seconds.
    #[arg(long, global = true, default_value_t = 200)]
    sse_clients: usize,
    /// Tracking scenarios to run: the interval between demand changes, comma-separated.
    #[arg(long, global = true, default_value = "3s,1s", value_delimiter = ',',
          value_parser = parse_duration)]
    intervals: Vec<Duration>,
}

/// The microscaler binary: `--microscaler`, else the one next to this binary.
fn microscaler_bin(o: &Opts) -> PathBuf {
    o.microscaler.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("microscaler")))
            .unwrap_or_else(|| PathBuf::from("microscaler"))
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write it like \"500ms\", \"30s\")"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let o = cli.opts.clone();
    let all = cli.cmd == Cmd::All;
    let mut rows = Vec::new();
    let mut out = Map::new();
    let mut failed = Vec::new();
    let mut record = |name: &str, r: Result<(Value, Vec<report::Row>)>, rows: &mut Vec<_>| match r {
        Ok((v, rs)) => {
            out.insert(name.into(), v);
            rows.extend(rs);
        }
        Err(e) => {
            eprintln!("bench: {name} failed: {e:#}");
            failed.push(name.to_string());
            out.insert(name.into(), json!({ "error": format!("{e:#}") }));
        }
    };
    let started = std::time::SystemTime::now();

    if all || cli.cmd == Cmd::Plan {
        eprintln!("bench: plan time ({} iterations)", o.plan_iterations);
        record("plan", Ok(plan::run(o.plan_iterations)), &mut rows);
    }
    if all || cli.cmd == Cmd::Tick {
        eprintln!("bench: control-loop tick ({} rounds)", o.plan_iterations);
        record("tick", Ok(tick::run(o.plan_iterations).await), &mut rows);
    }
    let mut floor_ms = None;
    if all || cli.cmd == Cmd::Reaction {
        eprintln!(
            "bench: reaction and release ({} steps, tick {:?}, pool {}, preempt {}, P1 preempt {})",
            o.steps, o.tick, o.pool, o.preempt, o.preempt_p1
        );
        let r = docker::reaction(&o).await;
        if let Ok((v, _)) = &r {
            floor_ms = v["reaction_free"]["baseline_create_start"]["p50_ms"].as_f64();
        }
        record("reaction", r, &mut rows);
    }
    if all || cli.cmd == Cmd::Burst {
        eprintln!("bench: burst 0 -> {}", o.burst);
        record("burst", docker::burst(&o).await, &mut rows);
    }
    if all || cli.cmd == Cmd::Tracking {
        for &interval in &o.intervals {
            let every = humantime::format_duration(interval);
            eprintln!(
                "bench: tracking ±3 every {every} for {:?} (pool {}, preempt {}, P1 preempt {})",
                o.tracking, o.pool, o.preempt, o.preempt_p1
            );
            let r = docker::tracking(&o, interval, floor_ms).await;
            record(&format!("tracking_{every}"), r, &mut rows);
        }
    }
    if all || cli.cmd == Cmd::Memory {
        let bin = microscaler_bin(&o);
        eprintln!(
            "bench: resident memory with {} replicas ({:?} backend, {})",
            o.replicas,
            o.memory_backend,
            bin.display()
        );
        let backend = o.memory_backend;
        let r = tokio::task::spawn_blocking(move || {
            memory::run(&bin, backend, o.replicas, Duration::from_millis(500))
        })
        .await?;
        record("memory", r, &mut rows);
    }

    if cli.cmd == Cmd::Kubernetes {
        eprintln!(
            "bench: kubernetes reaction ({} steps, tick {:?}) on the test rig",
            o.steps, o.tick
        );
        record("kubernetes", kubernetes::reaction(&o).await, &mut rows);
    }

    if cli.cmd == Cmd::EcsEvents {
        eprintln!(
            "bench: ECS container-instance events ({} steps) on moto server",
            o.steps
        );
        record("ecs_events", ecs::events(&o).await, &mut rows);
    }

    if cli.cmd == Cmd::Rpush {
        eprintln!(
            "bench: RPUSH -> replica running ({} steps, tick {:?}, pool {})",
            o.steps, o.tick, o.pool
        );
        record("rpush", wake::rpush(&o).await, &mut rows);
    }

    if cli.cmd == Cmd::Soak {
        let bin = microscaler_bin(&o);
        eprintln!(
            "bench: soak of {} for {} at tick {:?} with {} stream clients",
            bin.display(),
            humantime::format_duration(o.soak),
            o.tick,
            o.sse_clients
        );
        record(
            "soak",
            soak::run(&bin, o.soak, o.sse_clients, o.tick).await,
            &mut rows,
        );
    }

    print!("{}", report::table(&rows));
    if let Some(path) = &o.json {
        let unix = started
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let doc = json!({
            "started_unix": unix,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "options": { "tick_ms": report::ms(o.tick), "steps": o.steps, "burst": o.burst,
                         "parallelism": o.parallelism, "tracking_s": o.tracking.as_secs_f64(),
                         "replicas": o.replicas, "soak_s": o.soak.as_secs_f64(), "sse_clients": o.sse_clients, "pool": o.pool, "pool_p2": o.pool_p2, "preempt": o.preempt, "preempt_p1": o.preempt_p1,
                         "intervals_ms": o.intervals.iter().map(|d| report::ms(*d)).collect::<Vec<_>>() },
            "table": rows.iter().map(report::Row::json).collect::<Vec<_>>(),
            "results": Value::Object(out),
            "failed": failed,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("bench: wrote {}", path.display());
    }
    if !failed.is_empty() {
        anyhow::bail!("{} figure(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
