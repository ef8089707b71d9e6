//! The control loop on Nomad, against the test kit's fake of Nomad's HTTP API
//! (`microscaler_testkit::nomad`): no Nomad server can run on these machines (Nomad's source is
//! not under an open-source licence from 1.7 on, and no binary can be downloaded here). The
//! fake places allocations asynchronously on nodes of 3 slots each, blocks evaluations when
//! there is no room, and drains nodes; see its doc comment for what it does not model.

mod common;

use std::time::Duration;

use microscaler::control::{Controller, TickReport};
use microscaler::wiring::build_backend;
use microscaler_backends::{AnyBackend, Config};
use microscaler_testkit::nomad::{plain_job, NomadFake, NomadOptions};
use microscaler_testkit::unique;
use serde_json::json;

const TICK: Duration = Duration::from_millis(100);
const CONVERGE: Duration = Duration::from_secs(30);

/// The seeds' demo on Nomad: 3 slots per node, p1 on manual demand, p2 the remainder.
fn config(address: &str, instance: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "{tick}ms"
        on_exit = "stop"
        [capacity]
        slots_per_host = 3
        [backend]
        type = "nomad"
        address = "{address}"
        [[services]]
        name = "p1"
        priority = 1
        image = "registry.k8s.io/pause:3.10"
        [[services.triggers]]
        type = "manual"
        initial = 4
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        image = "registry.k8s.io/pause:3.10"
        "#,
        tick = TICK.as_millis(),
    ))
    .expect("valid configuration")
}

/// Ticks until the seeds' rule holds for `demand` on `capacity` (see `common::until`: no error
/// and every change succeeded at every tick); returns the reports.
async fn converged(
    ctl: &mut Controller<AnyBackend>,
    demand: u32,
    capacity: u32,
) -> Vec<TickReport> {
    common::until(ctl, "the seeds' rule", TICK, CONVERGE, |r| {
        common::seeds_rule(r, demand, capacity)
    })
    .await
}

/// The seeds' rule on 3 nodes x 3 slots while demand moves; a node drained: capacity drops,
/// p2 is shed and p1 keeps its demand in every tick; the drain ended: p2 grows back; a node
/// lost: the same. At the end `on_exit = "stop"` purges both jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_rule_holds_and_a_drained_node_sheds_priority_2_first() {
    let fake = NomadFake::start(NomadOptions::default()).await;
    let nodes: Vec<String> = (0..3)
        .map(|i| fake.add_node(&format!("node-{i}"), 3))
        .collect();
    let instance = unique("nl");
    let cfg = config(&fake.address(), &instance);
    let state = tempfile::tempdir().expect("state dir");
    let backend = build_backend(&cfg, state.path()).await.expect("backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let demand = ctl.controls().manual_of("p1").expect("p1's manual").clone();

    converged(&mut ctl, 4, 9).await;
    for d in [7, 2, 9, 0, 5] {
        demand.set(f64::from(d)).expect("set demand");
        converged(&mut ctl, d, 9).await;
    }
    assert_eq!(fake.running(&format!("{instance}-p1"), "p1"), 5);
    // Nomad keeps each scale with its message: who, what, and the plan's reason.
    let requests = fake.scale_requests();
    assert!(!requests.is_empty());
    for r in &requests {
        let m = r["Message"].as_str().unwrap_or("");
        let (head, why) = m
            .rsplit_once(" -> ")
            .and_then(|(h, rest)| Some((h, rest.split_once(": ")?.1)))
            .unwrap_or(("", ""));
        assert!(
            head.starts_with(&format!("microscaler {instance}: p")),
            "{m}"
        );
        assert!(!why.is_empty(), "the plan's reason is in the message: {m}");
    }
    eprintln!("a scale's message: {}", requests[0]["Message"]);

    fake.drain_node(&nodes[0], true);
    let reports = converged(&mut ctl, 5, 6).await;
    for r in &reports {
        assert_eq!(
            r.target_of("p1"),
            Some(5),
            "p1 keeps its demand during the drain"
        );
    }
    assert!(
        reports.iter().any(|r| r.target_of("p2") == Some(1)),
        "p2 was shed to what is left"
    );

    fake.drain_node(&nodes[0], false);
    converged(&mut ctl, 5, 9).await;

    fake.set_node_down(&nodes[1], true);
    let reports = converged(&mut ctl, 5, 6).await;
    for r in &reports {
        assert_eq!(
            r.target_of("p1"),
            Some(5),
            "p1 keeps its demand after a node is lost"
        );
    }

    ctl.shutdown().await.expect("shutdown");
    for s in ["p1", "p2"] {
        let job = format!("{instance}-{s}");
        assert!(fake.job(&job).is_none(), "on_exit = \"stop\" purges {job}");
    }
}

/// Capacity in CPU and memory on the fake (which bin-packs allocations by their tasks'
/// `Resources.CPU` MHz and `MemoryMB`): two nodes of 2000 MHz and 4096 MB, and on the first a
/// job of someone else's that asks for 500 MHz and 3072 MB. p1 (1 CPU = 1000 MHz at the default
/// `mhz_per_cpu`, 1 GiB) and the remainder p2 (1 CPU, 512 MiB) share what is left: 1 on the
/// first node (1 GB of memory left), 2 on the other, 3 in all, as demand moves; the other job
/// gone, 4. A reference whose tasks ask for other resources is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_plans_fit_the_nodes_beside_other_jobs() {
    let fake = NomadFake::start(NomadOptions::default()).await;
    let first = fake.add_node_sized("node-0", 100, 2000, 4096);
    fake.add_node_sized("node-1", 100, 2000, 4096);
    let mut other = plain_job("other", 1, false);
    other["TaskGroups"][0]["Tasks"][0]["Resources"] = json!({"CPU": 500, "MemoryMB": 3072});
    fake.register(other);
    microscaler_testkit::poll_until(|| fake.running("other", "web"), 1).await;
    let instance = unique("nr");
    let with = |services: &str| {
        Config::from_toml(&format!(
            r#"
            instance = "{instance}"
            tick = "{tick}ms"
            on_exit = "stop"
            [capacity]
            resources = true
            [backend]
            type = "nomad"
            address = "{address}"
            {services}
            "#,
            tick = TICK.as_millis(),
            address = fake.address(),
        ))
        .expect("valid configuration")
    };
    let cfg = with(
        r#"
        [[services]]
        name = "p1"
        priority = 1
        image = "registry.k8s.io/pause:3.10"
        resources = { cpu = "1", memory = "1Gi" }
        [[services.triggers]]
        type = "manual"
        initial = 1
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        image = "registry.k8s.io/pause:3.10"
        resources = { cpu = "1", memory = "512Mi" }
        "#,
    );
    let state = tempfile::tempdir().expect("state dir");
    let backend = build_backend(&cfg, state.path()).await.expect("backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    let demand = ctl.controls().manual_of("p1").expect("p1's manual").clone();
    let reports = converged(&mut ctl, 1, 3).await;
    let hosts = &reports
        .last()
        .expect("a tick")
        .observed
        .as_ref()
        .expect("observed")
        .hosts;
    let host = hosts.iter().find(|h| h.id.0 == first).expect("node-0");
    assert_eq!(
        (host.cpus, host.memory_bytes),
        (Some(1.5), Some(1 << 30)),
        "node-0's room is its resources less the other job's"
    );
    for d in [3, 0, 2] {
        demand.set(f64::from(d)).expect("set demand");
        for r in converged(&mut ctl, d, 3).await {
            let o = |s| r.observed_of(s);
            assert_eq!(
                o("p1").unschedulable + o("p2").unschedulable,
                0,
                "nothing blocked"
            );
        }
    }
    let job = fake.job(&format!("{instance}-p1")).expect("p1's job");
    assert_eq!(
        job["TaskGroups"][0]["Tasks"][0]["Resources"],
        json!({"CPU": 1000, "MemoryMB": 1024}),
        "the task asks for p1's resources"
    );
    fake.purge("other");
    converged(&mut ctl, 2, 4).await;
    ctl.shutdown().await.expect("shutdown");

    let mut shop = plain_job("shop", 0, false);
    shop["TaskGroups"][0]["Tasks"][0]["Resources"] = json!({"CPU": 250, "MemoryMB": 256});
    fake.register(shop);
    for (cpu, fits) in [("500m", false), ("250m", true)] {
        let cfg = with(&format!(
            r#"
            [[services]]
            name = "shop"
            priority = 1
            resources = {{ cpu = "{cpu}", memory = "256Mi" }}
            [services.reference]
            job = "shop"
            [[services.triggers]]
            type = "manual"
            initial = 1
            "#
        ));
        let backend = build_backend(&cfg, state.path()).await.expect("backend");
        let mut ctl = Controller::new(cfg, backend, 1);
        microscaler_testkit::assert_start(
            ctl.prepare().await,
            fits,
            &["ask for 250 MHz and 256 MB, but its resources are 500 MHz and 256 MB"],
        );
    }
}
