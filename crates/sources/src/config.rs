//! The sources' configuration: [`SourceConfig`], one variant per source, each holding the
//! options its module defines and validates; the network options every network source shares
//! ([`NetOptions`]); and the one `match` that hands a trigger's table to its source's
//! `validate`.
//!
//! Options are validated once, at load time, never per tick, and without I/O.

use std::time::Duration;

use microscaler_core::validate::join;
use microscaler_core::{SourceContext, SourcePlugins, Validator};

use crate::docker_cpu::DockerCpuConfig;
use crate::haproxy::HaproxyConfig;
use crate::http_json::HttpJsonConfig;
use crate::manual::ManualConfig;
use crate::nats::NatsJetstreamConfig;
use crate::nginx::NginxConfig;
use crate::prometheus::PrometheusConfig;
use crate::push::PushConfig;
use crate::rabbitmq::RabbitmqConfig;
use crate::random::RandomConfig;
use crate::redis::{RedisListConfig, RedisStreamConfig};
use crate::schedule::ScheduleConfig;
#[cfg(feature = "sqs")]
use crate::sqs::SqsConfig;

/// The URL schemes of HTTP servers.
pub(crate) const HTTP: &[&str] = &["http", "https"];
/// Only plain Redis: the Redis client is built without TLS (`rediss://` is refused at load
/// rather than failing at start-up).
pub(crate) const REDIS: &[&str] = &["redis"];

/// A demand source, validated: the options of one trigger's source. Each variant is built
/// into a live source by [`AnySource::build`](crate::AnySource::build).
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// Random demand as in the seeds' demo.
    Random(RandomConfig),
    /// A value set by hand (CLI now, API later).
    Manual(ManualConfig),
    /// A value a producer pushes over the API, with its own token.
    Push(PushConfig),
    /// Length of a Redis list (`LLEN`).
    RedisList(RedisListConfig),
    /// Lag of a Redis stream's consumer group (`XINFO GROUPS`, field `lag`).
    RedisStream(RedisStreamConfig),
    /// Depth of a RabbitMQ queue, from the management HTTP API.
    Rabbitmq(RabbitmqConfig),
    /// A Prometheus instant query that yields one number.
    Prometheus(PrometheusConfig),
    /// A number inside an HTTP JSON document, found by a JSON pointer.
    HttpJson(HttpJsonConfig),
    /// A request rate (or other field) from HAProxy's stats CSV.
    Haproxy(HaproxyConfig),
    /// Requests per second from nginx's `stub_status`, from successive totals.
    Nginx(NginxConfig),
    /// Pending messages of a NATS JetStream consumer, from the monitoring endpoint.
    NatsJetstream(NatsJetstreamConfig),
    /// A value by time of day and weekday.
    Schedule(ScheduleConfig),
    /// CPU use of a service's own containers, from the Docker engine's stats.
    DockerCpu(DockerCpuConfig),
    /// Messages in an AWS SQS queue (cargo feature `sqs`).
    #[cfg(feature = "sqs")]
    Sqs(SqsConfig),
}

impl SourceConfig {
    /// The network options of a source that talks to a server (`None` for local ones).
    pub fn net(&self) -> Option<&NetOptions> {
        match self {
            SourceConfig::Random(_)
            | SourceConfig::Manual(_)
            | SourceConfig::Push(_)
            | SourceConfig::Schedule(_) => None,
            SourceConfig::RedisList(s) => Some(&s.net),
            SourceConfig::RedisStream(s) => Some(&s.net),
            SourceConfig::Rabbitmq(s) => Some(&s.net),
            SourceConfig::Prometheus(s) => Some(&s.net),
            SourceConfig::HttpJson(s) => Some(&s.net),
            SourceConfig::Haproxy(s) => Some(&s.net),
            SourceConfig::Nginx(s) => Some(&s.net),
            SourceConfig::NatsJetstream(s) => Some(&s.net),
            SourceConfig::DockerCpu(s) => Some(&s.net),
            #[cfg(feature = "sqs")]
            SourceConfig::Sqs(s) => Some(&s.net),
        }
    }
}

impl SourcePlugins for SourceConfig {
    const TYPES: &'static [&'static str] = &[
        "random",
        "manual",
        "push",
        "redis_list",
        "redis_stream",
        "rabbitmq",
        "prometheus",
        "http_json",
        "haproxy",
        "nginx",
        "nats_jetstream",
        "schedule",
        "docker_cpu",
        "sqs",
    ];

    fn validate(
        kind: &str,
        options: toml::Table,
        cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Self> {
        let o = options;
        Some(match kind {
            "random" => SourceConfig::Random(RandomConfig::validate(o, cx, v, path)?),
            "manual" => SourceConfig::Manual(ManualConfig::validate(o, cx, v, path)?),
            "push" => SourceConfig::Push(PushConfig::validate(o, cx, v, path)?),
            "redis_list" => SourceConfig::RedisList(RedisListConfig::validate(o, cx, v, path)?),
            "redis_stream" => {
                SourceConfig::RedisStream(RedisStreamConfig::validate(o, cx, v, path)?)
            }
            "rabbitmq" => SourceConfig::Rabbitmq(RabbitmqConfig::validate(o, cx, v, path)?),
            "prometheus" => SourceConfig::Prometheus(PrometheusConfig::validate(o, cx, v, path)?),
            "http_json" => SourceConfig::HttpJson(HttpJsonConfig::validate(o, cx, v, path)?),
            "haproxy" => SourceConfig::Haproxy(HaproxyConfig::validate(o, cx, v, path)?),
            "nginx" => SourceConfig::Nginx(NginxConfig::validate(o, cx, v, path)?),
            "nats_jetstream" => {
                SourceConfig::NatsJetstream(NatsJetstreamConfig::validate(o, cx, v, path)?)
            }
            "schedule" => SourceConfig::Schedule(ScheduleConfig::validate(o, cx, v, path)?),
            "docker_cpu" => SourceConfig::DockerCpu(DockerCpuConfig::validate(o, cx, v, path)?),
            #[cfg(feature = "sqs")]
            "sqs" => SourceConfig::Sqs(SqsConfig::validate(o, cx, v, path)?),
            #[cfg(not(feature = "sqs"))]
            "sqs" => {
                v.err(
                    join(path, "type"),
                    "the sqs source is not built into this microscaler (the slim image and --no-default-features builds leave it out): use the full image microscaler:<version>, or rebuild with the cargo feature \"sqs\"",
                );
                return None;
            }
            other => {
                v.err(
                    join(path, "type"),
                    format!(
                        "unknown source type {other:?}: valid types are {}",
                        Self::TYPES.join(", ")
                    ),
                );
                return None;
            }
        })
    }

    fn type_name(&self) -> &'static str {
        match self {
            SourceConfig::Random(_) => "random",
            SourceConfig::Manual(_) => "manual",
            SourceConfig::Push(_) => "push",
            SourceConfig::RedisList(_) => "redis_list",
            SourceConfig::RedisStream(_) => "redis_stream",
            SourceConfig::Rabbitmq(_) => "rabbitmq",
            SourceConfig::Prometheus(_) => "prometheus",
            SourceConfig::HttpJson(_) => "http_json",
            SourceConfig::Haproxy(_) => "haproxy",
            SourceConfig::Nginx(_) => "nginx",
            SourceConfig::NatsJetstream(_) => "nats_jetstream",
            SourceConfig::Schedule(_) => "schedule",
            SourceConfig::DockerCpu(_) => "docker_cpu",
            #[cfg(feature = "sqs")]
            SourceConfig::Sqs(_) => "sqs",
        }
    }
}

/// Options every network source has (keys `timeout` and `required` of the trigger).
#[derive(Debug, Clone, PartialEq)]
pub struct NetOptions {
    /// Connect and read timeout of each request (default 2 s). The control loop also bounds a
    /// whole sample by `sample_timeout`.
    pub timeout: Duration,
    /// Whether the server must answer the start-up check (default `true`: microscaler exits
    /// with an error naming the server). `false`: start anyway and report the trigger as
    /// failing until the server answers.
    pub required: bool,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            timeout: Duration::from_secs(2),
            required: true,
        }
    }
}

/// Takes the network keys (`timeout`, `required`) out of a network source's table, so the
/// source's own raw struct sees only its keys.
pub(crate) fn net_options(v: &mut Validator, options: &mut toml::Table, path: &str) -> NetOptions {
    let mut net = NetOptions::default();
    match options.remove("timeout") {
        None => {}
        Some(toml::Value::String(t)) => {
            net.timeout = v.duration(
                Some(&t),
                &join(path, "timeout"),
                net.timeout,
                (Duration::from_millis(10), Duration::from_secs(60)),
            );
        }
        Some(other) => v.err(
            join(path, "timeout"),
            format!("must be a duration like \"2s\", got {}", other.type_str()),
        ),
    }
    match options.remove("required") {
        None => {}
        Some(toml::Value::Boolean(b)) => net.required = b,
        Some(other) => v.err(
            join(path, "required"),
            format!("must be true or false, got {}", other.type_str()),
        ),
    }
    net
}

/// Helpers of the sources' unit tests: validate a trigger written in TOML as the core would.
#[cfg(test)]
pub(crate) mod testing {
    use microscaler_core::{Capacity, SourceContext, SourcePlugins, Validator};

    use super::SourceConfig;

    /// The path of the trigger the helpers validate.
    pub(crate) const P: &str = "services[0].triggers[0]";

    /// Validates `trigger` (TOML keys, with `type`) as the first trigger of the first service,
    /// in a cluster of `capacity`: the source (if it could be built) and every error.
    pub(crate) fn validate_with(
        trigger: &str,
        capacity: Option<Capacity>,
    ) -> (Option<SourceConfig>, Vec<String>) {
        let mut table: toml::Table = toml::from_str(trigger).expect("the test's TOML");
        let kind = match table.remove("type") {
            Some(toml::Value::String(k)) => k,
            other => panic!("the test's trigger needs type = \"...\", got {other:?}"),
        };
        let cx = SourceContext {
            capacity,
            service: None,
        };
        let mut v = Validator::default();
        let source = SourceConfig::validate(&kind, table, &cx, &mut v, P);
        let errors = v.errors().iter().map(|e| e.to_string()).collect();
        (source, errors)
    }

    /// The source of a valid `trigger` (in a cluster of 9 slots); panics on errors.
    pub(crate) fn config(trigger: &str) -> SourceConfig {
        match validate_with(trigger, Some(Capacity::Slots(9))) {
            (Some(s), e) if e.is_empty() => s,
            (_, e) => panic!("{e:?}"),
        }
    }

    /// The errors of an invalid `trigger` (in a cluster of 9 slots); panics when there is none.
    pub(crate) fn errors(trigger: &str) -> Vec<String> {
        let (_, e) = validate_with(trigger, Some(Capacity::Slots(9)));
        assert!(!e.is_empty(), "expected errors");
        e
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{errors, P};
    use super::*;

    #[test]
    fn every_type_is_validated_by_its_source() {
        for kind in SourceConfig::TYPES {
            if cfg!(not(feature = "sqs")) && *kind == "sqs" {
                continue;
            }
            let e = errors(&format!("type = \"{kind}\"\nno_such_key = 1"));
            assert!(
                e.contains(&format!("{P}.no_such_key: unknown key")),
                "{kind}: {e:?}"
            );
        }
    }

    #[test]
    fn unknown_types_list_valid_ones() {
        assert_eq!(
            errors(r#"type = "kafka""#),
            vec![format!(
                "{P}.type: unknown source type \"kafka\": valid types are {}",
                SourceConfig::TYPES.join(", ")
            )]
        );
    }

    #[cfg(not(feature = "sqs"))]
    #[test]
    fn sqs_needs_its_feature() {
        assert_eq!(
            errors(r#"type = "sqs""#),
            vec![format!("{P}.type: the sqs source is not built into this microscaler (the slim image and --no-default-features builds leave it out): use the full image microscaler:<version>, or rebuild with the cargo feature \"sqs\"")]
        );
    }
}
