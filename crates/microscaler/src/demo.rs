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
    /// A Kubernetes cluster (KUBECONFIG, else ~/.kube/config, else in-cluster): Deployments
    /// in the `default` namespace running a placeholder image; on the test rig's 3 kwok nodes
    /// x 3 pods (`eval "$(scripts/k8s-rig.sh env)"`) that is the seeds' 9 slots.
    Kubernetes,
    /// A Nomad cluster (`--address`, else NOMAD_ADDR, else http://127.0.0.1:4646; NOMAD_TOKEN):
    /// one job per service, docker driver, running the placeholder image.
    Nomad,
    /// Marathon (`--address`, else MARATHON_URL, else http://127.0.0.1:8080): one app per
    /// service, a Docker container running the placeholder image.
    Marathon,
    /// AWS ECS (credentials and region from the AWS chain): one ECS service per service. With
    /// `--address` (an emulator's endpoint, e.g. moto server) the demo creates a cluster of 3
    /// container instances there and deletes it at the end; on AWS, `--cluster` names a
    /// cluster that has container instances.
    Ecs,
}

impl DemoBackend {
    /// The backend type of an orchestrator the demo is pointed at, for `--address`.
    pub fn orchestrator(self) -> Option<&'static str> {
        match self {
            DemoBackend::Kubernetes => Some("kubernetes"),
            DemoBackend::Nomad => Some("nomad"),
            DemoBackend::Marathon => Some("marathon"),
            DemoBackend::Ecs => Some("ecs"),
            DemoBackend::Auto | DemoBackend::Docker | DemoBackend::Process => None,
        }
    }
}

/// The image the demo's pods run on Kubernetes: they only hold a slot (on kwok's nodes no
/// container runs at all).
pub const KUBERNETES_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// The `[backend]` keys after `type` and each service's `image` line, for `backend`.
fn backend_keys(backend: &str, s: &DemoSettings) -> (String, String) {
    let address = s.address.as_deref();
    match backend {
        "ecs" => {
            let mut keys = format!("cluster = {:?}\n", s.ecs_cluster());
            if let Some(a) = address {
                keys.push_str(&format!("endpoint_url = {a:?}\n"));
            }
            if let Some(r) = &s.region {
                keys.push_str(&format!("region = {r:?}\n"));
            }
            (keys, format!("image = \"{KUBERNETES_IMAGE}\"\n"))
        }
        "nomad" | "marathon" => (
            address
                .map(|a| format!("address = {a:?}\n"))
                .unwrap_or_default(),
            format!("image = \"{KUBERNETES_IMAGE}\"\n"),
        ),
        "kubernetes" => (
            "namespace = \"default\"\n\
             # The taint of kwok's fake nodes (the test rig's): tolerating it changes nothing \
             elsewhere.\n\
             tolerations = [{ key = \"kwok.x-k8s.io/node\", operator = \"Exists\", effect = \"NoSchedule\" }]\n"
                .to_string(),
            format!("image = \"{KUBERNETES_IMAGE}\"\n"),
        ),
        _ => (String::new(), String::new()),
    }
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
    /// The orchestrator's address (`--address`), for the backends that take one.
    pub address: Option<String>,
    /// ecs: an existing cluster (`--cluster`); `None` means one the demo creates, named after
    /// the instance.
    pub cluster: Option<String>,
    /// ecs: the AWS region, when the AWS chain has none.
    pub region: Option<String>,
}

impl DemoSettings {
    /// The ECS cluster the demo runs on.
    pub fn ecs_cluster(&self) -> String {
        self.cluster
            .clone()
            .unwrap_or_else(|| self.instance.clone())
    }
}

/// The demo's configuration as TOML for `backend` ("docker", "process" or "kubernetes").
pub fn config_toml(s: &DemoSettings, backend: &str) -> String {
    let seed = s.seed.map(|n| format!("seed = {n}\n")).unwrap_or_default();
    let (backend_keys, image) = backend_keys(backend, s);
    format!(
        r#"# The seeds' demo: priority 1 follows random demand, priority 2 fills what is left.
instance = "{instance}"
tick = "{tick}ms"
on_exit = "stop"

[capacity]
slots = {capacity}

[backend]
type = "{backend}"
{backend_keys}
[[services]]
name = "priority1"
priority = 1
stop_grace = "2s"
{image}[[services.triggers]]
type = "random"
delta = {delta}
interval = "{interval}ms"
{seed}
[[services]]
name = "priority2"
priority = 2
remainder = true
stop_grace = "2s"
{image}"#,
        instance = s.instance,
        tick = s.tick.as_millis(),
        capacity = s.capacity,
        delta = s.delta,
        interval = s.interval.as_millis(),
    )
}

// ---------------------------------------------------------------------------------------------
// The queue scenario: a producer pushes jobs into a real Redis list at a varying rate,
// priority-1 workers (the built-in replica in worker mode) take them, and microscaler keeps the
// list near `per_replica` jobs per worker (`redis_list`, `rule = "average"`) while a priority-2
// remainder service fills the rest of the capacity.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::control::TickReport;

/// Which demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The seeds' demo: random priority-1 demand.
    Random,
    /// Jobs in a real Redis list, consumed by priority-1 workers.
    Queue,
}

/// How the producer's rate moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateShape {
    /// A slow sine from 0 up to the maximum and back, once per period.
    Sine,
    /// A level drawn (seeded) from 0, 1/4, 1/2, 3/4 or all of the maximum, held for a step.
    Steps,
}

/// The producer's rate over time: pure, so a seed replays the same run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateProfile {
    /// Shape.
    pub shape: RateShape,
    /// Highest rate in jobs per second.
    pub max: f64,
    /// Period of the sine.
    pub period: Duration,
    /// Length of a step.
    pub step: Duration,
    /// Seed of the steps.
    pub seed: u64,
}

impl RateProfile {
    /// Jobs per second at `t` since the start.
    pub fn at(&self, t: Duration) -> f64 {
        match self.shape {
            RateShape::Sine => {
                let phase = t.as_secs_f64() / self.period.as_secs_f64().max(0.001);
                self.max * (1.0 - (std::f64::consts::TAU * phase).cos()) / 2.0
            }
            RateShape::Steps => {
                let k = (t.as_secs_f64() / self.step.as_secs_f64().max(0.001)) as u64;
                let level = splitmix64(self.seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % 5;
                self.max * level as f64 / 4.0
            }
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The queue scenario's settings.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Redis URL (`redis://host[:port]`): the producer's, the trigger's and, as `host:port`,
    /// the workers'.
    pub redis: String,
    /// The list's key.
    pub key: String,
    /// Target jobs in the list per worker (the trigger's `target`).
    pub per_replica: f64,
    /// Time a worker spends on one job.
    pub job: Duration,
    /// The producer's rate.
    pub rate: RateProfile,
}

/// `host:port` of a `redis://host[:port][/0]` URL: what the workers connect to. They speak
/// plain RESP without AUTH or SELECT, so URLs with credentials or another database are refused.
pub fn worker_address(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("redis://").ok_or_else(|| {
        format!("--redis {url:?}: the queue demo needs a redis://host[:port] URL")
    })?;
    let (hostport, db) = rest.split_once('/').unwrap_or((rest, ""));
    if hostport.contains('@') {
        return Err(format!(
            "--redis {url:?}: the demo's workers speak plain RESP without AUTH; use a Redis without a password"
        ));
    }
    if !(db.is_empty() || db == "0") {
        return Err(format!(
            "--redis {url:?}: the demo's workers use database 0; leave out /{db}"
        ));
    }
    if hostport.is_empty() {
        return Err(format!("--redis {url:?}: no host"));
    }
    // host, host:port, [v6], [v6]:port
    let has_port = match hostport.rfind(']') {
        Some(i) => hostport[i..].contains(':'),
        None => hostport.contains(':'),
    };
    Ok(if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:6379")
    })
}

/// The queue scenario's configuration as TOML for `backend` ("docker" or "process"). On Docker
/// the replicas use the host's network so that the workers reach a Redis on 127.0.0.1.
pub fn queue_config_toml(s: &DemoSettings, q: &QueueSettings, backend: &str) -> String {
    let network = if backend == "docker" {
        "network = \"host\"   # the workers reach Redis on the host's loopback\n"
    } else {
        ""
    };
    let worker = worker_address(&q.redis).unwrap_or_default();
    format!(
        r#"# The queue demo: priority-1 workers keep a Redis list near its target, priority 2 fills what is left.
instance = "{instance}"
tick = "{tick}ms"
on_exit = "stop"

[capacity]
slots = {capacity}

[backend]
type = "{backend}"
{network}
[[services]]
name = "workers"
priority = 1
stop_grace = "2s"
env = {{ MICROSCALER_WORK_REDIS = {worker:?}, MICROSCALER_WORK_QUEUE = {key:?}, MICROSCALER_WORK_MS = "{job}" }}
# Shrink on the highest need of the last 3 s: no flapping where value / target crosses a whole number.
[services.scaling]
down = {{ stabilisation = "3s" }}
[[services.triggers]]
name = "queue"
type = "redis_list"
url = {url:?}
key = {key:?}
rule = "average"
target = {target}

[[services]]
name = "batch"
priority = 2
remainder = true
stop_grace = "2s"
"#,
        instance = s.instance,
        tick = s.tick.as_millis(),
        capacity = s.capacity,
        url = q.redis,
        key = q.key,
        job = q.job.as_millis(),
        target = q.per_replica,
    )
}

/// Connects to Redis and checks it answers PING, within `timeout`. The error says where and
/// how to start one.
pub async fn connect_redis(
    url: &str,
    timeout: Duration,
) -> Result<(redis::Client, redis::aio::MultiplexedConnection), String> {
    let hint = |e: &dyn std::fmt::Display| {
        format!(
            "no Redis answers at {url} ({e}): the queue demo needs one; start it with \
             `redis-server --daemonize yes` (the test command, `sudo scripts/test.sh`, installs and \
             starts it), or point --redis at another"
        )
    };
    let client = redis::Client::open(url).map_err(|e| hint(&e))?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| hint(&e))?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map_err(|e| hint(&e))?;
    Ok((client, conn))
}

/// Deletes the list (the demo's own key), at start and on exit.
pub async fn delete_queue(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> redis::RedisResult<()> {
    redis::cmd("DEL").arg(key).query_async::<i64>(conn).await?;
    Ok(())
}

/// What the producer shares with the tick lines.
#[derive(Debug, Default)]
pub struct ProducerStats {
    rate_bits: AtomicU64,
    produced: AtomicU64,
}

impl ProducerStats {
    /// Current rate in jobs per second.
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Relaxed))
    }
    /// Jobs pushed so far.
    pub fn produced(&self) -> u64 {
        self.produced.load(Ordering::Relaxed)
    }
}

/// Pushes jobs (`RPUSH key job-N`, every 100 ms as many as the rate has accrued) until
/// aborted. A failed push is logged and retried on a new connection at the next round.
pub fn spawn_producer(
    client: redis::Client,
    conn: redis::aio::MultiplexedConnection,
    key: String,
    profile: RateProfile,
) -> (tokio::task::JoinHandle<()>, Arc<ProducerStats>) {
    let stats = Arc::new(ProducerStats::default());
    let shared = stats.clone();
    let task = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut conn = Some(conn);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = start;
        let mut owed = 0.0_f64;
        let mut failing = false;
        loop {
            let now = every.tick().await;
            let rate = profile.at(now - start);
            shared.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
            owed += rate * (now - last).as_secs_f64();
            last = now;
            let n = owed.floor() as u64;
            if n == 0 {
                continue;
            }
            if conn.is_none() {
                conn = client.get_multiplexed_async_connection().await.ok();
            }
            let Some(c) = conn.as_mut() else { continue };
            let first = shared.produced();
            let mut cmd = redis::cmd("RPUSH");
            cmd.arg(&key);
            for i in first..first + n {
                cmd.arg(format!("job-{i}"));
            }
            match cmd.query_async::<i64>(c).await {
                Ok(_) => {
                    owed -= n as f64;
                    shared.produced.fetch_add(n, Ordering::Relaxed);
                    if failing {
                        tracing::info!(key, "producer: pushing again");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(key, error = %e, "producer: cannot push jobs; retrying");
                        failing = true;
                    }
                    conn = None;
                }
            }
        }
    });
    (task, stats)
}

/// The queue's part of a tick line.
#[derive(Debug, Serialize)]
pub struct QueueTick {
    /// The list's key.
    pub key: String,
    /// Its length as the trigger sampled it this tick (None if the sample failed).
    pub length: Option<f64>,
    /// Target jobs per worker.
    pub target: f64,
    /// The producer's rate now, in jobs per second.
    pub rate: f64,
    /// Jobs pushed so far.
    pub produced: u64,
}

impl QueueTick {
    /// `queue 37 (target 5/worker) in 20.3/s`.
    pub fn text(&self) -> String {
        let len = self.length.map_or("?".into(), |v| format!("{v:.0}"));
        format!(
            "queue {len:>3} (target {}/worker) in {:>4.1}/s",
            self.target, self.rate
        )
    }
}

/// Reads the queue's state for the tick lines.
#[derive(Debug, Clone)]
pub struct QueueView {
    /// The list's key.
    pub key: String,
    /// Target per worker.
    pub target: f64,
    /// The producer's counters.
    pub stats: Arc<ProducerStats>,
}

impl QueueView {
    /// The queue in tick `r`: the `queue` trigger's sample of the `workers` service.
    pub fn tick(&self, r: &TickReport) -> QueueTick {
        let length = r
            .samples
            .iter()
            .find(|(s, _)| s.as_str() == "workers")
            .and_then(|(_, ts)| ts.iter().find(|t| &*t.trigger == "queue"))
            .and_then(|t| t.value);
        QueueTick {
            key: self.key.clone(),
            length,
            target: self.target,
            rate: self.stats.rate(),
            produced: self.stats.produced(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(shape: RateShape, seed: u64) -> RateProfile {
        RateProfile {
            shape,
            max: 40.0,
            period: Duration::from_secs(60),
            step: Duration::from_secs(10),
            seed,
        }
    }

    #[test]
    fn sine_goes_from_zero_to_max_and_back() {
        let p = profile(RateShape::Sine, 1);
        assert_eq!(p.at(Duration::ZERO), 0.0);
        assert!((p.at(Duration::from_secs(30)) - 40.0).abs() < 1e-9);
        assert!(p.at(Duration::from_secs(60)) < 1e-9);
        assert!((p.at(Duration::from_secs(15)) - 20.0).abs() < 1e-9);
    }

    #[test]
    fn steps_are_seeded_levels_held_for_a_step() {
        let a = profile(RateShape::Steps, 7);
        let levels: Vec<f64> = (0..20)
            .map(|k| a.at(Duration::from_secs(k * 10 + 3)))
            .collect();
        for (k, l) in levels.iter().enumerate() {
            assert!([0.0, 10.0, 20.0, 30.0, 40.0].contains(l), "{l}");
            assert_eq!(*l, a.at(Duration::from_secs(k as u64 * 10 + 9)));
        }
        assert!(levels.windows(2).any(|w| w[0] != w[1]), "{levels:?}");
        let again: Vec<f64> = (0..20)
            .map(|k| a.at(Duration::from_secs(k * 10 + 3)))
            .collect();
        assert_eq!(levels, again);
        let b = profile(RateShape::Steps, 8);
        assert!((0..20).any(|k| b.at(Duration::from_secs(k * 10)) != levels[k as usize]));
    }

    #[test]
    fn workers_get_host_and_port() {
        assert_eq!(
            worker_address("redis://127.0.0.1:6379").unwrap(),
            "127.0.0.1:6379"
        );
        assert_eq!(
            worker_address("redis://localhost").unwrap(),
            "localhost:6379"
        );
        assert_eq!(
            worker_address("redis://10.0.0.2:7000/0").unwrap(),
            "10.0.0.2:7000"
        );
        assert_eq!(worker_address("redis://[::1]").unwrap(), "[::1]:6379");
        assert!(worker_address("redis://u:p@host").is_err());
        assert!(worker_address("redis://host/3").is_err());
        assert!(worker_address("rediss://host").is_err());
    }

    #[test]
    fn queue_config_validates_on_both_backends() {
        let s = DemoSettings {
            capacity: 9,
            delta: 3,
            interval: Duration::from_secs(3),
            seed: Some(1),
            tick: Duration::from_millis(500),
            instance: "demo".into(),
            address: Some("http://127.0.0.1:4646".into()),
            cluster: None,
            region: Some("us-east-1".into()),
        };
        let q = QueueSettings {
            redis: "redis://127.0.0.1:6379".into(),
            key: "demo:jobs".into(),
            per_replica: 5.0,
            job: Duration::from_millis(200),
            rate: profile(RateShape::Sine, 1),
        };
        for backend in ["docker", "process"] {
            let toml = queue_config_toml(&s, &q, backend);
            let cfg = microscaler_backends::Config::from_toml(&toml)
                .unwrap_or_else(|e| panic!("{backend}: {e}\n{toml}"));
            let w = cfg.service("workers").unwrap();
            assert_eq!(
                w.workload.run().unwrap().env["MICROSCALER_WORK_REDIS"],
                "127.0.0.1:6379"
            );
            assert_eq!(
                w.workload.run().unwrap().env["MICROSCALER_WORK_QUEUE"],
                "demo:jobs"
            );
            assert_eq!(w.workload.run().unwrap().env["MICROSCALER_WORK_MS"], "200");
        }
        assert!(queue_config_toml(&s, &q, "docker").contains("network = \"host\""));
    }

    #[test]
    fn demo_config_validates_on_every_backend() {
        let s = DemoSettings {
            capacity: 9,
            delta: 3,
            interval: Duration::from_secs(3),
            seed: Some(1),
            tick: Duration::from_millis(500),
            instance: "demo".into(),
            address: Some("http://127.0.0.1:4646".into()),
            cluster: None,
            region: Some("us-east-1".into()),
        };
        for backend in [
            "docker",
            "process",
            "kubernetes",
            "nomad",
            "marathon",
            "ecs",
        ] {
            let toml = config_toml(&s, backend);
            let cfg = microscaler_backends::Config::from_toml(&toml)
                .unwrap_or_else(|e| panic!("{backend}: {e}\n{toml}"));
            let image = cfg
                .service("priority2")
                .unwrap()
                .workload
                .run()
                .unwrap()
                .image
                .clone();
            let want = matches!(backend, "kubernetes" | "nomad" | "marathon" | "ecs")
                .then(|| KUBERNETES_IMAGE.to_string());
            assert_eq!(image, want, "{backend}");
        }
    }
}
