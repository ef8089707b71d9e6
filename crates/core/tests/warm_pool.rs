//! The warm pool in the engine and the configuration: paused replicas (pooled, or preempted
//! with `preempt = "pause"`) are neither running nor pending, and take capacity slots only for
//! services whose pool sets `paused_takes_slot`. Table tests, then properties.

use std::time::Duration;

use microscaler_core::config::OnExit;
use microscaler_core::engine::Commitment;
use microscaler_core::*;
use proptest::prelude::*;

use microscaler_core::plugin::opaque::{self, Opaque};

type Config = microscaler_core::Config<Opaque>;
type Service = microscaler_core::Service<Opaque>;
type ServiceKind = microscaler_core::ServiceKind<opaque::Source>;
type Trigger = microscaler_core::Trigger<opaque::Source>;

fn name(s: &str) -> ServiceName {
    ServiceName::try_new(s).unwrap()
}

fn svc(n: &str, priority: u32, kind: ServiceKind, pool: PoolSpec) -> Service {
    Service {
        name: name(n),
        priority: Priority::try_new(priority).unwrap(),
        min: 0,
        max: u32::MAX,
        max_step: None,
        kind,
        workload: Default::default(),
        stop_grace: Duration::from_secs(10),
        pool,
        resources: None,
    }
}

fn triggered(n: &str, priority: u32, pool: PoolSpec) -> Service {
    let t = Trigger::new("load", opaque::Source::of("manual"));
    svc(n, priority, ServiceKind::Triggered(vec![t]), pool)
}

fn config(slots: u32, services: Vec<Service>) -> Config {
    Config {
        instance: "test".into(),
        tick: Duration::from_millis(500),
        sample_timeout: Duration::from_millis(250),
        converge_timeout: Duration::from_secs(30),
        on_exit: OnExit::Leave,
        capacity: Capacity::Slots(slots),
        backend: opaque::Backend::of("process"),
        services,
        scaling: Default::default(),
        server: Default::default(),
        ha: None,
    }
}

fn pool(size: u32, preempt: Preempt, paused_takes_slot: bool) -> PoolSpec {
    PoolSpec {
        size,
        preempt,
        paused_takes_slot,
    }
}

/// The inputs of one tick.
#[derive(Default)]
struct Tick {
    observed: Observed,
    samples: Samples,
    memory: EngineState,
}

impl Tick {
    /// `s` runs `running` replicas (committed and converged) and has `paused` paused.
    fn settled(mut self, s: &str, running: u32, paused: u32) -> Self {
        self.observed
            .services
            .insert(name(s), ServiceObservation::counts(running, 0));
        self.memory.set_commitment(
            name(s),
            Commitment {
                target: running,
                changed_at: Duration::ZERO,
            },
        );
        if paused > 0 {
            self.memory.paused_replicas.insert(name(s), paused);
        }
        self
    }
    fn demand(mut self, s: &str, v: f64) -> Self {
        self.samples.set(&name(s), "load", Some(v));
        self
    }
    fn decide(&self, cfg: &Config) -> (Plan, EngineState) {
        decide(
            cfg,
            &self.observed,
            &self.samples,
            &self.memory,
            Duration::from_secs(100),
        )
    }
}

fn targets(plan: &Plan) -> Vec<(String, u32)> {
    plan.services
        .iter()
        .map(|s| (s.service.to_string(), s.target))
        .collect()
}

#[test]
fn paused_replicas_take_no_slot_by_default() {
    // The seeds' demo with a pool of 3 on priority 1 and priority 2 preempted with pause.
    let cfg = config(
        9,
        vec![
            triggered("p1", 1, pool(3, Preempt::Stop, false)),
            svc(
                "p2",
                2,
                ServiceKind::Remainder,
                pool(0, Preempt::Pause, false),
            ),
        ],
    );
    let tick = Tick::default()
        .settled("p1", 3, 3)
        .settled("p2", 6, 2)
        .demand("p1", 5.0);
    let (plan, memory) = tick.decide(&cfg);
    assert_eq!(plan.capacity, 9, "no slot held by paused replicas");
    assert_eq!(
        targets(&plan),
        vec![("p1".into(), 5), ("p2".into(), 4)],
        "{plan:#?}"
    );
    let p1 = plan.service("p1").unwrap();
    assert_eq!((p1.running, p1.pending, p1.paused), (3, 0, 3));
    assert_eq!(plan.service("p2").unwrap().paused, 2);
    assert_eq!(
        memory.paused_replicas, tick.memory.paused_replicas,
        "carried over"
    );
}

#[test]
fn paused_replicas_take_a_slot_when_configured() {
    let cfg = config(
        9,
        vec![
            triggered("p1", 1, pool(2, Preempt::Stop, true)),
            svc("p2", 2, ServiceKind::Remainder, PoolSpec::default()),
        ],
    );
    let tick = Tick::default()
        .settled("p1", 3, 2)
        .settled("p2", 6, 0)
        .demand("p1", 3.0);
    let (plan, _) = tick.decide(&cfg);
    assert_eq!(plan.capacity, 7, "two slots held by the pool");
    assert_eq!(
        targets(&plan),
        vec![("p1".into(), 3), ("p2".into(), 4)],
        "the remainder gives the pool's slots back: {plan:#?}"
    );
    assert_eq!(plan.actions.len(), 1);
    assert_eq!(plan.actions[0].bound, Bound::OverCapacity);

    // Priority 1 still gets its demand first: the pool's slots come off the remainder.
    let tick = Tick::default()
        .settled("p1", 3, 2)
        .settled("p2", 4, 0)
        .demand("p1", 7.0);
    let (plan, _) = tick.decide(&cfg);
    assert_eq!(targets(&plan), vec![("p1".into(), 7), ("p2".into(), 0)]);
}

#[test]
fn paused_replicas_are_neither_running_nor_pending_for_convergence() {
    let cfg = config(9, vec![triggered("p1", 1, pool(2, Preempt::Stop, false))]);
    // Converged at 3 with 2 paused: a new demand is acted on at once.
    let tick = Tick::default().settled("p1", 3, 2).demand("p1", 5.0);
    let (plan, _) = tick.decide(&cfg);
    let p1 = plan.service("p1").unwrap();
    assert_eq!((p1.target, p1.bound), (5, Bound::Demand), "{plan:#?}");

    // First tick (nothing committed): the current count is running + pending, never paused.
    let mut tick = Tick::default().demand("p1", 1.0);
    tick.observed
        .services
        .insert(name("p1"), ServiceObservation::counts(1, 0));
    tick.memory.paused_replicas.insert(name("p1"), 2);
    let (plan, _) = tick.decide(&cfg);
    let p1 = plan.service("p1").unwrap();
    assert_eq!((p1.current, p1.target), (1, 1), "{plan:#?}");
    assert!(plan.actions.is_empty());
}

const BASE: &str = r#"
    [capacity]
    slots = 9
    [[services]]
    name = "p1"
    max = 6
    [[services.triggers]]
    type = "manual"
"#;

fn errors(backend: &str, pool: &str) -> Vec<String> {
    let toml = format!("[backend]\ntype = \"{backend}\"\n{BASE}[services.pool]\n{pool}\n");
    match Config::from_toml(&toml) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn pool_config_is_validated_with_paths() {
    let cfg = Config::from_toml(&format!(
        "[backend]\ntype = \"docker\"\n{BASE}[services.pool]\nsize = 2\npreempt = \"pause\"\n"
    ))
    .expect("valid");
    assert_eq!(cfg.services[0].pool, pool(2, Preempt::Pause, false));
    let cfg = Config::from_toml(&format!("[backend]\ntype = \"docker\"\n{BASE}")).unwrap();
    assert_eq!(
        cfg.services[0].pool,
        PoolSpec::default(),
        "no pool, stop by default"
    );

    assert_eq!(errors("docker", "size = 7"), vec!["services[0].pool.size: must be <= max (6): a pool larger than the service can never be used, got 7"]);
    assert_eq!(
        errors("docker", "preempt = \"freeze\""),
        vec!["services[0].pool.preempt: must be \"stop\" or \"pause\", got \"freeze\""]
    );
    assert_eq!(
        errors("docker", "sise = 1"),
        vec!["services[0].pool.sise: unknown key"]
    );
    let e = errors("docker", "preempt = \"pause\"\npaused_takes_slot = true");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("services[0].pool.paused_takes_slot: with preempt = \"pause\""),
        "{e:?}"
    );
    assert_eq!(
        errors("swarm", "size = 1"),
        vec!["services[0].pool: the swarm backend cannot pause replicas: remove [services.pool] or use a backend that can (docker)"]
    );
    assert_eq!(
        errors("process", "preempt = \"pause\""),
        vec!["services[0].pool: the process backend cannot pause replicas: remove [services.pool] or use a backend that can (docker)"]
    );
    assert!(
        errors("swarm", "size = 0\npreempt = \"stop\"").is_empty(),
        "an empty pool is fine anywhere"
    );
}

// ---------------------------------------------------------------------------------------------
// Properties.

#[derive(Debug, Clone)]
struct Case {
    cfg: Config,
    observed: Observed,
    samples: Samples,
    memory: EngineState,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=5, 0u32..=30).prop_flat_map(|(n, slots)| {
        let per = (
            any::<bool>(),                               // remainder?
            1u32..=3,                                    // priority
            0u32..=2,                                    // min
            0u32..=8,                                    // running
            0u32..=2,                                    // pending
            prop::option::of((0u32..=9, any::<bool>())), // committed target, converged long ago?
            0u32..=10,                                   // demand
            0u32..=4,                                    // paused
            any::<bool>(),                               // paused_takes_slot
        );
        prop::collection::vec(per, n).prop_map(move |per| {
            let mut services = Vec::new();
            let mut observed = Observed::default();
            let mut samples = Samples::default();
            let mut memory = EngineState::default();
            for (i, (rem, prio, min, running, pending, commit, demand, paused, takes)) in
                per.into_iter().enumerate()
            {
                let n = format!("s{i}");
                let p = pool(paused.min(2), Preempt::Stop, takes);
                let mut s = if rem {
                    svc(&n, prio, ServiceKind::Remainder, p)
                } else {
                    triggered(&n, prio, p)
                };
                s.min = min.min(slots / 5);
                observed
                    .services
                    .insert(name(&n), ServiceObservation::counts(running, pending));
                if let Some((target, old)) = commit {
                    memory.set_commitment(
                        name(&n),
                        Commitment {
                            target,
                            changed_at: if old {
                                Duration::ZERO
                            } else {
                                Duration::from_secs(99)
                            },
                        },
                    );
                }
                if !rem {
                    samples.set(&name(&n), "load", Some(demand as f64));
                }
                if paused > 0 {
                    memory.paused_replicas.insert(name(&n), paused);
                }
                services.push(s);
            }
            Case {
                cfg: config(slots, services),
                observed,
                samples,
                memory,
            }
        })
    })
}

fn run(c: &Case) -> (Plan, EngineState) {
    decide(
        &c.cfg,
        &c.observed,
        &c.samples,
        &c.memory,
        Duration::from_secs(100),
    )
}

proptest! {
    /// Paused replicas that take a slot are exactly a smaller cluster: the plan equals the plan
    /// of the same tick with the capacity reduced by them and no paused replicas (but for the
    /// reported paused counts). Paused replicas that take no slot change nothing at all.
    #[test]
    fn paused_replicas_count_against_capacity_only_as_configured(c in case()) {
        let (plan, memory) = run(&c);
        let held: u32 = c
            .cfg
            .services
            .iter()
            .filter(|s| s.pool.paused_takes_slot)
            .map(|s| c.memory.paused_replicas.get(&s.name).copied().unwrap_or(0))
            .sum();
        let Capacity::Slots(slots) = c.cfg.capacity else { unreachable!() };
        prop_assert_eq!(plan.capacity, slots.saturating_sub(held));
        let mins: u32 = c.cfg.services.iter().map(|s| s.min).sum();
        if mins <= plan.capacity {
            prop_assert!(plan.allocated <= slots.saturating_sub(held), "replicas fit beside the held slots: {:#?}", plan);
        }

        let mut smaller = c.clone();
        smaller.cfg.capacity = Capacity::Slots(slots.saturating_sub(held));
        smaller.memory.paused_replicas.clear();
        let (mut expected, mut expected_memory) = run(&smaller);
        for sp in &mut expected.services {
            sp.paused = c.memory.paused_replicas.get(&sp.service).copied().unwrap_or(0);
        }
        expected_memory.paused_replicas = c.memory.paused_replicas.clone();
        prop_assert_eq!(&plan, &expected);
        prop_assert_eq!(&memory, &expected_memory);

        // The paused counts never make a replica running or pending.
        for sp in &plan.services {
            let o = c.observed.service(&sp.service);
            prop_assert_eq!((sp.running, sp.pending), (o.running, o.pending));
        }
    }
}
