//! A fault-injecting HTTP proxy: it forwards every request to a real API (moto server, for the
//! ECS tests) and, when told, answers the next requests of an AWS operation with a fault
//! instead: `ThrottlingException` ("Rate exceeded", as ECS throttles) or a 5xx. Requests are
//! counted per operation, so a test also sees how many calls a backend made.
//!
//! The operation of a request is what its `X-Amz-Target` header names after the dot
//! (`AmazonEC2ContainerServiceV20141113.UpdateService` is `UpdateService`, the JSON
//! protocols), else its `Action` query or form parameter (the query protocols).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

/// What the proxy answers instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 400 with ECS's throttling error: `{"__type": "ThrottlingException", "message":
    /// "Rate exceeded"}`, `x-amzn-ErrorType: ThrottlingException`.
    Throttle,
    /// This 5xx status with `{"__type": "ServerException", ...}`.
    ServerError(u16),
}

#[derive(Default)]
struct Book {
    /// Faults still to serve, per operation (`*`: any), in order.
    pending: HashMap<String, Vec<Fault>>,
    seen: HashMap<String, Vec<Instant>>,
    faulted: HashMap<String, u32>,
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    book: Mutex<Book>,
}

/// The proxy, listening on 127.0.0.1; stopped when dropped.
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
    /// Starts on a free port of 127.0.0.1, forwarding to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
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

    /// The next `times` requests of `operation` (`*`: of any operation) get `fault`.
    pub fn inject(&self, operation: &str, fault: Fault, times: u32) {
        let mut book = self.shared.book.lock().unwrap_or_else(|e| e.into_inner());
        let queue = book.pending.entry(operation.to_string()).or_default();
        queue.extend(std::iter::repeat_n(fault, times as usize));
    }

    /// Requests of `operation` seen so far, forwarded or faulted.
    pub fn seen(&self, operation: &str) -> u32 {
        self.times(operation).len() as u32
    }

    /// When each request of `operation` came, in order.
    pub fn times(&self, operation: &str) -> Vec<Instant> {
        let book = self.shared.book.lock().unwrap_or_else(|e| e.into_inner());
        book.seen.get(operation).cloned().unwrap_or_default()
    }

    /// Faults served for `operation` so far.
    pub fn faulted(&self, operation: &str) -> u32 {
        let book = self.shared.book.lock().unwrap_or_else(|e| e.into_inner());
        book.faulted.get(operation).copied().unwrap_or(0)
    }
}

/// The AWS operation of a request: `X-Amz-Target`'s part after the dot, else `Action=` in the
/// query or the form body.
fn operation(target: Option<&str>, query: &str, body: &[u8]) -> String {
    if let Some(t) = target {
        return t.rsplit('.').next().unwrap_or(t).to_string();
    }
    let form = std::str::from_utf8(body).unwrap_or("");
    for pairs in [query, form] {
        for pair in pairs.split('&') {
            if let Some(action) = pair.strip_prefix("Action=") {
                return action.to_string();
            }
        }
    }
    String::new()
}

fn fault_response(fault: Fault) -> Response {
    let (status, kind, message) = match fault {
        Fault::Throttle => (400, "ThrottlingException", "Rate exceeded".to_string()),
        Fault::ServerError(code) => (
            code,
            "ServerException",
            format!("injected {code} by the fault proxy"),
        ),
    };
    let body = serde_json::json!({"__type": kind, "message": message}).to_string();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let headers = resp.headers_mut();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    headers.insert("x-amzn-errortype", HeaderValue::from_static(kind));
    headers.insert(
        "x-amzn-requestid",
        HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
    );
    resp
}

async fn forward(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = to_bytes(body, 64 << 20).await.unwrap_or_default();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok());
    let query = parts.uri.query().unwrap_or("");
    let op = operation(target, query, &body);
    let fault = {
        let mut book = sh.book.lock().unwrap_or_else(|e| e.into_inner());
        book.seen
            .entry(op.clone())
            .or_default()
            .push(Instant::now());
        let mut take = |key: &str| {
            let q = book.pending.get_mut(key)?;
            (!q.is_empty()).then(|| q.remove(0))
        };
        let fault = take(&op).or_else(|| take("*"));
        if fault.is_some() {
            *book.faulted.entry(op.clone()).or_default() += 1;
        }
        fault
    };
    if let Some(f) = fault {
        return fault_response(f);
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut out = sh.http.request(
        parts.method.clone(),
        format!("{}{path_and_query}", sh.upstream),
    );
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            out = out.header(name, value);
        }
    }
    let answer = match out.body(body).send().await {
        Ok(a) => a,
        Err(e) => {
            let mut resp = Response::new(Body::from(format!("fault proxy: upstream: {e}")));
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            return resp;
        }
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap_or_default();
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    for (name, value) in &headers {
        if name == "content-length" || name == "transfer-encoding" || name == "connection" {
            continue;
        }
        if let Ok(n) = HeaderName::from_bytes(name.as_str().as_bytes()) {
            resp.headers_mut().append(n, value.clone());
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes the method, path, a header and the body.
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

    async fn call(proxy: &FaultProxy, op: &str) -> (u16, String, Option<String>) {
        let resp = reqwest::Client::new()
            .post(format!("{}/v1?x=1", proxy.address()))
            .header(
                "X-Amz-Target",
                format!("AmazonEC2ContainerServiceV20141113.{op}"),
            )
            .body("{\"a\":1}")
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let kind = resp
            .headers()
            .get("x-amzn-errortype")
            .map(|v| v.to_str().unwrap().to_string());
        (status, resp.text().await.unwrap(), kind)
    }

    #[tokio::test]
    async fn forwards_faithfully_and_injects_faults_per_operation() {
        let (upstream, _echo) = echo().await;
        let proxy = FaultProxy::start(&upstream).await;
        let (status, body, kind) = call(&proxy, "DescribeServices").await;
        assert_eq!(status, 201);
        assert_eq!(
            body,
            "POST /v1?x=1 AmazonEC2ContainerServiceV20141113.DescribeServices {\"a\":1}"
        );
        assert_eq!(kind, None);

        proxy.inject("UpdateService", Fault::Throttle, 2);
        for _ in 0..2 {
            let (status, body, kind) = call(&proxy, "UpdateService").await;
            assert_eq!(status, 400);
            assert!(
                body.contains("\"__type\":\"ThrottlingException\"")
                    && body.contains("Rate exceeded"),
                "{body}"
            );
            assert_eq!(kind.as_deref(), Some("ThrottlingException"));
            assert_eq!(call(&proxy, "DescribeServices").await.0, 201);
        }
        assert_eq!(call(&proxy, "UpdateService").await.0, 201, "then forwarded");

        proxy.inject("*", Fault::ServerError(503), 1);
        let (status, _, kind) = call(&proxy, "ListContainerInstances").await;
        assert_eq!((status, kind.as_deref()), (503, Some("ServerException")));
        assert_eq!(call(&proxy, "ListContainerInstances").await.0, 201);

        assert_eq!(proxy.seen("UpdateService"), 3);
        assert_eq!(proxy.faulted("UpdateService"), 2);
        assert_eq!(proxy.seen("DescribeServices"), 3);
        assert_eq!(proxy.faulted("DescribeServices"), 0);
        assert_eq!(proxy.faulted("ListContainerInstances"), 1);
        assert_eq!(proxy.times("UpdateService").len(), 3);
    }

    #[test]
    fn operations_come_from_the_target_or_the_action() {
        assert_eq!(
            operation(Some("AmazonSQS.ReceiveMessage"), "", b""),
            "ReceiveMessage"
        );
        assert_eq!(
            operation(None, "", b"Action=RunInstances&Version=1"),
            "RunInstances"
        );
        assert_eq!(operation(None, "Action=ListQueues", b""), "ListQueues");
        assert_eq!(operation(None, "", b""), "");
    }
}
