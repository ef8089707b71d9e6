//! Requests per second from nginx's `stub_status` page. It only has running totals, so the rate
//! is the difference of two totals over the tick time between them: the first sample (and the
//! first after a failure or a counter reset, when nginx restarted) has no rate and is missing.

use std::time::Duration;

use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;

use crate::config::{net_options, NetOptions, HTTP};
use crate::http::Http;
use crate::{Source, SourceError};

/// Requests per second from nginx's `stub_status` page: the difference of successive request
/// totals over the time between them.
#[derive(Debug, Clone, PartialEq)]
pub struct NginxConfig {
    /// URL of the `stub_status` page.
    pub url: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

#[derive(Deserialize)]
struct RawNginx {
    url: Option<String>,
}

impl NginxConfig {
    /// Validates a `type = "nginx"` trigger's options (`url`, `timeout`, `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<NginxConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawNginx = v.part(toml::Value::Table(options), path)?;
        Some(NginxConfig {
            url: v.url(r.url, None, path, "url", HTTP, "the stub_status page's URL"),
            net,
        })
    }
}

/// Request rate of one nginx.
#[derive(Debug)]
pub struct NginxSource {
    http: Http,
    url: String,
    /// The last total and when (tick time) it was read.
    last: Option<(u64, Duration)>,
}

impl NginxSource {
    /// Builds the source (no I/O).
    pub fn new(config: &NginxConfig) -> Result<Self, SourceError> {
        Ok(NginxSource {
            http: Http::new(
                format!("nginx stub_status at {}", config.url),
                config.net.timeout,
            )?,
            url: config.url.clone(),
            last: None,
        })
    }

    /// Start-up check: the page answers and is a `stub_status` page.
    pub async fn check(&mut self) -> Result<(), SourceError> {
        self.total().await.map(|_| ())
    }

    async fn total(&self) -> Result<u64, SourceError> {
        let body = self.http.get(&self.url, None).await?;
        parse_requests(&body).ok_or_else(|| {
            let snippet: String = body.chars().take(80).collect();
            self.http.garbage(format!(
                "not a stub_status page (no \"server accepts handled requests\" line): {snippet:?}"
            ))
        })
    }
}

/// The `requests` total of a `stub_status` page.
pub(crate) fn parse_requests(body: &str) -> Option<u64> {
    let mut lines = body.lines();
    lines.find(|l| {
        l.trim_start()
            .starts_with("server accepts handled requests")
    })?;
    let numbers: Vec<&str> = lines.next()?.split_whitespace().collect();
    numbers.get(2)?.parse().ok()
}

impl Source for NginxSource {
    fn describe(&self) -> String {
        self.http.name.clone()
    }

    async fn sample(&mut self, now: Duration) -> Result<f64, SourceError> {
        let total = match self.total().await {
            Ok(t) => t,
            Err(e) => {
                self.last = None;
                return Err(e);
            }
        };
        let prev = self.last.replace((total, now));
        match prev {
            Some((t0, at)) if total >= t0 && now > at => {
                Ok((total - t0) as f64 / (now - at).as_secs_f64())
            }
            Some((t0, _)) if total < t0 => Err(self.http.garbage(
                "the request total went down (nginx restarted): the rate starts again next tick",
            )),
            Some(_) => Err(self.http.garbage("two samples at the same time: no rate")),
            None => Err(self
                .http
                .garbage("first total read: the rate needs a second sample (next tick)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_requests;
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn nginx_needs_its_url() {
        assert_eq!(
            errors(r#"type = "nginx""#),
            vec![format!("{P}.url: missing: the stub_status page's URL")]
        );
        let SourceConfig::Nginx(n) = config(
            r#"type = "nginx"
            url = "http://127.0.0.1:8080/status""#,
        ) else {
            panic!()
        };
        assert_eq!(n.url, "http://127.0.0.1:8080/status");
    }

    #[test]
    fn parses_the_requests_total() {
        let page = "Active connections: 1 \nserver accepts handled requests\n 16 16 31 \nReading: 0 Writing: 1 Waiting: 0 \n";
        assert_eq!(parse_requests(page), Some(31));
        assert_eq!(parse_requests("<html>hello</html>"), None);
    }
}
