//! The pure core of microscaler.
//!
//! This crate holds the vocabulary (services, priorities, capacity), the configuration
//! (raw TOML -> validated, typed values, with the plugins'
//! options validated by the plugins through [`plugin`]) and the decision engine. It performs no I/O,
//! never reads a clock and depends on no async runtime: time is always an input. That
//! keeps [`engine::decide`] a pure function that can be property-tested and benchmarked
//! on its own.
#![deny(missing_docs)]

pub mod config;
pub mod engine;
pub mod model;
pub mod placement;
pub mod plan;
pub mod plugin;
pub mod rules;
pub mod validate;

pub use config::Config;
pub use engine::{decide, EngineState};
pub use model::*;
pub use plugin::{
    BackendPlugins, Capabilities, Plugins, ServiceContext, SourceContext, SourcePlugins,
    StopCompletion,
};
pub use validate::{ConfigError, ConfigErrors, Validator};

pub use plan::{Action, ActionKind, Bound, Plan, Reason, ServicePlan};
