//! `microscaler status` and `microscaler explain SERVICE`: a running daemon's state and the
//! reasons of its decisions, read from its API (`/api/v1/status`, `/api/v1/services`,
//! `/api/v1/decisions`), printed for people as `kubectl describe` does.
//!
//! The text is built by pure functions of the API's answers ([`status_text`],
//! [`explain_text`]), so what is printed is tested without a daemon.

use std::fmt::Write as _;
use std::time::Duration;

use microscaler_server::model::Decision;
use microscaler_server::Tick;
use serde_json::Value;

/// Where the daemon's API is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct Api {
    /// `http://host:port`, no trailing slash.
    pub address: String,
    /// The bearer token (needed only from a non-loopback address without `--open-read`).
    pub token: Option<String>,
}

/// Why reading the API failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// No answer at all.
    #[error(
        "cannot reach microscaler's API at {address}: {reason}; is `microscaler run` (or `demo`) \
         running with its server there? Give its address with --address (or MICROSCALER_ADDRESS)"
    )]
    Unreachable {
        /// The address tried.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// A 401: the read needs the token.
    #[error(
        "microscaler's API at {address} refused the read (401): from this address it needs the \
         token: --token-file FILE or MICROSCALER_TOKEN (or run the daemon with --open-read)"
    )]
    Unauthorized {
        /// The address tried.
        address: String,
    },
    /// Another answer than 200, or one that is not what the API documents.
    #[error("microscaler's API at {address}: {message}")]
    Api {
        /// The address tried.
        address: String,
        /// What it answered.
        message: String,
    },
}

impl Api {
    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, InspectError> {
        let url = format!("{}{path}", self.address);
        let mut req = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| self.unreachable(e))?
            .get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(InspectError::Unauthorized {
                address: self.address.clone(),
            });
        }
        let body = resp.text().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            let said = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            return Err(InspectError::Api {
                address: self.address.clone(),
                message: format!("GET {path}: {status}: {said}"),
            });
        }
        serde_json::from_str(&body).map_err(|e| InspectError::Api {
            address: self.address.clone(),
            message: format!("GET {path}: the answer is not JSON: {e}"),
        })
    }

    fn unreachable(&self, e: reqwest::Error) -> InspectError {
        InspectError::Unreachable {
            address: self.address.clone(),
            reason: e.to_string(),
        }
    }
}

/// The last tick of a `/api/v1/status` answer, if the daemon has ticked.
fn last_tick(status: &Value) -> Option<Tick> {
    serde_json::from_value(status["last_tick"].clone()).ok()
}

fn demand(d: Option<f64>) -> String {
    match d {
        Some(v) if v.fract() == 0.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "-".into(),
    }
}

/// What `microscaler status` prints, from `/api/v1/status`.
pub fn status_text(status: &Value) -> String {
    let mut out = String::new();
    let s = |k: &str| status[k].as_str().unwrap_or("?").to_string();
    let _ = writeln!(
        out,
        "microscaler {} | instance {} | backend {} | tick {} ms | up {:.0} s | API changes {}",
        s("version"),
        s("instance"),
        s("backend"),
        status["tick_ms"].as_u64().unwrap_or(0),
        status["uptime_s"].as_f64().unwrap_or(0.0),
        if status["writable"].as_bool() == Some(true) {
            "on"
        } else {
            "off (no token)"
        }
    );
    let Some(t) = last_tick(status) else {
        out.push_str("no tick yet\n");
        return out;
    };
    let now = status["now"].as_i64().unwrap_or(t.ts);
    let ready = t.hosts.iter().filter(|h| h.ready).count();
    let _ = writeln!(
        out,
        "last tick {} ms ago (took {:.1} ms) | capacity {} | free {} | hosts {ready} ready of {}",
        (now - t.ts).max(0),
        t.took_ms,
        t.capacity,
        t.free,
        t.hosts.len()
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "{:<20} {:>3} {:>7} {:>6} {:>7} {:>7} {:>6}  {:<10} REASON",
        "SERVICE", "P", "DEMAND", "TARGET", "RUNNING", "PENDING", "PAUSED", "BOUND"
    );
    for svc in &t.services {
        let _ = writeln!(
            out,
            "{:<20} {:>3} {:>7} {:>6} {:>7} {:>7} {:>6}  {:<10} {}",
            svc.name,
            svc.priority,
            demand(svc.demand),
            svc.target,
            svc.running,
            svc.pending,
            svc.paused,
            svc.bound,
            svc.reason
        );
    }
    if !t.errors.is_empty() {
        out.push_str("\nerrors in the last tick:\n");
        for e in &t.errors {
            let _ = writeln!(out, "  {}: {}", e.kind, e.message);
        }
    }
    out
}

/// Formats a Unix time in ms as `HH:MM:SS.mmm` UTC.
fn clock(ts: i64) -> String {
    let ms = ts.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// What `microscaler explain SERVICE` prints: the service's configuration (from
/// `/api/v1/services`), its state and the samples of its triggers in the last tick (from
/// `/api/v1/status`), and its latest decisions with their reasons (from `/api/v1/decisions`,
/// newest first). `None` when the daemon has no such service.
pub fn explain_text(
    service: &str,
    services: &Value,
    status: &Value,
    decisions: &Value,
) -> Option<String> {
    let cfg = services
        .as_array()?
        .iter()
        .find(|s| s["name"].as_str() == Some(service))?;
    let mut out = String::new();
    let _ = writeln!(out, "Service:   {service}");
    let max = match cfg["max"].as_u64() {
        Some(m) if m < u64::from(u32::MAX) => m.to_string(),
        _ => "none".into(),
    };
    let _ = writeln!(
        out,
        "Priority:  {}   Kind: {}   Replicas: min {} max {max}{}",
        cfg["priority"],
        cfg["kind"].as_str().unwrap_or("?"),
        cfg["min"],
        cfg["max_step"]
            .as_u64()
            .map(|m| format!(", at most {m} a tick"))
            .unwrap_or_default()
    );
    if let Some(pool) = cfg["pool"]["size"].as_u64().filter(|&n| n > 0) {
        let _ = writeln!(
            out,
            "Pool:      {pool} paused, preempt = {}",
            cfg["pool"]["preempt"].as_str().unwrap_or("stop")
        );
    }
    if cfg["paused"].as_bool() == Some(true) {
        out.push_str("Scaling:   PAUSED through the API (resume it to let microscaler act)\n");
    }
    if let Some(m) = cfg["manual"].as_f64() {
        let _ = writeln!(
            out,
            "Manual:    demand {} (the manual trigger's value: --set-demand or the API set it)",
            demand(Some(m))
        );
    }
    let tick = last_tick(status);
    out.push_str("Triggers:\n");
    let triggers = cfg["triggers"].as_array().cloned().unwrap_or_default();
    if triggers.is_empty() {
        out.push_str("  (none: a remainder or per-host service)\n");
    }
    for tr in &triggers {
        let name = tr["name"].as_str().unwrap_or("?");
        let value = tick
            .as_ref()
            .and_then(|t| {
                t.samples
                    .iter()
                    .find(|s| s.service == service && s.trigger == name)
            })
            .map(|s| {
                s.value
                    .map(|v| demand(Some(v)))
                    .unwrap_or_else(|| "no value (failing)".into())
            })
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "  {name:<16} {:<40} last value {value}",
            tr["source"].as_str().unwrap_or("?")
        );
    }
    match tick
        .as_ref()
        .and_then(|t| t.services.iter().find(|s| s.name == service))
    {
        Some(s) => {
            let _ = writeln!(
                out,
                "State:     demand {}, target {}, running {}, pending {}, paused {}",
                demand(s.demand),
                s.target,
                s.running,
                s.pending,
                s.paused
            );
            let _ = writeln!(out, "Bound:     {} (what had the last word)", s.bound);
            let _ = writeln!(out, "Reason:    {}", s.reason);
        }
        None => out.push_str("State:     no tick yet\n"),
    }
    let list: Vec<Decision> =
        serde_json::from_value(decisions["decisions"].clone()).unwrap_or_default();
    out.push_str("Decisions (newest first):\n");
    if list.is_empty() {
        out.push_str("  none in the history\n");
    }
    for d in &list {
        let _ = writeln!(
            out,
            "  {}  {:<7} {} -> {} ({} {})  {}",
            clock(d.ts),
            d.kind,
            d.from,
            d.to,
            d.count,
            d.bound,
            d.reason
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Value {
        json!({
            "version": "0.1.0", "instance": "prod", "backend": "docker", "demo": false,
            "tick_ms": 500, "uptime_s": 12.4, "now": 1_000_250, "writable": true,
            "last_tick": {
                "ts": 1_000_000, "t_ms": 12000, "capacity": 9, "free": 0, "took_ms": 3.25,
                "services": [
                    {"name": "web", "priority": 1, "remainder": false, "demand": 4.0, "target": 4,
                     "running": 3, "pending": 1, "paused": 0, "bound": "demand",
                     "reason": "started 1 of web: demand 4 > 3"},
                    {"name": "batch", "priority": 2, "remainder": true, "demand": null, "target": 5,
                     "running": 5, "pending": 0, "paused": 0, "bound": "capacity",
                     "reason": "fills free capacity: 5 of 9 slots"}
                ],
                "decisions": [],
                "hosts": [{"id": "h1", "name": "h1", "ready": true, "services": {}}],
                "samples": [{"service": "web", "trigger": "queue", "value": 4.0}],
                "errors": [{"kind": "source", "message": "web/queue: slow"}],
                "paused": []
            }
        })
    }

    #[test]
    fn status_lists_every_service_with_its_reason_and_the_errors() {
        let text = status_text(&status());
        assert!(
            text.starts_with("microscaler 0.1.0 | instance prod | backend docker | tick 500 ms"),
            "{text}"
        );
        assert!(
            text.contains(
                "last tick 250 ms ago (took 3.2 ms) | capacity 9 | free 0 | hosts 1 ready of 1"
            ),
            "{text}"
        );
        let web = text
            .lines()
            .find(|l| l.starts_with("web "))
            .expect("web's line");
        for want in [
            " 1 ",
            " 4 ",
            " 3 ",
            "demand",
            "started 1 of web: demand 4 > 3",
        ] {
            assert!(web.contains(want), "{want:?} in {web:?}");
        }
        let batch = text
            .lines()
            .find(|l| l.starts_with("batch"))
            .expect("batch's line");
        assert!(
            batch.contains(" - ") && batch.contains("capacity"),
            "{batch}"
        );
        assert!(
            text.contains("errors in the last tick:\n  source: web/queue: slow"),
            "{text}"
        );
        let none = status_text(&json!({"version": "0.1.0", "last_tick": null}));
        assert!(none.ends_with("no tick yet\n"), "{none}");
    }

    #[test]
    fn explain_shows_configuration_triggers_state_and_decisions() {
        let services = json!([
            {"name": "web", "priority": 1, "kind": "triggered", "min": 0, "max": 9, "max_step": 2,
             "triggers": [{"name": "queue", "source": "redis list jobs at redis://r:6379"}],
             "pool": {"size": 2, "preempt": "pause"}, "paused": false, "manual": null},
        ]);
        let decisions = json!({"decisions": [
            {"ts": 3_723_004, "kind": "start", "service": "web", "count": 1, "from": 3, "to": 4,
             "bound": "demand", "reason": "demand 4 > 3"}
        ]});
        let text = explain_text("web", &services, &status(), &decisions).expect("known");
        for want in [
            "Service:   web",
            "Priority:  1   Kind: triggered   Replicas: min 0 max 9, at most 2 a tick",
            "Pool:      2 paused, preempt = pause",
            "queue",
            "redis list jobs at redis://r:6379",
            "last value 4",
            "State:     demand 4, target 4, running 3, pending 1, paused 0",
            "Bound:     demand",
            "Reason:    started 1 of web: demand 4 > 3",
            "01:02:03.004  start   3 -> 4 (1 demand)  demand 4 > 3",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        assert!(explain_text("nope", &services, &status(), &decisions).is_none());
    }
}
