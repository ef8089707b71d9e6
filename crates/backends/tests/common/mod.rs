//! Shared by the backend tests: the helpers of the test kit, re-exported so each test file
//! keeps its short `common::` names.
#![allow(unused_imports)]

pub use microscaler_testkit::{missing_service, poll_until, running, service, unique, wait_for};
