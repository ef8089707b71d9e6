//! A value a producer pushes over the API (KEDA's "external push" idea): the producer tells
//! microscaler its backlog, rate or wanted replicas when it changes, instead of being polled,
//! and each push wakes the control loop at once.
//!
//! `PUT /api/v1/services/{service}/triggers/{trigger}/value` with `{"value": N}` sets it. The
//! operator's API token may push to every push trigger; a trigger's own token (`token_file`
//! or `token_env`) may push to that trigger only and do nothing else, so a producer never
//! holds the operator's token. With `expires`, a value not pushed again within that time
//! counts as missing: the trigger reports failing and its service is held, never scaled down
//! on a producer that went quiet.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use microscaler_core::validate::join;
use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::manual::{initial_value, ManualHandle, ManualSource};
use crate::{Source, SourceError};

/// Where a push trigger's own token is read from, at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFrom {
    /// A file holding the token (trimmed), readable by microscaler only.
    File(String),
    /// An environment variable holding it.
    Env(String),
}

/// A value pushed over the API.
#[derive(Debug, Clone, PartialEq)]
pub struct PushConfig {
    /// The value until the first push.
    pub initial: f64,
    /// The trigger's own token; `None`: only the operator's token may push.
    pub token: Option<TokenFrom>,
    /// A value older than this (since the last push, or since the start before any) counts
    /// as missing; `None`: a value holds until the next push. Measured on tokio's clock, so a
    /// test under a paused clock sees it expire in virtual time.
    pub expires: Option<Duration>,
}

#[derive(Deserialize)]
struct RawPush {
    initial: Option<f64>,
    token_file: Option<String>,
    token_env: Option<String>,
    expires: Option<String>,
}

impl PushConfig {
    /// Validates a `type = "push"` trigger's options (`initial`, `token_file` or `token_env`,
    /// `expires`).
    pub fn validate(
        options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<PushConfig> {
        let r: RawPush = v.part(toml::Value::Table(options), path)?;
        let initial = initial_value(r.initial, v, path);
        let token = match (r.token_file, r.token_env) {
            (Some(_), Some(_)) => {
                v.err(
                    join(path, "token_env"),
                    "give token_file or token_env, not both",
                );
                None
            }
            (Some(f), None) if f.trim().is_empty() => {
                v.err(join(path, "token_file"), "must be a file's path, got \"\"");
                None
            }
            (None, Some(e)) if !valid_env_name(&e) => {
                v.err(
                    join(path, "token_env"),
                    format!(
                        "must be an environment variable's name (letters, digits, _), got {e:?}"
                    ),
                );
                None
            }
            (Some(f), None) => Some(TokenFrom::File(f)),
            (None, Some(e)) => Some(TokenFrom::Env(e)),
            (None, None) => None,
        };
        let expires = r.expires.as_deref().map(|e| {
            v.duration(
                Some(e),
                &join(path, "expires"),
                Duration::from_secs(60),
                (Duration::from_millis(100), Duration::from_secs(86_400)),
            )
        });
        Some(PushConfig {
            initial,
            token,
            expires,
        })
    }
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A pushed value.
#[derive(Debug)]
pub struct PushSource {
    value: ManualSource,
    token: Option<Arc<str>>,
    expires: Option<Duration>,
    built: Instant,
}

/// Pushes values into a [`PushSource`] (the API holds one per push trigger). Cheap to clone.
#[derive(Debug, Clone)]
pub struct PushHandle {
    value: ManualHandle,
    token: Option<Arc<str>>,
}

impl PushSource {
    /// Builds the source, reading its token from its file or environment variable. The error
    /// names where the token should be, never what it is.
    pub fn new(config: &PushConfig) -> Result<Self, SourceError> {
        let failed = |reason: String| SourceError::Failed {
            source_name: "push".into(),
            reason,
        };
        let token = match &config.token {
            None => None,
            Some(TokenFrom::File(f)) => {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    failed(format!(
                        "cannot read the push token from token_file {f:?}: {e}"
                    ))
                })?;
                Some(text)
            }
            Some(TokenFrom::Env(e)) => Some(std::env::var(e).map_err(|err| {
                failed(format!(
                    "cannot read the push token from ${e} (token_env): {err}"
                ))
            })?),
        };
        let token = match token.map(|t| t.trim().to_string()) {
            Some(t) if t.is_empty() => {
                return Err(failed(format!(
                    "the push token ({}) is empty",
                    match &config.token {
                        Some(TokenFrom::File(f)) => format!("token_file {f:?}"),
                        Some(TokenFrom::Env(e)) => format!("${e}"),
                        None => String::new(),
                    }
                )))
            }
            t => t.map(Arc::from),
        };
        Ok(PushSource {
            value: ManualSource::new(config.initial),
            token,
            expires: config.expires,
            built: Instant::now(),
        })
    }

    /// A handle that pushes values into this source.
    pub fn handle(&self) -> PushHandle {
        PushHandle {
            value: self.value.handle(),
            token: self.token.clone(),
        }
    }

    /// Wakes `waker` whenever a push changes the value (set once).
    pub fn wake_on_change(&self, waker: Arc<Notify>) {
        self.value.wake_on_change(waker);
    }

    /// The value, or why it counts as missing (it expired).
    pub fn value_now(&self) -> Result<f64, SourceError> {
        if let Some(limit) = self.expires {
            let since = self.value.set_at().unwrap_or(self.built).elapsed();
            if since > limit {
                return Err(SourceError::Failed {
                    source_name: "push".into(),
                    reason: format!(
                        "no value pushed for {:.1}s (expires = {limit:?}): is the producer still pushing?",
                        since.as_secs_f64()
                    ),
                });
            }
        }
        Ok(self.value.get())
    }
}

impl PushHandle {
    /// Sets the value (NaN, infinite and negative ones are refused and change nothing); a
    /// push of the same value refreshes it for `expires`.
    pub fn push(&self, value: f64) -> Result<(), SourceError> {
        self.value.set(value)
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        self.value.get()
    }

    /// The trigger's own token, if it has one (the server compares it in constant time).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

impl Source for PushSource {
    fn describe(&self) -> String {
        match self.expires {
            Some(e) => format!("push (expires {e:?})"),
            None => "push".into(),
        }
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        self.value_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn options_are_checked_with_their_paths() {
        assert_eq!(
            config("type = \"push\""),
            SourceConfig::Push(PushConfig {
                initial: 0.0,
                token: None,
                expires: None
            })
        );
        assert_eq!(
            config("type = \"push\"\ninitial = 3\ntoken_env = \"WEB_PUSH\"\nexpires = \"30s\""),
            SourceConfig::Push(PushConfig {
                initial: 3.0,
                token: Some(TokenFrom::Env("WEB_PUSH".into())),
                expires: Some(Duration::from_secs(30)),
            })
        );
        assert_eq!(
            errors(
                "type = \"push\"\ninitial = -1\ntoken_file = \"/t\"\ntoken_env = \"T\"\nexpires = \"1ms\"\ncolour = 1"
            ),
            vec![
                format!("{P}.colour: unknown key"),
                format!("{P}.initial: must be a finite number >= 0, got -1"),
                format!("{P}.token_env: give token_file or token_env, not both"),
                format!("{P}.expires: must be between 100ms and 1day, got \"1ms\""),
            ]
        );
        assert_eq!(
            errors("type = \"push\"\ntoken_env = \"1-bad\""),
            vec![format!(
                "{P}.token_env: must be an environment variable's name (letters, digits, _), got \"1-bad\""
            )]
        );
    }

    #[test]
    fn the_token_comes_from_its_file_and_is_never_in_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret-push-token\n").unwrap();
        let path = f.display().to_string();
        let src = PushSource::new(&PushConfig {
            initial: 0.0,
            token: Some(TokenFrom::File(path.clone())),
            expires: None,
        })
        .unwrap();
        assert_eq!(src.handle().token(), Some("s3cret-push-token"));

        std::fs::write(&f, " \n").unwrap();
        let e = PushSource::new(&PushConfig {
            initial: 0.0,
            token: Some(TokenFrom::File(path.clone())),
            expires: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        let missing = PushSource::new(&PushConfig {
            initial: 0.0,
            token: Some(TokenFrom::File(format!("{path}.nope"))),
            expires: None,
        })
        .unwrap_err()
        .to_string();
        assert!(
            missing.contains("cannot read the push token from token_file"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn a_push_wakes_the_loop_and_a_quiet_producer_expires() {
        let mut src = PushSource::new(&PushConfig {
            initial: 2.0,
            token: None,
            expires: Some(Duration::from_millis(150)),
        })
        .unwrap();
        let waker = Arc::new(Notify::new());
        src.wake_on_change(waker.clone());
        let h = src.handle();
        assert_eq!(src.sample(Duration::ZERO).await.unwrap(), 2.0);
        h.push(7.0).unwrap();
        tokio::time::timeout(Duration::from_secs(1), waker.notified())
            .await
            .expect("a push wakes the loop");
        assert_eq!(src.sample(Duration::ZERO).await.unwrap(), 7.0);
        assert!(h.push(f64::NAN).is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let e = src.sample(Duration::ZERO).await.unwrap_err().to_string();
        assert!(
            e.contains("no value pushed for") && e.contains("expires = 150ms"),
            "{e}"
        );
        // The same value again refreshes it.
        h.push(7.0).unwrap();
        assert_eq!(src.sample(Duration::ZERO).await.unwrap(), 7.0);
    }
}
