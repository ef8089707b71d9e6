//! A fault-injecting HTTP proxy: it forwards every request to a real API (moto server, for the
//! ECS tests) and, when told, answers the next requests of an AWS operation with a fault
//! instead: `ThrottlingException` ("Rate exceeded", as ECS throttles) or a 5xx. Requests are
//! counted and timed per operation, so a test also sees how many calls a backend made and how
//! far apart its retries were.
//!
//! The operation of a request is what its `X-Amz-Target` header names after the dot
//! (`AmazonEC2ContainerServiceV20141113.UpdateService` is `UpdateService`: the JSON
//! protocols), else its `Action` query parameter or form field (the query protocols); a
//! request with neither counts under the empty operation `""`.
//!
//! Faults follow the awsJson1_1 error shape: the code in the `x-amzn-ErrorType` header (which
//! the AWS SDK for Rust reads first) and in the body's `__type`, the text in `message`. The
//! SDK's standard retry strategy counts `ThrottlingException` as throttling and 5xx as
//! transient, and retries both; a client with retries off sees the first fault.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

/// What the proxy answers instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 400 with ECS's throttling error: body `{"__type": "ThrottlingException", "message":
    /// "Rate exceeded"}`, headers `x-amzn-ErrorType: ThrottlingException` and `content-type:
    /// application/x-amz-json-1.1`.
    Throttle,
    /// This status (meant for a 5xx; an invalid code becomes 500) with body `{"__type":
    /// "ServerException", "message": ...}` and `x-amzn-ErrorType: ServerException`.
    ServerError(u16),
}

#[derive(Default)]
struct Book {
    /// Faults still to serve, per operation (`*`: any), in order.
    pending: HashMap<String, VecDeque<Fault>>,
    /// When each request came, per operation.
    seen: HashMap<String, Vec<Instant>>,
    faulted: HashMap<String, u32>,
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    book: Mutex<Book>,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The proxy, listening on 127.0.0.1 until [`FaultProxy::stop`] or dropped.
pub struct FaultProxy {
    address: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts on a free port of 127.0.0.1, forwarding every request (method, path, query,
    /// headers but `Host` and the hop-by-hop ones, body) to `upstream` (`http://host:port`) and
    /// answering with the upstream's status, headers and body (502 when the upstream cannot be
    /// reached). Redirects are passed back, not followed; no system proxy is used.
    pub async fn start(upstream: &str) -> FaultProxy {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("the fault proxy's HTTP client");
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            http,
            book: Mutex::new(Book::default()),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let address = format!("http://{}", listener.local_addr().expect("its address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy {
            address,
            shared,
            task,
        }
    }

    /// Where to point a client: `http://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// The next `times` requests of `operation` (`"*"`: of any operation) get `fault` instead
    /// of being forwarded. Injections add up, served in order; a request takes a fault of its
    /// own operation before one of `"*"`.
    pub fn inject(&self, operation: &str, fault: Fault, times: u32) {
        let mut book = self.shared.book();
        let queue = book.pending.entry(operation.to_string()).or_default();
        queue.extend(std::iter::repeat_n(fault, times as usize));
    }

    /// Requests of `operation` seen so far, forwarded or faulted.
    pub fn seen(&self, operation: &str) -> u32 {
        self.shared
            .book()
            .seen
            .get(operation)
            .map_or(0, |t| t.len() as u32)
    }

    /// Faults served for `operation` so far.
    pub fn faulted(&self, operation: &str) -> u32 {
        self.shared
            .book()
            .faulted
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    /// When each request of `operation` came, in order (tokio's clock, so virtual time under a
    /// paused clock): the gaps are a client's backoff between retries.
    pub fn times(&self, operation: &str) -> Vec<Instant> {
        self.shared
            .book()
            .seen
            .get(operation)
            .cloned()
            .unwrap_or_default()
    }

    /// Stops serving: new connections are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// The AWS operation of a request: `X-Amz-Target`'s part after the dot, else `Action=` in the
/// query or, for a form, in the body.
fn operation(headers: &HeaderMap, query: &str, body: &[u8]) -> String {
    if let Some(t) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        return t.rsplit('.').next().unwrap_or(t).to_string();
    }
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    let body = if form {
        std::str::from_utf8(body).unwrap_or("")
    } else {
        ""
    };
    [query, body]
        .iter()
        .flat_map(|pairs| pairs.split('&'))
        .find_map(|pair| pair.strip_prefix("Action="))
        .unwrap_or("")
        .to_string()
}

fn fault_response(fault: Fault) -> Response {
    let (status, kind, message) = match fault {
        Fault::Throttle => (
            StatusCode::BAD_REQUEST,
            "ThrottlingException",
            "Rate exceeded".to_string(),
        ),
        Fault::ServerError(code) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "ServerException",
            format!("Injected HTTP {code} by the fault proxy"),
        ),
    };
    let body = serde_json::json!({"__type": kind, "message": message}).to_string();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    headers.insert("x-amzn-errortype", HeaderValue::from_static(kind));
    headers.insert(
        "x-amzn-requestid",
        HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
    );
    resp
}

/// Headers that describe one connection or one encoding of the body, not the message:
/// never copied across the proxy (the body is passed whole).
fn hop_by_hop(name: &HeaderName) -> bool {
    name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name == header::CONNECTION
        || name == "keep-alive"
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
}

fn bad_gateway(text: String) -> Response {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

async fn forward(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = match to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return bad_gateway(format!("fault proxy: reading the request: {e}")),
    };
    let op = operation(&parts.headers, parts.uri.query().unwrap_or(""), &body);
    let fault = {
        let mut book = sh.book();
        let now = tokio::time::Instant::now().into_std();
        book.seen.entry(op.clone()).or_default().push(now);
        let mut take = |key: &str| book.pending.get_mut(key)?.pop_front();
        let fault = take(&op).or_else(|| take("*"));
        if fault.is_some() {
            *book.faulted.entry(op).or_default() += 1;
        }
        fault
    };
    if let Some(f) = fault {
        return fault_response(f);
    }
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = sh
        .http
        .request(parts.method, format!("{}{path_and_query}", sh.upstream));
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    let answer = match out.body(body).send().await {
        Ok(a) => a,
        Err(e) => return bad_gateway(format!("fault proxy: upstream: {e}")),
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = match answer.bytes().await {
        Ok(b) => b,
        Err(e) => return bad_gateway(format!("fault proxy: upstream's body: {e}")),
    };
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    for (name, value) in &headers {
        if !hop_by_hop(name) {
            resp.headers_mut().append(name, value.clone());
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers 201 with the method, path and query, `X-Amz-Target` and body
    /// it got, and a header `x-echo: yes`.
    async fn echo() -> (String, tokio::task::JoinHandle<()>) {
        let app = axum::Router::new().fallback(|req: Request| async move {
            let (parts, body) = req.into_parts();
            let body = to_bytes(body, 1 << 20).await.unwrap_or_default();
            let text = format!(
                "{} {} {} {}",
                parts.method,
                parts.uri,
                parts
                    .headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-"),
                String::from_utf8_lossy(&body)
            );
            let mut resp = Response::new(Body::from(text));
            *resp.status_mut() = StatusCode::CREATED;
            resp.headers_mut()
                .insert("x-echo", HeaderValue::from_static("yes"));
            resp
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (address, task)
    }

    struct Answer {
        status: u16,
        body: String,
        error_type: Option<String>,
        content_type: Option<String>,
        echo: Option<String>,
    }

    async fn call(proxy: &FaultProxy, op: &str) -> Answer {
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/x?y=1", proxy.address()))
            .header(
                "X-Amz-Target",
                format!("AmazonEC2ContainerServiceV20141113.{op}"),
            )
            .body("{\"a\":1}")
            .send()
            .await
            .unwrap();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        Answer {
            status: resp.status().as_u16(),
            error_type: header("x-amzn-errortype"),
            content_type: header("content-type"),
            echo: header("x-echo"),
            body: resp.text().await.unwrap(),
        }
    }

    #[tokio::test]
    async fn forwards_faithfully() {
        let (upstream, _echo) = echo().await;
        let proxy = FaultProxy::start(&upstream).await;
        let a = call(&proxy, "DescribeServices").await;
        assert_eq!(a.status, 201);
        assert_eq!(
            a.body,
            "POST /v1/x?y=1 AmazonEC2ContainerServiceV20141113.DescribeServices {\"a\":1}"
        );
        assert_eq!(a.echo.as_deref(), Some("yes"));
        assert_eq!(a.error_type, None);
        let got = reqwest::Client::new()
            .get(format!("{}/?Action=ListQueues&Version=1", proxy.address()))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status().as_u16(), 201);
        assert_eq!(
            got.text().await.unwrap(),
            "GET /?Action=ListQueues&Version=1 - "
        );
        assert_eq!(proxy.seen("DescribeServices"), 1);
        assert_eq!(proxy.seen("ListQueues"), 1);
        assert_eq!(proxy.faulted("DescribeServices"), 0);

        proxy.stop();
        tokio::task::yield_now().await;
        assert!(
            reqwest::Client::new()
                .get(proxy.address())
                .send()
                .await
                .is_err(),
            "stopped"
        );
    }

    #[tokio::test]
    async fn throttles_only_the_operation_and_only_so_many_times() {
        let (upstream, _echo) = echo().await;
        let proxy = FaultProxy::start(&upstream).await;
        proxy.inject("UpdateService", Fault::Throttle, 2);
        for _ in 0..2 {
            let a = call(&proxy, "UpdateService").await;
            assert_eq!(a.status, 400);
            let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"__type": "ThrottlingException", "message": "Rate exceeded"})
            );
            assert_eq!(a.error_type.as_deref(), Some("ThrottlingException"));
            assert_eq!(
                a.content_type.as_deref(),
                Some("application/x-amz-json-1.1")
            );
            assert_eq!(a.echo, None, "not forwarded");
            assert_eq!(call(&proxy, "DescribeServices").await.status, 201);
        }
        let a = call(&proxy, "UpdateService").await;
        assert_eq!(
            (a.status, a.echo.as_deref()),
            (201, Some("yes")),
            "then forwarded"
        );

        assert_eq!(proxy.seen("UpdateService"), 3);
        assert_eq!(proxy.faulted("UpdateService"), 2);
        assert_eq!(proxy.seen("DescribeServices"), 2);
        assert_eq!(proxy.faulted("DescribeServices"), 0);
        let times = proxy.times("UpdateService");
        assert_eq!(times.len(), 3);
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
    }

    #[tokio::test]
    async fn serves_server_errors_for_one_operation_or_any() {
        let (upstream, _echo) = echo().await;
        let proxy = FaultProxy::start(&upstream).await;
        proxy.inject("UpdateService", Fault::ServerError(503), 2);
        for _ in 0..2 {
            let a = call(&proxy, "UpdateService").await;
            assert_eq!(a.status, 503);
            assert_eq!(a.error_type.as_deref(), Some("ServerException"));
            let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
            assert_eq!(body["__type"], "ServerException");
            assert!(body["message"].is_string());
            assert_eq!(call(&proxy, "ListServices").await.status, 201);
        }
        assert_eq!(call(&proxy, "UpdateService").await.status, 201);

        proxy.inject("*", Fault::ServerError(500), 1);
        proxy.inject("ListServices", Fault::Throttle, 1);
        // Its own operation's fault first, then the one for any.
        assert_eq!(call(&proxy, "ListServices").await.status, 400);
        assert_eq!(call(&proxy, "ListServices").await.status, 500);
        assert_eq!(call(&proxy, "ListServices").await.status, 201);
        assert_eq!(call(&proxy, "UpdateService").await.status, 201);

        assert_eq!(
            (proxy.seen("UpdateService"), proxy.faulted("UpdateService")),
            (4, 2)
        );
        assert_eq!(
            (proxy.seen("ListServices"), proxy.faulted("ListServices")),
            (5, 2)
        );
    }

    #[test]
    fn operations_come_from_the_target_or_the_action() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-amz-target",
            HeaderValue::from_static("AmazonSQS.ReceiveMessage"),
        );
        assert_eq!(operation(&h, "", b""), "ReceiveMessage");
        let mut form = HeaderMap::new();
        form.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        assert_eq!(
            operation(&form, "", b"Action=RunInstances&Version=1"),
            "RunInstances"
        );
        let none = HeaderMap::new();
        assert_eq!(
            operation(&none, "", b"Action=RunInstances"),
            "",
            "not a form"
        );
        assert_eq!(operation(&none, "Action=ListQueues", b""), "ListQueues");
        assert_eq!(operation(&none, "", b""), "");
    }

    /// The AWS SDK reads the faults as ECS's: `ThrottlingException` is a throttling error it
    /// retries (and, with retries off, returns), a 5xx is retried too.
    #[cfg(feature = "ecs")]
    #[tokio::test]
    async fn the_aws_sdk_sees_ecs_throttling() {
        use aws_sdk_ecs::config::retry::RetryConfig;
        use aws_sdk_ecs::config::{BehaviorVersion, Credentials, Region};
        use aws_sdk_ecs::error::ProvideErrorMetadata;

        // An upstream that answers every call with an empty JSON object (a valid
        // UpdateService output).
        let app = axum::Router::new().fallback(|| async {
            let mut resp = Response::new(Body::from("{}"));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-amz-json-1.1"),
            );
            resp
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = format!("http://{}", listener.local_addr().unwrap());
        let _server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let proxy = FaultProxy::start(&upstream).await;
        let client = |retry: RetryConfig| {
            aws_sdk_ecs::Client::from_conf(
                aws_sdk_ecs::Config::builder()
                    .behavior_version(BehaviorVersion::latest())
                    .region(Region::new("us-east-1"))
                    .credentials_provider(Credentials::new("testing", "testing", None, None, "t"))
                    .endpoint_url(proxy.address())
                    .retry_config(retry)
                    .build(),
            )
        };

        proxy.inject("UpdateService", Fault::Throttle, 1);
        let err = client(RetryConfig::disabled())
            .update_service()
            .cluster("c")
            .service("s")
            .desired_count(1)
            .send()
            .await
            .expect_err("throttled");
        assert_eq!(err.code(), Some("ThrottlingException"));
        assert_eq!(err.message(), Some("Rate exceeded"));

        let retrying = client(
            RetryConfig::standard()
                .with_max_attempts(4)
                .with_initial_backoff(std::time::Duration::from_millis(20)),
        );
        proxy.inject("UpdateService", Fault::Throttle, 2);
        proxy.inject("UpdateService", Fault::ServerError(503), 1);
        retrying
            .update_service()
            .cluster("c")
            .service("s")
            .desired_count(1)
            .send()
            .await
            .expect("retried through");
        assert_eq!(proxy.seen("UpdateService"), 5);
        assert_eq!(proxy.faulted("UpdateService"), 4);
        let times = proxy.times("UpdateService");
        assert!(
            times[1..].windows(2).all(|w| w[1] > w[0]),
            "backed off: {times:?}"
        );
    }
}
