//! HAProxy's stats page in CSV (`/stats;csv`): one field (default `req_rate`, HTTP requests per
//! second over the last second) of the row of one proxy and server (default `FRONTEND`).

use std::time::Duration;

use microscaler_core::source_spec::HaproxySpec;

use crate::http::Http;
use crate::{Source, SourceError};

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
    pub fn new(spec: &HaproxySpec) -> Result<Self, SourceError> {
        let name = format!(
            "haproxy {}/{} {} at {}",
            spec.proxy, spec.server, spec.field, spec.url
        );
        Ok(HaproxySource {
            http: Http::new(name, spec.net.timeout)?,
            url: spec.url.clone(),
            proxy: spec.proxy.clone(),
            server: spec.server.clone(),
            field: spec.field.clone(),
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
