//! Capacity in CPU and memory (`[capacity] resources = true`): the engine plans where replicas
//! fit, host by host. Table tests through `decide` (fragmentation, room taken from the lowest
//! priority where it then fits, the reserve), and property tests: the placement never goes over
//! any host's allocatable in any dimension, respects wants and floors, and with every replica
//! one slot's worth the plan is the slot engine's plan.

use std::collections::BTreeMap;
use std::time::Duration;

use microscaler_core::config::OnExit;
use microscaler_core::engine::Commitment;
use microscaler_core::placement::{place, Ask, Growth, Room};
use microscaler_core::*;
use proptest::prelude::*;

use microscaler_core::plugin::opaque::{self, Opaque};

type Config = microscaler_core::Config<Opaque>;
type Service = microscaler_core::Service<Opaque>;
type ServiceKind = microscaler_core::ServiceKind<opaque::Source>;
type Trigger = microscaler_core::Trigger<opaque::Source>;

const GIB: u64 = 1024 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

fn name(s: &str) -> ServiceName {
    ServiceName::try_new(s).unwrap()
}

fn res(cpu_milli: u64, memory: u64) -> Resources {
    Resources { cpu_milli, memory }
}

fn service(n: &str, priority: u32, kind: ServiceKind, need: Resources) -> Service {
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
        resources: Some(need),
    }
}

fn triggered(n: &str, priority: u32, need: Resources) -> Service {
    service(
        n,
        priority,
        ServiceKind::Triggered(vec![Trigger::new("load", opaque::Source::of("manual"))]),
        need,
    )
}

fn remainder(n: &str, priority: u32, need: Resources) -> Service {
    service(n, priority, ServiceKind::Remainder, need)
}

fn config(capacity: Capacity, services: Vec<Service>) -> Config {
    Config {
        instance: "test".into(),
        tick: Duration::from_millis(500),
        sample_timeout: Duration::from_millis(250),
        converge_timeout: Duration::from_secs(30),
        on_exit: OnExit::Leave,
        capacity,
        backend: opaque::Backend::of("docker"),
        services,
        scaling: Default::default(),
        server: Default::default(),
        ha: None,
    }
}

fn host(i: usize, cpus: f64, memory: u64) -> Host {
    Host {
        id: format!("h{i}").into(),
        name: format!("host-{i}"),
        ready: true,
        cpus: Some(cpus),
        memory_bytes: Some(memory),
    }
}

/// One tick: `placed[service] = per-host counts` (running, committed, converged), demands of
/// the triggered services.
fn tick(cfg: &Config, hosts: &[Host], placed: &[(&str, Vec<u32>)], demand: &[(&str, f64)]) -> Plan {
    let mut observed = Observed {
        hosts: hosts.to_vec(),
        ..Default::default()
    };
    let mut memory = EngineState::default();
    for (svc, per_host) in placed {
        let total: u32 = per_host.iter().sum();
        observed
            .services
            .insert(name(svc), ServiceObservation::counts(total, 0));
        memory.set_commitment(
            name(svc),
            Commitment {
                target: total,
                changed_at: Duration::ZERO,
            },
        );
        for (h, &n) in per_host.iter().enumerate() {
            if n > 0 {
                observed
                    .placement
                    .entry(hosts[h].id.clone())
                    .or_default()
                    .insert(name(svc), n);
            }
        }
    }
    let mut samples = Samples::default();
    for (svc, v) in demand {
        samples.set(&name(svc), "load", Some(*v));
    }
    decide(cfg, &observed, &samples, &memory, Duration::from_secs(100)).0
}

/// The issue's fragmentation case: 1 CPU free in all, 0.5 on each of two hosts; a replica of
/// 1 CPU fits on neither, so it is not planned, and the reason names what no host has.
#[test]
fn free_resources_split_over_hosts_are_not_room() {
    let hosts = [host(1, 2.0, 4 * GIB), host(2, 2.0, 4 * GIB)];
    let cfg = config(
        Capacity::Resources {
            reserve: Resources::ZERO,
        },
        vec![
            triggered("api", 2, res(1000, 512 * MIB)),
            triggered("etl", 1, res(1500, 512 * MIB)),
        ],
    );
    let plan = tick(
        &cfg,
        &hosts,
        &[("api", vec![0, 0]), ("etl", vec![1, 1])],
        &[("api", 1.0), ("etl", 2.0)],
    );
    let api = plan.service("api").unwrap();
    assert_eq!(api.target, 0, "{plan:?}");
    assert_eq!(api.bound, Bound::Capacity);
    assert!(
        api.reason
            .contains("no host has 1 CPU and 512 MiB free, even from lower priorities"),
        "{}",
        api.reason
    );
    assert!(plan.actions.is_empty(), "{plan:?}");
}

/// Priority 1 grows into the host where room can be made, taking from the remainder (the
/// lowest) rather than from priority 2; the reasons say who gave what, where.
#[test]
fn a_higher_priority_takes_room_from_the_lowest_where_it_then_fits() {
    let hosts = [host(1, 1.0, 2 * GIB), host(2, 2.0, 2 * GIB)];
    let cfg = config(
        Capacity::Resources {
            reserve: Resources::ZERO,
        },
        vec![
            triggered("web", 1, res(1500, 512 * MIB)),
            triggered("api", 2, res(500, 256 * MIB)),
            remainder("batch", 3, res(250, 128 * MIB)),
        ],
    );
    let plan = tick(
        &cfg,
        &hosts,
        &[
            ("web", vec![0, 0]),
            ("api", vec![1, 1]),
            ("batch", vec![2, 6]),
        ],
        &[("web", 1.0), ("api", 2.0)],
    );
    assert_eq!(plan.target("web"), 1, "{plan:?}");
    assert_eq!(plan.target("api"), 2, "{plan:?}");
    assert_eq!(plan.target("batch"), 2, "{plan:?}");
    let batch = plan.service("batch").unwrap();
    assert_eq!(batch.bound, Bound::Preempted);
    assert!(
        batch.reason.contains("gave 6 to web on host-2"),
        "{}",
        batch.reason
    );
    assert!(
        plan.service("web")
            .unwrap()
            .reason
            .contains("took 6 of batch on host-2 for room"),
        "{plan:?}"
    );
    // The plan says where batch's replicas go from (the host where web's room is made), so a
    // backend that can choose which replicas go picks those; the others give nothing up.
    assert_eq!(batch.remove_from, vec![(HostId::from("h2"), 6)], "{plan:?}");
    assert!(plan.service("api").unwrap().remove_from.is_empty());
    assert!(plan.service("web").unwrap().remove_from.is_empty());
}

/// A service whose demand falls gives its surplus back from the host where it has the most,
/// and the plan says so; in slots the plan names no host.
#[test]
fn surplus_leaves_from_the_host_the_plan_names() {
    let hosts = [host(1, 4.0, 4 * GIB), host(2, 4.0, 4 * GIB)];
    let services = || vec![triggered("api", 1, res(500, 256 * MIB))];
    let cfg = config(
        Capacity::Resources {
            reserve: Resources::ZERO,
        },
        services(),
    );
    let plan = tick(&cfg, &hosts, &[("api", vec![1, 4])], &[("api", 3.0)]);
    assert_eq!(plan.target("api"), 3, "{plan:?}");
    let api = plan.service("api").unwrap();
    assert_eq!(api.remove_from, vec![(HostId::from("h2"), 2)], "{plan:?}");
    let slots = config(Capacity::Slots(8), services());
    let plan = tick(&slots, &hosts, &[("api", vec![1, 4])], &[("api", 3.0)]);
    assert_eq!(plan.target("api"), 3, "{plan:?}");
    assert!(plan.service("api").unwrap().remove_from.is_empty());
}

/// Mins are reserved first, as with slots: a remainder below its min takes room from a
/// higher priority above its own min (the lowest such first, on the host where that makes
/// the room), and a service's min beats a later service's min.
#[test]
fn mins_are_reserved_ahead_of_higher_priorities() {
    let hosts = [host(1, 2.0, 4 * GIB), host(2, 2.0, 4 * GIB)];
    let mut web = triggered("web", 1, res(1000, 512 * MIB));
    web.min = 1;
    let api = triggered("api", 2, res(1000, 512 * MIB));
    let mut batch = remainder("batch", 3, res(2000, 512 * MIB));
    batch.min = 1;
    let cfg = config(
        Capacity::Resources {
            reserve: Resources::ZERO,
        },
        vec![web, api, batch],
    );
    // web runs 2 on host 1 and api 2 on host 2: batch (2 CPUs) fits nowhere; its min takes a
    // whole host from api (the lowest above its min), not from web.
    let plan = tick(
        &cfg,
        &hosts,
        &[
            ("web", vec![2, 0]),
            ("api", vec![0, 2]),
            ("batch", vec![0, 0]),
        ],
        &[("web", 2.0), ("api", 2.0)],
    );
    assert_eq!(plan.target("batch"), 1, "{plan:?}");
    assert_eq!(plan.target("api"), 0, "{plan:?}");
    assert_eq!(plan.target("web"), 2, "{plan:?}");
    let api = plan.service("api").unwrap();
    assert_eq!(api.remove_from, vec![(HostId::from("h2"), 2)], "{plan:?}");
    assert!(
        api.reason.contains("gave 2 to batch on host-2"),
        "{}",
        api.reason
    );
    // With web's demand at 4, web still keeps only what batch's min leaves: 2.
    let plan = tick(
        &cfg,
        &hosts,
        &[
            ("web", vec![2, 0]),
            ("api", vec![0, 0]),
            ("batch", vec![0, 1]),
        ],
        &[("web", 4.0), ("api", 0.0)],
    );
    assert_eq!(
        (plan.target("web"), plan.target("batch")),
        (2, 1),
        "{plan:?}"
    );
}

/// A replica waiting for room (the orchestrator took a lower priority's replica from another
/// host than the plan's) is not left waiting while the counts match: the service that gives
/// room does not grow again elsewhere in the same tick (a move between hosts, which a count
/// cannot say), so its count goes down and the orchestrator frees more.
#[test]
fn a_replica_waiting_for_room_is_not_left_behind_a_move() {
    let hosts = [host(1, 2.0, 4 * GIB), host(2, 4.0, 4 * GIB)];
    let cfg = config(
        Capacity::Resources {
            reserve: Resources::ZERO,
        },
        vec![
            triggered("web", 1, res(1000, 3 * GIB)),
            remainder("batch", 2, res(1000, 512 * MIB)),
        ],
    );
    // web's replica is pending on no host; batch runs 2 on host 1 (full in CPU) and 3 on
    // host 2, where 1 CPU and 2.5 GiB are free: room for batch, not for web.
    let mut observed = Observed {
        hosts: hosts.to_vec(),
        ..Default::default()
    };
    let mut web = ServiceObservation::counts(0, 1);
    web.unschedulable = 1;
    observed.services.insert(name("web"), web);
    observed
        .services
        .insert(name("batch"), ServiceObservation::counts(5, 0));
    for (h, n) in [(0, 2), (1, 3)] {
        observed
            .placement
            .entry(hosts[h].id.clone())
            .or_default()
            .insert(name("batch"), n);
    }
    let mut memory = EngineState::default();
    for (svc, target) in [("web", 1), ("batch", 5)] {
        memory.set_commitment(
            name(svc),
            Commitment {
                target,
                changed_at: Duration::from_secs(99),
            },
        );
    }
    let mut samples = Samples::default();
    samples.set(&name("web"), "load", Some(1.0));
    let (plan, _) = decide(&cfg, &observed, &samples, &memory, Duration::from_secs(100));
    assert_eq!(plan.target("web"), 1, "{plan:?}");
    let batch = plan.service("batch").unwrap();
    assert_eq!(
        batch.target, 4,
        "batch gives room and does not move: {plan:?}"
    );
    assert_eq!(batch.remove_from, vec![(HostId::from("h1"), 1)], "{plan:?}");
    assert!(
        batch.reason.contains("does not grow elsewhere this tick"),
        "{}",
        batch.reason
    );
    assert_eq!(plan.actions.len(), 1, "batch's stop: {plan:?}");
}

/// The reserve is kept free on every host; a host whose CPU or memory the backend does not
/// know takes nothing.
#[test]
fn the_reserve_is_kept_and_unknown_hosts_take_nothing() {
    let mut unknown = host(2, 8.0, 16 * GIB);
    unknown.memory_bytes = None;
    let hosts = [host(1, 2.0, 2 * GIB), unknown];
    let cfg = config(
        Capacity::Resources {
            reserve: res(500, 512 * MIB),
        },
        vec![triggered("web", 1, res(500, 256 * MIB))],
    );
    let plan = tick(&cfg, &hosts, &[("web", vec![0, 0])], &[("web", 10.0)]);
    // 1.5 CPU and 1.5 GiB on host 1: 3 replicas of 0.5 CPU.
    assert_eq!(plan.target("web"), 3, "{plan:?}");
}

// ---------------------------------------------------------------------------------------------
// Properties of the placement itself.

#[derive(Debug, Clone)]
struct World {
    hosts: Vec<Room>,
    asks: Vec<Ask>,
    start: Vec<Vec<u32>>,
}

fn world() -> impl Strategy<Value = World> {
    let hosts = prop::collection::vec((1u64..=8, 1u64..=16, any::<bool>()), 1..=5);
    let asks = prop::collection::vec(
        (
            1u64..=4,
            1u64..=8,
            0u32..=12,
            0u32..=3,
            0u8..=5,
            (0u32..=2, 0u32..=2),
        ),
        1..=6,
    );
    let seed = any::<u64>();
    (hosts, asks, seed).prop_map(|(hosts, asks, seed)| {
        let hosts: Vec<Room> = hosts
            .into_iter()
            .map(|(cpu, gib, ready)| Room {
                allocatable: res(cpu * 1000, gib * GIB),
                ready: ready || cpu % 2 == 0,
            })
            .collect();
        let mut asks: Vec<Ask> = asks
            .into_iter()
            .map(
                |(quarters, half_gib, want, floor, kind, (min, waiting))| Ask {
                    need: res(quarters * 250, half_gib * GIB / 2),
                    want,
                    floor: floor.max(min).min(want),
                    min: min.min(want),
                    waiting: if kind >= 2 { waiting } else { 0 },
                    growth: match kind {
                        0 => Growth::PerHost,
                        1 => Growth::Remainder,
                        _ => Growth::Priority,
                    },
                },
            )
            .collect();
        // Remainder services go last, as in the engine's allocation order.
        asks.sort_by_key(|a| a.growth == Growth::Remainder);
        // A start within every host's allocatable: replicas placed first fit, in a seeded order.
        let mut rng = seed;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as u32
        };
        let mut used = vec![Resources::ZERO; hosts.len()];
        let mut start = vec![vec![0u32; hosts.len()]; asks.len()];
        for (a, ask) in asks.iter().enumerate() {
            for _ in 0..next() % 6 {
                let h = next() as usize % hosts.len();
                let after = used[h].plus(ask.need);
                if after.fits(&hosts[h].allocatable) {
                    used[h] = after;
                    start[a][h] += 1;
                }
            }
        }
        World { hosts, asks, start }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Never above any host's allocatable, in any dimension; nothing new on a host that is not
    /// ready; nobody above its want (or what it had) or pushed below its floor; a service short
    /// of its want says it was blocked.
    #[test]
    fn placements_fit_and_respect_wants_and_floors(w in world()) {
        let start: Vec<Vec<(usize, u32)>> = w
            .start
            .iter()
            .map(|c| c.iter().copied().enumerate().filter(|&(_, n)| n > 0).collect())
            .collect();
        let out = place(&w.asks, &w.hosts, &start);
        for (h, room) in w.hosts.iter().enumerate() {
            let used = w.asks.iter().zip(&out).fold(Resources::ZERO, |u, (a, p)| {
                u.plus(a.need.times(p.on(h)))
            });
            prop_assert!(used.fits(&room.allocatable), "host {h}: {used:?} > {:?}", room.allocatable);
            if !room.ready {
                for (a, p) in out.iter().enumerate() {
                    prop_assert!(p.on(h) <= w.start[a][h], "placed on a host that is not ready");
                }
            }
        }
        for (a, p) in out.iter().enumerate() {
            prop_assert_eq!(p.target, p.per_host.iter().map(|x| x.1).sum::<u32>());
            let ask = w.asks[a];
            if ask.growth == Growth::Priority {
                prop_assert!(p.target <= ask.want.max(w.start[a].iter().sum()));
            }
            if ask.growth == Growth::Priority && p.target < ask.want {
                prop_assert!(p.blocked || p.held, "{a} short of its want without being blocked");
            }
            // Held only for a replica that waited.
            if p.held {
                let for_waiting = out.iter().enumerate().any(|(b, o)| {
                    w.asks[b].waiting > 0 && o.took.iter().any(|&(x, _, _)| x == a)
                });
                prop_assert!(for_waiting, "{a} held without a waiting replica taking from it");
            }
            // Nobody goes below its floor because of someone else, but for another's min.
            let start: u32 = w.start[a].iter().sum();
            if ask.growth != Growth::PerHost && p.target < ask.floor.min(start).min(ask.want) {
                let for_a_min = out.iter().enumerate().any(|(b, o)| {
                    w.asks[b].min > 0 && o.took.iter().any(|&(x, _, _)| x == a)
                });
                prop_assert!(for_a_min, "{a} pushed below its floor");
                // Below its min only for an earlier service's min (mins go in allocation
                // order).
                if p.target < ask.min {
                    let earlier = out[..a].iter().enumerate().any(|(b, o)| {
                        w.asks[b].min > 0 && o.took.iter().any(|&(x, _, _)| x == a)
                    });
                    prop_assert!(earlier, "{a} pushed below its min");
                }
            }
        }
    }

    /// With every replica one slot's worth (1 CPU) and every host the same number of CPUs, the
    /// plan is the slot engine's plan with slots_per_host.
    #[test]
    fn one_cpu_replicas_plan_as_slots_per_host(
        per_host in 1u32..=6,
        nhosts in 1usize..=4,
        specs in prop::collection::vec((1u32..=3, any::<bool>(), 0u32..=12, prop::option::of(1u32..=3), 0u32..=4, 0u32..=2), 1..=5),
        seed in any::<u64>(),
    ) {
        let names = ["api", "batch", "cache", "db", "etl"];
        let hosts: Vec<Host> = (0..nhosts).map(|i| host(i, per_host as f64, 64 * GIB)).collect();
        let one = res(1000, MIB);
        let mut services = Vec::new();
        let mut demand = Vec::new();
        for (i, &(priority, rem, d, step, _, min)) in specs.iter().enumerate() {
            let mut s = if rem {
                remainder(names[i], priority, one)
            } else {
                demand.push((names[i], d as f64));
                triggered(names[i], priority, one)
            };
            s.max_step = step;
            s.min = min;
            services.push(s);
        }
        // What runs: first fit over the hosts, within their slots.
        let mut rng = seed;
        let mut free = vec![per_host; nhosts];
        let mut placed: Vec<(&str, Vec<u32>)> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let mut counts = vec![0u32; nhosts];
            for _ in 0..spec.4 {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let h = (rng >> 33) as usize % nhosts;
                if free[h] > 0 {
                    free[h] -= 1;
                    counts[h] += 1;
                }
            }
            placed.push((names[i], counts));
        }
        let slots = config(Capacity::SlotsPerHost(per_host), services.clone());
        let resources = config(Capacity::Resources { reserve: Resources::ZERO }, services);
        let a = tick(&slots, &hosts, &placed, &demand);
        let b = tick(&resources, &hosts, &placed, &demand);
        let targets = |p: &Plan| -> BTreeMap<String, u32> {
            p.services.iter().map(|s| (s.service.to_string(), s.target)).collect()
        };
        prop_assert_eq!(targets(&a), targets(&b));
    }
}

/// `[capacity] resources = true` and each service's `resources`, every error with its path.
#[test]
fn resources_are_validated_with_paths() {
    let good = Config::from_toml(
        r#"
        [capacity]
        resources = true
        reserve_cpu = "500m"
        reserve_memory = "1Gi"
        [backend]
        type = "docker"
        [[services]]
        name = "web"
        resources = { cpu = 0.25, memory = "256Mi" }
        [[services.triggers]]
        type = "manual"
        [[services]]
        name = "batch"
        remainder = true
        resources = { cpu = "2", memory = 1000000 }
        "#,
    )
    .expect("valid");
    assert_eq!(
        good.capacity,
        Capacity::Resources {
            reserve: res(500, GIB)
        }
    );
    assert_eq!(good.services[0].resources, Some(res(250, 256 * MIB)));
    assert_eq!(good.services[1].resources, Some(res(2000, 1_000_000)));

    let errors = Config::from_toml(
        r#"
        [capacity]
        resources = true
        slots = 3
        [backend]
        type = "docker"
        [[services]]
        name = "web"
        [[services.triggers]]
        type = "manual"
        [[services]]
        name = "batch"
        remainder = true
        resources = { cpu = "1.0005", memory = "12Qi" }
        "#,
    )
    .expect_err("invalid")
    .0
    .iter()
    .map(ToString::to_string)
    .collect::<Vec<_>>();
    let has = |p: &str| errors.iter().any(|e| e.starts_with(p));
    assert!(has("capacity: set exactly one of"), "{errors:?}");
    assert!(has("services[1].resources.cpu: "), "{errors:?}");
    assert!(has("services[1].resources.memory: "), "{errors:?}");

    let errors = Config::from_toml(
        r#"
        [capacity]
        resources = true
        [backend]
        type = "docker"
        [[services]]
        name = "web"
        [[services.triggers]]
        type = "manual"
        "#,
    )
    .expect_err("invalid")
    .0
    .iter()
    .map(ToString::to_string)
    .collect::<Vec<_>>();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("services[0].resources: missing")),
        "{errors:?}"
    );
}
