//! RabbitMQ queue depth against a real rabbitmq-server (management API on 127.0.0.1:15672).

mod common;

use std::time::Duration;

use common::{absent, dead_port, net, unique};
use microscaler_sources::{AnySource, RabbitmqConfig, Source, SourceConfig};

const API: &str = "http://127.0.0.1:15672";

fn spec(queue: &str, include_unacked: bool) -> SourceConfig {
    SourceConfig::Rabbitmq(RabbitmqConfig {
        url: API.into(),
        vhost: "/".into(),
        queue: queue.into(),
        username: "guest".into(),
        password: "guest".into(),
        include_unacked,
        net: net(),
    })
}

async fn api(method: reqwest::Method, path: &str, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .request(method, format!("{API}{path}"))
        .basic_auth("guest", Some("guest"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Samples until the value is `want` (the management API refreshes its counts every second
/// here, `collect_statistics_interval = 1000`).
async fn eventually(s: &mut AnySource, want: f64) {
    let mut last = None;
    for _ in 0..100 {
        let v = s.sample(Duration::ZERO).await;
        if matches!(v, Ok(x) if x == want) {
            return;
        }
        last = Some(v);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never got {want}; last sample {last:?}");
}

#[tokio::test]
async fn depth_follows_published_and_fetched_messages() {
    if absent("rabbitmq management API", 15672).await {
        return;
    }
    let q = unique("jobs");
    let r = api(
        reqwest::Method::PUT,
        &format!("/api/queues/%2F/{q}"),
        serde_json::json!({"durable": false}),
    )
    .await;
    assert!(r.status().is_success(), "{r:?}");
    let mut s = AnySource::build(&spec(&q, false), 9, 1).unwrap();
    let mut with_unacked = AnySource::build(&spec(&q, true), 9, 1).unwrap();
    s.check().await.unwrap();
    eventually(&mut s, 0.0).await;
    for i in 0..4 {
        let r = api(
            reqwest::Method::POST,
            "/api/exchanges/%2F/amq.default/publish",
            serde_json::json!({"properties": {}, "routing_key": q, "payload": format!("job {i}"), "payload_encoding": "string"}),
        )
        .await;
        assert!(r.status().is_success(), "{r:?}");
    }
    eventually(&mut s, 4.0).await;
    eventually(&mut with_unacked, 4.0).await;
    let r = api(
        reqwest::Method::DELETE,
        &format!("/api/queues/%2F/{q}"),
        serde_json::json!({}),
    )
    .await;
    assert!(r.status().is_success(), "{r:?}");
}

#[tokio::test]
async fn missing_queue_bad_password_and_dead_server_are_named() {
    if absent("rabbitmq management API", 15672).await {
        return;
    }
    let mut s = AnySource::build(&spec("no-such-queue-here", false), 9, 1).unwrap();
    let e = s.check().await.unwrap_err().to_string();
    assert!(
        e.contains("404") && e.contains("does the queue (and vhost) exist?"),
        "{e}"
    );

    let SourceConfig::Rabbitmq(mut bad) = spec("q", false) else {
        unreachable!()
    };
    bad.password = "wrong".into();
    let mut s = AnySource::build(&SourceConfig::Rabbitmq(bad), 9, 1).unwrap();
    let e = s.check().await.unwrap_err().to_string();
    assert!(
        e.contains("401") && e.contains("check username and password"),
        "{e}"
    );

    let SourceConfig::Rabbitmq(mut dead) = spec("q", false) else {
        unreachable!()
    };
    let port = dead_port();
    dead.url = format!("http://127.0.0.1:{port}");
    let mut s = AnySource::build(&SourceConfig::Rabbitmq(dead), 9, 1).unwrap();
    let e = s.check().await.unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "cannot connect to http://127.0.0.1:{port}/api/queues/%2F/q"
        )),
        "{e}"
    );
}

/// The source contract suite against the real server (a queue of this test) and a dead port.
#[tokio::test]
async fn source_contract() {
    if absent("rabbitmq management API", 15672).await {
        return;
    }
    let q = unique("contract");
    let path = format!("/api/queues/%2F/{q}");
    let r = api(
        reqwest::Method::PUT,
        &path,
        serde_json::json!({"durable": false}),
    )
    .await;
    assert!(r.status().is_success(), "{r:?}");
    let port = dead_port();
    let dead = match spec(&q, false) {
        SourceConfig::Rabbitmq(c) => SourceConfig::Rabbitmq(RabbitmqConfig {
            url: format!("http://127.0.0.1:{port}"),
            ..c
        }),
        other => other,
    };
    microscaler_testkit::source_contract::run(
        &spec(&q, false),
        &dead,
        &format!("127.0.0.1:{port}"),
    )
    .await;
    api(reqwest::Method::DELETE, &path, serde_json::json!({})).await;
}
