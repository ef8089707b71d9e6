//! The microscaler daemon as a library: wiring, the control loop, the demo and the per-tick
//! report. `main.rs` is only the command line on top.
#![deny(missing_docs)]

pub mod control;
pub mod demo;
pub mod report;
pub mod wiring;
