//! Messages in an AWS SQS queue: `GetQueueAttributes` with `ApproximateNumberOfMessages`
//! (visible), optionally plus `ApproximateNumberOfMessagesNotVisible` (in flight), through the
//! AWS SDK for Rust. The endpoint can be overridden (a local emulator such as moto, a VPC
//! endpoint). Credentials come from the SDK's default chain; the client is made on first use.

use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::QueueAttributeName;
use microscaler_core::validate::{check_url, join};
use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;

use crate::config::{net_options, NetOptions, HTTP};
use crate::{Source, SourceError};

/// Messages of an AWS SQS queue (`GetQueueAttributes`: `ApproximateNumberOfMessages`,
/// optionally plus `ApproximateNumberOfMessagesNotVisible`), through the AWS SDK. Credentials
/// come from the SDK's default chain (environment, profile, instance role).
#[derive(Debug, Clone, PartialEq)]
pub struct SqsConfig {
    /// The queue's URL.
    pub queue_url: String,
    /// The region (default: the SDK's, from `AWS_REGION` or the profile; else `us-east-1`).
    pub region: Option<String>,
    /// Endpoint override (a local emulator, a VPC endpoint).
    pub endpoint_url: Option<String>,
    /// Whether to add in-flight messages (received, not yet deleted).
    pub include_in_flight: bool,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

#[derive(Deserialize)]
struct RawSqs {
    queue_url: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    include_in_flight: Option<bool>,
}

impl SqsConfig {
    /// Validates a `type = "sqs"` trigger's options (`queue_url`, `region`, `endpoint_url`,
    /// `include_in_flight`, `timeout`, `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<SqsConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawSqs = v.part(toml::Value::Table(options), path)?;
        let queue_url = v.need(r.queue_url, path, "queue_url", "the queue's URL");
        if !queue_url.is_empty() {
            if let Err(e) = check_url(&queue_url, HTTP) {
                v.err(join(path, "queue_url"), e);
            }
        }
        if let Some(e) = &r.endpoint_url {
            if let Err(e) = check_url(e, HTTP) {
                v.err(join(path, "endpoint_url"), e);
            }
        }
        if let Some(region) = &r.region {
            let ok = !region.is_empty()
                && region
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                v.err(
                    join(path, "region"),
                    format!("{region:?} is not a region name like \"eu-west-1\""),
                );
            }
        }
        Some(SqsConfig {
            queue_url,
            region: r.region,
            endpoint_url: r.endpoint_url,
            include_in_flight: r.include_in_flight.unwrap_or(false),
            net,
        })
    }
}

/// One queue's backlog.
#[derive(Debug)]
pub struct SqsSource {
    config: SqsConfig,
    client: Option<aws_sdk_sqs::Client>,
    name: String,
}

impl SqsSource {
    /// Builds the source (no I/O).
    pub fn new(config: &SqsConfig) -> Self {
        let name = match &config.endpoint_url {
            Some(e) => format!("sqs queue {} at {e}", config.queue_url),
            None => format!("sqs queue {}", config.queue_url),
        };
        SqsSource {
            config: config.clone(),
            client: None,
            name,
        }
    }

    fn failed(&self, reason: String) -> SourceError {
        SourceError::Failed {
            source_name: self.name.clone(),
            reason,
        }
    }

    async fn client(&mut self) -> aws_sdk_sqs::Client {
        if let Some(c) = &self.client {
            return c.clone();
        }
        let t = self.config.net.timeout;
        let region = RegionProviderChain::first_try(self.config.region.clone().map(Region::new))
            .or_default_provider()
            .or_else(Region::new("us-east-1"));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(t)
                    .read_timeout(t)
                    .operation_attempt_timeout(t)
                    .operation_timeout(t)
                    .build(),
            )
            // One retry at most: the control loop samples again next tick anyway.
            .retry_config(RetryConfig::standard().with_max_attempts(2));
        if let Some(e) = &self.config.endpoint_url {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        let c = aws_sdk_sqs::Client::new(&conf);
        self.client = Some(c.clone());
        c
    }

    /// Start-up check: the queue's attributes can be read (endpoint, credentials, queue).
    pub async fn check(&mut self) -> Result<(), SourceError> {
        self.read().await.map(|_| ())
    }

    async fn read(&mut self) -> Result<f64, SourceError> {
        let client = self.client().await;
        let out = client
            .get_queue_attributes()
            .queue_url(&self.config.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| {
                let ctx = DisplayErrorContext(&e).to_string();
                let hint = if ctx.contains("NonExistentQueue") || ctx.contains("does not exist") {
                    ": does the queue exist?"
                } else if ctx.contains("dispatch failure") || ctx.contains("io error") {
                    ": is the endpoint reachable?"
                } else if ctx.contains("credentials") {
                    ": set AWS credentials (environment, profile or role)"
                } else {
                    ""
                };
                self.failed(format!("GetQueueAttributes failed: {ctx}{hint}"))
            })?;
        let attrs = out.attributes();
        let get = |k: &QueueAttributeName| -> Result<f64, SourceError> {
            let raw = attrs
                .and_then(|a| a.get(k))
                .ok_or_else(|| SourceError::Garbage {
                    source_name: self.name.clone(),
                    reason: format!("no {} in the answer", k.as_str()),
                })?;
            raw.parse::<f64>().map_err(|_| SourceError::Garbage {
                source_name: self.name.clone(),
                reason: format!("{} is {raw:?}, not a number", k.as_str()),
            })
        };
        let mut n = get(&QueueAttributeName::ApproximateNumberOfMessages)?;
        if self.config.include_in_flight {
            n += get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?;
        }
        Ok(n)
    }
}

impl Source for SqsSource {
    fn describe(&self) -> String {
        self.name.clone()
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
    fn sqs_options() {
        let SourceConfig::Sqs(q) = config(
            r#"type = "sqs"
            queue_url = "http://127.0.0.1:5000/123456789012/jobs"
            endpoint_url = "http://127.0.0.1:5000"
            region = "eu-west-1"
            include_in_flight = true"#,
        ) else {
            panic!()
        };
        assert_eq!(q.region.as_deref(), Some("eu-west-1"));
        assert!(q.include_in_flight);
        let e = errors(
            r#"type = "sqs"
            queue_url = "jobs"
            region = "EU West""#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.queue_url: \"jobs\" is not a URL: write it like http://host:port"),
                format!("{P}.region: \"EU West\" is not a region name like \"eu-west-1\""),
            ]
        );
        assert_eq!(
            errors(r#"type = "sqs""#),
            vec![format!("{P}.queue_url: missing: the queue's URL")]
        );
    }
}
