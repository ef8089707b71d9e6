//! The HTTP client the HTTP-based sources share: connect and read timeouts on every request,
//! no proxy from the environment, and errors that name the server.

use std::time::Duration;

use crate::SourceError;

/// A GET-only HTTP client for one source.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    /// Source description used in errors (`rabbitmq queue jobs at http://...`).
    pub(crate) name: String,
}

impl Http {
    /// A client whose every request connects within `timeout` and completes within it.
    pub(crate) fn new(name: String, timeout: Duration) -> Result<Self, SourceError> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .no_proxy()
            .user_agent(concat!("microscaler/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SourceError::Failed {
                source_name: name.clone(),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Http { client, name })
    }

    pub(crate) fn failed(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Failed {
            source_name: self.name.clone(),
            reason: reason.into(),
        }
    }

    pub(crate) fn garbage(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Garbage {
            source_name: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// GETs `url` and returns the body of a 2xx answer. `auth` is (user, password).
    pub(crate) async fn get(
        &self,
        url: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<String, SourceError> {
        let mut req = self.client.get(url);
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.failed(describe(url, &e)))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| self.failed(format!("reading the answer of {url}: {}", chain(&e))))?;
        if !status.is_success() {
            let mut snippet: String = body.chars().take(200).collect();
            if snippet.len() < body.len() {
                snippet.push_str("...");
            }
            return Err(self.failed(format!("GET {url} answered {status}: {snippet}")));
        }
        Ok(body)
    }

    /// GETs `url` and parses its body as JSON (a non-JSON body is garbage).
    pub(crate) async fn get_json(
        &self,
        url: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<serde_json::Value, SourceError> {
        let body = self.get(url, auth).await?;
        serde_json::from_str(&body).map_err(|e| {
            let snippet: String = body.chars().take(80).collect();
            self.garbage(format!("GET {url} did not answer JSON ({e}): {snippet:?}"))
        })
    }
}

fn describe(url: &str, e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("GET {url}: no answer within the timeout")
    } else if e.is_connect() {
        format!(
            "cannot connect to {url}: {}: is the server running and listening there?",
            chain(e)
        )
    } else {
        format!("GET {url}: {}", chain(e))
    }
}

/// The error with its causes, `a: b: c` (reqwest's own message alone says little).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A JSON number, or a string holding one (Prometheus sends values as strings). Anything else
/// is `None`.
pub(crate) fn json_number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}
