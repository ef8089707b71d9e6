//! The microscaler daemon as a library: wiring, the control loop, the demo, the per-tick
//! report and the reading of a running daemon's API (`status`, `explain`). `main.rs` is only the command line on top.
#![deny(missing_docs)]

pub mod control;
pub mod demo;
pub mod ha;
pub mod inspect;
pub mod repeat;
pub mod report;
pub mod simulate;
pub mod wiring;
