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
use microscaler::control::{run_loop, Controller, Controls, TickReport};
use microscaler_backends::docker::DockerBackend;
use microscaler_backends::labels;
use microscaler_core::config::{BackendSpec, DockerSpec};
use microscaler_core::Config;
use tokio::sync::watch;
use tokio::time::Instant;

/// Running replicas per service of one instance, as the engine's event stream reports them.
#[derive(Debug, Clone)]
pub struct Counts {
    /// Running containers per service label (start +1, die -1).
    pub running: BTreeMap<String, i64>,
    /// Start events per service since the watcher began.
    pub starts: BTreeMap<String, u64>,
    /// Die events per service since the watcher began.
    pub dies: BTreeMap<String, u64>,
    /// When the last event arrived.
    pub at: Instant,
}

impl Counts {
    /// Running replicas of `service`.
    pub fn of(&self, service: &str) -> i64 {
        self.running.get(service).copied().unwrap_or(0)
    }
    /// Start events of `service`.
    pub fn starts_of(&self, service: &str) -> u64 {
        self.starts.get(service).copied().unwrap_or(0)
    }
    /// Die events of `service`.
    pub fn dies_of(&self, service: &str) -> u64 {
        self.dies.get(service).copied().unwrap_or(0)
    }
}

/// Watches the engine's `start` and `die` events of containers labelled with `instance`.
pub async fn watch_instance(docker: &Docker, instance: &str) -> watch::Receiver<Counts> {
    let (tx, rx) = watch::channel(Counts {
        running: BTreeMap::new(),
        starts: BTreeMap::new(),
        dies: BTreeMap::new(),
        at: Instant::now(),
    });
    // The client's timeout bounds the whole request, and an event stream is one long request.
    let docker = docker.clone().with_timeout(Duration::from_secs(24 * 3600));
    let label = format!("{}={instance}", labels::INSTANCE);
    let filters = HashMap::from([
        ("type", vec!["container".to_string()]),
        ("label", vec![label]),
        ("event", vec!["start".to_string(), "die".to_string()]),
    ]);
    let opts = EventsOptionsBuilder::new().filters(&filters).build();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut stream = Box::pin(docker.events(Some(opts)));
        let _ = ready_tx.send(());
        while let Some(ev) = stream.next().await {
            let Ok(ev) = ev else { break };
            let at = Instant::now();
            let service = ev
                .actor
                .and_then(|a| a.attributes)
                .and_then(|mut a| a.remove(labels::SERVICE))
                .unwrap_or_default();
            let action = ev.action.unwrap_or_default();
            tx.send_modify(|c| {
                c.at = at;
                match action.as_str() {
                    "start" => {
                        *c.running.entry(service.clone()).or_default() += 1;
                        *c.starts.entry(service).or_default() += 1;
                    }
                    "die" => {
                        *c.running.entry(service.clone()).or_default() -= 1;
                        *c.dies.entry(service).or_default() += 1;
                    }
                    _ => {}
                }
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

    fn body(&self, service: &str) -> ContainerCreateBody {
        ContainerCreateBody {
            image: Some(self.image.clone()),
            env: Some(vec![
                format!("MICROSCALER_INSTANCE={}", self.instance),
                format!("MICROSCALER_SERVICE={service}"),
            ]),
            labels: Some(HashMap::from([
                (labels::INSTANCE.to_string(), self.instance.clone()),
                (labels::SERVICE.to_string(), service.to_string()),
            ])),
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
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ms-{}-{service}-{n}", self.instance);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(opts), self.body(service))
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
}

impl LoopStats {
    fn record(&mut self, r: &TickReport) {
        self.ticks += 1;
        self.tick_ms.push(r.took.as_secs_f64() * 1e3);
        for ex in &r.executions {
            if let Ok(o) = &ex.result {
                self.started += u64::from(o.started);
                self.stopped += u64::from(o.stopped);
            }
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
        BackendSpec::Docker(d) => d.clone(),
        _ => DockerSpec {
            host: None,
            start_parallelism: 8,
            network: "none".into(),
        },
    };
    let backend = DockerBackend::connect(&spec, &cfg.instance).await?;
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
