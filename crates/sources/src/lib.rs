//! Demand sources: where a trigger's value comes from.
//!
//! Each source owns its configuration, Vector-style: its module holds its options (`XConfig`,
//! every field documented), the raw form they are read from, their validation
//! (`XConfig::validate`, reporting every error with its path through the core's shared
//! [`Validator`](microscaler_core::Validator)), the live source built from them, and the
//! tests of both. [`SourceConfig`] (in [`config`]) is the closed set of the sources' options,
//! one variant each; it is the core's [`SourcePlugins`](microscaler_core::SourcePlugins), so
//! the core validates a configuration without knowing any source's options. [`NetOptions`]
//! are the keys every network source shares (`timeout`, `required`).
//!
//! A source is built once from its validated configuration ([`AnySource::build`]; options are
//! never parsed per tick) and sampled every tick with the tick's time as an input, so
//! time-driven sources (random, schedule) are deterministic under test. Network sources
//! (queues, load balancers, Prometheus) are built without I/O and checked once at start-up
//! ([`AnySource::check`]); every request they make has connect and read timeouts of its own,
//! besides the control loop's bound on a whole sample.
//!
//! Adding a source means: one module file (its `XConfig`, raw struct, `validate`, source and
//! unit tests); one variant in [`SourceConfig`], its name in `TYPES` and its arm in the one
//! `match` of `SourceConfig::validate` (and in `type_name` and [`SourceConfig::net`]); one
//! variant of [`AnySource`] and its arms; tests against a real server under `tests/`; and a
//! section in `docs/sources.md`.
//!
//! The `sqs` source needs the AWS SDK and is behind the cargo feature `sqs` (on by default).
//! Without it, a `type = "sqs"` trigger is refused at load with a message saying so.
#![deny(missing_docs)]

use std::future::Future;
use std::time::Duration;

pub mod config;
pub mod docker_cpu;
pub mod haproxy;
mod http;
pub mod http_json;
pub mod manual;
pub mod nats;
pub mod nginx;
pub mod prometheus;
pub mod push;
pub mod rabbitmq;
pub mod random;
pub mod redis;
pub mod schedule;
#[cfg(feature = "sqs")]
pub mod sqs;

pub use config::{NetOptions, SourceConfig};
pub use docker_cpu::{CpuAggregate, DockerCpuConfig, DockerCpuSource};
pub use haproxy::{HaproxyConfig, HaproxySource};
pub use http_json::{HttpJsonConfig, HttpJsonSource};
pub use manual::{ManualConfig, ManualHandle, ManualSource};
pub use nats::{NatsJetstreamConfig, NatsJetstreamSource};
pub use nginx::{NginxConfig, NginxSource};
pub use prometheus::{PrometheusConfig, PrometheusSource};
pub use push::{PushConfig, PushHandle, PushSource};
pub use rabbitmq::{RabbitmqConfig, RabbitmqSource};
pub use random::{RandomConfig, RandomControl, RandomSource};
pub use redis::{RedisListConfig, RedisListSource, RedisStreamConfig, RedisStreamSource};
pub use schedule::{ScheduleConfig, ScheduleSource, ScheduleWindow};
#[cfg(feature = "sqs")]
pub use sqs::{SqsConfig, SqsSource};

/// Errors of a source. Messages name the server and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SourceError {
    /// The source returned something that is not a usable value.
    #[error("rejected sample from {source_name}: {reason}")]
    Garbage {
        /// The source.
        source_name: String,
        /// Why the value was rejected.
        reason: String,
    },
    /// The source could not be read.
    #[error("cannot sample {source_name}: {reason}")]
    Failed {
        /// The source.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
}

/// A demand source.
pub trait Source: Send {
    /// Short description for logs and the dashboard (`random(±3 every 3s)`).
    fn describe(&self) -> String;

    /// The value at `now` (time since the daemon started).
    fn sample(&mut self, now: Duration) -> impl Future<Output = Result<f64, SourceError>> + Send;
}

/// All sources, as one closed enum.
#[derive(Debug)]
pub enum AnySource {
    /// Random walk.
    Random(RandomSource),
    /// Set by hand.
    Manual(ManualSource),
    /// Pushed over the API.
    Push(PushSource),
    /// Redis list length.
    RedisList(RedisListSource),
    /// Redis stream consumer-group lag.
    RedisStream(RedisStreamSource),
    /// RabbitMQ queue depth.
    Rabbitmq(RabbitmqSource),
    /// Prometheus instant query.
    Prometheus(PrometheusSource),
    /// A number in an HTTP JSON document.
    HttpJson(HttpJsonSource),
    /// HAProxy stats field (request rate).
    Haproxy(HaproxySource),
    /// nginx request rate.
    Nginx(NginxSource),
    /// NATS JetStream consumer backlog.
    NatsJetstream(NatsJetstreamSource),
    /// Value by time of day.
    Schedule(ScheduleSource),
    /// CPU use of a service's containers.
    DockerCpu(DockerCpuSource),
    /// AWS SQS queue backlog (cargo feature `sqs`).
    #[cfg(feature = "sqs")]
    Sqs(SqsSource),
    /// A source whose client could not be built: its check and every sample fail with the
    /// build error (see [`AnySource::build_or_broken`]).
    Broken(SourceError),
}

impl AnySource {
    /// Builds a source from its validated configuration, without I/O. `capacity` bounds the
    /// random walk when its configuration gives no max; `clock_seed` seeds it when its
    /// configuration gives no seed. Fails only when a client cannot be built from options the
    /// configuration accepted (a URL the client library rejects), with a message naming the
    /// source.
    pub fn build(
        config: &SourceConfig,
        capacity: u32,
        clock_seed: u64,
    ) -> Result<AnySource, SourceError> {
        Self::build_in(config, capacity, clock_seed, "", "")
    }

    /// [`AnySource::build`] for a trigger of `service` of microscaler `instance`: sources that
    /// measure the service itself (`docker_cpu`) need to know which.
    pub fn build_in(
        config: &SourceConfig,
        capacity: u32,
        clock_seed: u64,
        instance: &str,
        service: &str,
    ) -> Result<AnySource, SourceError> {
        Ok(match config {
            SourceConfig::Random(r) => {
                AnySource::Random(RandomSource::new(r, capacity, clock_seed))
            }
            SourceConfig::Manual(m) => AnySource::Manual(ManualSource::new(m.initial)),
            SourceConfig::Push(p) => AnySource::Push(PushSource::new(p)?),
            SourceConfig::RedisList(s) => AnySource::RedisList(RedisListSource::new(s)?),
            SourceConfig::RedisStream(s) => AnySource::RedisStream(RedisStreamSource::new(s)?),
            SourceConfig::Rabbitmq(s) => AnySource::Rabbitmq(RabbitmqSource::new(s)?),
            SourceConfig::Prometheus(s) => AnySource::Prometheus(PrometheusSource::new(s)?),
            SourceConfig::HttpJson(s) => AnySource::HttpJson(HttpJsonSource::new(s)?),
            SourceConfig::Haproxy(s) => AnySource::Haproxy(HaproxySource::new(s)?),
            SourceConfig::Nginx(s) => AnySource::Nginx(NginxSource::new(s)?),
            SourceConfig::NatsJetstream(s) => {
                AnySource::NatsJetstream(NatsJetstreamSource::new(s)?)
            }
            SourceConfig::Schedule(s) => AnySource::Schedule(ScheduleSource::new(s)),
            #[cfg(feature = "sqs")]
            SourceConfig::Sqs(s) => AnySource::Sqs(SqsSource::new(s)),
            SourceConfig::DockerCpu(s) => {
                AnySource::DockerCpu(DockerCpuSource::new(s, instance, service)?)
            }
        })
    }

    /// Like [`AnySource::build`], but a source that cannot be built becomes
    /// [`AnySource::Broken`], so the caller can report it at the start-up check (or keep running
    /// with the trigger failing when the source is not required).
    pub fn build_or_broken(
        config: &SourceConfig,
        capacity: u32,
        clock_seed: u64,
        instance: &str,
        service: &str,
    ) -> AnySource {
        Self::build_in(config, capacity, clock_seed, instance, service)
            .unwrap_or_else(AnySource::Broken)
    }

    /// The start-up health check: can the server be reached, and does the thing measured
    /// exist (queue, stream and group, consumer, proxy row, ...)? The error names the server
    /// and what is wrong. Local sources always pass. Bounded by the source's own timeouts.
    pub async fn check(&mut self) -> Result<(), SourceError> {
        match self {
            AnySource::Random(_)
            | AnySource::Manual(_)
            | AnySource::Push(_)
            | AnySource::Schedule(_) => Ok(()),
            AnySource::Broken(e) => Err(e.clone()),
            AnySource::RedisList(s) => s.check().await,
            AnySource::RedisStream(s) => s.check().await,
            AnySource::Rabbitmq(s) => s.check().await,
            AnySource::Prometheus(s) => s.check().await,
            AnySource::HttpJson(s) => s.check().await,
            AnySource::Haproxy(s) => s.check().await,
            AnySource::Nginx(s) => s.check().await,
            AnySource::NatsJetstream(s) => s.check().await,
            AnySource::DockerCpu(s) => s.check().await,
            #[cfg(feature = "sqs")]
            AnySource::Sqs(s) => s.check().await,
        }
    }
}

impl Source for AnySource {
    fn describe(&self) -> String {
        match self {
            AnySource::Random(s) => s.describe(),
            AnySource::Manual(s) => s.describe(),
            AnySource::Push(s) => s.describe(),
            AnySource::RedisList(s) => s.describe(),
            AnySource::RedisStream(s) => s.describe(),
            AnySource::Rabbitmq(s) => s.describe(),
            AnySource::Prometheus(s) => s.describe(),
            AnySource::HttpJson(s) => s.describe(),
            AnySource::Haproxy(s) => s.describe(),
            AnySource::Nginx(s) => s.describe(),
            AnySource::NatsJetstream(s) => s.describe(),
            AnySource::Schedule(s) => s.describe(),
            AnySource::DockerCpu(s) => s.describe(),
            #[cfg(feature = "sqs")]
            AnySource::Sqs(s) => s.describe(),
            AnySource::Broken(e) => match e {
                SourceError::Garbage { source_name, .. }
                | SourceError::Failed { source_name, .. } => source_name.clone(),
            },
        }
    }

    async fn sample(&mut self, now: Duration) -> Result<f64, SourceError> {
        let v = match self {
            AnySource::Random(s) => s.sample(now).await,
            AnySource::Manual(s) => s.sample(now).await,
            AnySource::Push(s) => s.sample(now).await,
            AnySource::RedisList(s) => s.sample(now).await,
            AnySource::RedisStream(s) => s.sample(now).await,
            AnySource::Rabbitmq(s) => s.sample(now).await,
            AnySource::Prometheus(s) => s.sample(now).await,
            AnySource::HttpJson(s) => s.sample(now).await,
            AnySource::Haproxy(s) => s.sample(now).await,
            AnySource::Nginx(s) => s.sample(now).await,
            AnySource::NatsJetstream(s) => s.sample(now).await,
            AnySource::Schedule(s) => s.sample(now).await,
            AnySource::DockerCpu(s) => s.sample(now).await,
            #[cfg(feature = "sqs")]
            AnySource::Sqs(s) => s.sample(now).await,
            AnySource::Broken(e) => Err(e.clone()),
        }?;
        self.checked(v)
    }
}

impl AnySource {
    /// The value at `now` without a future, for the sources that never wait for anything
    /// (random, manual, push, schedule, and a broken one's error); `None` for the others, which are
    /// sampled with [`Source::sample`]. The control loop reads most triggers this way: no
    /// future is built, boxed or polled for them.
    pub fn sample_now(&mut self, now: Duration) -> Option<Result<f64, SourceError>> {
        let v = match self {
            AnySource::Random(s) => Ok(f64::from(s.value_at(now))),
            AnySource::Manual(s) => Ok(s.get()),
            AnySource::Push(s) => s.value_now(),
            AnySource::Schedule(s) => Ok(s.value_now()),
            AnySource::Broken(e) => Err(e.clone()),
            _ => return None,
        };
        Some(v.and_then(|v| self.checked(v)))
    }

    /// [`check_value`], naming the source only when the value is refused.
    fn checked(&self, v: f64) -> Result<f64, SourceError> {
        if v.is_finite() && v >= 0.0 {
            return Ok(v);
        }
        check_value(&self.describe(), v)
    }
}

/// Rejects values no demand can have: NaN, infinities and negatives. A rejected sample counts
/// as a failure and is never used.
pub fn check_value(source_name: &str, v: f64) -> Result<f64, SourceError> {
    if !v.is_finite() || v < 0.0 {
        return Err(SourceError::Garbage {
            source_name: source_name.to_string(),
            reason: format!("{v} is not a finite number >= 0"),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::config;

    #[tokio::test]
    async fn sources_that_never_wait_are_read_without_a_future_and_agree_with_sample() {
        for trigger in [
            "type = \"random\"\nseed = 7",
            "type = \"manual\"\ninitial = 4",
            "type = \"schedule\"\nwindows = [{ days = \"mon-sun\", from = \"00:00\", to = \"23:59\", value = 3 }]",
        ] {
            let cfg = config(trigger);
            let (mut a, mut b) = (
                AnySource::build(&cfg, 9, 1).unwrap(),
                AnySource::build(&cfg, 9, 1).unwrap(),
            );
            for s in 0..5 {
                let now = Duration::from_secs(s * 4);
                let quick = a.sample_now(now).expect("answers at once").unwrap();
                assert_eq!(quick, b.sample(now).await.unwrap(), "{trigger} at {s}");
            }
        }
        let broken = SourceError::Failed {
            source_name: "x".into(),
            reason: "no".into(),
        };
        assert!(AnySource::Broken(broken)
            .sample_now(Duration::ZERO)
            .unwrap()
            .is_err());
        let mut redis =
            AnySource::build(&config("type = \"redis_list\"\nkey = \"q\""), 9, 1).unwrap();
        assert!(
            redis.sample_now(Duration::ZERO).is_none(),
            "a network source is sampled with its future"
        );
    }
}
