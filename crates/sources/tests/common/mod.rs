//! Helpers of the sources' tests against real servers (started by `scripts/test.sh` as root,
//! see `scripts/source-services.sh`).
#![allow(dead_code)]

use std::time::Duration;

use microscaler_sources::NetOptions;

/// Under `CI=true` a missing server fails the test; elsewhere the test says why it is skipped.
/// A test never passes by skipping in CI.
pub fn missing_service(what: &str, err: impl std::fmt::Display) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{what} is required under CI=true but is not available: {err}");
    }
    eprintln!("SKIPPED: {what} not available ({err}); run the test command (scripts/test.sh) as root to start it");
    true
}

/// True when nothing listens on 127.0.0.1:`port` (and the test should stop).
pub async fn absent(what: &str, port: u16) -> bool {
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    {
        Ok(Ok(_)) => false,
        Ok(Err(e)) => missing_service(&format!("{what} on 127.0.0.1:{port}"), e),
        Err(_) => missing_service(&format!("{what} on 127.0.0.1:{port}"), "connect timed out"),
    }
}

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{:x}-{}",
        std::process::id(),
        nanos & 0xfffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Default network options with a short timeout.
pub fn net() -> NetOptions {
    NetOptions {
        timeout: Duration::from_secs(2),
        required: true,
    }
}

/// A port on 127.0.0.1 where nothing listens.
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
