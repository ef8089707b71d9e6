//! A value set by hand: from the CLI at start-up now, from the API later.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use microscaler_core::validate::join;
use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::{check_value, Source, SourceError};

/// A value set by hand.
#[derive(Debug, Clone, PartialEq)]
pub struct ManualConfig {
    /// The value at start-up.
    pub initial: f64,
}

#[derive(Deserialize)]
struct RawManual {
    initial: Option<f64>,
}

impl ManualConfig {
    /// Validates a `type = "manual"` trigger's options (`initial`, default 0).
    pub fn validate(
        options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<ManualConfig> {
        let m: RawManual = v.part(toml::Value::Table(options), path)?;
        Some(ManualConfig {
            initial: initial_value(m.initial, v, path),
        })
    }
}

/// A pushed source's `initial` (manual, push): a finite number >= 0, default 0.
pub(crate) fn initial_value(initial: Option<f64>, v: &mut Validator, path: &str) -> f64 {
    let initial = initial.unwrap_or(0.0);
    if !initial.is_finite() || initial < 0.0 {
        v.err(
            join(path, "initial"),
            format!("must be a finite number >= 0, got {initial}"),
        );
    }
    initial
}

#[derive(Debug)]
struct Shared {
    value: Mutex<f64>,
    /// When a handle last set the value (changed or not); `None` before the first set.
    set_at: Mutex<Option<tokio::time::Instant>>,
    /// Woken when the value changes, so the control loop can act at once instead of at its
    /// next tick (a pushed value need not wait to be polled).
    waker: OnceLock<Arc<Notify>>,
}

/// A manual source; its value changes only when its [`ManualHandle`] sets it.
#[derive(Debug)]
pub struct ManualSource {
    shared: Arc<Shared>,
}

/// Sets the value of a [`ManualSource`] from elsewhere (CLI, API). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ManualHandle {
    shared: Arc<Shared>,
}

impl ManualSource {
    /// A source starting at `initial`.
    pub fn new(initial: f64) -> Self {
        Self {
            shared: Arc::new(Shared {
                value: Mutex::new(initial),
                set_at: Mutex::new(None),
                waker: OnceLock::new(),
            }),
        }
    }

    /// A handle that sets this source's value.
    pub fn handle(&self) -> ManualHandle {
        ManualHandle {
            shared: self.shared.clone(),
        }
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        *self.shared.value.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When a handle last set the value (changed or not); `None` before the first set.
    pub fn set_at(&self) -> Option<tokio::time::Instant> {
        *self.shared.set_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes `waker` whenever a handle changes the value (set once; later calls are ignored).
    pub fn wake_on_change(&self, waker: Arc<Notify>) {
        let _ = self.shared.waker.set(waker);
    }
}

impl ManualHandle {
    /// Sets the value; NaN, infinite and negative values are refused and change nothing.
    pub fn set(&self, v: f64) -> Result<(), SourceError> {
        let v = check_value("manual", v)?;
        let changed = {
            let mut value = self.shared.value.lock().unwrap_or_else(|e| e.into_inner());
            let changed = *value != v;
            *value = v;
            *self.shared.set_at.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(tokio::time::Instant::now());
            changed
        };
        if changed {
            if let Some(w) = self.shared.waker.get() {
                w.notify_one();
            }
        }
        Ok(())
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        *self.shared.value.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Source for ManualSource {
    fn describe(&self) -> String {
        "manual".into()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        Ok(self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn initial_value_is_checked() {
        assert_eq!(
            config(r#"type = "manual""#),
            SourceConfig::Manual(ManualConfig { initial: 0.0 })
        );
        assert_eq!(
            config(
                r#"type = "manual"
                initial = 2.5"#
            ),
            SourceConfig::Manual(ManualConfig { initial: 2.5 })
        );
        assert_eq!(
            errors(
                r#"type = "manual"
                initial = -1"#
            ),
            vec![format!("{P}.initial: must be a finite number >= 0, got -1")]
        );
    }

    #[test]
    fn handle_sets_value_and_refuses_garbage() {
        let src = ManualSource::new(2.0);
        let h = src.handle();
        assert_eq!(h.get(), 2.0);
        h.set(5.0).unwrap();
        assert_eq!(h.get(), 5.0);
        assert!(h.set(f64::NAN).is_err());
        assert!(h.set(-1.0).is_err());
        assert!(h.set(f64::INFINITY).is_err());
        assert_eq!(h.get(), 5.0, "refused values change nothing");
    }

    #[tokio::test]
    async fn a_change_wakes_the_waker_and_a_repeat_does_not() {
        let src = ManualSource::new(1.0);
        let waker = Arc::new(Notify::new());
        src.wake_on_change(waker.clone());
        let h = src.handle();
        h.set(1.0).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(20), waker.notified()).await;
        assert!(quiet.is_err(), "setting the same value wakes nobody");
        h.set(2.0).unwrap();
        tokio::time::timeout(Duration::from_secs(1), waker.notified())
            .await
            .expect("a change wakes the loop");
    }
}
