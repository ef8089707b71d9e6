//! A value by weekday and time of day (`windows = [{ days = "mon-fri", from = "09:00",
//! to = "17:00", value = 5 }]`): the largest value of the open windows, else `default`.
//!
//! Windows are in wall-clock time, so this source reads a clock; the clock is injected
//! ([`ScheduleSource::with_clock`]) so tests choose the time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use microscaler_core::source_spec::ScheduleSpec;

use crate::{Source, SourceError};

/// A wall clock: the current time.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// A schedule of values.
pub struct ScheduleSource {
    spec: ScheduleSpec,
    clock: Clock,
}

impl std::fmt::Debug for ScheduleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScheduleSource")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl ScheduleSource {
    /// A schedule on the system clock.
    pub fn new(spec: &ScheduleSpec) -> Self {
        Self::with_clock(spec, Arc::new(SystemTime::now))
    }

    /// A schedule on the given clock.
    pub fn with_clock(spec: &ScheduleSpec, clock: Clock) -> Self {
        ScheduleSource {
            spec: spec.clone(),
            clock,
        }
    }
}

impl Source for ScheduleSource {
    fn describe(&self) -> String {
        let off = self.spec.utc_offset_minutes;
        format!(
            "schedule({} windows, default {}, UTC{}{:02}:{:02})",
            self.spec.windows.len(),
            self.spec.default,
            if off < 0 { '-' } else { '+' },
            off.abs() / 60,
            off.abs() % 60
        )
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        let t = (self.clock)();
        let secs = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64) - 1,
        };
        Ok(self.spec.value_at(secs))
    }
}
