//! A Prometheus instant query (`GET /api/v1/query?query=...`). The result must be a scalar or a
//! vector of exactly one sample: anything else is an error that says what came back.

use std::time::Duration;

use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;

use crate::config::{net_options, NetOptions, HTTP};
use crate::http::{json_number, Http};
use crate::{Source, SourceError};

/// A PromQL instant query (`GET /api/v1/query`) whose result must be a scalar or a vector of
/// exactly one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct PrometheusConfig {
    /// Base URL of the server (default `http://127.0.0.1:9090`).
    pub url: String,
    /// The PromQL expression.
    pub query: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

#[derive(Deserialize)]
struct RawPrometheus {
    url: Option<String>,
    query: Option<String>,
}

impl PrometheusConfig {
    /// Validates a `type = "prometheus"` trigger's options (`url`, `query`, `timeout`,
    /// `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<PrometheusConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawPrometheus = v.part(toml::Value::Table(options), path)?;
        Some(PrometheusConfig {
            url: v.url(r.url, Some("http://127.0.0.1:9090"), path, "url", HTTP, ""),
            query: v.need(r.query, path, "query", "a PromQL expression"),
            net,
        })
    }
}

/// One PromQL expression.
#[derive(Debug)]
pub struct PrometheusSource {
    http: Http,
    url: String,
}

impl PrometheusSource {
    /// Builds the source (no I/O).
    pub fn new(config: &PrometheusConfig) -> Result<Self, SourceError> {
        let name = format!("prometheus query {:?} at {}", config.query, config.url);
        let http = Http::new(name, config.net.timeout)?;
        let mut url = url::Url::parse(&config.url)
            .map_err(|e| http.failed(format!("invalid URL {:?}: {e}", config.url)))?;
        url.path_segments_mut()
            .map_err(|_| http.failed(format!("{:?} cannot be a base URL", config.url)))?
            .pop_if_empty()
            .extend(["api", "v1", "query"]);
        url.query_pairs_mut().append_pair("query", &config.query);
        Ok(PrometheusSource {
            http,
            url: url.to_string(),
        })
    }

    /// Start-up check: the server answers and the query is valid. (An empty result is not a
    /// start-up error: the series may appear later.)
    pub async fn check(&mut self) -> Result<(), SourceError> {
        match self.read().await {
            Err(SourceError::Garbage { .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn read(&self) -> Result<f64, SourceError> {
        let doc = match self.http.get_json(&self.url, None).await {
            Ok(d) => d,
            // Prometheus answers 400 with a JSON error for a bad query: show its message.
            Err(SourceError::Failed { reason, .. }) if reason.contains("\"error\"") => {
                return Err(self.http.failed(format!("query rejected: {reason}")));
            }
            Err(e) => return Err(e),
        };
        if doc.get("status").and_then(|s| s.as_str()) != Some("success") {
            return Err(self.http.failed(format!(
                "query failed: {}",
                doc.get("error")
                    .map_or_else(|| doc.to_string(), |e| e.to_string())
            )));
        }
        let data = &doc["data"];
        let value = match data["resultType"].as_str() {
            Some("scalar") => &data["result"][1],
            Some("vector") => {
                let result = data["result"].as_array().map_or(&[][..], |v| v.as_slice());
                match result {
                    [one] => &one["value"][1],
                    [] => {
                        return Err(self.http.garbage(
                            "the query returned no sample (empty vector): no value this tick",
                        ))
                    }
                    many => {
                        let labels: Vec<String> = many
                            .iter()
                            .take(3)
                            .map(|s| s["metric"].to_string())
                            .collect();
                        return Err(self.http.garbage(format!(
                            "the query returned {} samples, one is needed (aggregate it, e.g. sum(...)): {}{}",
                            many.len(),
                            labels.join(", "),
                            if many.len() > 3 { ", ..." } else { "" }
                        )));
                    }
                }
            }
            other => {
                return Err(self.http.garbage(format!(
                    "the query returned a {}, a scalar or a one-sample vector is needed",
                    other.unwrap_or("result of unknown type")
                )))
            }
        };
        json_number(value).ok_or_else(|| {
            self.http
                .garbage(format!("the sample's value {value} is not a number"))
        })
    }
}

impl Source for PrometheusSource {
    fn describe(&self) -> String {
        self.http.name.clone()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn prometheus_needs_a_query() {
        assert_eq!(
            errors(r#"type = "prometheus""#),
            vec![format!("{P}.query: missing: a PromQL expression")]
        );
        let SourceConfig::Prometheus(p) = config(
            r#"type = "prometheus"
            query = "sum(up)""#,
        ) else {
            panic!()
        };
        assert_eq!(
            (p.url.as_str(), p.query.as_str()),
            ("http://127.0.0.1:9090", "sum(up)")
        );
    }
}
