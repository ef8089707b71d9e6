//! Demand source specifications: the validated options of each source type, and how each is
//! parsed from its trigger table.
//!
//! Adding a source means: one variant of [`SourceSpec`], one options struct, one raw struct
//! and one arm in [`Validator::source`] here; one module in the sources crate; one name in
//! [`SOURCE_TYPES`]. Options are validated here, once, at load time, never per tick.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Validator;
use crate::model::Capacity;

/// A demand source, validated. Each variant is built into a live source by the sources crate.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// Random demand as in the seeds' demo.
    Random(RandomSpec),
    /// A value set by hand (CLI now, API later).
    Manual(ManualSpec),
}

impl SourceSpec {
    /// The source's type name, as written in the configuration.
    pub fn type_name(&self) -> &'static str {
        match self {
            SourceSpec::Random(_) => "random",
            SourceSpec::Manual(_) => "manual",
        }
    }
}

/// Random demand: every `interval`, the value moves by a random amount in `[-delta, +delta]`,
/// kept within `[0, max]`. The same seed gives the same sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomSpec {
    /// Largest move per interval.
    pub delta: u32,
    /// Time between moves.
    pub interval: Duration,
    /// Seed for replayable runs; `None` means seeded from the clock at start-up.
    pub seed: Option<u64>,
    /// Starting value; `None` means half of `max`.
    pub initial: Option<u32>,
    /// Upper bound; `None` means the cluster's capacity.
    pub max: Option<u32>,
}

/// A value set by hand.
#[derive(Debug, Clone, PartialEq)]
pub struct ManualSpec {
    /// The value at start-up.
    pub initial: f64,
}

/// Source types a trigger may name, listed in errors.
pub const SOURCE_TYPES: &[&str] = &["random", "manual"];

#[derive(Deserialize)]
struct RawRandom {
    delta: Option<u32>,
    interval: Option<String>,
    seed: Option<u64>,
    initial: Option<u32>,
    max: Option<u32>,
}

#[derive(Deserialize)]
struct RawManual {
    initial: Option<f64>,
}

impl Validator {
    /// Parses the source-specific keys of a trigger (`rest`: the trigger's table without the
    /// common keys) for source type `kind`.
    pub(crate) fn source(
        &mut self,
        kind: &str,
        rest: toml::Value,
        path: &str,
        capacity: Option<Capacity>,
    ) -> Option<SourceSpec> {
        let source = match kind {
            "random" => {
                let r: RawRandom = self.part(rest.clone(), path)?;
                let interval = self.duration(
                    r.interval.as_deref(),
                    &format!("{path}.interval"),
                    Duration::from_secs(3),
                    (Duration::from_millis(10), Duration::from_secs(86400)),
                );
                let cap = match capacity {
                    Some(Capacity::Slots(n)) => Some(n),
                    _ => None,
                };
                if let (Some(initial), Some(max)) = (r.initial, r.max.or(cap)) {
                    if initial > max {
                        self.err(
                            format!("{path}.initial"),
                            format!("must be <= max ({max}), got {initial}"),
                        );
                    }
                }
                if r.max.is_none() && cap.is_none() {
                    if let Some(Capacity::SlotsPerHost(_)) = capacity {
                        self.err(
                            format!("{path}.max"),
                            "required when capacity is per host (the random walk needs a fixed bound)",
                        );
                    }
                }
                SourceSpec::Random(RandomSpec {
                    delta: r.delta.unwrap_or(3),
                    interval,
                    seed: r.seed,
                    initial: r.initial,
                    max: r.max,
                })
            }
            "manual" => {
                let m: RawManual = self.part(rest.clone(), path)?;
                let initial = m.initial.unwrap_or(0.0);
                if !initial.is_finite() || initial < 0.0 {
                    self.err(
                        format!("{path}.initial"),
                        format!("must be a finite number >= 0, got {initial}"),
                    );
                }
                SourceSpec::Manual(ManualSpec { initial })
            }
            other => {
                self.err(
                    format!("{path}.type"),
                    format!(
                        "unknown source type {other:?}: valid types are {}",
                        SOURCE_TYPES.join(", ")
                    ),
                );
                return None;
            }
        };
        Some(source)
    }
}
