//! HAProxy's stats page in CSV (`/stats;csv`): one field (default `req_rate`, HTTP requests per
//! second over the last second) of the row of one proxy and server (default `FRONTEND`).

use std::time::Duration;

use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;

use crate::config::{net_options, NetOptions, HTTP};
use crate::http::Http;
use crate::{Source, SourceError};

/// One field of one row of HAProxy's stats CSV (`/stats;csv`), by default the frontend's
/// `req_rate` (HTTP requests per second over the last second).
#[derive(Debug, Clone, PartialEq)]
pub struct HaproxyConfig {
    /// URL of the stats page in CSV (`http://127.0.0.1:8404/stats;csv`).
    pub url: String,
    /// Proxy name (`pxname` column): the frontend or backend.
    pub proxy: String,
    /// Server name (`svname` column; default `FRONTEND`; `BACKEND` for a backend's total).
    pub server: String,
    /// The column (default `req_rate`; `rate` for sessions per second, `scur`, `qcur`, ...).
    pub field: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

#[derive(Deserialize)]
struct RawHaproxy {
    url: Option<String>,
    proxy: Option<String>,
    server: Option<String>,
    field: Option<String>,
}

impl HaproxyConfig {
    /// Validates a `type = "haproxy"` trigger's options (`url`, `proxy`, `server`, `field`,
    /// `timeout`, `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<HaproxyConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawHaproxy = v.part(toml::Value::Table(options), path)?;
        Some(HaproxyConfig {
            url: v.url(
                r.url,
                None,
                path,
                "url",
                HTTP,
                "the stats page in CSV, like \"http://127.0.0.1:8404/stats;csv\"",
            ),
            proxy: v.need(r.proxy, path, "proxy", "the frontend or backend (pxname)"),
            server: r.server.unwrap_or_else(|| "FRONTEND".into()),
            field: r.field.unwrap_or_else(|| "req_rate".into()),
            net,
        })
    }
}

/// One field of one stats row.
#[derive(Debug)]
pub struct HaproxySource {
    http: Http,
    url: String,
    proxy: String,
    server: String,
    field: String,
}

impl HaproxySource {
    /// Builds the source (no I/O).
    pub fn new(config: &HaproxyConfig) -> Result<Self, SourceError> {
        let name = format!(
            "haproxy {}/{} {} at {}",
            config.proxy, config.server, config.field, config.url
        );
        Ok(HaproxySource {
            http: Http::new(name, config.net.timeout)?,
            url: config.url.clone(),
            proxy: config.proxy.clone(),
            server: config.server.clone(),
            field: config.field.clone(),
        })
    }

    /// Start-up check: the page answers CSV with the field, the proxy and the server.
    pub async fn check(&mut self) -> Result<(), SourceError> {
        match self.read().await {
            Err(SourceError::Garbage { reason, .. }) => Err(self.http.failed(reason)),
            other => other.map(|_| ()),
        }
    }

    async fn read(&self) -> Result<f64, SourceError> {
        let body = self.http.get(&self.url, None).await?;
        let cell = find_cell(&body, &self.proxy, &self.server, &self.field)
            .map_err(|e| self.http.garbage(e))?;
        if cell.is_empty() {
            return Err(self.http.garbage(format!(
                "{} is empty for {}/{} (HAProxy does not report it for this kind of row)",
                self.field, self.proxy, self.server
            )));
        }
        cell.parse::<f64>().map_err(|_| {
            self.http
                .garbage(format!("{} is {cell:?}, not a number", self.field))
        })
    }
}

/// The cell of `field` in the row of `proxy`/`server` of HAProxy's CSV.
pub(crate) fn find_cell(
    csv: &str,
    proxy: &str,
    server: &str,
    field: &str,
) -> Result<String, String> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or("the answer is not HAProxy's stats CSV (no \"# pxname,...\" header): does the URL end in ;csv?")?;
    let col = header
        .split(',')
        .position(|c| c == field)
        .ok_or_else(|| format!("the stats have no column {field:?}"))?;
    let mut proxies = Vec::new();
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() < 2 {
            continue;
        }
        if cells[0] == proxy && cells[1] == server {
            return Ok(cells.get(col).unwrap_or(&"").trim().to_string());
        }
        proxies.push(format!("{}/{}", cells[0], cells[1]));
    }
    Err(format!(
        "no row {proxy}/{server}; the stats have: {}",
        proxies.join(", ")
    ))
}

impl Source for HaproxySource {
    fn describe(&self) -> String {
        self.http.name.clone()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use super::find_cell;
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn haproxy_defaults_and_required_keys() {
        let SourceConfig::Haproxy(h) = config(
            r#"type = "haproxy"
            url = "http://127.0.0.1:8404/stats;csv"
            proxy = "web""#,
        ) else {
            panic!()
        };
        assert_eq!(
            (h.server.as_str(), h.field.as_str()),
            ("FRONTEND", "req_rate")
        );
        assert_eq!(
            errors(r#"type = "haproxy""#),
            vec![
                format!("{P}.url: missing: the stats page in CSV, like \"http://127.0.0.1:8404/stats;csv\""),
                format!("{P}.proxy: missing: the frontend or backend (pxname)"),
            ]
        );
    }

    const CSV: &str = "# pxname,svname,scur,req_rate,\nweb,FRONTEND,1,12,\nweb,BACKEND,1,,\n";

    #[test]
    fn finds_the_cell_by_proxy_server_and_column() {
        assert_eq!(find_cell(CSV, "web", "FRONTEND", "req_rate").unwrap(), "12");
        assert_eq!(find_cell(CSV, "web", "BACKEND", "req_rate").unwrap(), "");
        let e = find_cell(CSV, "api", "FRONTEND", "req_rate").unwrap_err();
        assert!(e.contains("web/FRONTEND"), "{e}");
        assert!(find_cell(CSV, "web", "FRONTEND", "nope").is_err());
        assert!(find_cell("<html>", "web", "FRONTEND", "req_rate").is_err());
    }
}
