//! What every Docker figure shares: an event watcher that counts running replicas per service
//! as the engine reports them, the raw Engine API baseline (the same container microscaler
//! would create, with no microscaler), the controller harness, and clean-up.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bollard::models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use microscaler::control::{run_loop, Controller, Controls, TickPhases, TickReport};
use microscaler_backends::docker::DockerBackend;
use microscaler_backends::docker::DockerConfig;
use microscaler_backends::labels;
use microscaler_backends::{Backend, BackendConfig, Config};
use tokio::sync::watch;
use tokio::time::Instant;

/// Where one container is, as far as the event stream says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Started, not paused: a running replica.
    Running,
    /// Started for the warm pool (label `io.microscaler.pool=warm`) and not yet paused: being
    /// filled, counted nowhere (as the backend counts it).
    Filling,
    /// Paused: pooled, or preempted with `preempt = "pause"`.
    Paused,
}

/// Running and paused replicas per service of one instance, as the engine's event stream
/// reports them: `start` (running, or filling for a pool container), `pause`, `unpause`, `die`.
#[derive(Debug, Clone)]
pub struct Counts {
    /// Running containers per service label (started or unpaused, not paused, not dead; a
    /// pool container being filled is not running).
    pub running: BTreeMap<String, i64>,
    /// Paused containers per service label.
    pub paused: BTreeMap<String, i64>,
    /// Start events per service since the watcher began.
    pub starts: BTreeMap<String, u64>,
    /// Die events per service since the watcher began.
    pub dies: BTreeMap<String, u64>,
    /// Pause events per service.
    pub pauses: BTreeMap<String, u64>,
    /// Unpause events per service.
    pub unpauses: BTreeMap<String, u64>,
    /// When the last event arrived.
    pub at: Instant,
    /// Each container seen: its service and state.
    containers: HashMap<String, (String, State)>,
}

fn get<T: Copy + Default>(m: &BTreeMap<String, T>, service: &str) -> T {
    m.get(service).copied().unwrap_or_default()
}

impl Counts {
    /// Running replicas of `service`.
    pub fn of(&self, service: &str) -> i64 {
        get(&self.running, service)
    }
    /// Start events of `service`.
    pub fn starts_of(&self, service: &str) -> u64 {
        get(&self.starts, service)
    }
    /// Die events of `service`.
    pub fn dies_of(&self, service: &str) -> u64 {
        get(&self.dies, service)
    }
    /// Pause events of `service`.
    pub fn pauses_of(&self, service: &str) -> u64 {
        get(&self.pauses, service)
    }
    /// Unpause events of `service`.
    pub fn unpauses_of(&self, service: &str) -> u64 {
        get(&self.unpauses, service)
    }

    fn apply(&mut self, id: String, service: String, action: &str, pool: bool) {
        let before = self.containers.get(&id).map(|(_, s)| *s);
        let after = match (action, before) {
            ("start", _) if pool => Some(State::Filling),
            ("start", _) => Some(State::Running),
            ("pause", _) => Some(State::Paused),
            ("unpause", _) => Some(State::Running),
            ("die", _) => None,
            (_, b) => b,
        };
        let counter = match action {
            "start" => &mut self.starts,
            "die" => &mut self.dies,
            "pause" => &mut self.pauses,
            "unpause" => &mut self.unpauses,
            _ => return,
        };
        *counter.entry(service.clone()).or_default() += 1;
        let mut adjust = |s: Option<State>, by: i64| match s {
            Some(State::Running) => *self.running.entry(service.clone()).or_default() += by,
            Some(State::Paused) => *self.paused.entry(service.clone()).or_default() += by,
            _ => {}
        };
        adjust(before, -1);
        adjust(after, 1);
        match after {
            Some(s) => {
                self.containers.insert(id, (service, s));
            }
            None => {
                self.containers.remove(&id);
            }
        }
    }
}

/// Watches the engine's `start`, `pause`, `unpause` and `die` events of containers labelled
/// with `instance`.
pub async fn watch_instance(docker: &Docker, instance: &str) -> watch::Receiver<Counts> {
    let (tx, rx) = watch::channel(Counts {
        running: BTreeMap::new(),
        paused: BTreeMap::new(),
        starts: BTreeMap::new(),
        dies: BTreeMap::new(),
        pauses: BTreeMap::new(),
        unpauses: BTreeMap::new(),
        at: Instant::now(),
        containers: HashMap::new(),
    });
    // The client's timeout bounds the whole request, and an event stream is one long request.
    let docker = docker.clone().with_timeout(Duration::from_secs(24 * 3600));
    let label = format!("{}={instance}", labels::INSTANCE);
    let filters = HashMap::from([
        ("type", vec!["container".to_string()]),
        ("label", vec![label]),
        (
            "event",
            ["start", "die", "pause", "unpause"]
                .map(String::from)
                .to_vec(),
        ),
    ]);
    let opts = EventsOptionsBuilder::new().filters(&filters).build();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut stream = Box::pin(docker.events(Some(opts)));
        let _ = ready_tx.send(());
        while let Some(ev) = stream.next().await {
            let Ok(ev) = ev else { break };
            let at = Instant::now();
            let (id, mut attrs) = ev
                .actor
                .map(|a| (a.id.unwrap_or_default(), a.attributes.unwrap_or_default()))
                .unwrap_or_default();
            let service = attrs.remove(labels::SERVICE).unwrap_or_default();
            let pool = attrs.contains_key(labels::POOL);
            let action = ev.action.unwrap_or_default();
            tx.send_modify(|c| {
                c.at = at;
                c.apply(id, service, &action, pool);
            });
        }
    });
    let _ = ready_rx.await;
    // The stream is subscribed once the engine has answered the request; give it that time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx
}

/// Waits until `pred` holds for the counts; returns when the event that made it true arrived.
pub async fn wait_until(
    rx: &mut watch::Receiver<Counts>,
    limit: Duration,
    what: &str,
    pred: impl FnMut(&Counts) -> bool,
) -> Result<Instant> {
    let got = match tokio::time::timeout(limit, rx.wait_for(pred)).await {
        Ok(Ok(c)) => Ok(c.at),
        Ok(Err(_)) => Err(false),
        Err(_) => Err(true),
    };
    match got {
        Ok(at) => Ok(at),
        Err(false) => bail!("the engine's event stream ended while waiting for {what}"),
        Err(true) => bail!(
            "timed out after {} waiting for {what}; counts: {:?}",
            humantime::format_duration(limit),
            rx.borrow().running
        ),
    }
}

/// One raw unpause of the paused container `frozen` of `service`, timed from the request to
/// its `unpause` event as `rx` sees it (at most `limit`); the container is paused again after.
pub async fn timed_unpause(
    raw: &Raw,
    rx: &mut watch::Receiver<Counts>,
    frozen: &str,
    service: &str,
    limit: Duration,
) -> Result<Duration> {
    let n = rx.borrow().unpauses_of(service);
    let t0 = Instant::now();
    raw.unpause(frozen).await?;
    let at = wait_until(rx, limit, "the baseline unpause", |c| {
        c.unpauses_of(service) > n
    })
    .await?;
    raw.pause(frozen).await?;
    Ok(at - t0)
}

/// The raw Engine API, with no microscaler: the container the Docker backend would create for
/// a service (same built-in image, environment shape, labels, stop timeout and host config).
pub struct Raw {
    /// The engine.
    pub docker: Docker,
    /// The instance label of the baseline's containers.
    pub instance: String,
    image: String,
    n: std::sync::atomic::AtomicU64,
}

impl Raw {
    /// Connects and imports the built-in replica image if needed.
    pub async fn new(instance: &str) -> Result<Raw> {
        let docker = microscaler_backends::docker_api::connect(None).await?;
        let image = microscaler_backends::docker_api::ensure_replica_image(&docker).await?;
        Ok(Raw {
            docker,
            instance: instance.to_string(),
            image,
            n: Default::default(),
        })
    }

    fn body(&self, service: &str, pool: bool) -> ContainerCreateBody {
        let mut labels = HashMap::from([
            (labels::INSTANCE.to_string(), self.instance.clone()),
            (labels::SERVICE.to_string(), service.to_string()),
        ]);
        if pool {
            labels.insert(labels::POOL.to_string(), "warm".to_string());
        }
        ContainerCreateBody {
            image: Some(self.image.clone()),
            env: Some(vec![
                format!("MICROSCALER_INSTANCE={}", self.instance),
                format!("MICROSCALER_SERVICE={service}"),
            ]),
            labels: Some(labels),
            stop_timeout: Some(2),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                auto_remove: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Creates and starts one container of `service`; returns its id.
    pub async fn create_start(&self, service: &str) -> Result<String> {
        self.create_start_as(service, false).await
    }

    /// Creates, starts and pauses one container of `service`, as the Docker backend fills its
    /// warm pool (with the pool label); returns its id.
    pub async fn create_paused(&self, service: &str) -> Result<String> {
        let id = self.create_start_as(service, true).await?;
        self.pause(&id).await?;
        Ok(id)
    }

    /// Pauses a container.
    pub async fn pause(&self, id: &str) -> Result<()> {
        self.docker
            .pause_container(id)
            .await
            .with_context(|| format!("pause {id}"))
    }

    /// Unpauses a container.
    pub async fn unpause(&self, id: &str) -> Result<()> {
        self.docker
            .unpause_container(id)
            .await
            .with_context(|| format!("unpause {id}"))
    }

    async fn create_start_as(&self, service: &str, pool: bool) -> Result<String> {
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ms-{}-{service}-{n}", self.instance);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(opts), self.body(service, pool))
            .await
            .with_context(|| format!("create {name}"))?;
        self.docker
            .start_container(&created.id, None)
            .await
            .with_context(|| format!("start {name}"))?;
        Ok(created.id)
    }

    /// Stops (SIGTERM, 2 s grace, as the services of the benchmark) and removes a container,
    /// as the Docker backend does on a scale-down.
    pub async fn stop_remove(&self, id: &str) -> Result<()> {
        let opts = StopContainerOptionsBuilder::new().t(2).build();
        let _ = self.docker.stop_container(id, Some(opts)).await;
        remove(&self.docker, id).await
    }
}

async fn remove(docker: &Docker, id: &str) -> Result<()> {
    let opts = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError { status_code, .. })
            if status_code == 404 || status_code == 409 =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("remove container {id}")),
    }
}

/// Removes every container labelled with `instance` (whatever happened before); returns how
/// many there were.
pub async fn cleanup(docker: &Docker, instance: &str) -> Result<usize> {
    let filters = HashMap::from([("label", vec![format!("{}={instance}", labels::INSTANCE)])]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let list = docker.list_containers(Some(opts)).await?;
    let ids: Vec<String> = list.into_iter().filter_map(|c| c.id).collect();
    let n = ids.len();
    let results = futures::stream::iter(ids)
        .map(|id| async move { remove(docker, &id).await })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        r?;
    }
    Ok(n)
}

/// What the control loop did while a scenario ran.
#[derive(Debug, Default, Clone)]
pub struct LoopStats {
    /// Ticks run.
    pub ticks: u64,
    /// Tick durations (observe + sample + decide + act), ms.
    pub tick_ms: Vec<f64>,
    /// Replicas started and stopped, as the backend reported.
    pub started: u64,
    /// Replicas stopped.
    pub stopped: u64,
    /// Replicas unpaused (from the pool, or resumed after a pause).
    pub resumed: u64,
    /// Ticks that started or resumed replicas: when the tick ended (as the loop reported it),
    /// how long it took, and how many it started (of which resumed).
    pub scale_ups: Vec<(Instant, Duration, u32, u32)>,
    /// Every tick that scaled something, in order.
    pub scaling_ticks: Vec<TickLog>,
}

/// One tick that scaled, as the loop reported it.
#[derive(Debug, Clone)]
pub struct TickLog {
    /// When the loop reported the tick (its end).
    pub end: Instant,
    /// How long it took.
    pub took: Duration,
    /// Where its time went.
    pub phases: TickPhases,
    /// The services it scaled, with their targets.
    pub scaled: Vec<(String, u32)>,
}

impl TickLog {
    /// When the tick started.
    pub fn start(&self) -> Instant {
        self.end - self.took
    }
}

impl LoopStats {
    fn record(&mut self, r: &TickReport) {
        let end = Instant::now();
        self.ticks += 1;
        self.tick_ms.push(r.took.as_secs_f64() * 1e3);
        if !r.executions.is_empty() {
            self.scaling_ticks.push(TickLog {
                end,
                took: r.took,
                phases: r.phases,
                scaled: r
                    .executions
                    .iter()
                    .map(|e| (e.service.to_string(), e.target))
                    .collect(),
            });
        }
        let (mut started, mut resumed) = (0, 0);
        for ex in &r.executions {
            if let Ok(o) = &ex.result {
                self.started += u64::from(o.started);
                self.stopped += u64::from(o.stopped);
                self.resumed += u64::from(o.resumed);
                started += o.started;
                resumed += o.resumed;
            }
        }
        if started > 0 {
            self.scale_ups.push((end, r.took, started, resumed));
        }
    }
}

/// Runs microscaler's real control loop (`Controller` + `DockerBackend` + `run_loop`) on `cfg`
/// while `drive` runs; then stops the loop and removes the replicas (`shutdown(remove)`).
pub async fn with_controller<T, Fut>(
    cfg: Config,
    drive: impl FnOnce(Controls) -> Fut,
) -> Result<(T, LoopStats)>
where
    Fut: Future<Output = Result<T>>,
{
    let spec = match &cfg.backend {
        BackendConfig::Docker(d) => d.clone(),
        _ => DockerConfig {
            host: None,
            start_parallelism: 8,
            network: "none".into(),
            allocatable: None,
            ..DockerConfig::default()
        },
    };
    let backend = DockerBackend::connect(&spec, &cfg.instance).await?;
    with_backend(cfg, backend, drive).await
}

/// [`with_controller`] on a backend already connected.
pub async fn with_backend<B, T, Fut>(
    cfg: Config,
    backend: B,
    drive: impl FnOnce(Controls) -> Fut,
) -> Result<(T, LoopStats)>
where
    B: Backend + 'static,
    Fut: Future<Output = Result<T>>,
{
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await?;
    let controls = ctl.controls().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stats = LoopStats::default();
    let driver = async move {
        let r = drive(controls).await;
        let _ = stop_tx.send(());
        r
    };
    let looper = run_loop(
        &mut ctl,
        async {
            let _ = stop_rx.await;
        },
        |r| stats.record(r),
    );
    let (result, ()) = tokio::join!(driver, looper);
    let shut = ctl.shutdown().await;
    let value = result?;
    shut?;
    Ok((value, stats))
}

/// Sets the manual demand of `service`.
pub fn set_demand(controls: &Controls, service: &str, v: u32) -> Result<()> {
    controls
        .manual_of(service)
        .with_context(|| format!("service {service} has no manual trigger"))?
        .set(f64::from(v))
        .map_err(|e| anyhow::anyhow!("{e}"))
}
