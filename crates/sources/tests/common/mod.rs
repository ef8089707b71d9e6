//! Helpers of the sources' tests against real servers (started by `scripts/test.sh` as root,
//! see `scripts/source-services.sh`).
#![allow(dead_code, unused_imports)]

use std::time::Duration;

use microscaler_sources::NetOptions;

pub use microscaler_testkit::{missing_service, unique};

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
