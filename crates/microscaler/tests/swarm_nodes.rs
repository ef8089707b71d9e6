//! The control loop on a real multi-node Docker Swarm: the rig's three engines, each in a
//! network namespace of its own with its own address (`scripts/swarm-rig.sh`, docs/swarm-rig.md;
//! ms1 the manager, ms2 and ms3 workers). Real: Swarm's scheduler and orchestrators, its
//! heartbeats (a killed engine's node goes down), the manager's event stream. The tests drain,
//! activate and kill nodes, so they take the rig one at a time (a file lock), and bring it back
//! at the end, passed or not; each test's Swarm services are removed too.
//!
//! Each test starts the rig itself (idempotent; as root). Without a Docker engine or the rig
//! they say they are skipped, and fail under CI=true with the rig's own error.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::swarm_rig::{Rig, MANAGER};
use microscaler::control::{run_loop, Controller, TickReport};
use microscaler::wiring::build_backend;
use microscaler_backends::{AnyBackend, Config};
use microscaler_core::ActionKind;
use microscaler_testkit::unique;

/// Slots each node gives: capacity is 3 x the nodes that are Ready and active.
const SLOTS: u32 = 3;

/// Takes the rig (see [`Rig::take`]; `None`: skipped) and prepares the control loop of
/// `services` and the remainder `p2` on it, 3 slots per node, ticking every `tick`.
async fn start(prefix: &str, tick: &str, services: &str) -> Option<(Rig, Controller<AnyBackend>)> {
    let instance = unique(prefix);
    let rig = Rig::take(&instance).await?;
    let cfg = Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "{tick}"
        on_exit = "stop"
        [capacity]
        slots_per_host = {SLOTS}
        [backend]
        type = "swarm"
        host = "{MANAGER}"
        {services}
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        stop_grace = "1s"
        "#
    ))
    .expect("valid configuration");
    let backend = build_backend(&cfg, &std::env::temp_dir())
        .await
        .expect("the swarm backend on the rig's manager");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    Some((rig, ctl))
}

fn ready_hosts(r: &TickReport) -> u32 {
    r.observed
        .as_ref()
        .map_or(0, |o| o.hosts.iter().filter(|h| h.ready).count() as u32)
}

/// A drained node, then a dead one (its dockerd killed), then one removed (it leaves the swarm
/// and the manager removes it), on 3 nodes x 3 slots: capacity follows the nodes that are Ready
/// and active (9, 6, 3; 9 once both are back; 6 without the removed one, 9 once it has joined
/// again as a new node); at every tick p1 keeps its demand of 2 and every stop the plan makes is
/// of p2, the remainder, which is shed to what is left (7, 4, 1, 7, 4, 7); each time the swarm
/// converges to exactly that (p1 running 2, p1 + p2 running the capacity, nothing pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_or_dead_node_sheds_the_remainder_first_and_p1_keeps_its_demand() {
    let Some((rig, mut ctl)) = start(
        "swn",
        "200ms",
        r#"
        [[services]]
        name = "p1"
        priority = 1
        stop_grace = "1s"
        [[services.triggers]]
        type = "manual"
        initial = 2
        "#,
    )
    .await
    else {
        return;
    };
    let demand = 2;
    let mut converge = async |what: &str, nodes: u32| {
        let capacity = SLOTS * nodes;
        let t0 = Instant::now();
        let reports = common::until(
            &mut ctl,
            what,
            Duration::from_millis(200),
            Duration::from_secs(90),
            |r| {
                let plan = r.plan.as_ref().expect("every tick decides");
                assert!(plan.allocated <= plan.capacity, "{what}: {plan:?}");
                assert_eq!(
                    r.target_of("p1"),
                    Some(demand),
                    "{what}: p1 keeps its demand"
                );
                for a in &plan.actions {
                    assert!(
                        a.kind == ActionKind::Start || a.service.as_str() == "p2",
                        "{what}: only the remainder is shed: {a:?}"
                    );
                }
                plan.capacity == capacity
                    && ready_hosts(r) == nodes
                    && common::seeds_rule(r, demand, capacity)
            },
        )
        .await;
        eprintln!(
            "{what}: converged in {:?} ({} ticks)",
            t0.elapsed(),
            reports.len()
        );
        reports
    };
    converge("3 nodes", 3).await;

    rig.availability(3, "drain");
    let reports = converge("ms3 drained", 2).await;
    assert!(
        reports.iter().any(|r| r
            .plan
            .as_ref()
            .is_some_and(|p| p.actions.iter().any(|a| a.kind == ActionKind::Stop))),
        "p2 was shed by a stop"
    );

    rig.kill(2);
    converge("ms2's engine killed (its node down)", 1).await;

    rig.restore();
    converge("ms2 back and ms3 active", 3).await;

    rig.remove(3);
    converge("ms3 left the swarm and removed", 2).await;

    rig.restore();
    converge("ms3 joined again (a new node)", 3).await;

    ctl.shutdown().await.expect("shutdown");
}

/// What the running loop saw at one tick.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    ready: u32,
    capacity: u32,
    agent: Option<u32>,
    p2: Option<u32>,
    /// Node events the backend had read when the tick ended.
    events: u64,
    errors: Vec<String>,
    /// The agent's observation and the plan's reason for its target: read through `Debug`,
    /// in failure messages.
    #[allow(dead_code)]
    agent_why: String,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// The first tick after `after` that `check` accepts, within `within` of `after`; panics with
/// the ticks seen when there is none.
async fn tick_after(
    log: &Log,
    after: Instant,
    within: Duration,
    what: &str,
    check: impl Fn(&Seen) -> bool,
) -> Seen {
    loop {
        let found = log
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.at >= after && check(s))
            .cloned();
        if let Some(s) = found {
            return s;
        }
        assert!(
            after.elapsed() < within,
            "{what}: no tick within {within:?}; ticks since: {:#?}",
            log.lock()
                .unwrap()
                .iter()
                .filter(|s| s.at >= after)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the loop has not ticked for 2 s (it sleeps until an event or its 30 s period);
/// returns when it last ticked.
async fn quiet(log: &Log) -> Instant {
    let t0 = Instant::now();
    loop {
        let last = log.lock().unwrap().last().map(|s| s.at).expect("a tick");
        if last.elapsed() >= Duration::from_secs(2) {
            return last;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the loop kept ticking: {:#?}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The loop's period here: no tick seen within it of the previous one can be the period's.
const PERIOD: Duration = Duration::from_secs(30);
/// How soon after a node change the tick that sees it must come.
const WOKEN_WITHIN: Duration = Duration::from_secs(5);

/// Node events wake the running loop: with a 30 s tick period, so that polling cannot explain
/// it, a per-host service (`agent`, global mode) and the remainder (`p2`) on 3 nodes x 3 slots.
/// Each node change — ms3 drained, activated again, its engine killed (its node goes down),
/// started again (the node rejoins), ms3 leaving the swarm and removed, joining again as a new
/// node — is followed within 5 s by a tick that sees the new set of nodes (Ready and active:
/// 2, 3, 2, 3, 2, 3) and the capacity they give (6, 9, 6, 9, 6, 9); the backend
/// had read a node event before that tick, and the tick came less than 30 s after the previous
/// one, so the period cannot have brought it. No tick's plan is over the capacity. Swarm itself (global mode) runs the agent's task on ms3 again each time
/// ms3 is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_events_wake_the_loop_within_one_tick() {
    node_changes(false).await;
}

/// The same node changes, and in the tick each node event brings, the per-host service's target
/// is the nodes that are Ready and active (2, 3, 2, 3, 2, 3) and the remainder gets the rest
/// (4, 6, 4, 6, 4, 6) — the per-host service follows within one tick.
///
/// (The engine used to hold a service's target while its previous change converged; Swarm's
/// global mode changes a per-host service's count by itself as soon as a node does, so the
/// plan lagged until `converge_timeout` and the remainder was given the agent's slot. Where
/// the orchestrator keeps one per host, the plan now follows the hosts at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_host_targets_follow_the_nodes_in_the_tick_a_node_event_brings() {
    node_changes(true).await;
}

/// The scenario of the two tests above; with `per_host_targets`, each woken tick must also
/// give the agent one per node and the remainder the rest.
async fn node_changes(per_host_targets: bool) {
    let Some((rig, mut ctl)) = start(
        if per_host_targets { "swt" } else { "swe" },
        "30s",
        r#"
        [[services]]
        name = "agent"
        per_host = true
        stop_grace = "1s"
        "#,
    )
    .await
    else {
        return;
    };
    let agent_service = format!("{}-agent", ctl.config().instance);
    let events: Arc<AtomicU64> = match ctl.backend() {
        AnyBackend::Swarm(b) => b.node_events(),
        _ => unreachable!("a swarm backend"),
    };
    let log: Log = Arc::default();
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let looping = {
        let (log, events) = (Arc::clone(&log), Arc::clone(&events));
        tokio::spawn(async move {
            run_loop(
                &mut ctl,
                async {
                    let _ = stop_rx.await;
                },
                |r| {
                    log.lock().unwrap().push(Seen {
                        at: Instant::now(),
                        ready: ready_hosts(r),
                        capacity: r.plan.as_ref().map_or(0, |p| p.capacity),
                        agent: r.target_of("agent"),
                        p2: r.target_of("p2"),
                        events: events.load(Ordering::SeqCst),
                        errors: r.errors.iter().map(|e| format!("{e:?}")).collect(),
                        agent_why: format!(
                            "{:?}: {}",
                            r.observed_of("agent"),
                            r.plan
                                .as_ref()
                                .and_then(|p| p.service("agent"))
                                .map_or(String::new(), |s| s.reason.to_string())
                        ),
                    })
                },
            )
            .await;
            ctl
        })
    };
    let nodes = |n: u32| {
        move |s: &Seen| {
            s.ready == n
                && s.capacity == SLOTS * n
                && (!per_host_targets || (s.agent == Some(n) && s.p2 == Some(SLOTS * n - n)))
        }
    };
    // At the start nothing has been changed yet: the agent runs on each node.
    tick_after(
        &log,
        started,
        Duration::from_secs(60),
        "the first ticks",
        |s| nodes(3)(s) && s.agent == Some(3) && s.p2 == Some(6),
    )
    .await;

    // One node change: `change` is made; the tick that sees `n` nodes must follow within
    // `WOKEN_WITHIN` of `seen_by` (when the manager had it: the change itself, or the node
    // seen down), after a node event, less than the period after the previous tick.
    let follow = async |what: &str, n: u32, change: &dyn Fn() -> Instant| {
        let before = quiet(&log).await;
        let read = events.load(Ordering::SeqCst);
        let t = Instant::now();
        // The change blocks (the docker CLI, waits): the loop goes on on the other worker.
        let seen_by = tokio::task::block_in_place(change);
        let s = tick_after(
            &log,
            t,
            seen_by.duration_since(t) + WOKEN_WITHIN,
            what,
            nodes(n),
        )
        .await;
        assert!(s.errors.is_empty(), "{what}: {:?}", s.errors);
        assert!(
            s.events > read,
            "{what}: the tick came without a node event read ({read} before, {} then)",
            s.events
        );
        assert!(
            s.at.duration_since(before) < PERIOD - Duration::from_secs(1),
            "{what}: the tick came {:?} after the previous one: the period could explain it",
            s.at.duration_since(before)
        );
        eprintln!(
            "{what}: the tick that saw {n} nodes came {:?} after the change was made, {:?} after \
             it was complete ({:?} after the previous tick; {} node events read so far)",
            s.at.duration_since(t),
            s.at.saturating_duration_since(seen_by),
            s.at.duration_since(before),
            s.events
        );
    };
    let agent_on_ms3 = async |what: &str| {
        let t0 = Instant::now();
        while rig.running_on(&agent_service, 3) != 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{what}: Swarm runs no agent task on ms3"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    agent_on_ms3("at the start").await;

    follow("ms3 drained", 2, &|| {
        rig.availability(3, "drain");
        Instant::now()
    })
    .await;
    follow("ms3 active again", 3, &|| {
        rig.availability(3, "active");
        Instant::now()
    })
    .await;
    agent_on_ms3("ms3 active again").await;

    let ms3 = rig.node_id(3);
    follow("ms3's engine killed", 2, &|| {
        rig.kill(3);
        // Swarm marks the node down when its heartbeats stop (about 10 s here).
        let t0 = Instant::now();
        while rig.state(&ms3) != "down" {
            assert!(
                t0.elapsed() < Duration::from_secs(40),
                "the manager still has ms3 {}",
                rig.state(&ms3)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Instant::now()
    })
    .await;
    follow("ms3's engine started again (the node rejoins)", 3, &|| {
        // Returns once every node is Ready again.
        rig.restore();
        Instant::now()
    })
    .await;
    agent_on_ms3("ms3 back").await;
    follow("ms3 left the swarm and removed", 2, &|| {
        rig.remove(3);
        Instant::now()
    })
    .await;
    follow("ms3 joined again (a new node)", 3, &|| {
        rig.restore();
        Instant::now()
    })
    .await;
    agent_on_ms3("ms3 joined again").await;

    stop_tx.send(()).expect("stop the loop");
    let ctl = looping.await.expect("the loop");
    for s in log.lock().unwrap().iter() {
        assert!(s.errors.is_empty(), "{s:?}");
        assert!(
            s.agent.unwrap_or(0) + s.p2.unwrap_or(0) <= s.capacity,
            "the plan is over the capacity: {s:?}"
        );
    }
    ctl.shutdown().await.expect("shutdown");
}
