//! The pure core of microscaler.
//!
//! This crate holds the vocabulary (services, priorities, capacity), the configuration
//! (raw TOML -> validated, typed values) and the decision engine. It performs no I/O,
//! never reads a clock and depends on no async runtime: time is always an input. That
//! keeps [`engine::decide`] a pure function that can be property-tested and benchmarked
//! on its own.
#![deny(missing_docs)]

pub mod config;
pub mod engine;
pub mod model;
pub mod plan;
pub mod rules;
pub mod source_spec;

pub use config::{Config, ConfigError, ConfigErrors};
pub use engine::{decide, EngineState};
pub use model::*;

pub use plan::{Action, ActionKind, Bound, Plan, ServicePlan};
