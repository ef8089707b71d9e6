//! The control loop on ECS, against moto server (an AWS emulator from PyPI on 127.0.0.1:5000,
//! started by the test command): the seeds' first demo (3 container instances x 3 slots, p1 on
//! demand, p2 the remainder), and seed 004's one-per-host service whose `desiredCount` follows
//! the container instances, by polling and woken by the EventBridge event through SQS.
//!
//! moto starts no tasks (`runningCount` jumps to `desiredCount`), emits no EventBridge event
//! (the test sends the event to the queue, as the rule would) and ignores cluster-query
//! filters; see `microscaler_testkit::moto`.
#![cfg(feature = "ecs")]

mod common;

use std::time::{Duration, Instant};

use microscaler::control::{run_loop, Controller};
use microscaler::wiring::build_backend;
use microscaler_backends::ecs::EcsBackend;
use microscaler_backends::{AnyBackend, Config};
use microscaler_testkit::{moto, unique};

const TICK: Duration = Duration::from_millis(100);
const CONVERGE: Duration = Duration::from_secs(20);

/// A configuration on moto's cluster `cluster` with `services` (TOML) and `extra` backend keys.
fn config(cluster: &str, instance: &str, tick: &str, extra: &str, services: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "{tick}"
        on_exit = "stop"
        [capacity]
        slots_per_host = 3
        [backend]
        type = "ecs"
        cluster = "{cluster}"
        region = "{region}"
        endpoint_url = "{endpoint}"
        {extra}
        {services}
        "#,
        region = moto::REGION,
        endpoint = moto::ENDPOINT,
    ))
    .expect("valid configuration")
}

/// A prepared controller of `cfg` (the ecs backend keeps no state on this machine).
async fn controller(cfg: Config) -> Controller<AnyBackend> {
    let backend = build_backend(&cfg, &std::env::temp_dir())
        .await
        .expect("backend");
    let mut ctl = Controller::new(cfg, backend, 1);
    ctl.prepare().await.expect("prepare");
    ctl
}

/// Runs one tick of `ctl`, without errors; then the ECS service "agent" of `cluster` must want
/// `want` tasks.
async fn one_tick(
    ctl: &mut Controller<AnyBackend>,
    ecs: &moto::EcsClient,
    cluster: &str,
    want: u32,
    after: &str,
) {
    let r = ctl.tick().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        moto::desired(ecs, cluster, "agent").await,
        Some(want),
        "one tick after {after}"
    );
}

/// Seed 004's one-per-host service: the existing REPLICA service "agent".
const AGENT: &str = r#"
        [[services]]
        name = "agent"
        per_host = true
        [services.reference]
        service = "agent"
"#;

const SEEDS: &str = r#"
        [[services]]
        name = "p1"
        priority = 1
        image = "busybox:1"
        [[services.triggers]]
        type = "manual"
        initial = 4
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        image = "busybox:1"
"#;

/// The seeds' ECS demo: 3 container instances x 3 slots; as p1's demand moves, p1 runs its
/// demand and p1 + p2 == 9 once converged; a container instance drained: p2 is shed to 3 and
/// p1 keeps its demand; at the end `on_exit = "stop"` deletes both ECS services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_rule_holds_on_three_container_instances() {
    if !moto::available().await {
        return;
    }
    let ecs = moto::ecs().await;
    let cluster = unique("el");
    let instances = moto::cluster(&ecs, &cluster, 3).await;
    let instance = unique("el");
    let cfg = config(&cluster, &instance, "100ms", "", SEEDS);
    let mut ctl = controller(cfg).await;
    let demand = ctl.controls().manual_of("p1").expect("p1's manual").clone();

    for d in [4, 7, 2, 9, 0, 5] {
        demand.set(f64::from(d)).expect("set demand");
        common::until(&mut ctl, "the seeds' rule", TICK, CONVERGE, |r| {
            common::seeds_rule(r, d, 9)
        })
        .await;
    }
    let p1 = EcsBackend::service_name(&instance, "p1");
    assert_eq!(moto::desired(&ecs, &cluster, &p1).await, Some(5));

    moto::drain(&ecs, &cluster, &instances[0], true).await;
    let reports = common::until(&mut ctl, "p2 shed", TICK, CONVERGE, |r| {
        common::seeds_rule(r, 5, 6)
    })
    .await;
    for r in &reports {
        assert_eq!(r.target_of("p1"), Some(5), "p1 keeps its demand");
    }

    ctl.shutdown().await.expect("shutdown");
    for s in ["p1", "p2"] {
        let name = EcsBackend::service_name(&instance, s);
        assert_eq!(
            moto::desired(&ecs, &cluster, &name).await,
            None,
            "{name} deleted on exit"
        );
    }
}

/// Seed 004: a one-per-host service (an existing REPLICA service, referenced with
/// `per_host = true`) has its desiredCount set to the number of ready container instances in
/// the first tick after an instance is registered, drained or deregistered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_host_service_follows_the_instances_within_one_tick() {
    if !moto::available().await {
        return;
    }
    let ecs = moto::ecs().await;
    let cluster = unique("ep");
    let mut instances = moto::cluster(&ecs, &cluster, 2).await;
    moto::plain_service(&ecs, &cluster, "agent", 0, "REPLICA").await;
    let cfg = config(&cluster, &unique("ep"), "100ms", "", AGENT);
    let mut ctl = controller(cfg).await;

    one_tick(&mut ctl, &ecs, &cluster, 2, "the start").await;
    instances.push(moto::add_instance(&ecs, &cluster).await);
    one_tick(&mut ctl, &ecs, &cluster, 3, "an instance registered").await;
    moto::drain(&ecs, &cluster, &instances[0], true).await;
    one_tick(&mut ctl, &ecs, &cluster, 2, "an instance drained").await;
    moto::drain(&ecs, &cluster, &instances[0], false).await;
    one_tick(&mut ctl, &ecs, &cluster, 3, "the drain ended").await;
    moto::deregister(&ecs, &cluster, &instances[1]).await;
    one_tick(&mut ctl, &ecs, &cluster, 2, "an instance deregistered").await;

    ctl.shutdown().await.expect("shutdown");
    assert_eq!(
        moto::desired(&ecs, &cluster, "agent").await,
        Some(2),
        "a referenced service is never deleted"
    );
}

/// Seed 004 on some instances only: the one-per-host service's `instances = "attribute:role ==
/// web"` keeps its desiredCount at the ACTIVE instances whose attribute `role` is `web`
/// (microscaler evaluates the query on each instance's description; moto ignores
/// `ListContainerInstances`' filter), in the first tick after a matching instance is
/// registered, drained or deregistered; one that does not match changes nothing; an instance
/// given the attribute later is counted once its description is read again (within 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_host_service_follows_the_matching_instances() {
    if !moto::available().await {
        return;
    }
    let ecs = moto::ecs().await;
    let cluster = unique("eq");
    let mut instances = moto::cluster(&ecs, &cluster, 3).await;
    for arn in &instances[..2] {
        moto::set_attribute(&ecs, &cluster, arn, "role", "web").await;
    }
    moto::set_attribute(&ecs, &cluster, &instances[2], "role", "db").await;
    moto::plain_service(&ecs, &cluster, "agent", 0, "REPLICA").await;
    let agent = format!("{AGENT}        instances = \"attribute:role == web\"\n");
    let cfg = config(&cluster, &unique("eq"), "100ms", "", &agent);
    let mut ctl = controller(cfg).await;

    one_tick(&mut ctl, &ecs, &cluster, 2, "the start").await;
    let web = moto::add_instance(&ecs, &cluster).await;
    moto::set_attribute(&ecs, &cluster, &web, "role", "web").await;
    instances.push(web);
    one_tick(&mut ctl, &ecs, &cluster, 3, "a web instance registered").await;
    instances.push(moto::add_instance(&ecs, &cluster).await);
    one_tick(
        &mut ctl,
        &ecs,
        &cluster,
        3,
        "an instance without the attribute registered",
    )
    .await;
    moto::drain(&ecs, &cluster, &instances[0], true).await;
    one_tick(&mut ctl, &ecs, &cluster, 2, "a web instance drained").await;
    moto::deregister(&ecs, &cluster, &instances[1]).await;
    one_tick(&mut ctl, &ecs, &cluster, 1, "a web instance deregistered").await;

    // The db instance becomes a web one: seen when the descriptions are read again.
    moto::set_attribute(&ecs, &cluster, &instances[2], "role", "web").await;
    let t0 = Instant::now();
    loop {
        let r = ctl.tick().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        if moto::desired(&ecs, &cluster, "agent").await == Some(2) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the changed attribute was not seen within 15 s"
        );
        tokio::time::sleep(TICK).await;
    }
    ctl.shutdown().await.expect("shutdown");
}

/// Seed 004's event path: with `events_queue`, the EventBridge event of a container instance
/// (sent to the SQS queue by the test, as the rule would) wakes the running loop at once, so
/// the one-per-host service follows a new instance long before the next tick (the tick here is
/// 20 s; the loop is woken only by the event). The event is deleted from the queue once read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_event_on_the_queue_wakes_the_loop() {
    if !moto::available().await {
        return;
    }
    let ecs = moto::ecs().await;
    let sqs = moto::sqs().await;
    let cluster = unique("ee");
    moto::cluster(&ecs, &cluster, 2).await;
    moto::plain_service(&ecs, &cluster, "agent", 0, "REPLICA").await;
    let queue = sqs
        .create_queue()
        .queue_name(unique("ecs-events"))
        .send()
        .await
        .expect("CreateQueue")
        .queue_url
        .expect("queue URL");
    let cfg = config(
        &cluster,
        &unique("ee"),
        "20s",
        &format!("events_queue = \"{queue}\""),
        AGENT,
    );
    let mut ctl = controller(cfg).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let looping = tokio::spawn(async move {
        run_loop(
            &mut ctl,
            async {
                let _ = stop_rx.await;
            },
            |_| {},
        )
        .await;
        ctl
    });
    // The loop's first tick (at once) sets the agent to the 2 instances.
    let t0 = Instant::now();
    while moto::desired(&ecs, &cluster, "agent").await != Some(2) {
        assert!(t0.elapsed() < Duration::from_secs(10), "first tick");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arn = moto::add_instance(&ecs, &cluster).await;
    let cluster_arn = format!(
        "arn:aws:ecs:{}:123456789012:cluster/{cluster}",
        moto::REGION
    );
    let sent = Instant::now();
    sqs.send_message()
        .queue_url(&queue)
        .message_body(moto::instance_event(&cluster_arn, &arn, "ACTIVE"))
        .send()
        .await
        .expect("SendMessage");
    while moto::desired(&ecs, &cluster, "agent").await != Some(3) {
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the event did not wake the loop (the next tick is 20 s away)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "from SendMessage to the agent's desiredCount updated: {:?}",
        sent.elapsed()
    );
    // The event was deleted once read.
    let t0 = Instant::now();
    loop {
        let attrs = sqs
            .get_queue_attributes()
            .queue_url(&queue)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(
                aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            )
            .send()
            .await
            .expect("GetQueueAttributes");
        let left: u32 = attrs
            .attributes()
            .map(|a| a.values().map(|v| v.parse::<u32>().unwrap_or(0)).sum())
            .unwrap_or(0);
        if left == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the event is still on the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(()).expect("stop the loop");
    let ctl = looping.await.expect("the loop");
    ctl.shutdown().await.expect("shutdown");
}

/// Throttling and 5xx met by the control loop (a fault proxy of ours in front of moto injects
/// them): p1's change is throttled ("Rate exceeded"), reported with its class, and retried
/// after the throttle's backoff (1 s, with jitter); p2's change in the meantime goes through
/// (a failed change never holds the rest of the plan); a 503 is retried too; at the end both
/// services run what their demand asks and nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_and_failed_changes_are_retried_with_backoff_and_the_rest_goes_on() {
    use microscaler::control::TickReport;
    use microscaler_backends::ErrorClass;
    use microscaler_testkit::fault_proxy::{Fault, FaultProxy};
    if !moto::available().await {
        return;
    }
    let ecs = moto::ecs().await;
    let cluster = unique("et");
    moto::cluster(&ecs, &cluster, 3).await;
    let proxy = FaultProxy::start(moto::ENDPOINT).await;
    let instance = unique("et");
    let mut cfg = config(
        &cluster,
        &instance,
        "100ms",
        "",
        r#"
        [[services]]
        name = "p1"
        priority = 1
        image = "busybox:1"
        [[services.triggers]]
        type = "manual"
        initial = 0
        [[services]]
        name = "p2"
        priority = 2
        image = "busybox:1"
        [[services.triggers]]
        type = "manual"
        initial = 0
        "#,
    );
    if let microscaler_backends::BackendConfig::Ecs(e) = &mut cfg.backend {
        e.endpoint_url = Some(proxy.address());
    }
    let mut ctl = controller(cfg).await;
    let p1 = ctl.controls().manual_of("p1").expect("p1").clone();
    let p2 = ctl.controls().manual_of("p2").expect("p2").clone();
    ctl.tick().await;

    // Every execution the loop reports, with when it was reported.
    type Log = Vec<(Instant, String, Result<(), ErrorClass>, String)>;
    fn record(log: &mut Log, r: &TickReport) {
        for ex in &r.executions {
            let (res, msg) = match &ex.result {
                Ok(_) => (Ok(()), String::new()),
                Err(e) => (Err(e.class), e.message.clone()),
            };
            log.push((Instant::now(), ex.service.to_string(), res, msg));
        }
    }
    fn of(log: &Log, svc: &str) -> Vec<(Instant, Result<(), ErrorClass>, String)> {
        log.iter()
            .filter(|(_, s, _, _)| s == svc)
            .map(|(t, _, r, m)| (*t, *r, m.clone()))
            .collect()
    }
    let mut log: Log = Vec::new();
    let (p1_name, p2_name) = (
        EcsBackend::service_name(&instance, "p1"),
        EcsBackend::service_name(&instance, "p2"),
    );

    proxy.inject("UpdateService", Fault::Throttle, 1);
    p1.set(3.0).expect("p1 demand");
    record(&mut log, &ctl.tick().await);
    p2.set(2.0).expect("p2 demand");
    let t0 = Instant::now();
    while moto::desired(&ecs, &cluster, &p1_name).await != Some(3) {
        assert!(t0.elapsed() < Duration::from_secs(15), "p1 never applied");
        record(&mut log, &ctl.tick().await);
        tokio::time::sleep(TICK).await;
    }
    assert_eq!(moto::desired(&ecs, &cluster, &p2_name).await, Some(2));
    // The retry's own result may be reported by the tick after the one that dispatched it
    // (it ends in the background once that tick's wait is over): tick until it is.
    async fn until_retried(ctl: &mut Controller<AnyBackend>, log: &mut Log) {
        let t1 = Instant::now();
        while of(log, "p1").len() < 2 && t1.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(TICK).await;
            record(log, &ctl.tick().await);
        }
    }
    until_retried(&mut ctl, &mut log).await;
    let p1_log = of(&log, "p1");
    assert_eq!(p1_log.len(), 2, "one throttled try, one retry: {log:?}");
    assert_eq!(p1_log[0].1, Err(ErrorClass::Throttled), "{log:?}");
    assert!(p1_log[0].2.contains("Rate exceeded"), "{log:?}");
    assert_eq!(p1_log[1].1, Ok(()));
    let waited = p1_log[1].0 - p1_log[0].0;
    assert!(
        waited >= Duration::from_millis(900),
        "retried after the throttle's backoff, not at once: {waited:?}"
    );
    let p2_log = of(&log, "p2");
    assert_eq!(p2_log.len(), 1, "{log:?}");
    assert!(
        p2_log[0].1.is_ok() && p2_log[0].0 < p1_log[1].0,
        "p2's change went through while p1 waited: {log:?}"
    );

    log.clear();
    proxy.inject("UpdateService", Fault::ServerError(503), 1);
    p1.set(5.0).expect("p1 demand");
    let t0 = Instant::now();
    while moto::desired(&ecs, &cluster, &p1_name).await != Some(5) {
        assert!(t0.elapsed() < Duration::from_secs(15), "p1 never applied");
        record(&mut log, &ctl.tick().await);
        tokio::time::sleep(TICK).await;
    }
    until_retried(&mut ctl, &mut log).await;
    let p1_log = of(&log, "p1");
    assert_eq!(p1_log.len(), 2, "{log:?}");
    assert_eq!(p1_log[0].1, Err(ErrorClass::Failed), "{log:?}");
    assert!(p1_log[0].2.contains("503"), "{log:?}");
    assert!(p1_log[1].0 - p1_log[0].0 >= Duration::from_millis(400));
    assert_eq!(proxy.faulted("UpdateService"), 2);
    ctl.shutdown().await.expect("shutdown");
}

/// Capacity in CPU and memory on three container instances (moto registers each with 4096
/// CPU units, 4 CPUs, and 7482 MiB), someone else's task reserving 2 CPUs and 3 GiB of the
/// first; p1 (1 CPU, 1 GiB) on manual demand, p2 (1 CPU, 2 GiB) the remainder. At every tick
/// the first instance's room is 2 CPUs and 4410 MiB and the others' all of theirs (someone
/// else's reservation is taken off, the services' own tasks are not); every task the plan
/// asks for is placed by moto within the tick after (never more than one tick short); as the
/// demand moves, p1 runs its demand and p2 fills what fits: no instance has room for one more
/// of p2's tasks. When someone else's task stops, p2 takes its room.
///
/// moto starts no task for a service (`runningCount` jumps to `desiredCount`), so the test
/// schedules the services' tasks itself between ticks ([`moto::schedule`]: `RunTask` in the
/// services' task groups, which moto places first fit and takes off the instances'
/// `remainingResources`, and `StopTask`, which gives it back); the backend reads the room and
/// the tasks as on AWS. moto advances a task's `lastStatus` past RUNNING on each
/// `DescribeTasks` (its state manager, shared by every test, is left alone), so the replicas
/// show as stopping; placement counts them all the same. How ECS itself places tasks
/// (strategies, constraints) and which task a scale-in stops are not shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_plans_fit_the_container_instances_beside_others_tasks() {
    if !moto::available().await {
        return;
    }
    let ecs = moto::ecs().await;
    let cluster = unique("er");
    let instances = moto::cluster(&ecs, &cluster, 3).await;
    let foreign = moto::task_definition(&ecs, "someone-elses", 2048, 3072).await;
    let foreign = moto::start_task(
        &ecs,
        &cluster,
        &foreign,
        &instances[0],
        "service:someone-elses",
    )
    .await;
    let instance = unique("er");
    let cfg = Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "100ms"
        on_exit = "stop"
        [capacity]
        resources = true
        [backend]
        type = "ecs"
        cluster = "{cluster}"
        region = "{region}"
        endpoint_url = "{endpoint}"
        [[services]]
        name = "p1"
        priority = 1
        image = "busybox:1"
        resources = {{ cpu = "1", memory = "1Gi" }}
        [[services.triggers]]
        type = "manual"
        initial = 1
        [[services]]
        name = "p2"
        priority = 2
        remainder = true
        image = "busybox:1"
        resources = {{ cpu = "1", memory = "2Gi" }}
        "#,
        region = moto::REGION,
        endpoint = moto::ENDPOINT,
    ))
    .expect("valid configuration");
    let mut ctl = controller(cfg).await;
    let demand = ctl.controls().manual_of("p1").expect("p1's manual").clone();
    let mut ecs_services = Vec::new();
    for s in ["p1", "p2"] {
        let name = EcsBackend::service_name(&instance, s);
        let td = moto::service(&ecs, &cluster, &name)
            .await
            .and_then(|s| s.task_definition().map(str::to_string))
            .expect("a managed service");
        ecs_services.push((name, td));
    }

    // Ticks (each followed by the test's scheduling) until p1 runs `d` and p2 fills what fits.
    let mut converge = async |d: u32, foreign_cpu: f64, foreign_mib: u64| {
        let t0 = Instant::now();
        let mut short_before = vec![0, 0];
        loop {
            let r = ctl.tick().await;
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            for ex in &r.executions {
                assert!(ex.result.is_ok(), "{ex:?}");
            }
            let hosts = &r.observed.as_ref().expect("observed").hosts;
            for h in hosts {
                let room = if h.id.0 == instances[0] {
                    (4.0 - foreign_cpu, 7482 - foreign_mib)
                } else {
                    (4.0, 7482)
                };
                assert_eq!(
                    (h.cpus, h.memory_bytes.map(|b| b >> 20)),
                    (Some(room.0), Some(room.1)),
                    "the room of {} (the first instance is {})",
                    h.id.0,
                    instances[0]
                );
            }
            let short = moto::schedule(&ecs, &cluster, &ecs_services).await;
            for (i, s) in short.iter().enumerate() {
                assert!(
                    *s == 0 || short_before[i] == 0,
                    "{} has tasks no instance could take for two ticks: {short:?}; plan {:?}",
                    ecs_services[i].0,
                    r.plan
                );
            }
            short_before = short.clone();
            let p1 = moto::desired(&ecs, &cluster, &ecs_services[0].0).await;
            let mut full = true;
            for arn in &instances {
                let (cpu, mib) = moto::remaining(&ecs, &cluster, arn).await;
                full &= cpu < 1024 || mib < 2048;
            }
            if p1 == Some(d) && short == [0, 0] && full {
                return;
            }
            assert!(
                t0.elapsed() < CONVERGE,
                "p1 at {d} with p2 filling what fits not reached: p1 {p1:?}, short {short:?}, \
                 plan {:?}",
                r.plan
            );
            tokio::time::sleep(TICK).await;
        }
    };
    for d in [1, 4, 0, 7, 2] {
        demand.set(f64::from(d)).expect("set demand");
        converge(d, 2.0, 3072).await;
    }
    // Someone else's task stops: its room is the services' again.
    moto::stop_task(&ecs, &cluster, &foreign).await;
    converge(2, 0.0, 0).await;
    let p2 = moto::desired(&ecs, &cluster, &ecs_services[1].0).await;
    // Three of p2's fit an instance by memory, two beside two of p1's: 8 or 9, as p1's tasks
    // lie.
    assert!(p2 >= Some(8), "p2 takes the room back: {p2:?}");

    ctl.shutdown().await.expect("shutdown");
}
