//! Load-balancer request rates against real servers: HAProxy's stats CSV (127.0.0.1:8404,
//! traffic on :8405) and nginx's stub_status (127.0.0.1:8480).

mod common;

use std::time::Duration;

use common::{absent, net};
use microscaler_sources::{
    AnySource, HaproxyConfig, NginxConfig, Source, SourceConfig, SourceError,
};

async fn hit(url: &str, n: usize) {
    let c = reqwest::Client::new();
    for _ in 0..n {
        let r = c.get(url).send().await.unwrap();
        assert!(r.status().is_success());
    }
}

fn haproxy(proxy: &str, server: &str, field: &str) -> AnySource {
    AnySource::build(
        &SourceConfig::Haproxy(HaproxyConfig {
            url: "http://127.0.0.1:8404/stats;csv".into(),
            proxy: proxy.into(),
            server: server.into(),
            field: field.into(),
            net: net(),
        }),
        9,
        1,
    )
    .unwrap()
}

#[tokio::test]
async fn haproxy_request_rate_of_a_frontend() {
    if absent("haproxy", 8404).await {
        return;
    }
    let mut s = haproxy("web", "FRONTEND", "req_rate");
    s.check().await.unwrap();
    // Only this test sends traffic to the "web" frontend (:8405), so its total moves by
    // exactly the requests sent; the per-second rate is positive right after them (its
    // exact value depends on where the second boundary falls, so it is not pinned).
    let mut tot = haproxy("web", "FRONTEND", "req_tot");
    let before = tot.sample(Duration::ZERO).await.unwrap();
    hit("http://127.0.0.1:8405/", 25).await;
    let rate = s.sample(Duration::ZERO).await.unwrap();
    let after = tot.sample(Duration::ZERO).await.unwrap();
    assert_eq!(after - before, 25.0, "req_tot {before} -> {after}");
    assert!(rate > 0.0 && rate <= 25.0 * 2.0, "req_rate {rate}");
}

#[tokio::test]
async fn haproxy_unknown_rows_and_columns_fail_the_check() {
    if absent("haproxy", 8404).await {
        return;
    }
    let e = haproxy("nope", "FRONTEND", "req_rate")
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no row nope/FRONTEND") && e.contains("web/FRONTEND"),
        "{e}"
    );
    let e = haproxy("web", "FRONTEND", "bogus")
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no column \"bogus\""), "{e}");
}

#[tokio::test]
async fn nginx_rate_from_successive_totals() {
    if absent("nginx", 8480).await {
        return;
    }
    let mut s = AnySource::build(
        &SourceConfig::Nginx(NginxConfig {
            url: "http://127.0.0.1:8480/nginx_status".into(),
            net: net(),
        }),
        9,
        1,
    )
    .unwrap();
    s.check().await.unwrap();
    // The first sample has no rate: missing, never zero.
    let first = s.sample(Duration::from_secs(10)).await;
    assert!(
        matches!(first, Err(SourceError::Garbage { .. })),
        "{first:?}"
    );
    hit("http://127.0.0.1:8480/ok", 20).await;
    // 20 requests plus this source's own status reads (and, under nextest, other tests'
    // requests to this nginx) over 2 s of tick time.
    let v = s.sample(Duration::from_secs(12)).await.unwrap();
    assert!((10.0..40.0).contains(&v), "rate {v}");
    let idle = s.sample(Duration::from_secs(22)).await.unwrap();
    assert!(idle < 1.0, "rate {idle}");

    let mut not_status = AnySource::build(
        &SourceConfig::Nginx(NginxConfig {
            url: "http://127.0.0.1:8480/ok".into(),
            net: net(),
        }),
        9,
        1,
    )
    .unwrap();
    let e = not_status.check().await.unwrap_err().to_string();
    assert!(e.contains("not a stub_status page"), "{e}");
}

/// The source contract suite for both load balancers, against the real servers and a dead
/// port each.
#[tokio::test]
async fn source_contract() {
    if absent("haproxy", 8404).await || absent("nginx", 8480).await {
        return;
    }
    let port = common::dead_port();
    let haproxy = |url: String| {
        SourceConfig::Haproxy(HaproxyConfig {
            url,
            proxy: "web".into(),
            server: "FRONTEND".into(),
            field: "req_tot".into(),
            net: net(),
        })
    };
    microscaler_testkit::source_contract::run(
        &haproxy("http://127.0.0.1:8404/stats;csv".into()),
        &haproxy(format!("http://127.0.0.1:{port}/stats;csv")),
        &format!("127.0.0.1:{port}"),
    )
    .await;
    let nginx = |url: String| SourceConfig::Nginx(NginxConfig { url, net: net() });
    microscaler_testkit::source_contract::run(
        &nginx("http://127.0.0.1:8480/nginx_status".into()),
        &nginx(format!("http://127.0.0.1:{port}/nginx_status")),
        &format!("127.0.0.1:{port}"),
    )
    .await;
}
