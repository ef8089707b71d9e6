//! The HTTP API's request bodies (and the range queries): the real router, built as
//! crates/server/tests/api.rs builds it (examples/process.toml's setup, a hub over a history
//! store in a temporary directory, a stand-in for the control loop), called in-process with
//! `tower::ServiceExt::oneshot`.
//!
//! Input: one selector byte, then the raw body (for `GET history` and `GET decisions`, the
//! query string instead). The selector's bits choose the route (bits 0-2), the content type
//! (bits 3-4: JSON, none, text/plain, JSON with a charset), the service (bits 5-6: `api` with
//! a manual and a random trigger, `crunch` with neither, an unknown one, one whose name is not
//! UTF-8) and whether the bearer token is sent (bit 7).
//!
//! Every answer must be below 500, be JSON (`application/json`, a body that parses) and carry
//! the security headers.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Method, Request};
use axum::Router;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use microscaler_server::{router, Control, Hub, RandomState, ServerOptions, Setup, Store};
use tower::ServiceExt;

const TOKEN: &str = "fuzz-token";

/// The control loop's stand-in. As far as the API can tell, the example's service `api` has a
/// manual and a random trigger (the API asks the loop, not the configuration); `crunch` has
/// neither, and pausing it is forgotten.
struct Loop(Mutex<Api>);

struct Api {
    manual: f64,
    overriding: bool,
    random: RandomState,
    paused: bool,
}

impl Loop {
    fn api(&self, service: &str) -> Option<MutexGuard<'_, Api>> {
        (service == "api").then(|| self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Control for Loop {
    fn manual(&self, s: &str) -> Option<f64> {
        self.api(s).map(|a| a.manual)
    }
    fn set_manual(&self, s: &str, v: f64) -> Result<(), String> {
        let mut a = self.api(s).ok_or("no manual trigger")?;
        a.manual = v;
        a.overriding = true;
        Ok(())
    }
    fn clear_manual(&self, s: &str) -> Result<(), String> {
        let mut a = self.api(s).ok_or("no manual trigger")?;
        a.manual = 0.0;
        a.overriding = false;
        Ok(())
    }
    fn overriding(&self, s: &str) -> bool {
        self.api(s).is_some_and(|a| a.overriding)
    }
    fn random(&self, s: &str) -> Option<RandomState> {
        self.api(s).map(|a| a.random)
    }
    fn set_random(&self, s: &str, r: RandomState) -> Result<(), String> {
        self.api(s).ok_or("no random trigger")?.random = r;
        Ok(())
    }
    fn paused(&self, s: &str) -> bool {
        self.api(s).is_some_and(|a| a.paused)
    }
    fn set_paused(&self, s: &str, p: bool) {
        if let Some(mut a) = self.api(s) {
            a.paused = p;
        }
    }
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    app: Router,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cfg =
            microscaler_backends::Config::from_toml(include_str!("../../examples/process.toml"))
                .expect("examples/process.toml is valid");
        let setup = Setup::from_config(&cfg, "process", true);
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(&dir.path().join("h.sqlite"), Duration::from_secs(3600))
            .expect("history store");
        let control = Arc::new(Loop(Mutex::new(Api {
            manual: 1.0,
            overriding: false,
            random: RandomState {
                delta: 3,
                interval_ms: 3000,
            },
            paused: false,
        })));
        let options = ServerOptions {
            token: Some(TOKEN.into()),
            ..ServerOptions::default()
        };
        let hub = Hub::new(setup, options, control, store);
        let app = router(hub).layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Fixture {
            runtime,
            app,
            _dir: dir,
        }
    })
}

/// Percent-encodes everything but unreserved characters and the query's own `=` and `&`.
fn query(bytes: &[u8]) -> String {
    let mut q = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~=&".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    q
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let service = ["api", "crunch", "nope", "%FF%FE"][usize::from(sel >> 5 & 3)];
    let (method, uri, body) = match sel & 7 {
        r @ 0..=4 => {
            let (method, action) = [
                (Method::PUT, "demand"),
                (Method::PUT, "random"),
                (Method::POST, "demand/clear"),
                (Method::POST, "pause"),
                (Method::POST, "resume"),
            ][usize::from(r)]
            .clone();
            (method, format!("/api/v1/services/{service}/{action}"), rest)
        }
        5 => (
            Method::GET,
            format!("/api/v1/history?{}", query(rest)),
            &[][..],
        ),
        6 => (
            Method::GET,
            format!("/api/v1/decisions?{}", query(rest)),
            &[][..],
        ),
        _ => (Method::GET, "/api/v1/services".to_string(), rest),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(&uri)
        .header("host", "127.0.0.1:8080");
    match sel >> 3 & 3 {
        0 => req = req.header("content-type", "application/json"),
        1 => {}
        2 => req = req.header("content-type", "text/plain"),
        _ => req = req.header("content-type", "application/json; charset=utf-8"),
    }
    if sel & 0x80 != 0 {
        req = req.header("authorization", format!("Bearer {TOKEN}"));
    }
    let req = req.body(Body::from(body.to_vec())).expect("request");
    let f = fixture();
    let (parts, bytes) = f.runtime.block_on(async {
        let res = f.app.clone().oneshot(req).await.expect("infallible");
        let (parts, body) = res.into_parts();
        (parts, body.collect().await.expect("body").to_bytes())
    });
    let shown = String::from_utf8_lossy(&bytes);
    assert!(
        !parts.status.is_server_error(),
        "{uri}: {} {shown}",
        parts.status
    );
    let kind = parts.headers.get("content-type").map(|v| v.as_bytes());
    assert!(
        kind.is_some_and(|k| k.starts_with(b"application/json")),
        "{uri}: {} with content type {kind:?}: {shown}",
        parts.status
    );
    assert!(
        serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
        "{uri}: {} not JSON: {shown}",
        parts.status
    );
    assert_eq!(
        parts
            .headers
            .get("x-content-type-options")
            .map(|v| v.as_bytes()),
        Some(&b"nosniff"[..]),
        "{uri}: no security headers"
    );
});
