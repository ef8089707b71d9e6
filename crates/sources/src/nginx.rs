//! Requests per second from nginx's `stub_status` page. It only has running totals, so the rate
//! is the difference of two totals over the tick time between them: the first sample (and the
//! first after a failure or a counter reset, when nginx restarted) has no rate and is missing.

use std::time::Duration;

use microscaler_core::source_spec::NginxSpec;

use crate::http::Http;
use crate::{Source, SourceError};

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
    pub fn new(spec: &NginxSpec) -> Result<Self, SourceError> {
        Ok(NginxSource {
            http: Http::new(
                format!("nginx stub_status at {}", spec.url),
                spec.net.timeout,
            )?,
            url: spec.url.clone(),
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

    #[test]
    fn parses_the_requests_total() {
        let page = "Active connections: 1 \nserver accepts handled requests\n 16 16 31 \nReading: 0 Writing: 1 Waiting: 0 \n";
        assert_eq!(parse_requests(page), Some(31));
        assert_eq!(parse_requests("<html>hello</html>"), None);
    }
}
