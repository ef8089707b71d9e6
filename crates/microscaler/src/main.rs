//! The `microscaler` command line.
//!
//! Exit codes: 0 success, 1 runtime failure (an orchestrator unreachable, ...), 2 invalid
//! configuration or usage.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use microscaler::control::{run_loop, Controller, Controls, TickReport};
use microscaler::demo::{self, DemoBackend, DemoSettings, QueueSettings, RateShape, Scenario};
use microscaler::report::TickLine;
use microscaler::wiring::{build_backend, default_state_dir};
use microscaler_backends::Config;
use microscaler_backends::{AnyBackend, Backend};
use microscaler_core::config::OnExit;
use microscaler_core::BackendPlugins;
use microscaler_server::{Hub, ServerOptions, Setup, Store, Tick, TickError, TickParts};

/// Real-time, priority-aware container autoscaler.
///
/// Every tick (500 ms by default) microscaler observes what runs, samples each service's
/// demand, decides how many replicas every service gets inside the cluster's fixed capacity
/// (priority 1 first; remainder services fill what is left) and makes it so through Docker,
/// Docker Swarm, Kubernetes, AWS ECS, Nomad, Marathon or local processes.
#[derive(Parser)]
#[command(name = "microscaler", version, propagate_version = true)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a full filter like
    /// "microscaler=debug,bollard=warn". RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn", env = "MICROSCALER_LOG")]
    log_level: String,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the seeds' demo: capacity 9, priority 1 on random demand (±3 every 3 s), priority 2
    /// fills the rest. Uses Docker if an engine answers, local processes otherwise.
    /// `--scenario queue`: priority-1 workers consume a real Redis list fed at a varying rate.
    Demo(DemoArgs),
    /// Run the autoscaler from a configuration file.
    Run(RunArgs),
    /// Check a configuration file; print every error with its path (exit 2 if any).
    Validate {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print a running daemon's state: every service's demand, target, what runs and why.
    Status(InspectArgs),
    /// Replay demand (a trace, or the configuration's random walks) through the real engine
    /// against a modelled cluster in virtual time, no containers, and print the seeds' figures
    /// (demand met, capacity used, reaction, churn) for each configuration side by side.
    Simulate(SimulateArgs),
    /// Explain a service of a running daemon: its configuration, its triggers' last values,
    /// what bound its target, and its latest decisions with their reasons.
    Explain {
        /// The service.
        service: String,
        /// How many decisions to show (newest first).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        decisions: u32,
        #[command(flatten)]
        api: InspectArgs,
    },
}

/// `microscaler simulate`'s flags.
#[derive(clap::Args)]
struct SimulateArgs {
    /// Configurations to compare [default: the seeds' demo: 9 slots, priority 1 on a ±3 random
    /// walk every 3 s, priority 2 the remainder, 500 ms ticks].
    configs: Vec<PathBuf>,
    /// Demand over time: CSV lines `time,service,value` or JSON lines
    /// `{"time": 1.5, "service": "web", "value": 3}`; time in seconds from the start, service as
    /// NAME or NAME/TRIGGER. Random and manual triggers without values in it keep their own.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Run each configuration with a key set to each value: PATH=V1,V2,... (repeatable; every
    /// combination runs). PATH: `tick`, `capacity.slots`, `services.NAME.max_step`,
    /// `services.NAME.pool.size`, ..., or the model's `hosts`, `host-cpu`, `host-memory`
    #[arg(long = "vary", value_name = "PATH=V1,V2")]
    vary: Vec<String>,
    /// Simulated time [default: 1h; with --trace, until its last change + 10 s].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Time at the start left out of the figures.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// Hosts of the modelled cluster (all ready).
    #[arg(long, default_value_t = 3)]
    hosts: u32,
    /// Each host's CPUs ("4", "3500m"), less the configuration's reserve_cpu: needed when
    /// capacity is counted in resources.
    #[arg(long, value_name = "CPUS", value_parser = microscaler_core::Resources::parse_cpu)]
    host_cpu: Option<u64>,
    /// Each host's memory ("8Gi", bytes), less reserve_memory: needed with resources.
    #[arg(long, value_name = "MEMORY", value_parser = microscaler_core::Resources::parse_memory)]
    host_memory: Option<u64>,
    /// From a start to the replica running: "250ms", or uniform between two: "180ms..260ms"
    /// [default: Docker's create + start measured here].
    #[arg(long, default_value = "180ms..260ms")]
    start_latency: microscaler::simulate::Latency,
    /// From a stop to the replica gone.
    #[arg(long, default_value = "40ms..60ms")]
    stop_latency: microscaler::simulate::Latency,
    /// From a pause to the replica frozen.
    #[arg(long, default_value = "10ms")]
    pause_latency: microscaler::simulate::Latency,
    /// From an unpause to the replica running.
    #[arg(long, default_value = "10ms..14ms")]
    unpause_latency: microscaler::simulate::Latency,
    /// Share of starts that fail (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Seed of the latencies, failures and random walks that have no seed of their own.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the figures (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

fn simulate_cmd(args: SimulateArgs) -> Result<(), Failure> {
    use microscaler::simulate::{combinations, set_key, simulate, table, Model, Trace};
    if !(0.0..=1.0).contains(&args.failure_rate) {
        return Err(usage(anyhow::anyhow!(
            "--failure-rate {}: a share between 0 and 1",
            args.failure_rate
        )));
    }
    let trace = match &args.trace {
        None => Trace::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(usage)?;
            Trace::parse(&text).map_err(|errs| {
                usage(anyhow::anyhow!(
                    "{} is not a trace:\n  {}",
                    path.display(),
                    errs.join("\n  ")
                ))
            })?
        }
    };
    let mut varies = Vec::new();
    for v in &args.vary {
        let (path, values) = v
            .split_once('=')
            .ok_or_else(|| usage(anyhow::anyhow!("--vary {v:?}: write it as PATH=V1,V2,...")))?;
        varies.push((
            path.trim().to_string(),
            values.split(',').map(|s| s.trim().to_string()).collect(),
        ));
    }
    let sources: Vec<(String, String)> = if args.configs.is_empty() {
        let demo = DemoSettings {
            capacity: 9,
            delta: 3,
            interval: Duration::from_secs(3),
            seed: None,
            tick: Duration::from_millis(500),
            instance: "simulate".into(),
            address: None,
            cluster: None,
            region: None,
        };
        vec![("demo".into(), demo::config_toml(&demo, "docker"))]
    } else {
        let mut v = Vec::new();
        for path in &args.configs {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(usage)?;
            v.push((path.display().to_string(), text));
        }
        v
    };
    let duration = args.duration.unwrap_or(if args.trace.is_some() {
        trace.end() + Duration::from_secs(10)
    } else {
        Duration::from_secs(3600)
    });
    let model = Model {
        hosts: args.hosts,
        start: args.start_latency,
        stop: args.stop_latency,
        pause: args.pause_latency,
        unpause: args.unpause_latency,
        failure_rate: args.failure_rate,
        seed: args.seed,
        duration,
        warmup: args.warmup,
        host_cpu: args.host_cpu,
        host_memory: args.host_memory,
    };
    let mut runs = Vec::new();
    for (name, text) in &sources {
        let doc: toml::Table = text
            .parse()
            .map_err(|e| usage(anyhow::anyhow!("{name}: {e}")))?;
        for combo in combinations(&varies) {
            let mut doc = doc.clone();
            let mut model = model.clone();
            let mut label = name.clone();
            for (path, value) in &combo {
                model
                    .set(path, value)
                    .unwrap_or_else(|| set_key(&mut doc, path, value))
                    .map_err(|e| usage(anyhow::anyhow!("--vary {e}")))?;
                label.push_str(&format!(" {path}={value}"));
            }
            let cfg = Config::from_toml(&doc.to_string()).map_err(|errs| {
                usage(anyhow::anyhow!(
                    "{label} is invalid:\n  {}",
                    errs.0
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n  ")
                ))
            })?;
            runs.push((label, cfg, model));
        }
    }
    eprintln!(
        "simulating {} configuration{} over {} (start {}, stop {}, unpause {}, {} hosts)...",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        humantime::format_duration(duration),
        model.start,
        model.stop,
        model.unpause,
        model.hosts
    );
    let t0 = std::time::Instant::now();
    // One thread per configuration, at most as many at once as there are cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut results = Vec::new();
    for chunk in runs.chunks(cores) {
        let done: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(_, cfg, model)| scope.spawn(|| simulate(cfg, model, &trace)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a simulation panicked"))
                .collect()
        });
        results.extend(done);
    }
    let mut figures = Vec::new();
    for ((label, _, _), r) in runs.iter().zip(results) {
        figures
            .push(r.map_err(|errs| usage(anyhow::anyhow!("{label}:\n  {}", errs.join("\n  "))))?);
    }
    eprintln!("done in {:.2} s", t0.elapsed().as_secs_f64());
    let names: Vec<String> = runs.iter().map(|(l, _, _)| l.clone()).collect();
    let mut json = serde_json::json!({
        "duration_s": duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "model": {
            "hosts": model.hosts,
            "start_latency": model.start.to_string(),
            "stop_latency": model.stop.to_string(),
            "pause_latency": model.pause.to_string(),
            "unpause_latency": model.unpause.to_string(),
            "failure_rate": model.failure_rate,
            "seed": model.seed,
        },
        "configurations": names.iter().zip(&figures).map(|(n, f)| {
            serde_json::json!({"name": n, "figures": f})
        }).collect::<Vec<_>>(),
    });
    if let (Some(cpu), Some(memory)) = (model.host_cpu, model.host_memory) {
        json["model"]["host_cpu_milli"] = cpu.into();
        json["model"]["host_memory_bytes"] = memory.into();
    }
    if let Some(path) = &args.output {
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", table(&names, &figures));
    }
    Ok(())
}

/// Where a running daemon's API is (`status`, `explain`).
#[derive(clap::Args)]
struct InspectArgs {
    /// The daemon's API.
    #[arg(
        long,
        env = "MICROSCALER_ADDRESS",
        default_value = "http://127.0.0.1:8080"
    )]
    address: String,
    /// The bearer token, needed only from another machine (the daemon lets loopback clients
    /// read without it).
    #[arg(long, env = "MICROSCALER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token. Not with --token.
    #[arg(
        long,
        env = "MICROSCALER_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl InspectArgs {
    fn api(&self) -> Result<microscaler::inspect::Api, Failure> {
        let token = match &self.token_file {
            Some(path) => Some(read_token_file(path)?),
            None => self.token.clone().filter(|t| !t.trim().is_empty()),
        };
        let address = self.address.trim_end_matches('/').to_string();
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(usage(anyhow::anyhow!(
                "--address {address:?} is not an http:// or https:// URL"
            )));
        }
        Ok(microscaler::inspect::Api { address, token })
    }
}

async fn status_cmd(args: InspectArgs) -> Result<(), Failure> {
    let api = args.api()?;
    let status = api.get("/api/v1/status").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", microscaler::inspect::status_text(&status));
    }
    Ok(())
}

async fn explain_cmd(service: String, decisions: u32, args: InspectArgs) -> Result<(), Failure> {
    let api = args.api()?;
    let services = api.get("/api/v1/services").await?;
    let known: Vec<&str> = services
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    if !known.contains(&service.as_str()) {
        return Err(usage(anyhow::anyhow!(
            "no service {service:?} in the daemon at {}: its services are {}",
            api.address,
            known.join(", ")
        )));
    }
    let status = api.get("/api/v1/status").await?;
    let path = format!(
        "/api/v1/decisions?service={}&limit={decisions}",
        service
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect::<String>()
    );
    let list = api.get(&path).await?;
    if args.json {
        let doc = serde_json::json!({
            "service": services.as_array().and_then(|a| a.iter().find(|s| s["name"] == service.as_str())),
            "status": status,
            "decisions": list["decisions"],
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    match microscaler::inspect::explain_text(&service, &services, &status, &list) {
        Some(text) => print!("{text}"),
        None => {
            return Err(anyhow::anyhow!("the daemon's answer has no service {service:?}").into())
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Which demo: random priority-1 demand, or workers of a real Redis list.
    #[arg(long, value_enum, default_value_t = Scenario::Random)]
    scenario: Scenario,
    /// Where replicas run.
    #[arg(long, value_enum, default_value_t = DemoBackend::Auto)]
    backend: DemoBackend,
    /// The orchestrator's API address (nomad: default NOMAD_ADDR, else http://127.0.0.1:4646;
    /// marathon: MARATHON_URL, else http://127.0.0.1:8080; ecs: an endpoint instead of AWS's,
    /// such as moto server's, where the demo creates its cluster).
    #[arg(long)]
    address: Option<String>,
    /// ecs: an existing cluster with container instances to run the demo on (default: a
    /// cluster of 3 container instances the demo creates on the --address emulator).
    #[arg(long)]
    cluster: Option<String>,
    /// Stop after this long (e.g. "60s"); default: run until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Seed of the random demand (queue: of the producer's steps), to replay a run.
    #[arg(long)]
    seed: Option<u64>,
    /// Capacity in slots.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=1000))]
    capacity: u32,
    /// Largest move of the demand per interval.
    #[arg(long, default_value_t = 3)]
    delta: u32,
    /// Time between demand moves.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    interval: Duration,
    /// Time between ticks (100ms to 60s).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    tick: Duration,
    /// Print one JSON object per tick instead of text.
    #[arg(long)]
    json: bool,
    /// Instance name: the label on the demo's replicas.
    #[arg(long, default_value = "demo")]
    instance: String,
    /// Directory for the process backend's records (and the history's default place).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    queue: QueueArgs,
    #[command(flatten)]
    server: ServerArgs,
}

/// The queue scenario's flags.
#[derive(clap::Args)]
struct QueueArgs {
    /// Queue: the Redis server (redis://host[:port], no password; the workers connect to it too).
    #[arg(long, default_value = "redis://127.0.0.1:6379", value_name = "URL")]
    redis: String,
    /// Queue: the list's key [default: <instance>:jobs]; deleted at start and on exit.
    #[arg(long, value_name = "KEY")]
    queue: Option<String>,
    /// Queue: target jobs in the list per worker (the trigger's `target`, rule "average").
    #[arg(long, default_value_t = 5.0, value_name = "JOBS")]
    per_worker: f64,
    /// Queue: time a worker spends on one job.
    #[arg(long, default_value = "200ms", value_parser = parse_duration, value_name = "TIME")]
    job_time: Duration,
    /// Queue: how the producer's rate moves.
    #[arg(long, value_enum, default_value_t = RateShape::Sine)]
    rate_shape: RateShape,
    /// Queue: highest producer rate, jobs per second.
    #[arg(long, default_value_t = 40.0, value_name = "JOBS_PER_S")]
    rate_max: f64,
    /// Queue: period of the sine (0 -> max -> 0).
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "TIME")]
    rate_period: Duration,
    /// Queue: how long each level of the steps lasts.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "TIME")]
    rate_step: Duration,
}

/// The HTTP server's flags (dashboard, API, /metrics, history).
#[derive(clap::Args)]
struct ServerArgs {
    /// Address of the dashboard, API and /metrics [default: 127.0.0.1:8080; if that is taken the
    /// daemon runs without them and says so]. "off" disables the server. microscaler's image
    /// sets MICROSCALER_LISTEN=0.0.0.0:8080.
    #[arg(long, value_name = "ADDR", env = "MICROSCALER_LISTEN")]
    listen: Option<String>,
    /// Bearer token for the API's changes (manual demand, pause, ...). Without one, changes
    /// are refused; the demo generates one and prints it.
    #[arg(long, env = "MICROSCALER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the bearer token (trimmed; never logged), e.g. a systemd credential:
    /// --token-file %d/api-token. Not with --token.
    #[arg(
        long,
        env = "MICROSCALER_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Let any client read the dashboard, API and metrics without the token (default: only
    /// loopback clients).
    #[arg(long)]
    open_read: bool,
    /// A host name (without port) that token-less reads from this machine may use in their
    /// Host header besides localhost, 127.0.0.1 and [::1], e.g. a local reverse proxy's
    /// (repeatable). Any other name needs the token, against DNS rebinding.
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// SQLite file of the history [default: <state dir>/history.sqlite].
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
    /// How long the history keeps ticks and decisions [default: 24h].
    #[arg(long, value_parser = parse_duration)]
    retention: Option<Duration>,
}

impl ServerArgs {
    /// The flags over the configuration's `[server]` section: a flag wins over the file.
    fn over(&self, spec: &microscaler_core::config::ServerSpec) -> ServerArgs {
        ServerArgs {
            listen: self.listen.clone().or_else(|| {
                if spec.disabled {
                    Some("off".into())
                } else {
                    spec.listen.map(|a| a.to_string())
                }
            }),
            // An empty MICROSCALER_TOKEN is no token: the file's [server] token still counts.
            token: self
                .token
                .clone()
                .filter(|t| !t.trim().is_empty())
                .or_else(|| spec.token.clone()),
            token_file: None,
            open_read: self.open_read || spec.open_read,
            allowed_hosts: if self.allowed_hosts.is_empty() {
                spec.allowed_hosts.clone()
            } else {
                self.allowed_hosts.clone()
            },
            history: self
                .history
                .clone()
                .or_else(|| spec.history.as_ref().map(PathBuf::from)),
            retention: self.retention.or(spec.retention),
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// The TOML configuration file.
    #[arg(short, long)]
    config: PathBuf,
    /// Set a manual trigger's value at start-up: SERVICE=VALUE (repeatable).
    #[arg(long = "set-demand", value_name = "SERVICE=VALUE")]
    set_demand: Vec<String>,
    /// Print one JSON object per tick on stdout.
    #[arg(long)]
    json: bool,
    /// Print one line per tick on stdout (default: only log).
    #[arg(long)]
    ticks: bool,
    /// Stop after this long (e.g. "60s"); default: run until SIGINT/SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Directory for the process backend's records (and the history's default place).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Observe, sample, decide and report, logging every change as one it would make, and
    /// change nothing: no replica, container, service or orchestrator object is created,
    /// scaled, updated or removed (leader election and ECS's event queue are off).
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    server: ServerArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write it like \"500ms\", \"3s\")"))
}

/// An error with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            error: e.into(),
        }
    }
}

fn usage(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo_cmd(args).await,
            Command::Run(args) => run_cmd(args).await,
            Command::Validate { file } => validate_cmd(&file).map(|_| ()),
            Command::Status(args) => status_cmd(args).await,
            Command::Simulate(args) => simulate_cmd(args),
            Command::Explain {
                service,
                decisions,
                api,
            } => explain_cmd(service, decisions, api).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load_config(file: &std::path::Path) -> Result<Config, Failure> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {}", file.display()))
        .map_err(usage)?;
    Config::from_toml(&text).map_err(|errs| {
        usage(anyhow::anyhow!(
            "{} is invalid ({} error{}):\n{}",
            file.display(),
            errs.0.len(),
            if errs.0.len() == 1 { "" } else { "s" },
            errs.0
                .iter()
                .map(|e| format!("  {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        ))
    })
}

fn validate_cmd(file: &std::path::Path) -> Result<Config, Failure> {
    let cfg = load_config(file)?;
    println!(
        "{}: valid ({} backend, {} service{}, tick {})",
        file.display(),
        cfg.backend.type_name(),
        cfg.services.len(),
        if cfg.services.len() == 1 { "" } else { "s" },
        humantime::format_duration(cfg.tick)
    );
    Ok(cfg)
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Resolves on SIGINT, SIGTERM or after `duration`.
async fn stop_signal(duration: Option<Duration>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    let timer = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("\nSIGINT: stopping"),
        _ = term.recv() => eprintln!("SIGTERM: stopping"),
        _ = timer => {},
    }
}

async fn demo_cmd(args: DemoArgs) -> Result<(), Failure> {
    let settings = DemoSettings {
        capacity: args.capacity,
        delta: args.delta,
        interval: args.interval,
        seed: Some(args.seed.unwrap_or_else(|| clock_seed() % 1_000_000)),
        tick: args.tick,
        instance: args.instance.clone(),
        address: args.address.clone(),
        cluster: args.cluster.clone(),
        // An emulator needs some region; AWS itself gets the chain's.
        region: (args.address.is_some()
            && ["AWS_REGION", "AWS_DEFAULT_REGION"]
                .iter()
                .all(|k| std::env::var(k).map_or(true, |v| v.is_empty())))
        .then(|| "us-east-1".to_string()),
    };
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&args.instance));
    let queue = match args.scenario {
        Scenario::Random => None,
        Scenario::Queue => Some(queue_settings(&args, &settings)?),
    };
    // The queue's Redis is checked (and the list emptied) before any replica starts.
    let mut redis = None;
    if let Some(q) = &queue {
        let (client, mut conn) = demo::connect_redis(&q.redis, Duration::from_secs(2))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        demo::delete_queue(&mut conn, &q.key)
            .await
            .with_context(|| format!("cannot delete the list {:?} at {}", q.key, q.redis))?;
        redis = Some((client, conn));
    }
    let config_for = |backend: &str| match &queue {
        Some(q) => demo_queue_config(&settings, q, backend),
        None => demo_config(&settings, backend),
    };

    if args.address.is_some()
        && !matches!(
            args.backend,
            DemoBackend::Nomad | DemoBackend::Marathon | DemoBackend::Ecs
        )
    {
        return Err(usage(anyhow::anyhow!(
            "--address is the API of an orchestrator that takes one: use it with --backend nomad, \
             marathon or ecs (kubernetes reads KUBECONFIG)"
        )));
    }
    if args.cluster.is_some() && args.backend != DemoBackend::Ecs {
        return Err(usage(anyhow::anyhow!(
            "--cluster names an ECS cluster: use it with --backend ecs"
        )));
    }
    let mut chosen = None;
    // The ECS cluster the demo created (and deletes at the end), if any.
    let mut demo_cluster = None;
    if let Some(orchestrator) = args.backend.orchestrator() {
        if queue.is_some() {
            return Err(usage(anyhow::anyhow!(
                "the queue demo runs on docker or process (its workers reach Redis on this \
                 machine); on {orchestrator} run --scenario random"
            )));
        }
        let cfg = config_for(orchestrator)?;
        demo_cluster = ecs_demo_cluster(&cfg, &settings).await?;
        let b = build_backend(&cfg, &state_dir).await?;
        chosen = Some((cfg, b));
    }
    if matches!(args.backend, DemoBackend::Auto | DemoBackend::Docker) {
        let cfg = config_for("docker")?;
        match build_backend(&cfg, &state_dir).await {
            Ok(b) => chosen = Some((cfg, b)),
            Err(e) if args.backend == DemoBackend::Auto => {
                eprintln!("No Docker engine answered ({e}).\nRunning the demo on local processes instead.");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (cfg, backend) = match chosen {
        Some(c) => c,
        None => {
            let cfg = config_for("process")?;
            let b = build_backend(&cfg, &state_dir).await?;
            (cfg, b)
        }
    };
    match &queue {
        None => {
            println!(
                "microscaler demo on {} | capacity {} | priority1: random demand ±{} every {} (seed {}) | priority2: remainder | tick {}",
                backend.kind(),
                settings.capacity,
                settings.delta,
                humantime::format_duration(settings.interval),
                settings.seed.unwrap_or_default(),
                humantime::format_duration(settings.tick),
            );
            println!("Success = priority1 running == demand AND priority1 + priority2 == {}. Ctrl-C stops and removes the demo's replicas.", settings.capacity);
        }
        Some(q) => {
            let shape = match q.rate.shape {
                RateShape::Sine => format!(
                    "sine 0..{} jobs/s over {}",
                    q.rate.max,
                    humantime::format_duration(q.rate.period)
                ),
                RateShape::Steps => format!(
                    "steps of 0..{} jobs/s every {} (seed {})",
                    q.rate.max,
                    humantime::format_duration(q.rate.step),
                    q.rate.seed
                ),
            };
            println!(
                "microscaler queue demo on {} | capacity {} | producer: {shape} into Redis list {:?} at {} | workers P1: {} per job, target {} jobs per worker | batch P2: remainder | tick {}",
                backend.kind(),
                settings.capacity,
                q.key,
                q.redis,
                humantime::format_duration(q.job),
                q.per_replica,
                humantime::format_duration(settings.tick),
            );
            println!("Success = the queue stays near {} x workers and drains when the rate drops AND workers + batch == {}. Ctrl-C stops, removes the demo's replicas and deletes the list.", q.per_replica, settings.capacity);
        }
    }
    let mut server = args.server;
    if server.token.is_none() && server.token_file.is_none() {
        server.token = Some(generate_token()?);
    }
    let web = start_server(&server, &cfg, backend.kind(), true, &state_dir).await?;
    let (Some(q), Some((client, mut conn))) = (queue, redis) else {
        let result = drive(
            cfg,
            backend,
            args.duration,
            args.json,
            true,
            &[],
            false,
            web,
            None,
            None,
        )
        .await;
        remove_ecs_demo_cluster(demo_cluster).await;
        return result;
    };
    let (producer, stats) = demo::spawn_producer(client, conn.clone(), q.key.clone(), q.rate);
    let view = demo::QueueView {
        key: q.key.clone(),
        target: q.per_replica,
        stats,
    };
    let result = drive(
        cfg,
        backend,
        args.duration,
        args.json,
        true,
        &[],
        false,
        web,
        Some(&view),
        None,
    )
    .await;
    producer.abort();
    let _ = producer.await;
    match demo::delete_queue(&mut conn, &q.key).await {
        Ok(()) => eprintln!("deleted the list {:?}", q.key),
        Err(e) => eprintln!(
            "warning: cannot delete the list {:?} at {}: {e}",
            q.key, q.redis
        ),
    }
    result
}

/// The queue scenario's settings from the flags.
fn queue_settings(args: &DemoArgs, settings: &DemoSettings) -> Result<QueueSettings, Failure> {
    let a = &args.queue;
    demo::worker_address(&a.redis).map_err(|e| usage(anyhow::anyhow!(e)))?;
    if !(a.per_worker.is_finite() && a.per_worker > 0.0) {
        return Err(usage(anyhow::anyhow!(
            "--per-worker must be a number > 0, got {}",
            a.per_worker
        )));
    }
    if !(a.rate_max.is_finite() && (0.0..=100_000.0).contains(&a.rate_max)) {
        return Err(usage(anyhow::anyhow!(
            "--rate-max must be between 0 and 100000 jobs/s, got {}",
            a.rate_max
        )));
    }
    for (flag, d) in [
        ("--rate-period", a.rate_period),
        ("--rate-step", a.rate_step),
    ] {
        if d < Duration::from_secs(1) {
            return Err(usage(anyhow::anyhow!("{flag} must be at least 1s")));
        }
    }
    Ok(QueueSettings {
        redis: a.redis.clone(),
        key: a
            .queue
            .clone()
            .unwrap_or_else(|| format!("{}:jobs", settings.instance)),
        per_replica: a.per_worker,
        job: a.job_time,
        rate: demo::RateProfile {
            shape: a.rate_shape,
            max: a.rate_max,
            period: a.rate_period,
            step: a.rate_step,
            seed: settings.seed.unwrap_or_default(),
        },
    })
}

fn demo_queue_config(
    settings: &DemoSettings,
    queue: &QueueSettings,
    backend: &str,
) -> Result<Config, Failure> {
    Config::from_toml(&demo::queue_config_toml(settings, queue, backend))
        .map_err(|e| usage(anyhow::anyhow!("invalid demo settings:\n{e}")))
}

fn demo_config(settings: &DemoSettings, backend: &str) -> Result<Config, Failure> {
    // The dashboard's "manual demand" control: a manual trigger beside the random one, at 0
    // until set (a service's demand is the max over its triggers); setting it also holds the
    // walk at the same value (`Controls::override_demand`), so it overrides the walk, lower or
    // higher, until cleared.
    let toml = demo::config_toml(settings, backend).replacen(
        "\n[[services]]\nname = \"priority2\"",
        "\n[[services.triggers]]\nname = \"manual\"\ntype = \"manual\"\n\n[[services]]\nname = \"priority2\"",
        1,
    );
    Config::from_toml(&toml).map_err(|e| usage(anyhow::anyhow!("invalid demo settings:\n{e}")))
}

/// 128 random bits from the kernel, as hex.
fn generate_token() -> Result<String, Failure> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom to generate the API token")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The running HTTP server.
struct Web {
    hub: Arc<Hub>,
    controls_set: Arc<std::sync::RwLock<Option<Controls>>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The server's view of the loop's controls, set once the controller exists (and again after
/// each reload).
struct LoopControl(Arc<std::sync::RwLock<Option<Controls>>>);

impl LoopControl {
    fn get(&self) -> Option<Controls> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl microscaler_server::Control for LoopControl {
    fn manual(&self, service: &str) -> Option<f64> {
        Some(self.get()?.manual_of(service)?.get())
    }
    fn set_manual(&self, service: &str, value: f64) -> Result<(), String> {
        let c = self.get().ok_or("the control loop is not running yet")?;
        c.override_demand(service, value)
    }
    fn clear_manual(&self, service: &str) -> Result<(), String> {
        let c = self.get().ok_or("the control loop is not running yet")?;
        c.clear_demand(service)
    }
    fn overriding(&self, service: &str) -> bool {
        self.get().is_some_and(|c| c.overriding(service))
    }
    fn random(&self, service: &str) -> Option<microscaler_server::RandomState> {
        let c = self.get()?;
        let r = c.random.iter().find(|((s, _), _)| s == service)?.1.get();
        Some(microscaler_server::RandomState {
            delta: r.delta,
            interval_ms: r.interval.as_millis() as u64,
        })
    }
    fn set_random(&self, service: &str, s: microscaler_server::RandomState) -> Result<(), String> {
        let c = self.get().ok_or("the control loop is not running yet")?;
        let r = c
            .random
            .iter()
            .find(|((n, _), _)| n == service)
            .ok_or("no random trigger")?
            .1;
        r.set(microscaler_sources::random::RandomSettings {
            delta: s.delta,
            interval: Duration::from_millis(s.interval_ms),
        })
    }
    fn paused(&self, service: &str) -> bool {
        self.get().is_some_and(|c| {
            c.paused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|s| s.as_str() == service)
        })
    }
    fn push_trigger(&self, service: &str, trigger: &str) -> Option<Option<String>> {
        let c = self.get()?;
        let h = c.push.get(&(service.to_string(), trigger.to_string()))?;
        Some(h.token().map(str::to_string))
    }
    fn push(&self, service: &str, trigger: &str, value: f64) -> Result<(), String> {
        let c = self.get().ok_or("the control loop is not running yet")?;
        let h = c
            .push
            .get(&(service.to_string(), trigger.to_string()))
            .ok_or("no such push trigger")?;
        h.push(value).map_err(|e| e.to_string())
    }
    fn set_paused(&self, service: &str, paused: bool) {
        if let (Some(c), Ok(name)) = (self.get(), microscaler_core::ServiceName::try_new(service)) {
            c.set_paused(&name, paused);
        }
    }
}

/// The API token kept in `path`, trimmed. The error names the file, never its content; an
/// empty file is an error (it would silently disable the API's changes).
fn read_token_file(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(anyhow::anyhow!("--token-file {}: {e}", path.display())))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "--token-file {}: the file is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// Opens the history and binds the server (unless `--listen off`). A taken default address
/// only disables the server, with a warning; an explicit `--listen` that fails is an error.
async fn start_server(
    args: &ServerArgs,
    cfg: &Config,
    backend: &str,
    demo: bool,
    state_dir: &Path,
) -> Result<Option<Web>, Failure> {
    let file_token = match &args.token_file {
        Some(path) => Some(read_token_file(path)?),
        None => None,
    };
    let mut args = args.over(&cfg.server);
    if file_token.is_some() {
        args.token = file_token;
    }
    let args = &args;
    let addr = args
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    if addr == "off" {
        return Ok(None);
    }
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) if args.listen.is_none() => {
            eprintln!("warning: no dashboard: cannot listen on {addr}: {e} (choose another address with --listen)");
            return Ok(None);
        }
        Err(e) => {
            return Err(usage(anyhow::anyhow!(
                "--listen {addr}: cannot listen: {e}"
            )))
        }
    };
    let bound = listener.local_addr()?;
    let path = args
        .history
        .clone()
        .unwrap_or_else(|| state_dir.join("history.sqlite"));
    let store = Store::open(&path, args.retention.unwrap_or(Duration::from_secs(86400)))?;
    let controls_set = Arc::new(std::sync::RwLock::new(None));
    let hub = Hub::new(
        Setup::from_config(cfg, backend, demo),
        ServerOptions {
            token: args.token.clone().filter(|t| !t.is_empty()),
            open_read: args.open_read,
            allowed_hosts: args.allowed_hosts.clone(),
            ..ServerOptions::default()
        },
        Arc::new(LoopControl(controls_set.clone())),
        store,
    );
    let host = if bound.ip().is_unspecified() {
        format!("127.0.0.1:{}", bound.port())
    } else {
        bound.to_string()
    };
    if demo {
        let token = args.token.as_deref().unwrap_or_default();
        println!("Dashboard: http://{host}/#token={token}");
        println!(
            "API token (Authorization: Bearer ...): {token}   history: {}",
            path.display()
        );
    } else {
        eprintln!(
            "dashboard and API on http://{host}/ (metrics on /metrics, history in {}){}",
            path.display(),
            if args.token.is_some() {
                ""
            } else {
                "; changes disabled: no --token, --token-file or MICROSCALER_TOKEN"
            }
        );
    }
    let task = tokio::spawn(microscaler_server::serve(
        listener,
        hub.clone(),
        std::future::pending(),
    ));
    Ok(Some(Web {
        hub,
        controls_set,
        task,
    }))
}

/// The server's record of a tick.
fn tick_of(r: &TickReport, paused: Vec<String>) -> Tick {
    let mut errors: Vec<TickError> = r
        .errors
        .iter()
        .map(|e| TickError {
            kind: e.kind().into(),
            message: e.to_string(),
        })
        .collect();
    for ex in &r.executions {
        match &ex.result {
            Ok(o) => errors.extend(o.failures.iter().map(|f| TickError {
                kind: "start".into(),
                message: format!("{}: start failed: {}", f.service, f.message),
            })),
            Err(e) => errors.push(TickError {
                kind: "scale".into(),
                message: format!("{}: {e}", ex.service),
            }),
        }
    }
    Tick::build(TickParts {
        ts: microscaler_server::now_ms(),
        now: r.now,
        observed: r.observed.as_ref(),
        samples: &r.samples,
        plan: r.plan.as_ref(),
        errors,
        took: r.took,
        paused,
    })
}

async fn run_cmd(args: RunArgs) -> Result<(), Failure> {
    let mut cfg = load_config(&args.config)?;
    let mut manual = Vec::new();
    for s in &args.set_demand {
        let (svc, value) = s.split_once('=').ok_or_else(|| {
            usage(anyhow::anyhow!(
                "--set-demand {s:?}: write it as SERVICE=VALUE"
            ))
        })?;
        let value: f64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| {
                usage(anyhow::anyhow!(
                    "--set-demand {s:?}: the value must be a number >= 0"
                ))
            })?;
        let svc = svc.trim();
        let has_manual = cfg.service(svc).is_some_and(|s| match &s.kind {
            microscaler_core::ServiceKind::Triggered(ts) => ts
                .iter()
                .any(|t| matches!(t.source, microscaler_sources::SourceConfig::Manual(_))),
            _ => false,
        });
        if !has_manual {
            return Err(usage(anyhow::anyhow!(
                "--set-demand {s:?}: {svc:?} is not a service with a manual trigger (add [[services.triggers]] type = \"manual\")"
            )));
        }
        manual.push((svc.to_string(), value));
    }
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&cfg.instance));
    if args.dry_run {
        microscaler::wiring::read_only(&mut cfg);
    }
    let backend = build_backend(&cfg, &state_dir).await?;
    tracing::info!(backend = backend.kind(), instance = %cfg.instance, services = cfg.services.len(), dry_run = args.dry_run, "starting");
    if args.dry_run {
        eprintln!("dry run: observing and deciding only; nothing will be changed");
    }
    let web = start_server(&args.server, &cfg, backend.kind(), false, &state_dir).await?;
    drive(
        cfg,
        backend,
        args.duration,
        args.json,
        args.ticks,
        &manual,
        args.dry_run,
        web,
        None,
        Some(&args.config),
    )
    .await
}

/// On ecs without `--cluster`: creates the demo's cluster of 3 container instances on the
/// emulator at `--address`, and returns its configuration for the clean-up.
#[cfg(feature = "ecs")]
async fn ecs_demo_cluster(
    cfg: &Config,
    settings: &DemoSettings,
) -> anyhow::Result<Option<microscaler_backends::ecs::EcsConfig>> {
    let microscaler_backends::BackendConfig::Ecs(e) = &cfg.backend else {
        return Ok(None);
    };
    if settings.cluster.is_some() {
        return Ok(None);
    }
    eprintln!(
        "creating the demo's ECS cluster {} with 3 container instances at {}",
        e.cluster,
        e.endpoint_url.as_deref().unwrap_or("AWS")
    );
    microscaler_backends::ecs::create_demo_cluster(e, 3).await?;
    Ok(Some(e.clone()))
}

#[cfg(not(feature = "ecs"))]
async fn ecs_demo_cluster(_cfg: &Config, _settings: &DemoSettings) -> anyhow::Result<Option<()>> {
    Ok(None)
}

/// Deletes the ECS cluster the demo created (its services are gone by then).
#[cfg(feature = "ecs")]
async fn remove_ecs_demo_cluster(cluster: Option<microscaler_backends::ecs::EcsConfig>) {
    let Some(e) = cluster else { return };
    match microscaler_backends::ecs::delete_demo_cluster(&e).await {
        Ok(()) => eprintln!("deleted the demo's ECS cluster {}", e.cluster),
        Err(err) => eprintln!(
            "warning: cannot delete the demo's ECS cluster {}: {err}",
            e.cluster
        ),
    }
}

#[cfg(not(feature = "ecs"))]
async fn remove_ecs_demo_cluster(_cluster: Option<()>) {}

/// SIGHUP: reads and validates `path` again and hands it to the controller. An invalid file
/// or a change that needs a restart is reported and the running configuration goes on.
async fn reload(ctl: &mut Controller<AnyBackend>, path: &Path, dry_run: bool, web: Option<&Web>) {
    tracing::info!(file = %path.display(), "SIGHUP: reloading the configuration");
    let mut new = match load_config(path) {
        Ok(c) => c,
        Err(f) => {
            tracing::error!(
                "reload refused, the running configuration goes on: {:#}",
                f.error
            );
            return;
        }
    };
    if dry_run {
        microscaler::wiring::read_only(&mut new);
    }
    match ctl.reload(new).await {
        Ok(done) => {
            tracing::info!(file = %path.display(), changes = %done, "configuration reloaded");
            if let Some(w) = web {
                let demo = w.hub.setup().demo;
                w.hub
                    .set_setup(Setup::from_config(ctl.config(), ctl.backend().kind(), demo));
                *w.controls_set.write().unwrap_or_else(|e| e.into_inner()) =
                    Some(ctl.controls().clone());
            }
        }
        Err(e) => {
            tracing::error!(file = %path.display(), "reload refused, the running configuration goes on: {e}")
        }
    }
}

/// Prepares the backend, runs the loop until a signal (or `duration`), then shuts down.
/// `queue` adds the queue demo's state to every tick line.
#[allow(clippy::too_many_arguments)]
async fn drive(
    cfg: Config,
    backend: AnyBackend,
    duration: Option<Duration>,
    json: bool,
    text: bool,
    manual: &[(String, f64)],
    dry_run: bool,
    web: Option<Web>,
    queue: Option<&demo::QueueView>,
    reload_from: Option<&Path>,
) -> Result<(), Failure> {
    // SIGHUP reloads the file (`run`); installed first, so one that arrives while the
    // backend is prepared is acted on rather than ending the process.
    let mut hangup = match reload_from {
        Some(_) => Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("install the SIGHUP handler")?,
        ),
        None => None,
    };
    let ha = cfg.ha.clone();
    let mut ctl = Controller::new(cfg, backend, clock_seed());
    if dry_run {
        ctl.dry_run();
    }
    // [ha]: the etcd election runs beside the loop (not in a dry run, which never acts).
    let election = match ha {
        Some(spec) if !dry_run => {
            let elector = microscaler::ha::EtcdElector::new(spec.clone());
            tracing::info!(key = %spec.key, identity = elector.identity(), etcd = ?spec.endpoints, ttl = ?spec.ttl, "high availability: acting only while holding the etcd lease");
            ctl.elect(elector.clone());
            Some(tokio::spawn(elector.run()))
        }
        _ => None,
    };
    if let Some(w) = &web {
        *w.controls_set.write().unwrap_or_else(|e| e.into_inner()) = Some(ctl.controls().clone());
    }
    let paused = ctl.controls().paused.clone();
    for (svc, value) in manual {
        let handle = ctl.controls().manual_of(svc).ok_or_else(|| {
            usage(anyhow::anyhow!(
                "--set-demand {svc}={value}: {svc:?} has no manual trigger (add [[services.triggers]] type = \"manual\")"
            ))
        })?;
        handle.set(*value).map_err(|e| usage(e.into()))?;
    }
    ctl.prepare().await?;
    let mut stdout = std::io::stdout();
    let mut record = |r: &TickReport| {
        if let Some(w) = &web {
            let p = paused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|s| s.to_string())
                .collect();
            w.hub.record(tick_of(r, p));
        }
        let line = TickLine::from_report(r);
        let queue = queue.map(|q| q.tick(r));
        let out = if json {
            match &queue {
                None => serde_json::to_string(&line).unwrap_or_default(),
                Some(q) => {
                    let mut v = serde_json::to_value(&line).unwrap_or_default();
                    v["queue"] = serde_json::to_value(q).unwrap_or_default();
                    v.to_string()
                }
            }
        } else if text {
            let t = line.text();
            match &queue {
                None => t,
                // After the time: `[   12.5s] queue  37 (target 5/worker) in 20.3/s | workers ...`
                Some(q) => match t.find(']') {
                    Some(i) => format!("{} {} |{}", &t[..=i], q.text(), &t[i + 1..]),
                    None => format!("{} | {t}", q.text()),
                },
            }
        } else {
            return;
        };
        let _ = writeln!(stdout, "{out}");
        let _ = stdout.flush();
    };
    let stop = stop_signal(duration);
    tokio::pin!(stop);
    loop {
        // The loop runs until a stop, or a SIGHUP: then the file is reloaded between two
        // ticks and the loop goes on.
        let hup = std::cell::Cell::new(false);
        let until = async {
            let reload = async {
                match hangup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stop => {}
                _ = reload => hup.set(true),
            }
        };
        run_loop(&mut ctl, until, &mut record).await;
        match reload_from {
            Some(path) if hup.get() => reload(&mut ctl, path, dry_run, web.as_ref()).await,
            _ => break,
        }
    }
    if let Some(w) = web {
        w.hub.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), w.task).await;
    }
    if let Some(e) = election {
        e.abort();
    }
    match ctl.shutdown().await? {
        _ if dry_run => eprintln!("dry run: changed nothing"),
        OnExit::Stop => eprintln!("stopped and removed the managed replicas"),
        OnExit::Leave => eprintln!("left the managed replicas running for the next start to adopt"),
    }
    Ok(())
}
