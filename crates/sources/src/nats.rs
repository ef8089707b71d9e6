//! Pending messages of a NATS JetStream consumer, from the server's monitoring endpoint
//! (`GET /jsz?consumers=true`, port 8222 by default): the consumer's `num_pending`
//! (messages not yet delivered), optionally plus `num_ack_pending` (delivered, not acked).

use std::time::Duration;

use microscaler_core::source_spec::NatsJetstreamSpec;
use serde_json::Value;

use crate::http::{json_number, Http};
use crate::{Source, SourceError};

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
    pub fn new(spec: &NatsJetstreamSpec) -> Result<Self, SourceError> {
        let name = format!(
            "nats jetstream {}/{} at {}",
            spec.stream, spec.consumer, spec.url
        );
        let http = Http::new(name, spec.net.timeout)?;
        let mut url = url::Url::parse(&spec.url)
            .map_err(|e| http.failed(format!("invalid URL {:?}: {e}", spec.url)))?;
        url.path_segments_mut()
            .map_err(|_| http.failed(format!("{:?} cannot be a base URL", spec.url)))?
            .pop_if_empty()
            .push("jsz");
        url.query_pairs_mut().append_pair("consumers", "true");
        if let Some(a) = &spec.account {
            url.query_pairs_mut().append_pair("acc", a);
        }
        Ok(NatsJetstreamSource {
            http,
            url: url.to_string(),
            account: spec.account.clone(),
            stream: spec.stream.clone(),
            consumer: spec.consumer.clone(),
            include_ack_pending: spec.include_ack_pending,
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
