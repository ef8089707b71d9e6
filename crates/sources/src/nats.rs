//! Pending messages of a NATS JetStream consumer, from the server's monitoring endpoint
//! (`GET /jsz?consumers=true`, port 8222 by default): the consumer's `num_pending`
//! (messages not yet delivered), optionally plus `num_ack_pending` (delivered, not acked).

use std::time::Duration;

use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{net_options, NetOptions, HTTP};
use crate::http::{json_number, Http};
use crate::{Source, SourceError};

/// Pending messages of a JetStream consumer, from the NATS monitoring endpoint
/// (`GET /jsz?consumers=true`).
#[derive(Debug, Clone, PartialEq)]
pub struct NatsJetstreamConfig {
    /// Base URL of the monitoring endpoint (default `http://127.0.0.1:8222`).
    pub url: String,
    /// Account (default: any account that has the stream).
    pub account: Option<String>,
    /// The stream.
    pub stream: String,
    /// The durable consumer.
    pub consumer: String,
    /// Whether to add messages delivered but not yet acknowledged (`num_ack_pending`).
    pub include_ack_pending: bool,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

#[derive(Deserialize)]
struct RawNatsJetstream {
    url: Option<String>,
    account: Option<String>,
    stream: Option<String>,
    consumer: Option<String>,
    include_ack_pending: Option<bool>,
}

impl NatsJetstreamConfig {
    /// Validates a `type = "nats_jetstream"` trigger's options (`url`, `account`, `stream`,
    /// `consumer`, `include_ack_pending`, `timeout`, `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<NatsJetstreamConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawNatsJetstream = v.part(toml::Value::Table(options), path)?;
        Some(NatsJetstreamConfig {
            url: v.url(r.url, Some("http://127.0.0.1:8222"), path, "url", HTTP, ""),
            account: r.account,
            stream: v.need(r.stream, path, "stream", "the stream's name"),
            consumer: v.need(r.consumer, path, "consumer", "the durable consumer's name"),
            include_ack_pending: r.include_ack_pending.unwrap_or(false),
            net,
        })
    }
}

/// One consumer's backlog.
#[derive(Debug)]
pub struct NatsJetstreamSource {
    http: Http,
    url: String,
    account: Option<String>,
    stream: String,
    consumer: String,
    include_ack_pending: bool,
}

impl NatsJetstreamSource {
    /// Builds the source (no I/O).
    pub fn new(config: &NatsJetstreamConfig) -> Result<Self, SourceError> {
        let name = format!(
            "nats jetstream {}/{} at {}",
            config.stream, config.consumer, config.url
        );
        let http = Http::new(name, config.net.timeout)?;
        let mut url = url::Url::parse(&config.url)
            .map_err(|e| http.failed(format!("invalid URL {:?}: {e}", config.url)))?;
        url.path_segments_mut()
            .map_err(|_| http.failed(format!("{:?} cannot be a base URL", config.url)))?
            .pop_if_empty()
            .push("jsz");
        url.query_pairs_mut().append_pair("consumers", "true");
        if let Some(a) = &config.account {
            url.query_pairs_mut().append_pair("acc", a);
        }
        Ok(NatsJetstreamSource {
            http,
            url: url.to_string(),
            account: config.account.clone(),
            stream: config.stream.clone(),
            consumer: config.consumer.clone(),
            include_ack_pending: config.include_ack_pending,
        })
    }

    /// Start-up check: the monitoring endpoint answers, JetStream is on, and the stream and
    /// consumer exist.
    pub async fn check(&mut self) -> Result<(), SourceError> {
        self.read().await.map(|_| ())
    }

    async fn read(&self) -> Result<f64, SourceError> {
        let doc = self.http.get_json(&self.url, None).await?;
        let consumer = find_consumer(&doc, self.account.as_deref(), &self.stream, &self.consumer)
            .map_err(|e| self.http.failed(e))?;
        let num = |key: &str| {
            consumer.get(key).and_then(json_number).ok_or_else(|| {
                self.http
                    .garbage(format!("{key} is missing or not a number"))
            })
        };
        let mut n = num("num_pending")?;
        if self.include_ack_pending {
            n += num("num_ack_pending")?;
        }
        Ok(n)
    }
}

/// The consumer's object in a `/jsz?consumers=true` document.
pub(crate) fn find_consumer<'a>(
    doc: &'a Value,
    account: Option<&str>,
    stream: &str,
    consumer: &str,
) -> Result<&'a Value, String> {
    let accounts = doc["account_details"].as_array().ok_or(
        "the monitoring endpoint reports no JetStream accounts: is JetStream enabled (nats-server -js)?",
    )?;
    let mut streams_seen = Vec::new();
    for acc in accounts {
        if let Some(a) = account {
            if acc["name"].as_str() != Some(a) {
                continue;
            }
        }
        for s in acc["stream_detail"].as_array().into_iter().flatten() {
            let name = s["name"].as_str().unwrap_or("");
            if name != stream {
                streams_seen.push(name.to_string());
                continue;
            }
            let consumers = s["consumer_detail"]
                .as_array()
                .map_or(&[][..], |c| c.as_slice());
            if let Some(c) = consumers
                .iter()
                .find(|c| c["name"].as_str() == Some(consumer))
            {
                return Ok(c);
            }
            let names: Vec<&str> = consumers
                .iter()
                .filter_map(|c| c["name"].as_str())
                .collect();
            return Err(format!(
                "stream {stream:?} has no consumer {consumer:?} (it has: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ));
        }
    }
    Err(format!(
        "no stream {stream:?}{} (streams: {})",
        account
            .map(|a| format!(" in account {a:?}"))
            .unwrap_or_default(),
        if streams_seen.is_empty() {
            "none".to_string()
        } else {
            streams_seen.join(", ")
        }
    ))
}

impl Source for NatsJetstreamSource {
    fn describe(&self) -> String {
        self.http.name.clone()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn nats_needs_a_stream_and_a_consumer() {
        let e = errors(
            r#"type = "nats_jetstream"
            stream = """#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.stream: must not be empty"),
                format!("{P}.consumer: missing: the durable consumer's name"),
            ]
        );
        let SourceConfig::NatsJetstream(n) = config(
            r#"type = "nats_jetstream"
            stream = "jobs"
            consumer = "workers""#,
        ) else {
            panic!()
        };
        assert_eq!(n.url, "http://127.0.0.1:8222");
        assert_eq!((n.account, n.include_ack_pending), (None, false));
    }
}
