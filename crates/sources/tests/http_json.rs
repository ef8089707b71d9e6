//! The HTTP JSON source against real servers: nginx's fixed answers (127.0.0.1:8480, see
//! scripts/source-services.sh) and Prometheus' JSON API.

mod common;

use std::time::Duration;

use common::{absent, dead_port, net};
use microscaler_sources::{AnySource, HttpJsonConfig, Source, SourceConfig, SourceError};

fn json(url: &str, pointer: &str) -> AnySource {
    AnySource::build(
        &SourceConfig::HttpJson(HttpJsonConfig {
            url: url.into(),
            pointer: pointer.into(),
            net: net(),
        }),
        9,
        1,
    )
    .unwrap()
}

const N: &str = "http://127.0.0.1:8480/json";

#[tokio::test]
async fn numbers_and_numeric_strings_at_a_pointer() {
    if absent("nginx", 8480).await {
        return;
    }
    let mut s = json(&format!("{N}/depth"), "/queue/depth");
    s.check().await.unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 42.0);
    assert_eq!(
        json(&format!("{N}/depth"), "/list/1")
            .sample(Duration::ZERO)
            .await
            .unwrap(),
        2.5
    );
    assert_eq!(
        json(&format!("{N}/string"), "/v")
            .sample(Duration::ZERO)
            .await
            .unwrap(),
        17.0
    );
}

#[tokio::test]
async fn prometheus_api_through_a_pointer() {
    if absent("prometheus", 9090).await {
        return;
    }
    let mut s = json(
        "http://127.0.0.1:9090/api/v1/query?query=vector(3)",
        "/data/result/0/value/1",
    );
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 3.0);
}

#[tokio::test]
async fn garbage_is_rejected_never_used() {
    if absent("nginx", 8480).await {
        return;
    }
    let garbage = |r: Result<f64, SourceError>| match r {
        Err(SourceError::Garbage { reason, .. }) => reason,
        other => panic!("expected garbage, got {other:?}"),
    };
    let r = garbage(
        json(&format!("{N}/garbage"), "/v")
            .sample(Duration::ZERO)
            .await,
    );
    assert!(r.contains("\"lots\" is not a number"), "{r}");
    let r = garbage(
        json(&format!("{N}/negative"), "/v")
            .sample(Duration::ZERO)
            .await,
    );
    assert!(r.contains("-3 is not a finite number >= 0"), "{r}");
    let r = garbage(
        json(&format!("{N}/notjson"), "/v")
            .sample(Duration::ZERO)
            .await,
    );
    assert!(r.contains("did not answer JSON"), "{r}");
    let r = garbage(
        json(&format!("{N}/depth"), "/queue/missing")
            .sample(Duration::ZERO)
            .await,
    );
    assert!(r.contains("nothing at \"/queue/missing\""), "{r}");
    let r = garbage(
        json(&format!("{N}/depth"), "/queue")
            .sample(Duration::ZERO)
            .await,
    );
    assert!(r.contains("is not a number"), "{r}");
    // Error statuses and dead servers are failures that name the URL.
    let e = json(&format!("{N}/error"), "/v")
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("answered 503"), "{e}");
    let port = dead_port();
    let e = json(&format!("http://127.0.0.1:{port}/x"), "/v")
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("cannot connect to http://127.0.0.1:{port}/x")),
        "{e}"
    );
}

/// The source contract suite against nginx's fixed answer and a dead port.
#[tokio::test]
async fn source_contract() {
    if absent("nginx", 8480).await {
        return;
    }
    let config = |url: String| {
        SourceConfig::HttpJson(HttpJsonConfig {
            url,
            pointer: "/queue/depth".into(),
            net: net(),
        })
    };
    let port = dead_port();
    microscaler_testkit::source_contract::run(
        &config(format!("{N}/depth")),
        &config(format!("http://127.0.0.1:{port}/json/depth")),
        &format!("127.0.0.1:{port}"),
    )
    .await;
}
