//! The error-with-path machinery every part of the configuration shares.
//!
//! The core validates its own sections with it and every plugin (source, backend) validates
//! its options with it: one [`Validator`] collects every error of a file, each with its path
//! (`services[1].triggers[0].queue: missing: the queue's name`), so a user fixes a file in one
//! go. Nothing here does I/O.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

/// One configuration error with the path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path, `services[2].max`; empty for the document itself.
    pub path: String,
    /// What is wrong, lowercase.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// All errors of a configuration, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects the errors of a configuration as it is validated, each with its path. Every
/// plugin's `validate` reports through one, so a user sees all errors of a file at once.
#[derive(Debug, Default)]
pub struct Validator {
    errors: Vec<ConfigError>,
}

/// `path.key`, or `key` at the top of the document.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Validator {
    /// Reports `message` at `path`.
    pub fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Deserializes one part of the document, reporting unknown keys and type errors with paths.
    /// Unknown keys are errors, but the part is still returned so its other values get checked.
    pub fn part<T: DeserializeOwned>(&mut self, value: toml::Value, path: &str) -> Option<T> {
        let mut unknown = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let de = serde_path_to_error::Deserializer::new(value, &mut track);
        let result = serde_ignored::deserialize(de, |p| unknown.push(p.to_string()));
        for key in unknown {
            self.err(join(path, &key), "unknown key");
        }
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = track.path().to_string();
                let at = if inner == "." || inner.is_empty() {
                    path.to_string()
                } else {
                    join(path, &inner)
                };
                // The message alone: the path says where (toml's own text would add
                // "in `key`" on lines of its own).
                self.err(at, e.message().trim_end().to_string());
                None
            }
        }
    }

    /// A duration option (`"500ms"`, `"3s"`), within `range`; `default` when absent or invalid.
    pub fn duration(
        &mut self,
        raw: Option<&str>,
        path: &str,
        default: Duration,
        range: (Duration, Duration),
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw) {
            Ok(d) if d < range.0 || d > range.1 => {
                self.err(
                    path,
                    format!(
                        "must be between {} and {}, got {raw:?}",
                        humantime::format_duration(range.0),
                        humantime::format_duration(range.1)
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    path,
                    format!(
                        "invalid duration {raw:?} ({e}); write it like \"500ms\", \"3s\" or \"1m\""
                    ),
                );
                default
            }
        }
    }

    /// A required, non-empty string option `key` of the table at `path`; `what` says what it
    /// is in the error when it is missing.
    pub fn need(&mut self, raw: Option<String>, path: &str, key: &str, what: &str) -> String {
        match raw {
            Some(v) if !v.trim().is_empty() => v,
            Some(_) => {
                self.err(join(path, key), "must not be empty");
                String::new()
            }
            None => {
                self.err(join(path, key), format!("missing: {what}"));
                String::new()
            }
        }
    }

    /// A URL option `key` with an optional default, checked for its shape ([`check_url`]).
    pub fn url(
        &mut self,
        raw: Option<String>,
        default: Option<&str>,
        path: &str,
        key: &str,
        schemes: &[&str],
        what: &str,
    ) -> String {
        let Some(url) = raw.or(default.map(str::to_string)) else {
            self.err(join(path, key), format!("missing: {what}"));
            return String::new();
        };
        if let Err(e) = check_url(&url, schemes) {
            self.err(join(path, key), e);
        }
        url
    }

    /// The errors so far, in the order they were found.
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// True when no error was reported.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// `value` when no error was reported (and it is there), else every error.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, ConfigErrors> {
        match value {
            Some(v) if self.errors.is_empty() => Ok(v),
            _ => Err(ConfigErrors(self.errors)),
        }
    }
}

/// Checks the shape of a URL: `scheme://host[:port][/path...]` with one of `schemes`.
/// (The core crate has no URL library; a plugin that needs the parts parses it fully when it
/// builds.)
pub fn check_url(raw: &str, schemes: &[&str]) -> Result<(), String> {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(format!(
            "{raw:?} is not a URL: write it like {}://host:port",
            schemes[0]
        ));
    };
    if !schemes.contains(&scheme) {
        return Err(format!(
            "{raw:?}: scheme must be one of {}, got {scheme:?}",
            schemes.join(", ")
        ));
    }
    if raw.chars().any(char::is_whitespace) {
        return Err(format!("{raw:?}: a URL has no spaces"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return Err(format!("{raw:?}: unclosed [ in the host")),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{raw:?}: the host is missing"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{raw:?}: the port must be 1-65535, got {p:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP: &[&str] = &["http", "https"];

    #[test]
    fn urls_are_checked_at_load() {
        assert!(check_url("http://127.0.0.1:9090", HTTP).is_ok());
        assert!(check_url("https://prom.example/prefix/", HTTP).is_ok());
        assert!(check_url("http://[::1]:8222", HTTP).is_ok());
        assert!(check_url("redis://user:pw@host:6379/2", &["redis"]).is_ok());
        assert!(check_url("127.0.0.1:9090", HTTP)
            .unwrap_err()
            .contains("not a URL"));
        assert!(check_url("http://h:99999", HTTP)
            .unwrap_err()
            .contains("port must be 1-65535"));
        assert!(check_url("http://h:0", HTTP).is_err());
        assert!(check_url("http://h x", HTTP)
            .unwrap_err()
            .contains("no spaces"));
        assert!(check_url("ftp://h", HTTP).unwrap_err().contains("scheme"));
    }

    #[test]
    fn every_error_keeps_its_path() {
        let mut v = Validator::default();
        v.err("", "top");
        v.err(join("services[1]", "max"), "too big");
        let got = v.need(None, "services[0].triggers[0]", "queue", "the queue's name");
        assert!(got.is_empty());
        let e = v.finish(Some(())).unwrap_err().to_string();
        assert_eq!(
            e,
            "top\nservices[1].max: too big\nservices[0].triggers[0].queue: missing: the queue's name"
        );
    }
}
