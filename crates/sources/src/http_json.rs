//! A number inside a JSON document: `GET url`, then the value at a JSON pointer (RFC 6901),
//! which must be a number or a string holding one.

use std::time::Duration;

use microscaler_core::validate::join;
use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;

use crate::config::{net_options, NetOptions, HTTP};
use crate::http::{json_number, Http};
use crate::{Source, SourceError};

/// A number in a JSON document fetched by `GET url`, at a JSON pointer (RFC 6901).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpJsonConfig {
    /// The document's URL.
    pub url: String,
    /// JSON pointer to the value (`/queue/depth`); the value must be a number or a string
    /// holding one.
    pub pointer: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

#[derive(Deserialize)]
struct RawHttpJson {
    url: Option<String>,
    pointer: Option<String>,
}

impl HttpJsonConfig {
    /// Validates a `type = "http_json"` trigger's options (`url`, `pointer`, `timeout`,
    /// `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<HttpJsonConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawHttpJson = v.part(toml::Value::Table(options), path)?;
        let pointer = r.pointer.unwrap_or_default();
        if !pointer.is_empty() && !pointer.starts_with('/') {
            v.err(
                join(path, "pointer"),
                format!(
                    "a JSON pointer starts with \"/\" (like \"/queue/depth\"), got {pointer:?}"
                ),
            );
        }
        Some(HttpJsonConfig {
            url: v.url(r.url, None, path, "url", HTTP, "the JSON document's URL"),
            pointer,
            net,
        })
    }
}

/// One value of one document.
#[derive(Debug)]
pub struct HttpJsonSource {
    http: Http,
    url: String,
    pointer: String,
}

impl HttpJsonSource {
    /// Builds the source (no I/O).
    pub fn new(config: &HttpJsonConfig) -> Result<Self, SourceError> {
        let name = format!("http_json {} at {:?}", config.url, config.pointer);
        Ok(HttpJsonSource {
            http: Http::new(name, config.net.timeout)?,
            url: config.url.clone(),
            pointer: config.pointer.clone(),
        })
    }

    /// Start-up check: the document can be fetched and is JSON.
    pub async fn check(&mut self) -> Result<(), SourceError> {
        self.http.get_json(&self.url, None).await.map(|_| ())
    }
}

impl Source for HttpJsonSource {
    fn describe(&self) -> String {
        self.http.name.clone()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        let doc = self.http.get_json(&self.url, None).await?;
        let v = doc.pointer(&self.pointer).ok_or_else(|| {
            self.http
                .garbage(format!("the document has nothing at {:?}", self.pointer))
        })?;
        json_number(v).ok_or_else(|| self.http.garbage(format!("{v} is not a number")))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn http_json_needs_a_url_and_a_pointer() {
        assert_eq!(
            errors(r#"type = "http_json""#),
            vec![format!("{P}.url: missing: the JSON document's URL")]
        );
        assert_eq!(
            errors(
                r#"type = "http_json"
                url = "http://h/x"
                pointer = "queue.depth""#
            ),
            vec![format!("{P}.pointer: a JSON pointer starts with \"/\" (like \"/queue/depth\"), got \"queue.depth\"")]
        );
        let SourceConfig::HttpJson(h) = config(
            r#"type = "http_json"
            url = "http://h/x"
            pointer = "/queue/depth""#,
        ) else {
            panic!()
        };
        assert_eq!(h.pointer, "/queue/depth");
    }
}
