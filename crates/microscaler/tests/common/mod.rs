//! Shared by the control-loop tests on the orchestrators: ticking until the seeds' rule holds.
#![allow(dead_code)]

pub mod daemon;
pub mod swarm_rig;

use std::time::{Duration, Instant};

use microscaler::control::{Controller, TickReport};
use microscaler_backends::AnyBackend;

/// Ticks `ctl` every `tick` until `done` holds for a report, within `limit`; at every tick: no
/// error and every change it made succeeded. Returns the reports, the last one `done`.
pub async fn until(
    ctl: &mut Controller<AnyBackend>,
    what: &str,
    tick: Duration,
    limit: Duration,
    done: impl Fn(&TickReport) -> bool,
) -> Vec<TickReport> {
    let t0 = Instant::now();
    let mut reports = Vec::new();
    loop {
        let r = ctl.tick().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        for ex in &r.executions {
            assert!(ex.result.is_ok(), "{ex:?}");
        }
        let finished = done(&r);
        let (p1, p2) = (r.observed_of("p1"), r.observed_of("p2"));
        reports.push(r);
        if finished {
            return reports;
        }
        assert!(
            t0.elapsed() < limit,
            "{what} not reached within {limit:?}: p1 {p1:?}, p2 {p2:?}"
        );
        tokio::time::sleep(tick).await;
    }
}

/// The seeds' rule on a report: p1 runs `demand`, p1 + p2 run `capacity`, nothing pending, and
/// the orchestrator holds p2 at the rest.
pub fn seeds_rule(r: &TickReport, demand: u32, capacity: u32) -> bool {
    let (p1, p2) = (r.observed_of("p1"), r.observed_of("p2"));
    p1.running == demand
        && p1.running + p2.running == capacity
        && p1.pending + p2.pending == 0
        && p2.orchestrator_wants == Some(capacity - demand)
}
