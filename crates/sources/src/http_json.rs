//! A number inside a JSON document: `GET url`, then the value at a JSON pointer (RFC 6901),
//! which must be a number or a string holding one.

use std::time::Duration;

use microscaler_core::source_spec::HttpJsonSpec;

use crate::http::{json_number, Http};
use crate::{Source, SourceError};

/// One value of one document.
#[derive(Debug)]
pub struct HttpJsonSource {
    http: Http,
    url: String,
    pointer: String,
}

impl HttpJsonSource {
    /// Builds the source (no I/O).
    pub fn new(spec: &HttpJsonSpec) -> Result<Self, SourceError> {
        let name = format!("http_json {} at {:?}", spec.url, spec.pointer);
        Ok(HttpJsonSource {
            http: Http::new(name, spec.net.timeout)?,
            url: spec.url.clone(),
            pointer: spec.pointer.clone(),
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
