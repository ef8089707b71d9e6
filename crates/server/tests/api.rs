//! API tests: every route, its errors and the auth rule, through axum's `oneshot` (no socket),
//! the OpenAPI document checked against the real router, one test through a real socket, and
//! the history's persistence and retention.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use microscaler_server::model::{Decision, HostTick, SampleTick, ServiceTick};
use microscaler_server::{
    now_ms, router, routes, Access, Control, Hub, RandomState, ServerOptions, Setup, Store, Tick,
};
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "s3cret-token";

/// A stand-in for the control loop's handles: records what the API changed.
#[derive(Default)]
struct FakeControl {
    manual: Mutex<BTreeMap<String, f64>>,
    random: Mutex<BTreeMap<String, RandomState>>,
    paused: Mutex<BTreeSet<String>>,
    overriding: Mutex<BTreeSet<String>>,
    /// Values pushed, by (service, trigger).
    pushed: Mutex<BTreeMap<(String, String), f64>>,
}

/// The push token of web's push trigger `queue` (its other one, `open`, has none).
const PUSH_TOKEN: &str = "push-token-of-web-queue";

impl Control for FakeControl {
    fn manual(&self, s: &str) -> Option<f64> {
        self.manual.lock().unwrap().get(s).copied()
    }
    fn set_manual(&self, s: &str, v: f64) -> Result<(), String> {
        self.manual.lock().unwrap().insert(s.into(), v);
        self.overriding.lock().unwrap().insert(s.into());
        Ok(())
    }
    fn clear_manual(&self, s: &str) -> Result<(), String> {
        self.manual.lock().unwrap().insert(s.into(), 0.0);
        self.overriding.lock().unwrap().remove(s);
        Ok(())
    }
    fn overriding(&self, s: &str) -> bool {
        self.overriding.lock().unwrap().contains(s)
    }
    fn random(&self, s: &str) -> Option<RandomState> {
        self.random.lock().unwrap().get(s).copied()
    }
    fn set_random(&self, s: &str, r: RandomState) -> Result<(), String> {
        self.random.lock().unwrap().insert(s.into(), r);
        Ok(())
    }
    fn paused(&self, s: &str) -> bool {
        self.paused.lock().unwrap().contains(s)
    }
    fn set_paused(&self, s: &str, p: bool) {
        let mut set = self.paused.lock().unwrap();
        if p {
            set.insert(s.into());
        } else {
            set.remove(s);
        }
    }
    fn push_trigger(&self, s: &str, t: &str) -> Option<Option<String>> {
        match (s, t) {
            ("web", "queue") => Some(Some(PUSH_TOKEN.into())),
            ("web", "open") => Some(None),
            _ => None,
        }
    }
    fn push(&self, s: &str, t: &str, v: f64) -> Result<(), String> {
        self.pushed.lock().unwrap().insert((s.into(), t.into()), v);
        Ok(())
    }
}

fn setup() -> Setup {
    let cfg = microscaler_backends::Config::from_toml(
        r#"
instance = "t"
[capacity]
slots = 9
[backend]
type = "process"
[[services]]
name = "web"
priority = 1
[[services.triggers]]
type = "random"
[[services.triggers]]
type = "manual"
[[services]]
name = "batch"
priority = 2
remainder = true
"#,
    )
    .expect("valid config");
    Setup::from_config(&cfg, "process", true)
}

struct Fixture {
    hub: Arc<Hub>,
    control: Arc<FakeControl>,
    _dir: tempfile::TempDir,
}

fn fixture(token: Option<&str>, open_read: bool) -> Fixture {
    fixture_with(ServerOptions {
        token: token.map(str::to_string),
        open_read,
        ..ServerOptions::default()
    })
}

fn fixture_with(options: ServerOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("h.sqlite"), Duration::from_secs(24 * 3600)).unwrap();
    let control = Arc::new(FakeControl::default());
    control.manual.lock().unwrap().insert("web".into(), 0.0);
    control.random.lock().unwrap().insert(
        "web".into(),
        RandomState {
            delta: 3,
            interval_ms: 3000,
        },
    );
    let hub = Hub::new(setup(), options, control.clone(), store);
    Fixture {
        hub,
        control,
        _dir: dir,
    }
}

fn tick(ts: i64, demand: f64, p1: u32, p2: u32, decisions: Vec<Decision>) -> Tick {
    let svc = |name: &str, priority, remainder, demand, n| ServiceTick {
        name: name.into(),
        priority,
        remainder,
        demand,
        target: n,
        running: n,
        pending: 0,
        paused: 0,
        bound: if remainder { "remainder" } else { "demand" }.into(),
        reason: "because".into(),
    };
    Tick {
        ts,
        t_ms: 0,
        capacity: 9,
        free: 9 - p1 - p2,
        services: vec![
            svc("web", 1, false, Some(demand), p1),
            svc("batch", 2, true, None, p2),
        ],
        decisions,
        hosts: vec![HostTick {
            id: "id-1".into(),
            name: "h1".into(),
            ready: true,
            cpus: Some(2.0),
            memory_bytes: Some(4 << 30),
            services: [("web".to_string(), [p1, 0]), ("batch".to_string(), [p2, 0])].into(),
        }],
        samples: vec![SampleTick {
            service: "web".into(),
            trigger: "random".into(),
            value: Some(demand),
        }],
        errors: vec![],
        took_ms: 3.0,
        paused: vec![],
    }
}

fn decision(ts: i64, service: &str, bound: &str) -> Decision {
    Decision {
        ts,
        kind: "start".into(),
        service: service.into(),
        count: 1,
        from: 1,
        to: 2,
        bound: bound.into(),
        reason: format!("started 1 of {service}: demand 2 > 1"),
    }
}

const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 40000);
const REMOTE: ([u8; 4], u16) = ([10, 1, 2, 3], 40000);

/// The router as a client at `peer` reaches it: through `http://127.0.0.1:8080/` unless the
/// request names another `Host`.
fn app(hub: &Arc<Hub>, peer: ([u8; 4], u16)) -> Router {
    router(hub.clone())
        .layer(MockConnectInfo(SocketAddr::from(peer)))
        .layer(axum::middleware::map_request(
            |mut req: Request<Body>| async move {
                if !req.headers().contains_key("host") {
                    req.headers_mut()
                        .insert("host", "127.0.0.1:8080".parse().unwrap());
                }
                req
            },
        ))
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// An error answer must be JSON with a message.
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {}", self.body))
            .to_string()
    }
}

async fn call(
    app: Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    send(app, req).await
}

async fn get(f: &Fixture, uri: &str) -> Answer {
    call(app(&f.hub, LOOPBACK), Method::GET, uri, None, None).await
}

#[tokio::test]
async fn dashboard_assets_are_served_with_no_external_reference() {
    let f = fixture(Some(TOKEN), false);
    for (path, kind) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
    ] {
        let a = get(&f, path).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert!(a.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with(kind));
        assert!(
            !a.body.contains("http://") && !a.body.contains("https://"),
            "{path} must not load anything from the network"
        );
        assert!(a.headers.contains_key("content-security-policy"));
    }
}

#[tokio::test]
async fn status_before_and_after_a_tick() {
    let f = fixture(Some(TOKEN), false);
    let a = get(&f, "/api/v1/status").await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    assert_eq!(v["instance"], "t");
    assert_eq!(v["backend"], "process");
    assert_eq!(v["writable"], true);
    assert!(v["last_tick"].is_null());
    f.hub.record(tick(now_ms(), 4.0, 4, 5, vec![]));
    let v = get(&f, "/api/v1/status").await.json();
    assert_eq!(v["last_tick"]["services"][0]["running"], 4);
}

#[tokio::test]
async fn services_show_config_controls_and_state() {
    let f = fixture(Some(TOKEN), false);
    f.hub.record(tick(now_ms(), 4.0, 4, 5, vec![]));
    let v = get(&f, "/api/v1/services").await.json();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["name"], "web");
    assert_eq!(list[0]["priority"], 1);
    assert_eq!(list[0]["kind"], "triggered");
    assert_eq!(list[0]["manual"], 0.0);
    assert_eq!(list[0]["random"], json!({"delta": 3, "interval_ms": 3000}));
    assert_eq!(list[0]["state"]["demand"], 4.0);
    assert_eq!(list[0]["triggers"].as_array().unwrap().len(), 2);
    assert_eq!(list[1]["kind"], "remainder");
    assert!(list[1]["manual"].is_null());
    assert_eq!(list[1]["state"]["running"], 5);
}

#[tokio::test]
async fn history_over_a_range_with_thinning_and_errors() {
    let f = fixture(Some(TOKEN), false);
    let t0 = now_ms() - 100_000;
    for i in 0..100 {
        f.hub
            .record(tick(t0 + i * 1000, (i % 5) as f64, 1, 8, vec![]));
    }
    f.hub.store().flush();
    let v = get(&f, &format!("/api/v1/history?from={t0}&to={}", t0 + 9_000))
        .await
        .json();
    let pts = v["points"].as_array().unwrap();
    assert_eq!(pts.len(), 10);
    assert_eq!(pts[0]["ts"], t0);
    assert_eq!(pts[3]["services"]["web"]["demand"], 3.0);
    assert_eq!(pts[3]["services"]["batch"]["running"], 8);
    assert_eq!(pts[0]["capacity"], 9);
    // Default range: the last 10 minutes.
    let v = get(&f, "/api/v1/history").await.json();
    assert_eq!(v["points"].as_array().unwrap().len(), 100);
    // Thinned evenly to the limit, oldest first.
    let v = get(&f, &format!("/api/v1/history?from={t0}&limit=10"))
        .await
        .json();
    let pts = v["points"].as_array().unwrap();
    assert_eq!(pts.len(), 10);
    assert!(pts
        .windows(2)
        .all(|w| w[0]["ts"].as_i64() < w[1]["ts"].as_i64()));

    // A range whose from is after its to is empty, not the client's error (JSON Schema cannot
    // say from <= to, so a client checked against the OpenAPI document may send one).
    let v = get(&f, "/api/v1/history?from=10&to=5").await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.body);
    assert_eq!(v.json()["points"], serde_json::json!([]));
    for bad in [
        "/api/v1/history?from=abc",
        "/api/v1/history?limit=0",
        "/api/v1/history?limit=100000",
        "/api/v1/history?from=-5",
        "/api/v1/history?colour=red",
        "/api/v1/history?service=web",
    ] {
        let a = get(&f, bad).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}: {}", a.body);
        assert!(!a.error().is_empty());
    }
}

#[tokio::test]
async fn decisions_newest_first_filtered_by_service() {
    let f = fixture(Some(TOKEN), false);
    let t0 = now_ms() - 10_000;
    f.hub
        .record(tick(t0, 2.0, 1, 8, vec![decision(t0, "web", "demand")]));
    f.hub.record(tick(
        t0 + 500,
        2.0,
        2,
        7,
        vec![
            decision(t0 + 500, "batch", "preempted"),
            decision(t0 + 500, "web", "demand"),
        ],
    ));
    f.hub.store().flush();
    let v = get(&f, "/api/v1/decisions").await.json();
    let d = v["decisions"].as_array().unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(d[0]["ts"], t0 + 500);
    assert_eq!(d[2]["ts"], t0);
    assert!(d[0]["reason"].as_str().unwrap().starts_with("started 1 of"));
    let v = get(&f, "/api/v1/decisions?service=batch").await.json();
    let d = v["decisions"].as_array().unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["bound"], "preempted");
    let v = get(&f, "/api/v1/decisions?limit=1").await.json();
    assert_eq!(v["decisions"].as_array().unwrap().len(), 1);

    let a = get(&f, "/api/v1/decisions?service=nope").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.error().contains("nope"));
    for bad in ["/api/v1/decisions?limit=5000", "/api/v1/decisions?to=x"] {
        assert_eq!(get(&f, bad).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn metrics_have_the_conventional_names() {
    let f = fixture(Some(TOKEN), false);
    let mut t = tick(
        now_ms(),
        4.5,
        4,
        5,
        vec![decision(now_ms(), "web", "demand")],
    );
    t.errors.push(microscaler_server::TickError {
        kind: "start".into(),
        message: "boom".into(),
    });
    f.hub.record(t);
    let a = get(&f, "/metrics").await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for line in [
        "microscaler_replicas_desired{service=\"web\"} 4",
        "microscaler_replicas_running{service=\"batch\"} 5",
        "microscaler_replicas_pending{service=\"web\"} 0",
        "microscaler_demand{service=\"web\"} 4.5",
        "microscaler_decisions_total{service=\"web\",reason=\"demand\"} 1",
        "microscaler_backend_errors_total{kind=\"start\"} 1",
        "microscaler_tick_duration_seconds_bucket{le=\"0.005\"} 1",
        "microscaler_tick_duration_seconds_bucket{le=\"+Inf\"} 1",
        "microscaler_tick_duration_seconds_count 1",
        "# TYPE microscaler_tick_duration_seconds histogram",
    ] {
        assert!(a.body.contains(line), "missing {line:?} in\n{}", a.body);
    }
    assert!(
        a.body.contains(
            "microscaler_demand_sample_age_seconds{service=\"web\",trigger=\"random\",source=\"random\"}"
        ),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn stream_sends_the_latest_tick_then_new_ones() {
    let f = fixture(Some(TOKEN), false);
    f.hub.record(tick(now_ms(), 4.0, 4, 5, vec![]));
    let req = Request::get("/api/v1/stream").body(Body::empty()).unwrap();
    let res = app(&f.hub, LOOPBACK).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = res.into_body();
    let mut text = String::new();
    let hub = f.hub.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        hub.record(tick(now_ms(), 7.0, 7, 2, vec![]));
    });
    while text.matches("event: tick").count() < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a tick within 5 s")
            .unwrap()
            .unwrap();
        if let Some(d) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
        }
    }
    let datas: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(datas[0]["services"][0]["running"], 4);
    assert_eq!(datas[1]["services"][0]["running"], 7);
    // Closing the hub ends the stream (a graceful shutdown never waits on open dashboards).
    f.hub.close();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    assert!(end.is_ok(), "the stream must end when the hub closes");
}

#[tokio::test]
async fn set_manual_demand_needs_the_token_and_valid_input() {
    let f = fixture(Some(TOKEN), false);
    let put = |token: Option<&'static str>, uri: &'static str, body: &'static str| {
        call(app(&f.hub, LOOPBACK), Method::PUT, uri, token, Some(body))
    };
    let uri = "/api/v1/services/web/demand";
    // No token, wrong token: 401, nothing changes. Loopback does not exempt changes.
    let a = put(None, uri, r#"{"value": 5}"#).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.headers["www-authenticate"], "Bearer");
    assert!(a.error().contains("token"));
    assert_eq!(
        put(Some("wrong"), uri, r#"{"value": 5}"#).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(f.control.manual("web"), Some(0.0));

    let a = put(Some(TOKEN), uri, r#"{"value": 5}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.json()["manual"], 5.0);
    assert_eq!(f.control.manual("web"), Some(5.0));

    // Bad input: 4xx JSON error, nothing changes.
    for (body, status) in [
        (r#"{"value": -1}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"value": 1e9}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"value": "seven"}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (
            r#"{"value": 3, "extra": 1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (r#"{}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"value": "#, StatusCode::BAD_REQUEST),
        ("", StatusCode::BAD_REQUEST),
    ] {
        let a = put(Some(TOKEN), uri, body).await;
        assert_eq!(a.status, status, "{body:?}: {}", a.body);
        assert!(!a.error().is_empty());
        assert_eq!(
            f.control.manual("web"),
            Some(5.0),
            "{body:?} changed the demand"
        );
    }
    // Wrong content type.
    let req = Request::put(uri)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"value": 1}"#))
        .unwrap();
    let res = app(&f.hub, LOOPBACK).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Too big a body.
    let big = format!(r#"{{"value": 1, "pad": "{}"}}"#, "x".repeat(10_000));
    let req = Request::put(uri)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from(big))
        .unwrap();
    let res = app(&f.hub, LOOPBACK).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(f.control.manual("web"), Some(5.0));
    // Unknown service: 404; a service with no manual trigger: 409.
    let a = put(
        Some(TOKEN),
        "/api/v1/services/nope/demand",
        r#"{"value": 1}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.error().contains("nope"));
    let a = put(
        Some(TOKEN),
        "/api/v1/services/batch/demand",
        r#"{"value": 1}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.error().contains("manual"));
}

/// The manual demand overrides the random walk until cleared: the service shows `override`
/// once set; `POST .../demand/clear` (token needed) ends it and puts the manual trigger back
/// to 0; a service without a manual trigger is a 409.
#[tokio::test]
async fn a_manual_demand_overrides_until_cleared() {
    let f = fixture(Some(TOKEN), false);
    let send = |method: Method, uri: &'static str, token: Option<&'static str>, body| {
        call(app(&f.hub, LOOPBACK), method, uri, token, body)
    };
    let a = send(Method::GET, "/api/v1/services", None, None).await;
    assert_eq!(a.json()[0]["override"], false, "{}", a.body);
    let a = send(
        Method::PUT,
        "/api/v1/services/web/demand",
        Some(TOKEN),
        Some(r#"{"value": 2}"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        (a.json()["manual"].clone(), a.json()["override"].clone()),
        (2.0.into(), true.into())
    );
    let clear = "/api/v1/services/web/demand/clear";
    let a = send(Method::POST, clear, None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(
        f.control.overriding("web"),
        "nothing changed without the token"
    );
    let a = send(Method::POST, clear, Some(TOKEN), None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        (a.json()["manual"].clone(), a.json()["override"].clone()),
        (0.0.into(), false.into())
    );
    assert_eq!(f.control.manual("web"), Some(0.0));
    let a = send(
        Method::POST,
        "/api/v1/services/batch/demand/clear",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn set_random_delta_and_interval() {
    let f = fixture(Some(TOKEN), false);
    let put = |body: &'static str, svc: &'static str| {
        call(
            app(&f.hub, LOOPBACK),
            Method::PUT,
            if svc == "web" {
                "/api/v1/services/web/random"
            } else {
                "/api/v1/services/batch/random"
            },
            Some(TOKEN),
            Some(body),
        )
    };
    let a = put(r#"{"delta": 1, "interval_ms": 500}"#, "web").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.json()["random"], json!({"delta": 1, "interval_ms": 500}));
    // Partial: only the delta.
    let a = put(r#"{"delta": 2}"#, "web").await;
    assert_eq!(a.json()["random"], json!({"delta": 2, "interval_ms": 500}));
    for body in [
        r#"{"interval_ms": 5}"#,
        r#"{"interval_ms": 99999999}"#,
        r#"{"delta": 5000}"#,
        r#"{"delta": -1}"#,
    ] {
        let a = put(body, "web").await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            a.body
        );
        assert!(!a.error().is_empty());
    }
    assert_eq!(
        f.control.random("web"),
        Some(RandomState {
            delta: 2,
            interval_ms: 500
        })
    );
    assert_eq!(
        put(r#"{"delta": 1}"#, "batch").await.status,
        StatusCode::CONFLICT
    );
    let a = call(
        app(&f.hub, LOOPBACK),
        Method::PUT,
        "/api/v1/services/web/random",
        None,
        Some(r#"{"delta": 1}"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn pause_and_resume() {
    let f = fixture(Some(TOKEN), false);
    let post = |uri: &'static str, token: Option<&'static str>| {
        call(app(&f.hub, LOOPBACK), Method::POST, uri, token, None)
    };
    let a = post("/api/v1/services/batch/pause", None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(!f.control.paused("batch"));
    let a = post("/api/v1/services/batch/pause", Some(TOKEN)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["paused"], true);
    assert!(f.control.paused("batch"));
    let a = post("/api/v1/services/batch/resume", Some(TOKEN)).await;
    assert_eq!(a.json()["paused"], false);
    assert!(!f.control.paused("batch"));
    assert_eq!(
        post("/api/v1/services/nope/pause", Some(TOKEN))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post("/api/v1/services/nope/resume", Some(TOKEN))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn without_a_token_changes_are_refused() {
    let f = fixture(None, false);
    let a = call(
        app(&f.hub, LOOPBACK),
        Method::POST,
        "/api/v1/services/web/pause",
        Some("anything"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.error().contains("--token"));
    assert!(!f.control.paused("web"));
    assert_eq!(get(&f, "/api/v1/status").await.json()["writable"], false);
}

#[tokio::test]
async fn reads_are_open_only_on_loopback_unless_open_read() {
    let f = fixture(Some(TOKEN), false);
    for path in [
        "/api/v1/status",
        "/api/v1/services",
        "/api/v1/history",
        "/api/v1/decisions",
        "/api/v1/stream",
        "/metrics",
    ] {
        let a = call(app(&f.hub, REMOTE), Method::GET, path, None, None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(!a.error().is_empty());
        let a = call(app(&f.hub, REMOTE), Method::GET, path, Some("wrong"), None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let a = call(
        app(&f.hub, REMOTE),
        Method::GET,
        "/api/v1/status",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let uri = format!("/api/v1/status?access_token={TOKEN}");
    let a = call(app(&f.hub, REMOTE), Method::GET, &uri, None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    // The page itself holds no data: it loads anywhere, and asks for the token.
    let a = call(app(&f.hub, REMOTE), Method::GET, "/", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    // No peer address known: treated as remote.
    let a = call(
        router(f.hub.clone()),
        Method::GET,
        "/api/v1/status",
        None,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    let open = fixture(Some(TOKEN), true);
    let a = call(
        app(&open.hub, REMOTE),
        Method::GET,
        "/api/v1/status",
        None,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    // open_read never opens changes.
    let a = call(
        app(&open.hub, REMOTE),
        Method::POST,
        "/api/v1/services/web/pause",
        None,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn cors_is_closed() {
    let f = fixture(Some(TOKEN), false);
    let req = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api/v1/services/web/demand")
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "PUT")
        .body(Body::empty())
        .unwrap();
    let res = app(&f.hub, LOOPBACK).oneshot(req).await.unwrap();
    assert!(res.status().is_client_error());
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    let req = Request::get("/api/v1/status")
        .header("origin", "https://evil.example")
        .body(Body::empty())
        .unwrap();
    let res = app(&f.hub, LOOPBACK).oneshot(req).await.unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let f = fixture(Some(TOKEN), false);
    let a = get(&f, "/api/v1/nothing").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(!a.error().is_empty());
    let a = call(
        app(&f.hub, LOOPBACK),
        Method::DELETE,
        "/api/v1/status",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(!a.error().is_empty());
}

/// The OpenAPI document and the router cannot drift: the router's table and the document's
/// paths are the same set, every documented path answers on the real router with a status the
/// document lists, and the document is valid JSON with the required parts.
#[tokio::test]
async fn openapi_matches_the_router() {
    let f = fixture(Some(TOKEN), false);
    let doc: Value = serde_json::from_str(&get(&f, "/api/v1/openapi.json").await.body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            documented.insert((method.to_uppercase(), path.clone()));
            assert!(op["responses"].is_object(), "{method} {path}: no responses");
            let secured = op.get("security").is_some();
            let (_, table) = routes(f.hub.clone());
            let access = table
                .iter()
                .find(|(m, p, _)| m.as_str() == method.to_uppercase() && p == path)
                .map(|(_, _, a)| *a);
            assert_eq!(
                secured,
                matches!(access, Some(Access::Write | Access::Push)),
                "{method} {path}: the document's security must say whether it needs the token"
            );
        }
    }
    let (_, table) = routes(f.hub.clone());
    let served: BTreeSet<(String, String)> = table
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "OpenAPI paths and router routes differ");

    // Every documented operation answers on the real router with a documented status.
    for (method, path) in &documented {
        let uri = path.replace("{name}", "web").replace("{trigger}", "queue");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let body = match uri.as_str() {
            "/api/v1/services/web/demand" => Some(r#"{"value": 2}"#),
            "/api/v1/services/web/random" => Some(r#"{"delta": 2}"#),
            "/api/v1/services/web/triggers/queue/value" => Some(r#"{"value": 40}"#),
            _ => None,
        };
        let status = if uri.ends_with("/stream") {
            let req = Request::get(&uri).body(Body::empty()).unwrap();
            app(&f.hub, LOOPBACK).oneshot(req).await.unwrap().status()
        } else {
            call(
                app(&f.hub, LOOPBACK),
                method.clone(),
                &uri,
                Some(TOKEN),
                body,
            )
            .await
            .status
        };
        let op = &doc["paths"][path][method.as_str().to_lowercase()];
        assert!(
            op["responses"].get(status.as_str()).is_some(),
            "{method} {uri} answered {status}, which the document does not list"
        );
        if uri == "/readyz" {
            // No tick recorded in this fixture: not ready (tested on its own below).
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        } else {
            assert_eq!(status, StatusCode::OK, "{method} {uri}");
        }
        // And without the token, a route that needs it says 401, which is documented.
        if op.get("security").is_some() {
            let a = call(app(&f.hub, LOOPBACK), method.clone(), &uri, None, body).await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED);
            assert!(op["responses"].get("401").is_some());
        }
    }
    // Every $ref points at a schema that exists.
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &r[..r.find('"').unwrap()];
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "missing schema {name}"
        );
    }
}

#[tokio::test]
async fn history_survives_a_restart_and_old_rows_expire() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/h.sqlite");
    let now = now_ms();
    {
        let store = Store::open(&path, Duration::from_secs(3600)).unwrap();
        let t = |ts, d| tick(ts, d, 1, 8, vec![decision(ts, "web", "demand")]);
        store.record(&t(now - 2 * 3600 * 1000, 1.0)); // older than the retention
        store.record(&t(now - 1000, 2.0));
        store.record(&t(now, 3.0));
        store.close();
    }
    let store = Store::open(&path, Duration::from_secs(3600)).unwrap();
    let pts = store.history(0, now, 100).unwrap();
    assert_eq!(pts.len(), 2, "the expired point must be gone: {pts:?}");
    assert_eq!(pts[1].services["web"].demand, Some(3.0));
    let d = store.decisions(0, now, None, 100).unwrap();
    assert_eq!(d.len(), 2);
}

/// One test through a real socket: the same router behind `serve`, with the peer address
/// coming from the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_real_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture(Some(TOKEN), false);
    f.hub.record(tick(now_ms(), 4.0, 4, 5, vec![]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(microscaler_server::serve(listener, f.hub.clone(), async {
        let _ = stop_rx.await;
    }));
    async fn raw(addr: SocketAddr, req: String) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
    let res = raw(
        addr,
        "GET /api/v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(
        res.starts_with("HTTP/1.1 401"),
        "a Host that is not loopback: {res}"
    );
    let res = raw(
        addr,
        "GET /api/v1/status HTTP/1.1\r\nhost: localhost:8080\r\nconnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(res.contains("\"instance\":\"t\""));
    let body = r#"{"value": 6}"#;
    let res = raw(
        addr,
        format!(
            "PUT /api/v1/services/web/demand HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(f.control.manual("web"), Some(6.0));
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}

/// The probes: alive always, ready only while ticks are recorded (no token either way, from
/// any address: the kubelet probes from the node's).
#[tokio::test]
async fn probes_need_no_token_and_readiness_follows_the_ticks() {
    let f = fixture(Some(TOKEN), false);
    let remote = ([10, 1, 2, 3], 40000);
    let probe = |path: &'static str| {
        let hub = f.hub.clone();
        async move {
            call(app(&hub, remote), Method::GET, path, None, None)
                .await
                .status
        }
    };
    assert_eq!(probe("/healthz").await, StatusCode::OK);
    assert_eq!(probe("/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
    f.hub.record(tick(now_ms() - 60_000, 4.0, 4, 5, vec![]));
    assert_eq!(
        probe("/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "a minute-old tick is stale"
    );
    f.hub.record(tick(now_ms(), 4.0, 4, 5, vec![]));
    assert_eq!(probe("/readyz").await, StatusCode::OK);
}

/// A request as built, sent to `app`.
async fn send(app: Router, req: Request<Body>) -> Answer {
    let res = app.oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// DNS rebinding: a page of `evil.example` whose name now resolves to 127.0.0.1 reaches the
/// server from a loopback peer, but names its own host: without the token it reads nothing.
#[tokio::test]
async fn token_less_reads_need_a_loopback_host() {
    let f = fixture(Some(TOKEN), false);
    let read = |hub: Arc<Hub>,
                uri: &'static str,
                host: Option<&'static str>,
                auth: Option<&'static str>| {
        let mut req = Request::get(uri);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = req.body(Body::empty()).unwrap();
        async move {
            // No default Host here: the request's own, or none.
            send(
                router(hub).layer(MockConnectInfo(SocketAddr::from(LOOPBACK))),
                req,
            )
            .await
        }
    };
    for host in [
        "localhost:8080",
        "LocalHost",
        "127.0.0.1:8080",
        "127.0.0.1",
        "[::1]:8080",
        "localhost.",
    ] {
        let a = read(f.hub.clone(), "/api/v1/status", Some(host), None).await;
        assert_eq!(a.status, StatusCode::OK, "Host {host}: {}", a.body);
    }
    for path in [
        "/api/v1/status",
        "/api/v1/services",
        "/api/v1/history",
        "/api/v1/stream",
        "/metrics",
    ] {
        for host in [
            Some("evil.example:8080"),
            Some("evil.example"),
            Some("localhost.evil.example"),
            Some("127.0.0.1.evil.example"),
            None,
        ] {
            let a = read(f.hub.clone(), path, host, None).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{path} with Host {host:?}"
            );
            assert!(a.error().contains("Host"), "{}", a.body);
        }
    }
    // An absolute URI names the host too, whatever the Host header says.
    let a = read(
        f.hub.clone(),
        "http://evil.example/api/v1/status",
        Some("localhost"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // The token is enough from any Host, in the header or the query.
    let bearer = Box::leak(format!("Bearer {TOKEN}").into_boxed_str());
    let a = read(
        f.hub.clone(),
        "/api/v1/status",
        Some("evil.example"),
        Some(bearer),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let uri = Box::leak(format!("/api/v1/status?access_token={TOKEN}").into_boxed_str());
    let a = read(f.hub.clone(), uri, Some("evil.example"), None).await;
    assert_eq!(a.status, StatusCode::OK);
    // The page itself holds no data.
    let a = read(f.hub.clone(), "/", Some("evil.example"), None).await;
    assert_eq!(a.status, StatusCode::OK);

    // A configured name (a reverse proxy's on the same machine), any case and port.
    let named = fixture_with(ServerOptions {
        token: Some(TOKEN.into()),
        allowed_hosts: vec!["scaler.internal".into()],
        ..ServerOptions::default()
    });
    let a = read(
        named.hub.clone(),
        "/api/v1/status",
        Some("Scaler.Internal:443"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = read(
        named.hub.clone(),
        "/api/v1/status",
        Some("other.internal"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // open_read opens reads to anyone, whatever the Host.
    let open = fixture(Some(TOKEN), true);
    let a = read(
        open.hub.clone(),
        "/api/v1/status",
        Some("evil.example"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
}

/// RFC 7235: the scheme of `Authorization` is case-insensitive.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let f = fixture(Some(TOKEN), false);
    let pause = |auth: String| {
        let req = Request::post("/api/v1/services/web/pause")
            .header("authorization", auth)
            .body(Body::empty())
            .unwrap();
        send(app(&f.hub, LOOPBACK), req)
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let a = pause(format!("{scheme} {TOKEN}")).await;
        assert_eq!(a.status, StatusCode::OK, "{scheme}: {}", a.body);
    }
    for bad in [
        format!("Basic {TOKEN}"),
        format!("Bearer{TOKEN}"),
        format!("bearer  {TOKEN}x"),
        TOKEN.to_string(),
    ] {
        let a = pause(bad.clone()).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{bad}");
    }
}

/// `to=0` is a valid range end (nothing before it), not the client's error.
#[tokio::test]
async fn a_range_may_end_at_zero() {
    let f = fixture(Some(TOKEN), false);
    for (path, list) in [("history", "points"), ("decisions", "decisions")] {
        let a = get(&f, &format!("/api/v1/{path}?to=0")).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.body);
        let v = a.json();
        assert_eq!((v["from"].as_i64(), v["to"].as_i64()), (Some(0), Some(0)));
        assert_eq!(v[list], json!([]));
        let a = get(&f, &format!("/api/v1/{path}?from=0&to=0")).await;
        assert_eq!(a.status, StatusCode::OK);
        for bad in ["to=-1", "from=-1&to=0", &format!("to={}", i64::MIN)] {
            let a = get(&f, &format!("/api/v1/{path}?{bad}")).await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}?{bad}");
            assert!(a.error().contains(">= 0"), "{}", a.body);
        }
    }
}

/// JSON Schema's integers include `8577.0`; `8577.5` is refused and said why.
#[tokio::test]
async fn integral_floats_are_integers() {
    let f = fixture(Some(TOKEN), false);
    let put = |body: &'static str| {
        call(
            app(&f.hub, LOOPBACK),
            Method::PUT,
            "/api/v1/services/web/random",
            Some(TOKEN),
            Some(body),
        )
    };
    let a = put(r#"{"delta": 2.0, "interval_ms": 8577.0}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.json()["random"], json!({"delta": 2, "interval_ms": 8577}));
    let a = put(r#"{"interval_ms": 1e4}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.json()["random"]["interval_ms"], 10000);
    for (body, message) in [
        (
            r#"{"interval_ms": 8577.5}"#,
            "interval_ms must be a whole number, got 8577.5",
        ),
        (r#"{"delta": 0.5}"#, "delta must be a whole number, got 0.5"),
        (
            r#"{"delta": -1.0}"#,
            "delta must be between 0 and 1000, got -1.0",
        ),
        (
            r#"{"interval_ms": 1e300}"#,
            "interval_ms must be between 100 and 3600000, got 1e+300",
        ),
    ] {
        let a = put(body).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            a.body
        );
        assert_eq!(a.error(), message);
    }
    // null is not a number (found by schemathesis: it was taken as "unchanged").
    for body in [
        r#"{"interval_ms": null}"#,
        r#"{"delta": null, "interval_ms": 500}"#,
    ] {
        let a = put(body).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            a.body
        );
        assert!(a.error().contains("invalid type: null"), "{}", a.body);
    }
    assert_eq!(
        f.control.random("web"),
        Some(RandomState {
            delta: 2,
            interval_ms: 10000
        })
    );
}

/// A body must be a JSON object: serde would read `[5]` as `{"value": 5}`.
#[tokio::test]
async fn bodies_must_be_json_objects() {
    let f = fixture(Some(TOKEN), false);
    for (uri, body, kind) in [
        ("/api/v1/services/web/demand", "[5]", "an array"),
        ("/api/v1/services/web/demand", "5", "a number"),
        ("/api/v1/services/web/demand", "null", "null"),
        ("/api/v1/services/web/random", "[2, 3000]", "an array"),
        ("/api/v1/services/web/random", r#""x""#, "a string"),
    ] {
        let a = call(
            app(&f.hub, LOOPBACK),
            Method::PUT,
            uri,
            Some(TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(
            a.status,
            StatusCode::BAD_REQUEST,
            "{uri} {body}: {}",
            a.body
        );
        assert_eq!(
            a.error(),
            format!("the body must be a JSON object, got {kind}")
        );
    }
    assert_eq!(f.control.manual("web"), Some(0.0));
    assert_eq!(f.control.random("web").unwrap().interval_ms, 3000);
}

/// A path that is not UTF-8 once decoded is a JSON 400 with the security headers.
#[tokio::test]
async fn a_path_that_is_not_utf8_is_a_json_error() {
    let f = fixture(Some(TOKEN), false);
    for (method, uri) in [
        (Method::POST, "/api/v1/services/%FF/pause"),
        (Method::PUT, "/api/v1/services/%C3%28/demand"),
    ] {
        let a = call(app(&f.hub, LOOPBACK), method, uri, Some(TOKEN), Some("{}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{uri}: {}", a.body);
        assert!(a.error().starts_with("invalid path"), "{}", a.body);
        assert_eq!(a.headers["x-content-type-options"], "nosniff");
    }
    // Documented for every route with a name.
    let doc: Value = serde_json::from_str(microscaler_server::api::OPENAPI).unwrap();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if path.contains("{name}") {
            for (method, op) in ops.as_object().unwrap() {
                assert!(op["responses"].get("400").is_some(), "{method} {path}");
            }
        }
    }
}

/// A server on a socket with `read_timeout`; stops when the returned sender is dropped.
async fn listening(
    read_timeout: Duration,
) -> (Fixture, SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let f = fixture_with(ServerOptions {
        token: Some(TOKEN.into()),
        read_timeout,
        ..ServerOptions::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(microscaler_server::serve(listener, f.hub.clone(), async {
        let _ = stop_rx.await;
    }));
    (f, addr, stop_tx)
}

/// Sends `request` and reads the answer until the server closes the connection.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// What hyper answers before any route (a URI too long, too many headers, a path of raw
/// non-ASCII bytes) has the API's JSON error and security headers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_layers_own_errors_are_json_with_the_security_headers() {
    let (_f, addr, _stop) = listening(Duration::from_secs(10)).await;
    let long = format!(
        "GET /{} HTTP/1.1\r\nhost: localhost\r\n\r\n",
        "a".repeat(70_000)
    );
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = format!("GET /healthz HTTP/1.1\r\nhost: localhost\r\n{many}\r\n");
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-big: {}\r\n\r\n",
        "b".repeat(500_000)
    );
    let mut raw =
        b"GET /api/v1/services/\xff\xfe/pause HTTP/1.1\r\nhost: localhost\r\n\r\n".to_vec();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (long.into_bytes(), "414"),
        (many.into_bytes(), "431"),
        (huge.into_bytes(), "431"),
        (std::mem::take(&mut raw), "400"),
        (b"NOT HTTP AT ALL\r\n\r\n".to_vec(), "400"),
    ];
    for (request, status) in cases {
        let res = exchange(addr, &request).await;
        let head = res.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(
            res.starts_with(&format!("HTTP/1.1 {status} ")),
            "{status}: {res}"
        );
        for h in [
            "x-content-type-options: nosniff",
            "x-frame-options: deny",
            "content-type: application/json",
            "content-security-policy: ",
        ] {
            assert!(head.contains(h), "{status}: no {h}: {res}");
        }
        let body: Value = serde_json::from_str(res.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert!(!body["error"].as_str().unwrap().is_empty(), "{res}");
    }
    // And the server still answers.
    let res = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
}

/// Slowloris: clients that send their head a byte at a time, keep an idle connection open or
/// send their body slowly are cut off after the read timeout (here 300 ms), while they keep
/// sending; bounds are generous, the test asserts that they are closed, not how fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (f, addr, _stop) = listening(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    // Dripping heads: 20 connections, one byte every 50 ms, a head that never ends.
    let drips = (0..20).map(|_| {
        tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-slow: ";
            let mut sent = 0usize;
            let mut buf = [0u8; 256];
            loop {
                let byte = head.get(sent).copied().unwrap_or(b'a');
                if s.write_all(&[byte]).await.is_err() {
                    return sent; // reset by the server
                }
                sent += 1;
                match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return sent, // closed by the server
                    Ok(Ok(n)) => panic!("an answer to an unfinished head: {:?}", &buf[..n]),
                    Err(_) => {}
                }
                assert!(sent < 400, "still open after 20 s of dripping");
            }
        })
    });
    for d in drips {
        let sent = d.await.unwrap();
        assert!(
            sent > 1,
            "closed before the client sent anything much: {sent}"
        );
    }
    // Idle keep-alive: one request answered, then nothing sent: the server closes.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "an idle connection stays open");
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    // A slow body: 408 in JSON, and closed.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("PUT /api/v1/services/web/demand HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{{").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let answered = async {
        loop {
            match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => {
                    let _ = s.write_all(b" ").await;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), answered)
        .await
        .expect("a slow body is cut off");
    let res = String::from_utf8_lossy(&out);
    assert!(res.starts_with("HTTP/1.1 408"), "{res}");
    assert!(
        res.contains("\"error\":\"the request body did not arrive within"),
        "{res}"
    );
    assert_eq!(f.control.manual("web"), Some(0.0));
    // A client at normal speed is served.
    let res = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// The history is readable by its owner only: a new file, and one an older version created
/// world-readable.
#[cfg(unix)]
#[test]
fn the_history_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let path = dir.path().join("h.sqlite");
    let store = Store::open(&path, Duration::from_secs(3600)).unwrap();
    store.record(&tick(now_ms(), 1.0, 1, 8, vec![]));
    store.flush();
    for suffix in ["", "-wal", "-shm"] {
        let p = dir.path().join(format!("h.sqlite{suffix}"));
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    store.close();
    let old = dir.path().join("old.sqlite");
    drop(Store::open(&old, Duration::from_secs(3600)).unwrap());
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = Store::open(&old, Duration::from_secs(3600)).unwrap();
    assert_eq!(mode(&old), 0o600);
}

/// A producer pushes with its trigger's own token, which may do nothing else; the API token
/// may push too. Without a valid token nothing about the triggers is told (401 whatever the
/// names); with one, an unknown trigger is a 404 and a bad value a 422. A trigger without a
/// token of its own, on a server without an API token, refuses pushes (403).
#[tokio::test]
async fn pushes_need_the_api_token_or_the_triggers_own_which_can_do_nothing_else() {
    let f = fixture(Some(TOKEN), false);
    let put = |uri: &'static str, token: Option<&'static str>, body: &'static str| {
        let app = app(&f.hub, REMOTE);
        async move { call(app, Method::PUT, uri, token, Some(body)).await }
    };
    let queue = "/api/v1/services/web/triggers/queue/value";
    let a = put(queue, Some(PUSH_TOKEN), r#"{"value": 17}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        serde_json::from_str::<Value>(&a.body).unwrap(),
        json!({"service": "web", "trigger": "queue", "value": 17.0})
    );
    let a = put(queue, Some(TOKEN), r#"{"value": 18}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        f.control.pushed.lock().unwrap()[&("web".to_string(), "queue".to_string())],
        18.0
    );
    // The push token is for that trigger only.
    let a = put(
        "/api/v1/services/web/demand",
        Some(PUSH_TOKEN),
        r#"{"value": 1}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = put(
        "/api/v1/services/web/triggers/open/value",
        Some(PUSH_TOKEN),
        r#"{"value": 1}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // No token, a wrong one, and unknown names without a token: all the same 401.
    for (uri, token) in [
        (queue, None),
        (queue, Some("wrong")),
        ("/api/v1/services/nope/triggers/x/value", None),
    ] {
        let a = put(uri, token, r#"{"value": 1}"#).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{uri} {token:?}");
        assert_eq!(a.headers["www-authenticate"], "Bearer");
    }
    // With the API token: unknown names are named; bad values refused.
    let a = put(
        "/api/v1/services/nope/triggers/x/value",
        Some(TOKEN),
        r#"{"value": 1}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    let a = put(
        "/api/v1/services/web/triggers/x/value",
        Some(TOKEN),
        r#"{"value": 1}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    assert!(a.body.contains("has no push trigger"), "{}", a.body);
    for bad in [
        r#"{"value": -1}"#,
        r#"{"value": 1e13}"#,
        r#"{"value": "x"}"#,
        r#"{"v": 1}"#,
    ] {
        let a = put(queue, Some(PUSH_TOKEN), bad).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            a.body
        );
    }
    let a = put(queue, Some(PUSH_TOKEN), "[1]").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    // No API token and a trigger with no token of its own: pushes are off.
    let f = fixture(None, false);
    let a = call(
        app(&f.hub, LOOPBACK),
        Method::PUT,
        "/api/v1/services/web/triggers/open/value",
        None,
        Some(r#"{"value": 1}"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    // The trigger's own token still works there.
    let a = call(
        app(&f.hub, LOOPBACK),
        Method::PUT,
        "/api/v1/services/web/triggers/queue/value",
        Some(PUSH_TOKEN),
        Some(r#"{"value": 3}"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}
