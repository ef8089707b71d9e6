//! The SQS source against moto server (an AWS emulator from PyPI, started on 127.0.0.1:5000 by
//! scripts/source-services.sh): ApproximateNumberOfMessages and ...NotVisible behave as on AWS
//! there. Fake credentials; the endpoint is overridden.
#![cfg(feature = "sqs")]

mod common;

use std::time::Duration;

use common::{absent, dead_port, net, unique};
use microscaler_sources::{AnySource, Source, SourceConfig, SqsConfig};

const ENDPOINT: &str = "http://127.0.0.1:5000";

use microscaler_testkit::moto::fake_credentials;

fn source(queue_url: &str, endpoint: &str, include_in_flight: bool) -> AnySource {
    AnySource::build(
        &SourceConfig::Sqs(SqsConfig {
            queue_url: queue_url.into(),
            region: Some("eu-west-1".into()),
            endpoint_url: Some(endpoint.into()),
            include_in_flight,
            net: net(),
        }),
        9,
        1,
    )
    .unwrap()
}

async fn client() -> aws_sdk_sqs::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("eu-west-1"))
        .endpoint_url(ENDPOINT)
        .load()
        .await;
    aws_sdk_sqs::Client::new(&conf)
}

#[tokio::test]
async fn visible_and_in_flight_messages() {
    fake_credentials();
    if absent("moto server", 5000).await {
        return;
    }
    let c = client().await;
    let name = unique("jobs");
    let url = c
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let mut s = source(&url, ENDPOINT, false);
    let mut all = source(&url, ENDPOINT, true);
    s.check().await.unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 0.0);
    for i in 0..3 {
        c.send_message()
            .queue_url(&url)
            .message_body(format!("job {i}"))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 3.0);
    // A worker receives one: 2 visible, 1 in flight.
    let got = c
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(1)
        .visibility_timeout(300)
        .send()
        .await
        .unwrap();
    assert_eq!(got.messages().len(), 1);
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 2.0);
    assert_eq!(all.sample(Duration::ZERO).await.unwrap(), 3.0);
    c.delete_queue().queue_url(&url).send().await.unwrap();
}

#[tokio::test]
async fn missing_queue_and_dead_endpoint_are_named() {
    fake_credentials();
    if absent("moto server", 5000).await {
        return;
    }
    // moto loads its SQS emulation on the first SQS request, which on a fresh install and a
    // busy machine took longer than the source's 2 s timeout; warm it without one.
    client().await.list_queues().send().await.unwrap();
    let mut s = source(
        "http://127.0.0.1:5000/123456789012/no-such-queue",
        ENDPOINT,
        false,
    );
    let e = s.check().await.unwrap_err().to_string();
    assert!(
        e.contains("GetQueueAttributes failed") && e.contains("does the queue exist?"),
        "{e}"
    );

    let port = dead_port();
    let dead = format!("http://127.0.0.1:{port}");
    let mut s = source(&format!("{dead}/123456789012/jobs"), &dead, false);
    let e = s.check().await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("sqs queue {dead}/123456789012/jobs at {dead}")),
        "{e}"
    );
    assert!(e.contains("is the endpoint reachable?"), "{e}");
}

/// The source contract suite against moto and a dead endpoint.
#[tokio::test]
async fn source_contract() {
    fake_credentials();
    if absent("moto server", 5000).await {
        return;
    }
    let c = client().await;
    let url = c
        .create_queue()
        .queue_name(unique("contract"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let config = |queue_url: String, endpoint: &str| {
        SourceConfig::Sqs(SqsConfig {
            queue_url,
            region: Some("eu-west-1".into()),
            endpoint_url: Some(endpoint.into()),
            include_in_flight: false,
            net: net(),
        })
    };
    let dead = format!("http://127.0.0.1:{}", dead_port());
    microscaler_testkit::source_contract::run(
        &config(url.clone(), ENDPOINT),
        &config(format!("{dead}/123456789012/jobs"), &dead),
        dead.trim_start_matches("http://"),
    )
    .await;
    c.delete_queue().queue_url(&url).send().await.unwrap();
}
