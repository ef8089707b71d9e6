//! Demand sources: where a trigger's value comes from.
//!
//! One module per source, one variant of [`AnySource`] each. A source is built once from its
//! validated spec (options are never parsed per tick) and sampled every tick with the tick's
//! time as an input, so time-driven sources (random, later schedule) are deterministic under
//! test. Network sources (queues, load balancers, Prometheus) join as further modules.
#![deny(missing_docs)]

use std::future::Future;
use std::time::Duration;

use microscaler_core::SourceSpec;

pub mod manual;
pub mod random;

pub use manual::{ManualHandle, ManualSource};
pub use random::{RandomControl, RandomSource};

/// Errors of a source. Messages name the server and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SourceError {
    /// The source returned something that is not a usable value.
    #[error("rejected sample from {source_name}: {reason}")]
    Garbage {
        /// The source.
        source_name: String,
        /// Why the value was rejected.
        reason: String,
    },
    /// The source could not be read.
    #[error("cannot sample {source_name}: {reason}")]
    Failed {
        /// The source.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
}

/// A demand source.
pub trait Source: Send {
    /// Short description for logs and the dashboard (`random(±3 every 3s)`).
    fn describe(&self) -> String;

    /// The value at `now` (time since the daemon started).
    fn sample(&mut self, now: Duration) -> impl Future<Output = Result<f64, SourceError>> + Send;
}

/// All sources, as one closed enum.
#[derive(Debug)]
pub enum AnySource {
    /// Random walk.
    Random(RandomSource),
    /// Set by hand.
    Manual(ManualSource),
}

impl AnySource {
    /// Builds a source from its validated spec. `capacity` bounds the random walk when its spec
    /// gives no max; `clock_seed` seeds it when its spec gives no seed.
    pub fn build(spec: &SourceSpec, capacity: u32, clock_seed: u64) -> AnySource {
        match spec {
            SourceSpec::Random(r) => AnySource::Random(RandomSource::new(r, capacity, clock_seed)),
            SourceSpec::Manual(m) => AnySource::Manual(ManualSource::new(m.initial)),
        }
    }
}

impl Source for AnySource {
    fn describe(&self) -> String {
        match self {
            AnySource::Random(s) => s.describe(),
            AnySource::Manual(s) => s.describe(),
        }
    }

    async fn sample(&mut self, now: Duration) -> Result<f64, SourceError> {
        let v = match self {
            AnySource::Random(s) => s.sample(now).await,
            AnySource::Manual(s) => s.sample(now).await,
        }?;
        check_value(&self.describe(), v)
    }
}

/// Rejects values no demand can have: NaN, infinities and negatives. A rejected sample counts
/// as a failure and is never used.
pub fn check_value(source_name: &str, v: f64) -> Result<f64, SourceError> {
    if !v.is_finite() || v < 0.0 {
        return Err(SourceError::Garbage {
            source_name: source_name.to_string(),
            reason: format!("{v} is not a finite number >= 0"),
        });
    }
    Ok(v)
}
