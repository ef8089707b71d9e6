//! The routes: the JSON API under `/api/v1`, `/metrics` and the dashboard's assets.
//!
//! Every route is registered through [`routes`], which also returns the table of
//! `(method, path, access)` the router serves; a test checks that table against the OpenAPI
//! document both ways, and calls every documented route on the real router.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::ServiceInfo;
use crate::{now_ms, Hub, RandomState};

/// Largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 4096;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (the dashboard's static assets: they hold no data).
    Open,
    /// Loopback clients that name a loopback `Host` (or an allowed one), or any client with the
    /// token (or anyone with `open_read`).
    Read,
    /// Only with the bearer token.
    Write,
    /// With the bearer token, or the push token of the trigger the path names (checked by
    /// the route itself, which knows the trigger).
    Push,
}

/// The OpenAPI document of the API.
pub const OPENAPI: &str = include_str!("openapi.json");

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
    fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let status = if status.is_client_error() {
            status
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad(r.body_text())
    }
}

type ApiResult = Result<Response, ApiError>;

/// The router with every route.
pub fn router(hub: Arc<Hub>) -> Router {
    routes(hub).0
}

/// The router, and the table of the routes it serves: `(method, path, access)`.
pub fn routes(hub: Arc<Hub>) -> (Router, Vec<(Method, &'static str, Access)>) {
    let mut table = Vec::new();
    let mut r = Router::new();
    macro_rules! route {
        ($method:ident, $path:literal, $access:expr, $handler:expr) => {{
            table.push((Method::$method, $path, $access));
            let filter = MethodFilter::try_from(Method::$method).expect("method filter");
            r = r.route(
                $path,
                on(filter, $handler).route_layer(middleware::from_fn_with_state(
                    (hub.clone(), $access),
                    guard,
                )),
            );
        }};
    }
    // axum merges methods per path only when added with the same MethodRouter, so each path
    // has one method here.
    route!(GET, "/", Access::Open, index);
    route!(GET, "/app.js", Access::Open, app_js);
    route!(GET, "/app.css", Access::Open, app_css);
    route!(GET, "/metrics", Access::Read, metrics);
    route!(GET, "/api/v1/openapi.json", Access::Open, openapi);
    route!(GET, "/healthz", Access::Open, healthz);
    route!(GET, "/readyz", Access::Open, readyz);
    route!(GET, "/api/v1/status", Access::Read, status);
    route!(GET, "/api/v1/services", Access::Read, services);
    route!(GET, "/api/v1/history", Access::Read, history);
    route!(GET, "/api/v1/decisions", Access::Read, decisions);
    route!(GET, "/api/v1/stream", Access::Read, stream);
    route!(
        PUT,
        "/api/v1/services/{name}/demand",
        Access::Write,
        set_demand
    );
    route!(
        POST,
        "/api/v1/services/{name}/demand/clear",
        Access::Write,
        clear_demand
    );
    route!(
        PUT,
        "/api/v1/services/{name}/random",
        Access::Write,
        set_random
    );
    route!(
        PUT,
        "/api/v1/services/{name}/triggers/{trigger}/value",
        Access::Push,
        push_value
    );
    route!(POST, "/api/v1/services/{name}/pause", Access::Write, pause);
    route!(
        POST,
        "/api/v1/services/{name}/resume",
        Access::Write,
        resume
    );
    let r = r
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(hub.clone(), read_body))
        .layer(middleware::from_fn(security_headers))
        .with_state(hub);
    (r, table)
}

/// The headers of every answer, the HTTP layer's own errors included.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    ),
];

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        h.insert(name, HeaderValue::from_static(value));
    }
    res
}

/// A whole HTTP/1.1 answer `{"error": message}` with the security headers that closes the
/// connection, for the errors the HTTP layer answers before any route (see `conn`).
pub(crate) fn raw_error(status: StatusCode, message: &str) -> Vec<u8> {
    let body = json!({ "error": message }).to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    for (name, value) in SECURITY_HEADERS {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Reads the request's body before routing, within the read timeout (a client that sends it
/// slowly holds no connection longer: 408) and the size limit (413).
async fn read_body(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = hub.options.read_timeout;
    let bytes = match tokio::time::timeout(limit, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {BODY_LIMIT} bytes"),
                )
            } else {
                ApiError::bad(format!("cannot read the request body: {e}"))
            }
            .into_response();
        }
        Err(_) => {
            let mut res = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {limit:?}"),
            )
            .into_response();
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return res;
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Compares without leaking the position of the first difference through timing.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The token of `Authorization: Bearer <token>`; the scheme in any case (RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Whether the request names a loopback host, or one of `allowed`, in its `Host` (or its
/// absolute URI): any port; a name resolved to 127.0.0.1 by a rebinding DNS is neither.
fn loopback_host(req: &Request, allowed: &[String]) -> bool {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => match req.headers().get(header::HOST).map(|h| h.to_str()) {
            Some(Ok(h)) => h,
            _ => return false,
        },
    };
    let Ok(authority) = authority.parse::<axum::http::uri::Authority>() else {
        return false;
    };
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
        || allowed.iter().any(|a| {
            let a = a.trim_start_matches('[').trim_end_matches(']');
            a.eq_ignore_ascii_case(host)
        })
}

/// The `access_token` query parameter (for `EventSource`, which cannot send headers).
fn query_token(uri: &axum::http::Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        kv.strip_prefix("access_token=").map(|v| {
            v.replace("%2B", "+")
                .replace("%2F", "/")
                .replace("%3D", "=")
        })
    })
}

async fn guard(
    State((hub, access)): State<(Arc<Hub>, Access)>,
    req: Request,
    next: Next,
) -> Response {
    let token = hub.options.token.as_deref();
    let given = bearer(req.headers()).map(str::to_string);
    let valid = |g: Option<&str>| matches!((token, g), (Some(t), Some(g)) if same(t, g));
    match access {
        Access::Open | Access::Push => {}
        Access::Read => {
            // The peer of the connection (`MockConnectInfo` stands in for it in tests).
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0)
                .or_else(|| {
                    req.extensions()
                        .get::<MockConnectInfo<SocketAddr>>()
                        .map(|c| c.0)
                });
            let loopback = peer.is_some_and(|p| p.ip().is_loopback());
            let ok = hub.options.open_read
                || valid(given.as_deref())
                || valid(query_token(req.uri()).as_deref())
                || (loopback && loopback_host(&req, &hub.options.allowed_hosts));
            if !ok {
                let message = if loopback {
                    "read access with this Host needs the bearer token: without it, only a loopback Host (localhost, 127.0.0.1, [::1]) or a name of --allowed-host is served"
                } else {
                    "read access from this address needs the bearer token (or start with --open-read)"
                };
                return ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
            }
        }
        Access::Write => {
            if token.is_none() {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "changes are disabled: start microscaler with --token or MICROSCALER_TOKEN",
                )
                .into_response();
            }
            if !valid(given.as_deref()) {
                return unauthorized(
                    "missing or wrong bearer token (Authorization: Bearer <token>)",
                );
            }
        }
    }
    next.run(req).await
}

/// A 401 with `message` that asks for a bearer token.
fn unauthorized(message: &str) -> Response {
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}
async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}
async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// Ready while ticks are recorded: the last one within 10 tick periods (10 s at least).
async fn readyz(State(hub): State<Arc<Hub>>) -> Response {
    let limit = (hub.setup().tick_ms * 10).max(10_000) as i64;
    match hub.latest() {
        Some(t) if now_ms() - t.ts <= limit => (StatusCode::OK, "ready\n").into_response(),
        Some(t) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the last tick was {} ms ago\n", now_ms() - t.ts),
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no tick yet\n").into_response(),
    }
}

async fn openapi() -> Response {
    asset("application/json", OPENAPI)
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    let mut sources = BTreeMap::new();
    for s in &hub.setup().services {
        for t in &s.triggers {
            sources.insert((s.name.clone(), t.name.clone()), t.source.clone());
        }
    }
    let text = hub
        .metrics
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .render(now_ms(), &sources);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn status(State(hub): State<Arc<Hub>>) -> Json<Value> {
    let latest = hub.latest();
    let setup = hub.setup();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "instance": setup.instance,
        "backend": setup.backend,
        "demo": setup.demo,
        "tick_ms": setup.tick_ms,
        "uptime_s": hub.started.elapsed().as_secs_f64(),
        "now": now_ms(),
        "writable": hub.options.token.is_some(),
        "last_tick": latest.as_deref(),
    }))
}

fn service_json(hub: &Hub, s: &ServiceInfo) -> Value {
    let latest = hub.latest();
    let state = latest
        .as_deref()
        .and_then(|t| t.services.iter().find(|x| x.name == s.name));
    json!({
        "name": s.name,
        "priority": s.priority,
        "kind": s.kind,
        "min": s.min,
        "max": s.max,
        "max_step": s.max_step,
        "triggers": s.triggers,
        "pool": { "size": s.pool_size, "preempt": s.preempt },
        "resources": s.resources,
        "paused": hub.control.paused(&s.name),
        "manual": hub.control.manual(&s.name),
        "override": hub.control.overriding(&s.name),
        "random": hub.control.random(&s.name),
        "state": state,
    })
}

async fn services(State(hub): State<Arc<Hub>>) -> Json<Value> {
    Json(Value::Array(
        hub.setup()
            .services
            .iter()
            .map(|s| service_json(&hub, s))
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeQuery {
    from: Option<i64>,
    to: Option<i64>,
    limit: Option<usize>,
    service: Option<String>,
}

impl RangeQuery {
    /// `(from, to, limit)` with defaults, or a 400.
    fn resolve(
        &self,
        default_span_ms: i64,
        default_limit: usize,
        max_limit: usize,
    ) -> Result<(i64, i64, usize), ApiError> {
        let to = self.to.unwrap_or_else(now_ms);
        if self.from.is_some_and(|f| f < 0) || to < 0 {
            return Err(ApiError::bad("from and to are Unix milliseconds >= 0"));
        }
        // The default span reaches back no further than 0: `to=0` is valid. A range whose
        // `from` is after its `to` is valid too, and empty (nothing is between them in the store).
        let from = self.from.unwrap_or((to - default_span_ms).max(0));
        let limit = self.limit.unwrap_or(default_limit);
        if limit == 0 || limit > max_limit {
            return Err(ApiError::bad(format!(
                "limit must be between 1 and {max_limit}, got {limit}"
            )));
        }
        Ok((from, to, limit))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

async fn history(
    State(hub): State<Arc<Hub>>,
    q: Result<Query<RangeQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = q?;
    if q.service.is_some() {
        return Err(ApiError::bad(
            "history has no service filter: every service is in each point",
        ));
    }
    let (from, to, limit) = q.resolve(10 * 60 * 1000, 1200, 10_000)?;
    let h = hub.clone();
    let points = blocking(move || h.store.history(from, to, limit)).await?;
    Ok(Json(json!({ "from": from, "to": to, "points": points })).into_response())
}

async fn decisions(
    State(hub): State<Arc<Hub>>,
    q: Result<Query<RangeQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = q?;
    let (from, to, limit) = q.resolve(24 * 3600 * 1000, 100, 1000)?;
    if let Some(s) = &q.service {
        known(&hub, s)?;
    }
    let h = hub.clone();
    let service = q.service.clone();
    let list = blocking(move || h.store.decisions(from, to, service.as_deref(), limit)).await?;
    Ok(Json(json!({ "from": from, "to": to, "decisions": list })).into_response())
}

async fn stream(State(hub): State<Arc<Hub>>) -> Response {
    let first = hub
        .latest()
        .map(|t| Arc::<str>::from(serde_json::to_string(&*t).unwrap_or_default()));
    let rx = hub.live.subscribe();
    let closing = hub.closing.subscribe();
    let events = futures::stream::unfold(
        (first, rx, closing),
        |(mut first, mut rx, mut closing)| async move {
            if let Some(f) = first.take() {
                let ev = Event::default().event("tick").data(&*f);
                return Some((Ok::<_, Infallible>(ev), (None, rx, closing)));
            }
            loop {
                if *closing.borrow() {
                    return None;
                }
                tokio::select! {
                    m = rx.recv() => match m {
                        Ok(json) => {
                            let ev = Event::default().event("tick").data(&*json);
                            return Some((Ok(ev), (None, rx, closing)));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    },
                    _ = closing.changed() => return None,
                }
            }
        },
    );
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The service called `name` in the setup (a copy: a reload may replace the setup).
fn known(hub: &Hub, name: &str) -> Result<ServiceInfo, ApiError> {
    hub.setup()
        .services
        .iter()
        .find(|s| s.name == name)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no service {name:?}")))
}

/// The `{name}` of a route's path; one that is not UTF-8 once decoded is a 400 in JSON.
struct Name(String);

impl<S: Send + Sync> FromRequestParts<S> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(name)) => Ok(Name(name)),
            Err(e) => Err(ApiError::bad(format!("invalid path: {}", e.body_text()))),
        }
    }
}

/// The `{name}` and `{trigger}` of a route's path (not UTF-8 once decoded: a 400 in JSON).
struct TriggerName(String, String);

impl<S: Send + Sync> FromRequestParts<S> for TriggerName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(String, String)>::from_request_parts(parts, state).await {
            Ok(Path((name, trigger))) => Ok(TriggerName(name, trigger)),
            Err(e) => Err(ApiError::bad(format!("invalid path: {}", e.body_text()))),
        }
    }
}

/// A JSON body that must be an object (serde would take an array for a struct's fields in
/// order), read into `T`: not JSON, or not an object, is a 400; wrong fields a 422.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<Value>::from_request(req, state).await?;
        if !value.is_object() {
            return Err(ApiError::bad(format!(
                "the body must be a JSON object, got {}",
                match value {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            )));
        }
        serde_json::from_value(value).map(Body).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("invalid body: {e}"),
            )
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemandBody {
    value: f64,
}

/// Largest manual demand accepted.
const MAX_DEMAND: f64 = 1_000_000.0;

async fn set_demand(
    State(hub): State<Arc<Hub>>,
    Name(name): Name,
    body: Result<Body<DemandBody>, ApiError>,
) -> ApiResult {
    let svc = known(&hub, &name)?;
    let Body(body) = body?;
    if !body.value.is_finite() || !(0.0..=MAX_DEMAND).contains(&body.value) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "value must be a number between 0 and {MAX_DEMAND}, got {}",
                body.value
            ),
        ));
    }
    if hub.control.manual(&name).is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name:?} has no manual trigger (add [[services.triggers]] type = \"manual\")"),
        ));
    }
    hub.control
        .set_manual(&name, body.value)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Json(service_json(&hub, &svc)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    value: f64,
}

/// Largest value a producer may push (integers stay exact in a double up to 2^53).
const MAX_PUSH: f64 = 1e12;

/// A producer pushes its trigger's value: with the operator's token, or the trigger's own
/// (which may do nothing else). Who may push is checked before anything about the trigger is
/// told, so a caller without a token learns nothing of the names.
async fn push_value(
    State(hub): State<Arc<Hub>>,
    TriggerName(name, trigger): TriggerName,
    headers: HeaderMap,
    body: Result<Body<PushBody>, ApiError>,
) -> ApiResult {
    let given = bearer(&headers);
    let operator = hub.options.token.as_deref();
    let own = hub.control.push_trigger(&name, &trigger);
    let own_token = own.as_ref().and_then(|t| t.as_deref());
    let matches = |t: Option<&str>| matches!((t, given), (Some(t), Some(g)) if same(t, g));
    if !matches(operator) && !matches(own_token) {
        if operator.is_none() && own_token.is_none() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "pushes are disabled here: give the trigger a token_file or token_env, or start microscaler with an API token",
            ));
        }
        return Ok(unauthorized(
            "missing or wrong bearer token: the API token or the trigger's push token (Authorization: Bearer <token>)",
        ));
    }
    if own.is_none() {
        known(&hub, &name)?;
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{name:?} has no push trigger {trigger:?} (add [[services.triggers]] type = \"push\" with name = {trigger:?})"),
        ));
    }
    let Body(body) = body?;
    if !body.value.is_finite() || !(0.0..=MAX_PUSH).contains(&body.value) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "value must be a number between 0 and {MAX_PUSH}, got {}",
                body.value
            ),
        ));
    }
    hub.control
        .push(&name, &trigger, body.value)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Json(json!({ "service": name, "trigger": trigger, "value": body.value })).into_response())
}

async fn clear_demand(State(hub): State<Arc<Hub>>, Name(name): Name) -> ApiResult {
    let svc = known(&hub, &name)?;
    if hub.control.manual(&name).is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name:?} has no manual trigger (add [[services.triggers]] type = \"manual\")"),
        ));
    }
    hub.control
        .clear_manual(&name)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Json(service_json(&hub, &svc)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RandomBody {
    #[serde(default, deserialize_with = "present")]
    delta: Option<serde_json::Number>,
    #[serde(default, deserialize_with = "present")]
    interval_ms: Option<serde_json::Number>,
}

/// An optional field that, when present, must be a number: `null` is not one (the OpenAPI
/// document says integer, and a client sending null meant something this API does not do).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Number>, D::Error> {
    serde_json::Number::deserialize(d).map(Some)
}

/// `field`'s value, a whole number within `range` (JSON Schema's integer: `8577.0` is one,
/// `8577.5` is not), or a 422 that says so.
fn whole(
    field: &str,
    value: Option<&serde_json::Number>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ApiError> {
    let Some(n) = value else {
        return Ok(None);
    };
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    let v = match n.as_u64() {
        Some(v) => v as f64,
        None => n.as_f64().unwrap_or(f64::NAN),
    };
    if v.fract() != 0.0 || !v.is_finite() {
        return Err(unprocessable(format!(
            "{field} must be a whole number, got {n}"
        )));
    }
    if v < *range.start() as f64 || v > *range.end() as f64 {
        return Err(unprocessable(format!(
            "{field} must be between {} and {}, got {n}",
            range.start(),
            range.end()
        )));
    }
    Ok(Some(v as u64))
}

async fn set_random(
    State(hub): State<Arc<Hub>>,
    Name(name): Name,
    body: Result<Body<RandomBody>, ApiError>,
) -> ApiResult {
    let svc = known(&hub, &name)?;
    let Body(body) = body?;
    let Some(current) = hub.control.random(&name) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name:?} has no random trigger"),
        ));
    };
    let delta = whole("delta", body.delta.as_ref(), 0..=1000)?;
    let interval_ms = whole("interval_ms", body.interval_ms.as_ref(), 100..=3_600_000)?;
    let new = RandomState {
        delta: delta.map_or(current.delta, |d| d as u32),
        interval_ms: interval_ms.unwrap_or(current.interval_ms),
    };
    hub.control
        .set_random(&name, new)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Json(service_json(&hub, &svc)).into_response())
}

async fn pause(State(hub): State<Arc<Hub>>, Name(name): Name) -> ApiResult {
    let svc = known(&hub, &name)?;
    hub.control.set_paused(&name, true);
    Ok(Json(service_json(&hub, &svc)).into_response())
}

async fn resume(State(hub): State<Arc<Hub>>, Name(name): Name) -> ApiResult {
    let svc = known(&hub, &name)?;
    hub.control.set_paused(&name, false);
    Ok(Json(service_json(&hub, &svc)).into_response())
}
