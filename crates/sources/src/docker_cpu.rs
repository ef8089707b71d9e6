//! CPU use of one microscaler service's own containers, from the Docker engine's stats.
//!
//! Only running containers labelled `io.microscaler.instance=<instance>` and
//! `io.microscaler.service=<service>` are measured. Each container's use is the engine's usual
//! formula, `(cpu delta / system delta) x online CPUs x 100`, over the ~1 s between the two
//! readings one stats call returns: 100 is one full core. The value is their average (for
//! `rule = "utilisation"`) or their sum.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{ListContainersOptionsBuilder, StatsOptionsBuilder};
use bollard::Docker;
use futures::StreamExt;
use microscaler_core::validate::{check_url, join};
use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;

use crate::config::{net_options, NetOptions};
use crate::{Source, SourceError};

/// CPU use of the containers of one microscaler service (labelled `io.microscaler.instance` and
/// `io.microscaler.service`), from the Docker engine's stats, in percent of one CPU (100 = one
/// full core): the average over the running containers, or their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerCpuConfig {
    /// Engine address (`unix:///var/run/docker.sock`, `tcp://host:2375`); `None`: `DOCKER_HOST`
    /// or the default socket.
    pub docker_host: Option<String>,
    /// The microscaler service whose containers are measured; `None`: the trigger's own.
    pub service: Option<String>,
    /// Average per container (default) or the sum.
    pub aggregate: CpuAggregate,
    /// Timeouts and start-up policy (the default timeout is 5 s: a stats read takes ~1 s).
    pub net: NetOptions,
}

/// How the CPU use of several containers is combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAggregate {
    /// The mean over the running containers (for `rule = "utilisation"`).
    Average,
    /// The total.
    Sum,
}

#[derive(Deserialize)]
struct RawDockerCpu {
    docker_host: Option<String>,
    service: Option<String>,
    aggregate: Option<String>,
}

impl DockerCpuConfig {
    /// Validates a `type = "docker_cpu"` trigger's options (`docker_host`, `service`,
    /// `aggregate`, `timeout`, `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<DockerCpuConfig> {
        let has_timeout = options.contains_key("timeout");
        let mut net = net_options(v, &mut options, path);
        if !has_timeout {
            net.timeout = Duration::from_secs(5);
        }
        let r: RawDockerCpu = v.part(toml::Value::Table(options), path)?;
        if let Some(h) = &r.docker_host {
            let checked = match h.strip_prefix("unix://") {
                Some(p) if p.starts_with('/') => Ok(()),
                Some(_) => Err(format!(
                    "{h:?}: a socket address is unix:// and an absolute path, like unix:///var/run/docker.sock"
                )),
                None => check_url(h, &["unix", "tcp", "http"]),
            };
            if let Err(e) = checked {
                v.err(join(path, "docker_host"), e);
            }
        }
        let aggregate = match r.aggregate.as_deref() {
            None | Some("average") => CpuAggregate::Average,
            Some("sum") => CpuAggregate::Sum,
            Some(other) => {
                v.err(
                    join(path, "aggregate"),
                    format!("must be \"average\" or \"sum\", got {other:?}"),
                );
                CpuAggregate::Average
            }
        };
        Some(DockerCpuConfig {
            docker_host: r.docker_host,
            service: r.service,
            aggregate,
            net,
        })
    }
}

/// The labels microscaler puts on its replicas (as the Docker backend does).
const LABEL_INSTANCE: &str = "io.microscaler.instance";
const LABEL_SERVICE: &str = "io.microscaler.service";

/// CPU use of one service's containers.
#[derive(Debug)]
pub struct DockerCpuSource {
    address: String,
    docker: Option<Docker>,
    instance: String,
    service: String,
    aggregate: CpuAggregate,
    timeout: Duration,
    name: String,
}

impl DockerCpuSource {
    /// Builds the source for `service` of `instance` (no I/O; connects on first use). The
    /// config's `service`, when set, overrides `service`.
    pub fn new(
        config: &DockerCpuConfig,
        instance: &str,
        service: &str,
    ) -> Result<Self, SourceError> {
        let service = config
            .service
            .clone()
            .unwrap_or_else(|| service.to_string());
        let address = config
            .docker_host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let name = format!("docker_cpu of {instance}/{service} at {address}");
        if service.is_empty() || instance.is_empty() {
            return Err(SourceError::Failed {
                source_name: name,
                reason: "no instance or service to measure (build it with AnySource::build_in, or set service)".into(),
            });
        }
        Ok(DockerCpuSource {
            address,
            docker: None,
            instance: instance.to_string(),
            service,
            aggregate: config.aggregate,
            timeout: config.net.timeout,
            name,
        })
    }

    fn failed(&self, reason: String) -> SourceError {
        SourceError::Failed {
            source_name: self.name.clone(),
            reason,
        }
    }

    async fn docker(&mut self) -> Result<Docker, SourceError> {
        if let Some(d) = &self.docker {
            return Ok(d.clone());
        }
        let secs = self.timeout.as_secs().max(1);
        let a = self.address.as_str();
        let d = if let Some(path) = a.strip_prefix("unix://") {
            Docker::connect_with_unix(path, secs, bollard::API_DEFAULT_VERSION)
        } else {
            Docker::connect_with_http(a, secs, bollard::API_DEFAULT_VERSION)
        }
        .map_err(|e| {
            self.failed(format!(
                "cannot use the Docker engine at {a}: {e}: is dockerd running? set docker_host or DOCKER_HOST"
            ))
        })?;
        // Debian's engine speaks API <= 1.41 and refuses newer clients: negotiate.
        let d = tokio::time::timeout(self.timeout, d.negotiate_version())
            .await
            .map_err(|_| self.failed(format!("the Docker engine at {a} did not answer in time")))?
            .map_err(|e| {
                self.failed(format!(
                    "cannot reach the Docker engine at {a}: {e}: is dockerd running? set docker_host or DOCKER_HOST"
                ))
            })?;
        self.docker = Some(d.clone());
        Ok(d)
    }

    /// Start-up check: the engine answers. (No container may run yet.)
    pub async fn check(&mut self) -> Result<(), SourceError> {
        let d = self.docker().await?;
        let t = self.timeout;
        match tokio::time::timeout(t, d.ping()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.failed(format!("the Docker engine did not answer ping: {e}"))),
            Err(_) => Err(self.failed("the Docker engine did not answer ping in time".into())),
        }
    }

    async fn read(&mut self) -> Result<f64, SourceError> {
        let d = self.docker().await?;
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_INSTANCE}={}", self.instance),
                format!("{LABEL_SERVICE}={}", self.service),
            ],
        )]);
        let opts = ListContainersOptionsBuilder::new()
            .filters(&filters)
            .build();
        let list = d.list_containers(Some(opts)).await.map_err(|e| {
            self.docker = None;
            self.failed(format!("cannot list containers: {e}"))
        })?;
        // The engine filtered already; a wrong filter must still never count someone else's.
        let ids: Vec<String> = list
            .into_iter()
            .filter(|c| {
                let l = c.labels.as_ref();
                l.and_then(|l| l.get(LABEL_INSTANCE)) == Some(&self.instance)
                    && l.and_then(|l| l.get(LABEL_SERVICE)) == Some(&self.service)
            })
            .filter_map(|c| c.id)
            .collect();
        if ids.is_empty() {
            return Err(SourceError::Garbage {
                source_name: self.name.clone(),
                reason: "no running container of the service: no CPU value".into(),
            });
        }
        let reads = ids.iter().map(|id| {
            let d = d.clone();
            async move {
                let opts = StatsOptionsBuilder::new()
                    .stream(false)
                    .one_shot(false)
                    .build();
                let mut s = d.stats(id, Some(opts));
                match s.next().await {
                    Some(Ok(st)) => Ok(cpu_percent(&st)),
                    Some(Err(e)) => Err(format!("stats of {}: {e}", short(id))),
                    None => Err(format!("stats of {}: no answer", short(id))),
                }
            }
        });
        let mut values = Vec::new();
        for r in futures::future::join_all(reads).await {
            match r {
                Ok(Some(v)) => values.push(v),
                // A container that stopped between list and stats has no reading: skip it.
                Ok(None) => {}
                Err(e) => return Err(self.failed(e)),
            }
        }
        if values.is_empty() {
            return Err(SourceError::Garbage {
                source_name: self.name.clone(),
                reason: "no container had two CPU readings yet".into(),
            });
        }
        let sum: f64 = values.iter().sum();
        Ok(match self.aggregate {
            CpuAggregate::Sum => sum,
            CpuAggregate::Average => sum / values.len() as f64,
        })
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Percent of one CPU between the two readings of a stats answer; `None` without both.
fn cpu_percent(st: &bollard::models::ContainerStatsResponse) -> Option<f64> {
    let cur = st.cpu_stats.as_ref()?;
    let pre = st.precpu_stats.as_ref()?;
    let total = cur.cpu_usage.as_ref()?.total_usage?;
    let pre_total = pre.cpu_usage.as_ref()?.total_usage?;
    let system = cur.system_cpu_usage?;
    let pre_system = pre.system_cpu_usage?;
    let cpus = cur.online_cpus.filter(|n| *n > 0).unwrap_or(1);
    if system <= pre_system {
        return None;
    }
    let used = total.saturating_sub(pre_total) as f64;
    Some(used / (system - pre_system) as f64 * f64::from(cpus) * 100.0)
}

impl Source for DockerCpuSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::CpuAggregate;
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn docker_cpu_options() {
        let SourceConfig::DockerCpu(d) = config(r#"type = "docker_cpu""#) else {
            panic!()
        };
        assert_eq!(d.aggregate, CpuAggregate::Average);
        assert_eq!(d.net.timeout, Duration::from_secs(5));
        assert_eq!((d.service, d.docker_host), (None, None));
        let SourceConfig::DockerCpu(d) = config(
            r#"type = "docker_cpu"
            docker_host = "tcp://127.0.0.1:2375"
            service = "web"
            aggregate = "sum"
            timeout = "1s""#,
        ) else {
            panic!()
        };
        assert_eq!(d.aggregate, CpuAggregate::Sum);
        assert_eq!(d.net.timeout, Duration::from_secs(1));
        assert_eq!(d.service.as_deref(), Some("web"));
        let e = errors(
            r#"type = "docker_cpu"
            docker_host = "unix://docker.sock"
            aggregate = "max""#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.docker_host: \"unix://docker.sock\": a socket address is unix:// and an absolute path, like unix:///var/run/docker.sock"),
                format!("{P}.aggregate: must be \"average\" or \"sum\", got \"max\""),
            ]
        );
    }
}
