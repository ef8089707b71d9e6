//! Table tests of the decision engine: the seeds' demo, each rule of the engine on its own, and
//! whole simulated runs against a tiny in-test backend.

use std::time::Duration;

use microscaler_core::config::OnExit;
use microscaler_core::engine::Commitment;
use microscaler_core::*;

use microscaler_core::plugin::opaque::{self, Opaque};

type Config = microscaler_core::Config<Opaque>;
type Service = microscaler_core::Service<Opaque>;
type ServiceKind = microscaler_core::ServiceKind<opaque::Source>;
type Trigger = microscaler_core::Trigger<opaque::Source>;

// ---------------------------------------------------------------------------------------------
// Helpers: configs, a world that remembers the engine's memory, and short plan summaries.

/// The seeds' demo: capacity 9, a randomly driven priority 1 and a remainder priority 2.
const DEMO: &str = r#"
    instance = "demo"
    tick = "500ms"
    converge_timeout = "30s"
    [capacity]
    slots = 9
    [backend]
    type = "docker"
    [[services]]
    name = "priority1"
    priority = 1
    [[services.triggers]]
    type = "random"
    delta = 3
    interval = "3s"
    seed = 7
    [[services]]
    name = "priority2"
    priority = 2
    remainder = true
"#;

/// The name of the single trigger of services built by [`triggered`].
const LOAD: &str = "load";

fn name(s: &str) -> ServiceName {
    ServiceName::try_new(s).unwrap()
}

fn service(n: &str, priority: u32, kind: ServiceKind) -> Service {
    Service {
        name: name(n),
        priority: Priority::try_new(priority).unwrap(),
        min: 0,
        max: u32::MAX,
        max_step: None,
        kind,
        workload: Default::default(),
        stop_grace: Duration::from_secs(10),
        pool: Default::default(),
        resources: None,
    }
}

fn trigger(n: &str) -> Trigger {
    Trigger::new(n, opaque::Source::of("manual"))
}

/// A service driven by one trigger called [`LOAD`].
fn triggered(n: &str, priority: u32) -> Service {
    service(n, priority, ServiceKind::Triggered(vec![trigger(LOAD)]))
}

fn remainder(n: &str, priority: u32) -> Service {
    service(n, priority, ServiceKind::Remainder)
}

fn per_host(n: &str, priority: u32) -> Service {
    service(n, priority, ServiceKind::PerHost)
}

/// Small builder methods on a service, so a table reads `triggered("web", 1).min(2).step(3)`.
trait Tune {
    fn min(self, n: u32) -> Self;
    fn max(self, n: u32) -> Self;
    fn step(self, n: u32) -> Self;
}

impl Tune for Service {
    fn min(mut self, n: u32) -> Self {
        self.min = n;
        self
    }
    fn max(mut self, n: u32) -> Self {
        self.max = n;
        self
    }
    fn step(mut self, n: u32) -> Self {
        self.max_step = Some(n);
        self
    }
}

fn config(capacity: Capacity, services: Vec<Service>) -> Config {
    Config {
        instance: "test".into(),
        tick: Duration::from_millis(500),
        sample_timeout: Duration::from_millis(250),
        converge_timeout: Duration::from_secs(30),
        on_exit: OnExit::Leave,
        capacity,
        backend: opaque::Backend::of("process"),
        services,
        scaling: Default::default(),
        server: Default::default(),
        ha: None,
    }
}

fn host(i: usize, ready: bool) -> Host {
    Host {
        id: format!("h{i}").into(),
        name: format!("host-{i}"),
        ready,
        ..Host::default()
    }
}

/// The engine's inputs and memory across ticks. `decide` runs one tick and keeps the memory;
/// what is observed changes only when a test (or a simulated backend) says so.
struct World {
    cfg: Config,
    observed: Observed,
    samples: Samples,
    memory: EngineState,
    now: Duration,
}

impl World {
    fn new(cfg: Config) -> Self {
        World {
            cfg,
            observed: Observed::default(),
            samples: Samples::default(),
            memory: EngineState::default(),
            now: Duration::from_secs(100),
        }
    }

    fn demo() -> Self {
        Self::new(Config::from_toml(DEMO).expect("demo config is valid"))
    }

    /// Sets the value of the first trigger of `svc` (`None` = missing).
    fn demand(&mut self, svc: &str, value: Option<f64>) -> &mut Self {
        let s = self.cfg.service(svc).expect("known service");
        let ServiceKind::Triggered(ts) = &s.kind else {
            panic!("{svc} has no trigger")
        };
        let t = ts[0].name.clone();
        self.samples.set(&name(svc), &t, value);
        self
    }

    /// `svc` is observed with `running` and `pending` replicas.
    fn observe(&mut self, svc: &str, running: u32, pending: u32) -> &mut Self {
        self.observed
            .services
            .insert(name(svc), ServiceObservation::counts(running, pending));
        self
    }

    /// The engine committed `target` for `svc` at `changed_at`.
    fn committed(&mut self, svc: &str, target: u32, changed_at: Duration) -> &mut Self {
        self.memory
            .set_commitment(name(svc), Commitment { target, changed_at });
        self
    }

    /// `svc` runs `n` replicas, committed long ago and converged.
    fn settled(&mut self, svc: &str, n: u32) -> &mut Self {
        self.observe(svc, n, 0).committed(svc, n, Duration::ZERO)
    }

    fn hosts(&mut self, ready: &[bool]) -> &mut Self {
        self.observed.hosts = ready.iter().enumerate().map(|(i, r)| host(i, *r)).collect();
        self
    }

    /// One decision; the memory is kept, the clock moves on by one tick.
    fn decide(&mut self) -> Plan {
        let (plan, memory) = decide(
            &self.cfg,
            &self.observed,
            &self.samples,
            &self.memory,
            self.now,
        );
        self.check(&plan);
        self.memory = memory;
        self.now += self.cfg.tick;
        plan
    }

    /// A backend that does everything at once: what was committed is running.
    fn converge(&mut self) {
        for (n, c) in self.memory.commitments() {
            self.observed
                .services
                .insert(n.clone(), ServiceObservation::counts(c.target, 0));
        }
    }

    /// Checks every plan makes: within capacity, actions consistent with the targets.
    fn check(&self, plan: &Plan) {
        assert!(plan.allocated <= plan.capacity, "over capacity: {plan:#?}");
        let sum: u32 = plan.services.iter().map(|s| s.target).sum();
        assert_eq!(sum, plan.allocated);
        for a in &plan.actions {
            let s = plan.service(a.service.as_str()).unwrap();
            assert_eq!((a.from, a.to), (s.current, s.target));
            assert_eq!(a.count, a.from.abs_diff(a.to));
            assert_eq!(a.bound, s.bound);
        }
    }
}

/// The actions of a plan as `"-3 batch"` / `"+3 web"`, in order.
fn actions(plan: &Plan) -> Vec<String> {
    plan.actions
        .iter()
        .map(|a| {
            let sign = match a.kind {
                ActionKind::Stop => '-',
                ActionKind::Start => '+',
            };
            format!("{sign}{} {}", a.count, a.service)
        })
        .collect()
}

fn reason<'a>(plan: &'a Plan, svc: &str) -> &'a str {
    &plan
        .actions
        .iter()
        .find(|a| a.service.as_str() == svc)
        .unwrap_or_else(|| panic!("no action for {svc}: {plan:#?}"))
        .reason
}

fn bound(plan: &Plan, svc: &str) -> Bound {
    plan.service(svc).unwrap().bound
}

// ---------------------------------------------------------------------------------------------
// The seeds' demo.

#[test]
fn demo_from_empty_priority_gets_demand_and_remainder_fills() {
    let mut w = World::demo();
    w.demand("priority1", Some(4.0));
    let plan = w.decide();
    assert_eq!(plan.capacity, 9);
    assert_eq!(plan.target("priority1"), 4);
    assert_eq!(plan.target("priority2"), 5);
    assert_eq!(plan.allocated, 9);
    assert_eq!(actions(&plan), ["+4 priority1", "+5 priority2"]);
    assert_eq!(bound(&plan, "priority1"), Bound::Demand);
    assert_eq!(bound(&plan, "priority2"), Bound::Remainder);
    assert_eq!(
        reason(&plan, "priority1"),
        "started 4 of priority1: demand 4 > 0"
    );
    assert_eq!(
        reason(&plan, "priority2"),
        "started 5 of priority2: fills free capacity: 5 of 9 slots"
    );
}

#[test]
fn demo_demand_rise_stops_remainder_before_starting_and_reasons_name_each_other() {
    let mut w = World::demo();
    w.settled("priority1", 4).settled("priority2", 5);
    w.demand("priority1", Some(7.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-3 priority2", "+3 priority1"]);
    assert_eq!(plan.target("priority1"), 7);
    assert_eq!(plan.target("priority2"), 2);
    assert_eq!(bound(&plan, "priority1"), Bound::Demand);
    assert_eq!(bound(&plan, "priority2"), Bound::Preempted);
    assert_eq!(
        reason(&plan, "priority2"),
        "stopped 3 of priority2: preempted by priority1 (priority 1) needing 3 slots"
    );
    assert_eq!(
        reason(&plan, "priority1"),
        "started 3 of priority1: demand 7 > 4; took 3 slots from priority2 (priority 2)"
    );
}

#[test]
fn demo_demand_fall_shrinks_priority_and_converged_remainder_fills() {
    let mut w = World::demo();
    w.settled("priority1", 7).settled("priority2", 2);
    w.demand("priority1", Some(4.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-3 priority1", "+3 priority2"]);
    assert_eq!(
        reason(&plan, "priority1"),
        "stopped 3 of priority1: demand 4 < 7"
    );
    assert_eq!(
        reason(&plan, "priority2"),
        "started 3 of priority2: fills free capacity: 5 of 9 slots"
    );
}

#[test]
fn demo_demand_fall_remainder_fills_only_once_converged() {
    let mut w = World::demo();
    w.settled("priority1", 7);
    // priority2 was cut from 5 to 2 a moment ago and 2 of its replicas are still stopping.
    w.committed("priority2", 2, w.now - Duration::from_secs(1))
        .observe("priority2", 4, 0);
    w.demand("priority1", Some(4.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-3 priority1"]);
    assert_eq!(plan.target("priority2"), 2);
    assert_eq!(bound(&plan, "priority2"), Bound::Converging);
    assert_eq!(
        plan.service("priority2").unwrap().reason,
        "waiting for the previous change to converge: 4 running, 0 pending of 2"
    );
    assert_eq!(plan.free(), 3);

    w.converge();
    let plan = w.decide();
    assert_eq!(actions(&plan), ["+3 priority2"]);
    assert_eq!(plan.target("priority1") + plan.target("priority2"), 9);
}

// ---------------------------------------------------------------------------------------------
// One rule at a time.

#[test]
fn max_step_cuts_both_ways() {
    let mut w = World::new(config(
        Capacity::Slots(20),
        vec![triggered("web", 1).step(2)],
    ));
    w.settled("web", 1).demand("web", Some(9.0));
    let plan = w.decide();
    assert_eq!(plan.target("web"), 3);
    assert_eq!(bound(&plan, "web"), Bound::MaxStep);
    assert_eq!(
        reason(&plan, "web"),
        "started 2 of web: wants demand 9, change limited to max_step 2"
    );

    let mut w = World::new(config(
        Capacity::Slots(20),
        vec![triggered("web", 1).step(2)],
    ));
    w.settled("web", 9).demand("web", Some(0.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-2 web"]);
    assert_eq!(bound(&plan, "web"), Bound::MaxStep);
}

#[test]
fn max_step_limits_how_fast_a_lower_priority_is_preempted() {
    let mut w = World::new(config(
        Capacity::Slots(9),
        vec![triggered("web", 1), remainder("batch", 2).step(2)],
    ));
    w.settled("web", 4)
        .settled("batch", 5)
        .demand("web", Some(9.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-2 batch", "+2 web"]);
    assert_eq!(bound(&plan, "web"), Bound::Capacity);
    w.converge();
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-2 batch", "+2 web"]);
    w.converge();
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-1 batch", "+1 web"]);
    assert_eq!(plan.target("web"), 9);
}

#[test]
fn min_is_kept_under_pressure_from_a_higher_priority() {
    let mut w = World::new(config(
        Capacity::Slots(9),
        vec![triggered("web", 1), triggered("batch", 2).min(2)],
    ));
    w.settled("web", 4).settled("batch", 5);
    w.demand("web", Some(20.0)).demand("batch", Some(5.0));
    let plan = w.decide();
    assert_eq!(plan.target("web"), 7);
    assert_eq!(plan.target("batch"), 2);
    assert_eq!(bound(&plan, "web"), Bound::Capacity);
    assert_eq!(bound(&plan, "batch"), Bound::Preempted);
    assert_eq!(
        reason(&plan, "web"),
        "started 3 of web: demand 20 but only 7 fit in capacity 9 (higher priorities first); \
         took 3 slots from batch (priority 2)"
    );

    // The same for a remainder service.
    let mut w = World::new(config(
        Capacity::Slots(9),
        vec![triggered("web", 1), remainder("batch", 2).min(3)],
    ));
    w.settled("web", 4)
        .settled("batch", 5)
        .demand("web", Some(9.0));
    let plan = w.decide();
    assert_eq!((plan.target("web"), plan.target("batch")), (6, 3));
}

#[test]
fn min_is_guaranteed_even_when_a_higher_priority_already_holds_the_slots() {
    // batch starts below its min (nothing placed yet); web holds the whole cluster.
    let mut w = World::new(config(
        Capacity::Slots(9),
        vec![triggered("web", 1), triggered("batch", 2).min(3)],
    ));
    w.settled("web", 9);
    w.demand("web", Some(9.0)).demand("batch", Some(0.0));
    let plan = w.decide();
    assert_eq!(plan.target("batch"), 3, "{plan:#?}");
    assert_eq!(plan.target("web"), 6);
    assert_eq!(actions(&plan), ["-3 web", "+3 batch"]);
    assert_eq!(bound(&plan, "batch"), Bound::Min);
    assert_eq!(
        reason(&plan, "batch"),
        "started 3 of batch: demand 0 is below min 3; took 3 slots from web (priority 1)"
    );
    assert_eq!(
        reason(&plan, "web"),
        "stopped 3 of web: preempted by batch (priority 2) needing 3 slots to reach its min 3"
    );
}

#[test]
fn min_and_max_win_over_max_step() {
    let mut w = World::new(config(
        Capacity::Slots(20),
        vec![triggered("web", 1).min(5).max(8).step(1)],
    ));
    w.observe("web", 0, 0).demand("web", Some(0.0));
    let plan = w.decide();
    assert_eq!(plan.target("web"), 5);
    assert_eq!(bound(&plan, "web"), Bound::Min);
    assert_eq!(
        reason(&plan, "web"),
        "started 5 of web: demand 0 is below min 5"
    );
    let mut w = World::new(config(
        Capacity::Slots(20),
        vec![triggered("web", 1).min(5).max(8).step(1)],
    ));
    w.observe("web", 0, 0).demand("web", Some(7.0));
    let plan = w.decide();
    assert_eq!(plan.target("web"), 5);
    assert_eq!(
        reason(&plan, "web"),
        "started 5 of web: demand 7; raised to min 5 (max_step 1 applies only within min and max)"
    );

    let mut w = World::new(config(
        Capacity::Slots(20),
        vec![triggered("web", 1).min(5).max(8).step(1)],
    ));
    w.observe("web", 12, 0).demand("web", Some(20.0));
    let plan = w.decide();
    assert_eq!(plan.target("web"), 8);
    assert_eq!(bound(&plan, "web"), Bound::Max);
}

#[test]
fn max_clamps() {
    let mut w = World::new(config(
        Capacity::Slots(20),
        vec![triggered("web", 1).max(6), remainder("batch", 2)],
    ));
    w.settled("web", 2).settled("batch", 18);
    w.demand("web", Some(20.0));
    let plan = w.decide();
    assert_eq!(plan.target("web"), 6);
    assert_eq!(plan.target("batch"), 14);
    assert_eq!(bound(&plan, "web"), Bound::Max);
    assert_eq!(
        reason(&plan, "web"),
        "started 4 of web: demand 20 is above max 6; took 4 slots from batch (priority 2)"
    );

    // A remainder service stops at its max and leaves the rest free.
    let mut w = World::new(config(
        Capacity::Slots(9),
        vec![triggered("web", 1), remainder("batch", 2).max(3)],
    ));
    w.demand("web", Some(2.0));
    let plan = w.decide();
    assert_eq!((plan.target("batch"), plan.free()), (3, 4));
    assert_eq!(bound(&plan, "batch"), Bound::Max);
    assert_eq!(
        reason(&plan, "batch"),
        "started 3 of batch: fills free capacity up to max 3: 3 of 9 slots"
    );
}

#[test]
fn demand_is_rounded_up_and_the_max_over_triggers() {
    let mut s = triggered("web", 1);
    s.kind = ServiceKind::Triggered(vec![trigger("queue"), trigger("rps")]);
    let mut w = World::new(config(Capacity::Slots(20), vec![s]));
    w.samples.insert(
        name("web"),
        vec![
            TriggerSample {
                trigger: "queue".into(),
                value: Some(2.2),
            },
            TriggerSample {
                trigger: "rps".into(),
                value: Some(4.01),
            },
        ],
    );
    let plan = w.decide();
    assert_eq!(plan.target("web"), 5);
    assert_eq!(plan.service("web").unwrap().demand, Some(4.01));
}

#[test]
fn converging_service_is_held_until_converge_timeout() {
    let mut w = World::new(config(Capacity::Slots(20), vec![triggered("web", 1)]));
    let changed = w.now - Duration::from_secs(2);
    w.committed("web", 4, changed).observe("web", 2, 2);
    w.demand("web", Some(8.0));
    let plan = w.decide();
    assert_eq!(plan.target("web"), 4);
    assert!(plan.actions.is_empty());
    assert_eq!(bound(&plan, "web"), Bound::Converging);
    assert_eq!(
        plan.service("web").unwrap().reason,
        "waiting for the previous change to converge: 2 running, 2 pending of 4"
    );
    // Held downwards too, and the hold keeps the time of the change.
    w.demand("web", Some(1.0));
    let plan = w.decide();
    assert_eq!(plan.target("web"), 4);
    assert_eq!(
        w.memory.commitment(&name("web")).unwrap().changed_at,
        changed
    );

    // converge_timeout after the change, the service may change again.
    w.now = changed + w.cfg.converge_timeout;
    w.demand("web", Some(8.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["+4 web"]);
}

#[test]
fn converging_service_can_still_be_preempted_within_max_step() {
    let mut w = World::new(config(
        Capacity::Slots(10),
        vec![triggered("web", 1), triggered("batch", 2).step(2)],
    ));
    w.settled("web", 2);
    w.committed("batch", 8, w.now - Duration::from_secs(1))
        .observe("batch", 5, 3);
    w.demand("web", Some(8.0)).demand("batch", Some(8.0));
    let plan = w.decide();
    assert_eq!(plan.target("batch"), 6);
    assert_eq!(plan.target("web"), 4);
    assert_eq!(bound(&plan, "batch"), Bound::Preempted);
}

#[test]
fn missing_sample_holds_but_never_scales_down() {
    let mut w = World::new(config(
        Capacity::Slots(9),
        vec![triggered("web", 1), remainder("batch", 2)],
    ));
    w.settled("web", 5).settled("batch", 4).demand("web", None);
    let plan = w.decide();
    assert!(plan.actions.is_empty(), "{plan:#?}");
    assert_eq!(bound(&plan, "web"), Bound::MissingDemand);
    assert_eq!(plan.service("web").unwrap().demand, None);
    assert_eq!(
        plan.service("web").unwrap().reason,
        "no demand sample; holding at 5"
    );

    // No sample at all (not even a failed one) is missing too.
    w.samples = Samples::default();
    assert!(w.decide().actions.is_empty());
}

#[test]
fn missing_sample_does_not_protect_from_preemption() {
    let mut w = World::new(config(
        Capacity::Slots(9),
        vec![triggered("web", 1), triggered("batch", 2)],
    ));
    w.settled("web", 4).settled("batch", 5);
    w.demand("web", Some(7.0)).demand("batch", None);
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-3 batch", "+3 web"]);
    assert_eq!(bound(&plan, "batch"), Bound::Preempted);
}

#[test]
fn one_missing_trigger_of_several_allows_scaling_up_but_not_down() {
    let mut s = triggered("web", 1);
    s.kind = ServiceKind::Triggered(vec![trigger("queue"), trigger("rps")]);
    let mut w = World::new(config(Capacity::Slots(20), vec![s]));
    w.settled("web", 5);
    let set = |w: &mut World, rps: f64| {
        w.samples.insert(
            name("web"),
            vec![
                TriggerSample {
                    trigger: "queue".into(),
                    value: None,
                },
                TriggerSample {
                    trigger: "rps".into(),
                    value: Some(rps),
                },
            ],
        );
    };
    // The queue might ask for 10: a low rps alone must not scale down.
    set(&mut w, 2.0);
    let plan = w.decide();
    assert!(plan.actions.is_empty(), "{plan:#?}");
    assert_eq!(bound(&plan, "web"), Bound::MissingDemand);
    assert_eq!(
        plan.service("web").unwrap().reason,
        "no demand sample from queue; holding at 5 (demand 2 alone never scales down)"
    );
    // Whatever the queue says, 8 are needed for rps.
    set(&mut w, 8.0);
    let plan = w.decide();
    assert_eq!(actions(&plan), ["+3 web"]);
}

#[test]
fn missing_sample_on_first_tick_still_honours_min() {
    let mut w = World::new(config(Capacity::Slots(9), vec![triggered("web", 1).min(2)]));
    w.demand("web", None);
    let plan = w.decide();
    assert_eq!(plan.target("web"), 2);
    assert_eq!(bound(&plan, "web"), Bound::Min);
}

#[test]
fn three_priorities_the_lowest_gives_first() {
    let cfg = config(
        Capacity::Slots(10),
        vec![triggered("a", 1), triggered("b", 2), triggered("c", 3)],
    );
    let mut w = World::new(cfg.clone());
    w.settled("a", 3).settled("b", 3).settled("c", 4);
    w.demand("a", Some(3.0))
        .demand("b", Some(6.0))
        .demand("c", Some(4.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-3 c", "+3 b"]);
    assert_eq!(
        reason(&plan, "b"),
        "started 3 of b: demand 6 > 3; took 3 slots from c (priority 3)"
    );
    assert_eq!(
        reason(&plan, "c"),
        "stopped 3 of c: preempted by b (priority 2) needing 3 slots"
    );

    // b wants more than c has: c goes to zero, a keeps all it needs.
    let mut w = World::new(cfg);
    w.settled("a", 3).settled("b", 3).settled("c", 4);
    w.demand("a", Some(3.0))
        .demand("b", Some(9.0))
        .demand("c", Some(4.0));
    let plan = w.decide();
    assert_eq!(
        (plan.target("a"), plan.target("b"), plan.target("c")),
        (3, 7, 0)
    );
    assert_eq!(bound(&plan, "b"), Bound::Capacity);
}

#[test]
fn preemption_takes_from_the_lowest_then_the_next_lowest() {
    let mut w = World::new(config(
        Capacity::Slots(10),
        vec![
            triggered("a", 1),
            triggered("b", 2),
            triggered("c", 3).step(1),
        ],
    ));
    w.settled("a", 2).settled("b", 4).settled("c", 4);
    w.demand("a", Some(6.0))
        .demand("b", Some(4.0))
        .demand("c", Some(4.0));
    let plan = w.decide();
    // c can only give 1 this tick; b gives the other 3.
    assert_eq!(actions(&plan), ["-1 c", "-3 b", "+4 a"]);
    assert_eq!(
        reason(&plan, "a"),
        "started 4 of a: demand 6 > 2; took 1 slot from c (priority 3); \
         took 3 slots from b (priority 2)"
    );
}

#[test]
fn ties_are_broken_by_name_whatever_the_config_order() {
    let services = vec![triggered("beta", 1), triggered("alpha", 1)];
    let mut w = World::new(config(Capacity::Slots(5), services.clone()));
    w.demand("alpha", Some(4.0)).demand("beta", Some(4.0));
    let plan = w.decide();
    assert_eq!((plan.target("alpha"), plan.target("beta")), (4, 1));
    assert_eq!(plan.services[0].service.as_str(), "alpha");
    assert_eq!(actions(&plan), ["+4 alpha", "+1 beta"]);

    let mut reversed = services;
    reversed.reverse();
    let mut w2 = World::new(config(Capacity::Slots(5), reversed));
    w2.samples = w.samples.clone();
    assert_eq!(w2.decide(), plan);
}

#[test]
fn remainder_services_come_after_triggered_ones_whatever_their_priority() {
    let mut w = World::new(config(
        Capacity::Slots(6),
        vec![remainder("filler", 1), triggered("web", 2)],
    ));
    w.demand("web", Some(4.0));
    let plan = w.decide();
    assert_eq!((plan.target("web"), plan.target("filler")), (4, 2));
    assert_eq!(plan.services[0].service.as_str(), "web");
}

#[test]
fn per_host_follows_ready_hosts() {
    let mut w = World::new(config(
        Capacity::Slots(10),
        vec![per_host("agent", 1), remainder("batch", 2)],
    ));
    w.hosts(&[true, true, true]);
    let plan = w.decide();
    assert_eq!((plan.target("agent"), plan.target("batch")), (3, 7));
    assert_eq!(bound(&plan, "agent"), Bound::Hosts);
    assert_eq!(
        reason(&plan, "agent"),
        "started 3 of agent: one per ready host: 3 hosts"
    );
    w.converge();
    w.hosts(&[true, false, true]);
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-1 agent", "+1 batch"]);
    w.converge();
    w.hosts(&[true, true, true, true]);
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-2 batch", "+2 agent"]);
}

/// A per-host service the orchestrator runs on some hosts only (an ECS service limited by a
/// cluster query) counts the ready ones among them.
#[test]
fn per_host_limited_to_some_hosts_counts_those() {
    let mut w = World::new(config(
        Capacity::Slots(10),
        vec![per_host("agent", 1), remainder("batch", 2)],
    ));
    w.hosts(&[true, true, true, false]);
    w.observed
        .runs_on
        .insert(name("agent"), vec!["h0".into(), "h2".into(), "h3".into()]);
    let plan = w.decide();
    assert_eq!((plan.target("agent"), plan.target("batch")), (2, 8));
    assert_eq!(
        reason(&plan, "agent"),
        "started 2 of agent: one per ready host: 2 hosts"
    );
    w.converge();
    w.hosts(&[true, true, true, true]);
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-1 batch", "+1 agent"]);
}

/// Where the orchestrator keeps one per host itself (Swarm's global mode), a per-host
/// service's count has already followed the hosts when the plan sees them: the plan follows
/// at once, not after the previous change converges. Elsewhere microscaler places them and a
/// change still converging holds as for any service.
#[test]
fn per_host_follows_the_hosts_at_once_where_the_orchestrator_keeps_them() {
    for (kind, native) in [("swarm", true), ("process", false)] {
        let mut cfg = config(
            Capacity::Slots(10),
            vec![per_host("agent", 1), remainder("batch", 2)],
        );
        cfg.backend = opaque::Backend::of(kind);
        let mut w = World::new(cfg);
        w.hosts(&[true, true, true]);
        w.decide();
        w.converge();
        // A host goes while agent's last change (to 3) is still converging: 2 run, 1 pending.
        w.observe("agent", 2, 1);
        w.hosts(&[true, true, false]);
        let plan = w.decide();
        if native {
            assert_eq!(plan.target("agent"), 2, "{kind}: {plan:?}");
            assert_eq!(bound(&plan, "agent"), Bound::Hosts);
        } else {
            assert_eq!(plan.target("agent"), 3, "{kind}: {plan:?}");
            assert_eq!(bound(&plan, "agent"), Bound::Converging);
        }
    }
}

#[test]
fn capacity_shrinking_under_what_is_placed_sheds_lowest_priority_first() {
    let mut w = World::new(config(
        Capacity::SlotsPerHost(3),
        vec![triggered("web", 1), remainder("batch", 2).step(1)],
    ));
    w.hosts(&[true, true, true]);
    w.settled("web", 4)
        .settled("batch", 5)
        .demand("web", Some(4.0));
    assert!(w.decide().actions.is_empty());

    // A host goes: 6 slots for the 9 placed. batch sheds 3, beyond its max_step.
    w.hosts(&[true, true, false]);
    let plan = w.decide();
    assert_eq!(plan.capacity, 6);
    assert_eq!(actions(&plan), ["-3 batch"]);
    assert_eq!(bound(&plan, "batch"), Bound::OverCapacity);
    assert_eq!(
        reason(&plan, "batch"),
        "stopped 3 of batch: capacity 6 is below the 9 slots placed; lowest priority shrinks first"
    );
    assert_eq!(plan.allocated, 6);

    // Another goes: 3 slots. batch goes to zero first, then web gives what it must.
    w.converge();
    w.hosts(&[false, true, false]);
    let plan = w.decide();
    assert_eq!(plan.capacity, 3);
    assert_eq!(actions(&plan), ["-2 batch", "-1 web"]);
    assert_eq!(bound(&plan, "web"), Bound::OverCapacity);
    assert_eq!(plan.allocated, 3);

    // No host at all: nothing can run.
    w.converge();
    w.hosts(&[]);
    let plan = w.decide();
    assert_eq!(plan.allocated, 0);
    assert_eq!(actions(&plan), ["-3 web"]);
}

#[test]
fn capacity_shrinking_while_a_higher_priority_grows_names_both_causes() {
    let mut w = World::new(config(
        Capacity::SlotsPerHost(3),
        vec![triggered("web", 1), remainder("batch", 2)],
    ));
    w.hosts(&[true, true, false]);
    w.settled("web", 4)
        .settled("batch", 5)
        .demand("web", Some(5.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-4 batch", "+1 web"]);
    assert_eq!(bound(&plan, "batch"), Bound::Preempted);
    assert_eq!(
        reason(&plan, "batch"),
        "stopped 4 of batch: preempted by web (priority 1) needing 1 slot; 3 more because \
         capacity 6 is below the 9 slots placed; lowest priority shrinks first"
    );
}

#[test]
fn actions_free_capacity_first_lowest_priority_first_then_start_highest_first() {
    let mut w = World::new(config(
        Capacity::Slots(20),
        vec![
            remainder("d", 4),
            triggered("c", 3),
            triggered("b", 2),
            triggered("a", 1),
        ],
    ));
    w.settled("a", 2)
        .settled("b", 6)
        .settled("c", 2)
        .settled("d", 10);
    w.demand("a", Some(5.0))
        .demand("b", Some(3.0))
        .demand("c", Some(4.0));
    let plan = w.decide();
    assert_eq!(actions(&plan), ["-2 d", "-3 b", "+3 a", "+2 c"]);
    let kinds: Vec<ActionKind> = plan.actions.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [
            ActionKind::Stop,
            ActionKind::Stop,
            ActionKind::Start,
            ActionKind::Start
        ]
    );
}

#[test]
fn at_target_nothing_happens() {
    let mut w = World::demo();
    w.settled("priority1", 4).settled("priority2", 5);
    w.demand("priority1", Some(4.0));
    let before = w.memory.clone();
    let plan = w.decide();
    assert!(plan.actions.is_empty());
    assert_eq!(w.memory, before);
    assert_eq!(bound(&plan, "priority1"), Bound::Demand);
    assert_eq!(plan.service("priority1").unwrap().reason, "demand 4 = 4");
}

#[test]
fn adopts_what_is_running_on_the_first_tick() {
    let mut w = World::demo();
    w.observe("priority1", 3, 1).observe("priority2", 5, 0);
    w.demand("priority1", Some(4.0));
    let plan = w.decide();
    assert!(plan.actions.is_empty(), "{plan:#?}");
    assert_eq!(plan.service("priority1").unwrap().current, 4);
}

// ---------------------------------------------------------------------------------------------
// Whole runs.

/// The demo's demand walk: moves by up to 3, one value per 3 s (6 ticks of 500 ms).
const WALK: &[f64] = &[
    4.0, 7.0, 9.0, 6.0, 3.0, 6.0, 8.0, 5.0, 2.0, 0.0, 3.0, 6.0, 9.0,
];

#[test]
fn demo_run_with_an_instant_backend_tracks_demand_every_tick() {
    let mut w = World::demo();
    for &d in WALK {
        w.demand("priority1", Some(d));
        for _ in 0..6 {
            let plan = w.decide();
            w.converge();
            let (p1, p2) = (plan.target("priority1"), plan.target("priority2"));
            assert_eq!(p1, d as u32, "{plan:#?}");
            assert_eq!(p1 + p2, 9, "{plan:#?}");
        }
    }
}

/// A backend where a stop is immediate but a started replica stays pending for `lag` ticks.
struct SlowBackend {
    lag: u32,
    /// Per service: running, and the ticks left for each pending replica.
    state: std::collections::BTreeMap<ServiceName, (u32, Vec<u32>)>,
}

impl SlowBackend {
    fn apply(&mut self, plan: &Plan) {
        // Stops run before starts, as the plan orders them.
        for a in &plan.actions {
            let (running, pending) = self.state.entry(a.service.clone()).or_default();
            match a.kind {
                ActionKind::Stop => {
                    for _ in 0..a.count {
                        if pending.pop().is_none() {
                            *running -= 1;
                        }
                    }
                }
                ActionKind::Start => {
                    pending.extend(std::iter::repeat_n(self.lag, a.count as usize))
                }
            }
        }
    }

    fn advance(&mut self) {
        for (running, pending) in self.state.values_mut() {
            for p in pending.iter_mut() {
                *p = p.saturating_sub(1);
            }
            let ready = pending.iter().filter(|p| **p == 0).count() as u32;
            pending.retain(|p| *p > 0);
            *running += ready;
        }
    }

    fn observed(&self) -> Observed {
        Observed {
            placement: Default::default(),
            runs_on: Default::default(),
            services: self
                .state
                .iter()
                .map(|(n, (r, p))| (n.clone(), ServiceObservation::counts(*r, p.len() as u32)))
                .collect(),
            hosts: Vec::new(),
        }
    }

    fn total(&self) -> u32 {
        self.state.values().map(|(r, p)| r + p.len() as u32).sum()
    }
}

#[test]
fn demo_run_with_slow_starts_converges_within_each_demand_period() {
    let mut w = World::demo();
    let mut backend = SlowBackend {
        lag: 2,
        state: Default::default(),
    };
    for &d in WALK {
        w.demand("priority1", Some(d));
        let mut last = None;
        for _ in 0..6 {
            w.observed = backend.observed();
            let plan = w.decide();
            backend.apply(&plan);
            assert!(backend.total() <= 9, "the cluster never holds more than 9");
            backend.advance();
            last = Some(plan);
        }
        let plan = last.unwrap();
        let obs = backend.observed();
        let running = |s: &str| obs.service(&name(s)).running;
        assert_eq!(plan.target("priority1"), d as u32, "{plan:#?}");
        assert_eq!(running("priority1"), d as u32, "{obs:#?}");
        assert_eq!(running("priority1") + running("priority2"), 9, "{obs:#?}");
    }
}

/// A paused service holds its count: demand does not move it and a higher priority cannot take
/// from it; resumed, it follows the rules again.
#[test]
fn paused_service_is_frozen_until_resumed() {
    use microscaler_core::{Bound, EngineState, ServiceName};
    let cfg = Config::from_toml(
        r#"
        [capacity]
        slots = 9
        [backend]
        type = "process"
        [[services]]
        name = "web"
        priority = 1
        [[services.triggers]]
        type = "manual"
        [[services]]
        name = "batch"
        priority = 2
        remainder = true
        "#,
    )
    .unwrap();
    let web = ServiceName::try_new("web").unwrap();
    let batch = ServiceName::try_new("batch").unwrap();
    let mut observed = microscaler_core::Observed::default();
    let mut samples = microscaler_core::Samples::default();
    samples.set(&web, "manual", Some(3.0));
    let (plan, mut mem) = microscaler_core::decide(
        &cfg,
        &observed,
        &samples,
        &EngineState::default(),
        Duration::ZERO,
    );
    assert_eq!((plan.target("web"), plan.target("batch")), (3, 6));
    for p in &plan.services {
        observed.services.insert(
            p.service.clone(),
            microscaler_core::ServiceObservation::counts(p.target, 0),
        );
    }

    mem.paused.insert(batch.clone());
    samples.set(&web, "manual", Some(7.0));
    let (plan, mut mem) =
        microscaler_core::decide(&cfg, &observed, &samples, &mem, Duration::from_secs(1));
    assert_eq!(plan.target("batch"), 6, "a paused service is not preempted");
    assert_eq!(plan.service("batch").unwrap().bound, Bound::Paused);
    assert_eq!(
        plan.target("web"),
        3,
        "web cannot grow into a paused service's slots"
    );
    assert!(mem.paused.contains(&batch), "pause is carried over");

    mem.paused.clear();
    let (plan, _) =
        microscaler_core::decide(&cfg, &observed, &samples, &mem, Duration::from_secs(2));
    assert_eq!((plan.target("web"), plan.target("batch")), (7, 2));
}

// ---------------------------------------------------------------------------------------------
// The memory's name-order hint: a tick reuses the last tick's order of the services by name
// only while it still sorts the configuration it is given.

/// The public part of a memory, without the hint a tick leaves for the next, and with its
/// commitments in another order than the configuration's (so they are matched by name).
fn without_hint(m: &EngineState) -> EngineState {
    let mut fresh = EngineState::default();
    let mut commitments: Vec<_> = m.commitments().collect();
    commitments.reverse();
    for (n, c) in commitments {
        fresh.set_commitment(n.clone(), *c);
    }
    fresh.paused = m.paused.clone();
    fresh.rules = m.rules.clone();
    fresh.paused_replicas = m.paused_replicas.clone();
    fresh
}

#[test]
fn a_memory_from_another_configuration_gives_the_same_plan_as_without_its_hint() {
    let names = ["api", "batch", "cache", "db", "edge", "feed"];
    let build = |order: &[usize], rename: Option<(usize, &str)>| {
        let services = order
            .iter()
            .map(|&k| {
                let n = match rename {
                    Some((r, to)) if r == k => to,
                    _ => names[k],
                };
                if k == names.len() - 1 {
                    remainder(n, 9)
                } else {
                    triggered(n, 1 + k as u32 % 3).max(4)
                }
            })
            .collect();
        config(Capacity::Slots(10), services)
    };
    let samples = |cfg: &Config, round: u32| {
        let mut s = Samples::default();
        for (i, svc) in cfg.services.iter().enumerate() {
            if !svc.is_remainder() {
                s.set(&svc.name, LOAD, Some(((i as u32 + round) % 5) as f64));
            }
        }
        s
    };
    let first = build(&[0, 1, 2, 3, 4, 5], None);
    let (_, memory) = decide(
        &first,
        &Observed::default(),
        &samples(&first, 0),
        &EngineState::default(),
        Duration::from_secs(1),
    );
    // The same services in another order, one renamed so the old order no longer sorts them,
    // and one where it still would if the indices were taken as names.
    let others = [
        build(&[5, 4, 3, 2, 1, 0], None),
        build(&[0, 1, 2, 3, 4, 5], Some((0, "zeta"))),
        build(&[2, 0, 1, 5, 3, 4], Some((3, "aaa"))),
        build(&[0, 1, 2, 3, 4, 5], None),
    ];
    for (k, cfg) in others.iter().enumerate() {
        for round in 1..4 {
            let at = Duration::from_secs(1 + round as u64);
            let s = samples(cfg, round);
            let with = decide(cfg, &Observed::default(), &s, &memory, at);
            let plain = decide(cfg, &Observed::default(), &s, &without_hint(&memory), at);
            assert_eq!(
                with.0, plain.0,
                "configuration {k}, round {round}: plans differ"
            );
            assert_eq!(
                with.1, plain.1,
                "configuration {k}, round {round}: memories differ"
            );
            // The plan lists services in allocation order, ties broken by name.
            let order: Vec<(bool, u32, String)> = with
                .0
                .services
                .iter()
                .map(|sp| (sp.remainder, sp.priority.get(), sp.service.to_string()))
                .collect();
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(order, sorted, "configuration {k}: allocation order");
        }
    }
}
