//! Prometheus instant queries against a real prometheus on 127.0.0.1:9090.

mod common;

use std::time::Duration;

use common::{absent, net};
use microscaler_sources::{AnySource, PrometheusConfig, Source, SourceConfig, SourceError};

fn config(url: &str, q: &str) -> SourceConfig {
    SourceConfig::Prometheus(PrometheusConfig {
        url: url.into(),
        query: q.into(),
        net: net(),
    })
}

/// The source contract suite against the real server and a dead port.
#[tokio::test]
async fn source_contract() {
    if absent("prometheus", 9090).await {
        return;
    }
    let port = common::dead_port();
    microscaler_testkit::source_contract::run(
        &config("http://127.0.0.1:9090", "vector(1)"),
        &config(&format!("http://127.0.0.1:{port}"), "vector(1)"),
        &format!("127.0.0.1:{port}"),
    )
    .await;
}

fn query(q: &str) -> AnySource {
    AnySource::build(
        &SourceConfig::Prometheus(PrometheusConfig {
            url: "http://127.0.0.1:9090".into(),
            query: q.into(),
            net: net(),
        }),
        9,
        1,
    )
    .unwrap()
}

#[tokio::test]
async fn scalar_and_one_sample_vector() {
    if absent("prometheus", 9090).await {
        return;
    }
    let mut s = query("vector(7)");
    s.check().await.unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 7.0);
    assert_eq!(
        query("scalar(vector(2.5))")
            .sample(Duration::ZERO)
            .await
            .unwrap(),
        2.5
    );
    // A real series: Prometheus scrapes itself every second (scripts/source-services.sh).
    let mut up = query("sum(up{job=\"prometheus\"})");
    let mut last = None;
    for _ in 0..100 {
        match up.sample(Duration::ZERO).await {
            Ok(v) => {
                assert_eq!(v, 1.0);
                return;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no up sample within 10 s: {last:?}");
}

#[tokio::test]
async fn anything_but_one_number_is_rejected() {
    if absent("prometheus", 9090).await {
        return;
    }
    let two = r#"label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", "")"#;
    let e = query(two).sample(Duration::ZERO).await.unwrap_err();
    assert!(matches!(e, SourceError::Garbage { .. }), "{e:?}");
    assert!(
        e.to_string().contains("returned 2 samples, one is needed"),
        "{e}"
    );

    let e = query("vector(1) > 2")
        .sample(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no sample (empty vector)"), "{e}");

    let e = query("vector(-1)")
        .sample(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("-1 is not a finite number >= 0"),
        "{e}"
    );
    let e = query("vector(NaN)")
        .sample(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("NaN is not a finite number"), "{e}");

    let e = query("\"text\"").sample(Duration::ZERO).await.unwrap_err();
    assert!(e.to_string().contains("returned a string"), "{e}");

    // A bad query fails the start-up check with Prometheus' own message.
    let e = query("sum(").check().await.unwrap_err().to_string();
    assert!(
        e.contains("query rejected") && e.contains("parse error"),
        "{e}"
    );
    // An empty result does not: the series may appear later.
    query("vector(1) > 2").check().await.unwrap();
}
