//! RabbitMQ queue depth from the management HTTP API (`rabbitmq_management` plugin):
//! `GET /api/queues/{vhost}/{queue}`, fields `messages_ready` and `messages_unacknowledged`.
//!
//! The management API's counts are refreshed every `collect_statistics_interval` (5 s by
//! default), so a depth can lag the queue by that much.

use std::time::Duration;

use microscaler_core::source_spec::RabbitmqSpec;

use crate::http::{json_number, Http};
use crate::{Source, SourceError};

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
    pub fn new(spec: &RabbitmqSpec) -> Result<Self, SourceError> {
        let name = format!(
            "rabbitmq queue {:?} (vhost {:?}) at {}",
            spec.queue, spec.vhost, spec.url
        );
        let http = Http::new(name, spec.net.timeout)?;
        let mut url = url::Url::parse(&spec.url)
            .map_err(|e| http.failed(format!("invalid URL {:?}: {e}", spec.url)))?;
        url.path_segments_mut()
            .map_err(|_| http.failed(format!("{:?} cannot be a base URL", spec.url)))?
            .pop_if_empty()
            .extend(["api", "queues", &spec.vhost, &spec.queue]);
        Ok(RabbitmqSource {
            http,
            url: url.to_string(),
            username: spec.username.clone(),
            password: spec.password.clone(),
            include_unacked: spec.include_unacked,
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
