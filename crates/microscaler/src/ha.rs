//! High availability off Kubernetes (`[ha]`): several microscalers of one instance share a lease
//! in etcd, and only its holder acts.
//!
//! Every `retry_period` each candidate keeps its etcd lease alive (or is granted a new one
//! when it expired) and campaigns: one transaction puts the election's key with its name and
//! lease when the key does not exist, or else reads who holds it. The key goes with the
//! holder's lease, so etcd deletes it `ttl` after the holder's last renewal reached it, and
//! only then may another candidate's transaction win (etcd serialises them: two can never both
//! win).
//!
//! A holder acts only while its last successful renewal, counted from the moment it *sent* it
//! on its own monotonic clock, is younger than `renew_deadline` (< `ttl`). etcd counts the
//! lease from when the renewal reached it, later than it was sent, so a holder that cannot
//! reach etcd, or is frozen (SIGSTOP, a stalled VM) and thawed, has stopped acting before
//! anyone else can win, without trusting any clock but its own. It starts again only after a
//! round that finds it still holds the key.
//!
//! The calls are etcd's v3 JSON gateway (`/v3/lease/grant`, `/v3/lease/keepalive`,
//! `/v3/kv/txn`, `/v3/lease/revoke`), which every etcd since 3.3 serves on its client port.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use microscaler_core::config::HaSpec;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{info, warn};

/// Why a round could not tell.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// No endpoint answered.
    #[error(
        "etcd at {endpoint} cannot be reached ({source}); is etcd running there? check [ha] etcd"
    )]
    Unreachable {
        /// The last endpoint tried.
        endpoint: String,
        /// What the HTTP client said.
        source: reqwest::Error,
    },
    /// An endpoint answered with an error.
    #[error("etcd at {endpoint} answered {path} with {status}: {body}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The call.
        path: &'static str,
        /// The HTTP status.
        status: u16,
        /// etcd's error.
        body: String,
    },
}

#[derive(Default)]
struct State {
    /// The lease this candidate holds in etcd, if it was granted one that may still be alive.
    lease: Option<i64>,
    /// When the last round that found this candidate holding the key was sent.
    renewed: Option<Instant>,
    /// The endpoint that answered last.
    endpoint: usize,
    /// Whether the last round ended leading (for the transitions' log lines).
    was_leader: bool,
    /// Whether the last round failed (logged once until one succeeds).
    failing: bool,
}

/// One candidate of the election.
pub struct EtcdElector {
    http: reqwest::Client,
    spec: HaSpec,
    identity: String,
    state: Mutex<State>,
}

/// The name a candidate puts in the key when `[ha] identity` is not set: its host name and
/// process id.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

impl EtcdElector {
    /// A candidate for the election of `spec`.
    pub fn new(spec: HaSpec) -> Arc<EtcdElector> {
        let identity = spec.identity.clone().unwrap_or_else(default_identity);
        // A call that takes longer than a third of the deadline is a failed round: a
        // holder then has other tries before it must stop acting.
        let timeout = (spec.renew_deadline / 3).max(Duration::from_millis(50));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_default();
        Arc::new(EtcdElector {
            http,
            spec,
            identity,
            state: Mutex::new(State::default()),
        })
    }

    /// This candidate's name in the key.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this candidate may act now.
    pub fn leading(&self) -> bool {
        self.lock()
            .renewed
            .is_some_and(|t| t.elapsed() < self.spec.renew_deadline)
    }

    /// Takes or renews the lease every `retry_period`, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            let sent = Instant::now();
            let result = self.round().await;
            let leading = {
                let mut st = self.lock();
                match &result {
                    Ok(true) => st.renewed = Some(sent),
                    Ok(false) => st.renewed = None,
                    Err(_) => {}
                }
                st.renewed
                    .is_some_and(|t| t.elapsed() < self.spec.renew_deadline)
            };
            self.log(&result, leading);
            tokio::time::sleep(self.spec.retry_period).await;
        }
    }

    fn log(&self, result: &Result<bool, HaError>, leading: bool) {
        let key = &self.spec.key;
        let (was, failed) = {
            let mut st = self.lock();
            let was = std::mem::replace(&mut st.was_leader, leading);
            let failed = std::mem::replace(&mut st.failing, result.is_err());
            (was, failed)
        };
        match result {
            Err(e) if !failed => warn!(
                key = %key, error = %e,
                "cannot reach etcd for the election; a leader stops acting {} after its last renewal",
                humantime::format_duration(self.spec.renew_deadline)
            ),
            Ok(_) if failed => info!(key = %key, "etcd answers again"),
            _ => {}
        }
        if leading && !was {
            info!(key = %key, identity = %self.identity, "leading: this microscaler acts");
        } else if !leading && was {
            warn!(key = %key, identity = %self.identity, "no longer leading: this microscaler observes and changes nothing");
        }
    }

    /// Gives the lease up (at shutdown): the key goes with it, so another candidate takes
    /// over at its next round instead of after `ttl`.
    pub async fn release(&self) {
        let lease = {
            let mut st = self.lock();
            st.renewed = None;
            st.lease.take()
        };
        if let Some(id) = lease {
            match self
                .call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
                .await
            {
                Ok(_) => info!(key = %self.spec.key, "released the etcd lease"),
                Err(e) => {
                    warn!(key = %self.spec.key, error = %e, "could not release the etcd lease; the others take over when it expires")
                }
            }
        }
    }

    /// One round: `Ok(true)` when this candidate holds the key now.
    async fn round(&self) -> Result<bool, HaError> {
        let held = self.lock().lease;
        let lease = match held {
            Some(id) if self.keep_alive(id).await? => id,
            _ => {
                self.lock().lease = None;
                let granted = self
                    .call("/v3/lease/grant", json!({ "TTL": self.spec.ttl.as_secs() }))
                    .await?;
                let id =
                    int(&granted["ID"]).ok_or_else(|| self.odd("/v3/lease/grant", &granted))?;
                self.lock().lease = Some(id);
                id
            }
        };
        let key = b64(self.spec.key.as_bytes());
        let answer = self
            .call(
                "/v3/kv/txn",
                json!({
                    "compare": [{ "key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
                    "success": [{ "request_put": { "key": key, "value": b64(self.identity.as_bytes()), "lease": lease.to_string() } }],
                    "failure": [{ "request_range": { "key": key } }],
                }),
            )
            .await?;
        if answer["succeeded"].as_bool() == Some(true) {
            return Ok(true);
        }
        // Someone holds the key: this candidate, when it is its name on its live lease.
        let holder = &answer["responses"][0]["response_range"]["kvs"][0];
        let mine = holder["value"]
            .as_str()
            .and_then(unb64)
            .is_some_and(|v| v == self.identity.as_bytes())
            && int(&holder["lease"]) == Some(lease);
        Ok(mine)
    }

    /// Renews lease `id`; false when it has expired.
    async fn keep_alive(&self, id: i64) -> Result<bool, HaError> {
        let answer = self
            .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))
            .await?;
        Ok(int(&answer["result"]["TTL"]).is_some_and(|ttl| ttl > 0))
    }

    fn odd(&self, path: &'static str, answer: &Value) -> HaError {
        HaError::Refused {
            endpoint: self.spec.endpoints[self.lock().endpoint].clone(),
            path,
            status: 200,
            body: format!("unexpected answer {answer}"),
        }
    }

    /// POSTs `body` to `path` on the endpoint that answered last, then on the others in turn.
    async fn call(&self, path: &'static str, body: Value) -> Result<Value, HaError> {
        let n = self.spec.endpoints.len();
        let first = self.lock().endpoint;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let endpoint = &self.spec.endpoints[i];
            let url = format!("{}{path}", endpoint.trim_end_matches('/'));
            match self.http.post(&url).json(&body).send().await {
                Ok(r) => {
                    self.lock().endpoint = i;
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    if !(200..300).contains(&status) {
                        return Err(HaError::Refused {
                            endpoint: endpoint.clone(),
                            path,
                            status,
                            body: text,
                        });
                    }
                    return serde_json::from_str(&text).map_err(|_| HaError::Refused {
                        endpoint: endpoint.clone(),
                        path,
                        status,
                        body: format!("not JSON: {text}"),
                    });
                }
                Err(e) => {
                    last = Some(HaError::Unreachable {
                        endpoint: endpoint.clone(),
                        source: e,
                    })
                }
            }
        }
        Err(last.expect("[ha] etcd has at least one endpoint (validated)"))
    }
}

/// etcd's JSON gateway writes 64-bit integers as strings.
fn int(v: &Value) -> Option<i64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as the gateway writes bytes.
fn b64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The inverse of [`b64`]; `None` for text that is not base64.
fn unb64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_etcd_writes_it() {
        // From etcd's own answers: the key "/k" and the value "me".
        assert_eq!(b64(b"/k"), "L2s=");
        assert_eq!(b64(b"me"), "bWU=");
        for s in [
            "",
            "a",
            "ab",
            "abc",
            "/microscaler/default/leader",
            "host-1234",
        ] {
            assert_eq!(unb64(&b64(s.as_bytes())).as_deref(), Some(s.as_bytes()));
        }
        assert_eq!(unb64("no!"), None);
    }
}
