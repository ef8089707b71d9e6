//! RabbitMQ queue depth from the management HTTP API (`rabbitmq_management` plugin):
//! `GET /api/queues/{vhost}/{queue}`, fields `messages_ready` and `messages_unacknowledged`.
//!
//! The management API's counts are refreshed every `collect_statistics_interval` (5 s by
//! default), so a depth can lag the queue by that much.

use std::time::Duration;

use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;

use crate::config::{net_options, NetOptions, HTTP};
use crate::http::{json_number, Http};
use crate::{Source, SourceError};

/// Depth of a RabbitMQ queue, read from the management HTTP API
/// (`GET /api/queues/{vhost}/{queue}`).
#[derive(Debug, Clone, PartialEq)]
pub struct RabbitmqConfig {
    /// Base URL of the management API (default `http://127.0.0.1:15672`).
    pub url: String,
    /// Virtual host (default `/`).
    pub vhost: String,
    /// The queue.
    pub queue: String,
    /// User name (default `guest`).
    pub username: String,
    /// Password (default `guest`).
    pub password: String,
    /// Whether to add unacknowledged messages to the ready ones.
    pub include_unacked: bool,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

#[derive(Deserialize)]
struct RawRabbitmq {
    url: Option<String>,
    vhost: Option<String>,
    queue: Option<String>,
    username: Option<String>,
    password: Option<String>,
    include_unacked: Option<bool>,
}

impl RabbitmqConfig {
    /// Validates a `type = "rabbitmq"` trigger's options (`url`, `vhost`, `queue`,
    /// `username`, `password`, `include_unacked`, `timeout`, `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<RabbitmqConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawRabbitmq = v.part(toml::Value::Table(options), path)?;
        Some(RabbitmqConfig {
            url: v.url(r.url, Some("http://127.0.0.1:15672"), path, "url", HTTP, ""),
            vhost: r.vhost.unwrap_or_else(|| "/".into()),
            queue: v.need(r.queue, path, "queue", "the queue's name"),
            username: r.username.unwrap_or_else(|| "guest".into()),
            password: r.password.unwrap_or_else(|| "guest".into()),
            include_unacked: r.include_unacked.unwrap_or(false),
            net,
        })
    }
}

/// Depth of one queue.
#[derive(Debug)]
pub struct RabbitmqSource {
    http: Http,
    url: String,
    username: String,
    password: String,
    include_unacked: bool,
}

impl RabbitmqSource {
    /// Builds the source (no I/O).
    pub fn new(config: &RabbitmqConfig) -> Result<Self, SourceError> {
        let name = format!(
            "rabbitmq queue {:?} (vhost {:?}) at {}",
            config.queue, config.vhost, config.url
        );
        let http = Http::new(name, config.net.timeout)?;
        let mut url = url::Url::parse(&config.url)
            .map_err(|e| http.failed(format!("invalid URL {:?}: {e}", config.url)))?;
        url.path_segments_mut()
            .map_err(|_| http.failed(format!("{:?} cannot be a base URL", config.url)))?
            .pop_if_empty()
            .extend(["api", "queues", &config.vhost, &config.queue]);
        Ok(RabbitmqSource {
            http,
            url: url.to_string(),
            username: config.username.clone(),
            password: config.password.clone(),
            include_unacked: config.include_unacked,
        })
    }

    /// Start-up check: the management API answers and the queue exists.
    pub async fn check(&mut self) -> Result<(), SourceError> {
        self.read().await.map(|_| ())
    }

    async fn read(&self) -> Result<f64, SourceError> {
        let auth = Some((self.username.as_str(), self.password.as_str()));
        let doc = self
            .http
            .get_json(&self.url, auth)
            .await
            .map_err(|e| match e {
                SourceError::Failed {
                    source_name,
                    reason,
                } if reason.contains(" 404 ") => SourceError::Failed {
                    source_name,
                    reason: format!("{reason}: does the queue (and vhost) exist?"),
                },
                SourceError::Failed {
                    source_name,
                    reason,
                } if reason.contains(" 401 ") => SourceError::Failed {
                    source_name,
                    reason: format!("{reason}: check username and password"),
                },
                e => e,
            })?;
        let count = |key: &str| -> Result<f64, SourceError> {
            match doc.get(key) {
                // A queue that has never seen a message has no counts yet: it is empty.
                None | Some(serde_json::Value::Null) => Ok(0.0),
                Some(v) => json_number(v)
                    .ok_or_else(|| self.http.garbage(format!("{key} is {v}, not a number"))),
            }
        };
        let mut depth = count("messages_ready")?;
        if self.include_unacked {
            depth += count("messages_unacknowledged")?;
        }
        Ok(depth)
    }
}

impl Source for RabbitmqSource {
    fn describe(&self) -> String {
        self.http.name.clone()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn network_options_are_checked() {
        let SourceConfig::Rabbitmq(s) = config(
            r#"type = "rabbitmq"
            queue = "jobs"
            timeout = "500ms"
            required = false
            include_unacked = true"#,
        ) else {
            panic!()
        };
        assert_eq!(s.net.timeout, Duration::from_millis(500));
        assert!(!s.net.required);
        assert!(s.include_unacked);
        assert_eq!((s.vhost.as_str(), s.username.as_str()), ("/", "guest"));
        let e = errors(
            r#"type = "rabbitmq"
            queue = "jobs"
            timeout = "2 hours"
            required = "yes"
            url = "http://:15672"
            exchange = "x""#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.timeout: must be between 10ms and 1m, got \"2 hours\""),
                format!("{P}.required: must be true or false, got string"),
                format!("{P}.exchange: unknown key"),
                format!("{P}.url: \"http://:15672\": the host is missing"),
            ]
        );
        assert_eq!(
            errors(
                r#"type = "rabbitmq"
                queue = "jobs"
                timeout = 5"#
            ),
            vec![format!(
                "{P}.timeout: must be a duration like \"2s\", got integer"
            )]
        );
    }
}
