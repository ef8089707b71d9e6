//! The source contract suite: the same cases for every demand source that talks to a server.
//!
//! A source's integration test (against its real server) calls [`run`] with a configuration
//! that reaches the server and one that points at a port where nothing listens. The cases:
//! - building needs no I/O (both configurations build);
//! - against the live server the start-up check passes and the second sample is a finite
//!   number >= 0 (a rate's first may be rejected as not a rate yet, never fail);
//! - against the dead address the check and a sample fail, each within the source's timeout
//!   and the test's bound, with a message that names the address, so a user knows which server
//!   to start.

use std::time::Duration;

use microscaler_sources::{AnySource, Source, SourceConfig, SourceError};

/// Runs every case. `dead_address` is what the dead configuration's error must name
/// (`127.0.0.1:PORT`).
pub async fn run(live: &SourceConfig, dead: &SourceConfig, dead_address: &str) {
    run_in(live, dead, dead_address, "", "").await
}

/// [`run`] for a source that measures a service of a microscaler instance (`docker_cpu`).
pub async fn run_in(
    live: &SourceConfig,
    dead: &SourceConfig,
    dead_address: &str,
    instance: &str,
    service: &str,
) {
    let mut s = AnySource::build_in(live, 9, 1, instance, service)
        .expect("a valid configuration builds without I/O");
    assert!(!s.describe().is_empty());
    s.check()
        .await
        .expect("the live server passes the start-up check");
    // A rate (nginx) needs two totals: its first sample may be rejected as not a rate yet,
    // never failed; the second must be a number.
    match s.sample(Duration::ZERO).await {
        Ok(v) => assert!(v.is_finite() && v >= 0.0, "first sample is {v}"),
        Err(SourceError::Garbage { .. }) => {}
        Err(e) => panic!("the live server gives a sample: {e}"),
    }
    let v = s
        .sample(Duration::from_secs(1))
        .await
        .expect("the live server gives a second sample");
    assert!(v.is_finite() && v >= 0.0, "second sample is {v}");

    let mut d = AnySource::build_in(dead, 9, 1, instance, service)
        .expect("building does no I/O, even to nowhere");
    let bound = Duration::from_secs(10);
    let e = tokio::time::timeout(bound, d.check())
        .await
        .expect("the check of a dead address ends within its timeout")
        .expect_err("the check of a dead address fails");
    assert!(
        e.to_string().contains(dead_address),
        "the error names the address {dead_address}: {e}"
    );
    let e = tokio::time::timeout(bound, d.sample(Duration::ZERO))
        .await
        .expect("a sample of a dead address ends within its timeout")
        .expect_err("a sample of a dead address fails");
    assert!(
        e.to_string().contains(dead_address),
        "the error names the address {dead_address}: {e}"
    );
}
