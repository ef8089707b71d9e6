//! What the backends that speak plain HTTP/JSON to their orchestrator share (nomad, marathon):
//! environment fallbacks, the client with an optional CA, secrets read from files, and the
//! error texts.

use std::time::Duration;

use crate::BackendError;

/// A variable of the environment, unless unset or blank.
pub(crate) fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// "cannot reach `what`" with `hint`, without a source.
pub(crate) fn unreachable(what: &str, hint: String) -> BackendError {
    BackendError::Unreachable {
        what: what.to_string(),
        hint,
        source: None,
    }
}

/// A secret kept in a file (a token, a password), trimmed. The error names the file, never
/// its content.
pub(crate) fn read_secret(what: &str, kind: &str, path: &str) -> Result<String, BackendError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| unreachable(what, format!("cannot read the {kind} {path}: {e}")))
}

/// An HTTP client whose requests time out after `timeout`, trusting the CA in `ca_file` (PEM)
/// beside the system's roots. `what` names the API in errors.
pub(crate) fn client(
    what: &str,
    ca_file: Option<&str>,
    timeout: Duration,
) -> Result<reqwest::Client, BackendError> {
    let mut http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| unreachable(what, format!("cannot read the CA file {path}: {e}")))?;
        let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| {
            unreachable(
                what,
                format!("the CA file {path} is not a PEM certificate: {e}"),
            )
        })?;
        http = http.add_root_certificate(ca);
    }
    http.build()
        .map_err(|e| unreachable(what, format!("building the HTTP client failed: {e}")))
}

/// `s`, cut to 300 bytes (an orchestrator's error body in a message).
pub(crate) fn clip(s: &str) -> String {
    if s.len() <= 300 {
        return s.to_string();
    }
    let mut end = 300;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Percent-encodes a path segment or query value.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'*') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_and_clipping() {
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(200);
        let c = clip(&long);
        assert!(c.ends_with("...") && c.len() <= 303, "{c}");
    }
}
