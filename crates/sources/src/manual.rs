//! A value set by hand: from the CLI at start-up now, from the API later.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{check_value, Source, SourceError};

/// A manual source; its value changes only when its [`ManualHandle`] sets it.
#[derive(Debug)]
pub struct ManualSource {
    value: Arc<Mutex<f64>>,
}

/// Sets the value of a [`ManualSource`] from elsewhere (CLI, API). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ManualHandle {
    value: Arc<Mutex<f64>>,
}

impl ManualSource {
    /// A source starting at `initial`.
    pub fn new(initial: f64) -> Self {
        Self {
            value: Arc::new(Mutex::new(initial)),
        }
    }

    /// A handle that sets this source's value.
    pub fn handle(&self) -> ManualHandle {
        ManualHandle {
            value: self.value.clone(),
        }
    }
}

impl ManualHandle {
    /// Sets the value; NaN, infinite and negative values are refused and change nothing.
    pub fn set(&self, v: f64) -> Result<(), SourceError> {
        let v = check_value("manual", v)?;
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = v;
        Ok(())
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        *self.value.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Source for ManualSource {
    fn describe(&self) -> String {
        "manual".into()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        Ok(*self.value.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
