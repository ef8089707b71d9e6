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
use microscaler_core::source_spec::SqsSpec;

use crate::{Source, SourceError};

/// One queue's backlog.
#[derive(Debug)]
pub struct SqsSource {
    spec: SqsSpec,
    client: Option<aws_sdk_sqs::Client>,
    name: String,
}

impl SqsSource {
    /// Builds the source (no I/O).
    pub fn new(spec: &SqsSpec) -> Self {
        let name = match &spec.endpoint_url {
            Some(e) => format!("sqs queue {} at {e}", spec.queue_url),
            None => format!("sqs queue {}", spec.queue_url),
        };
        SqsSource {
            spec: spec.clone(),
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
        let t = self.spec.net.timeout;
        let region = RegionProviderChain::first_try(self.spec.region.clone().map(Region::new))
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
        if let Some(e) = &self.spec.endpoint_url {
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
            .queue_url(&self.spec.queue_url)
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
        if self.spec.include_in_flight {
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
