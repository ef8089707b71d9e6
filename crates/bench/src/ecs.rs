//! The ECS event figure, on moto server (scripts/source-services.sh starts it on
//! 127.0.0.1:5000): seed 004's one-per-host service on a 20 s tick, so that only the
//! container-instance event can make it follow a new instance in time. Per step a container
//! instance is registered and the EventBridge event of the rule is sent to microscaler's SQS
//! queue; timed from `SendMessage` to the `UpdateService` of the service reaching the API.
//! The baseline, interleaved step by step, is the floor of any event-driven controller: a
//! plain SQS consumer (the same long poll) that calls `UpdateService` itself as soon as it
//! reads the event, with no observation and no plan. Both talk to moto through the same fault
//! proxy of the test kit (no fault injected), which timestamps each `UpdateService` as it
//! arrives; only one step is in flight at a time.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use microscaler::wiring::build_backend;
use microscaler_backends::Config;
use microscaler_testkit::fault_proxy::FaultProxy;
use microscaler_testkit::{moto, unique};
use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::engine::with_backend;
use crate::report::{ratio, Dist, Row};
use crate::Opts;

const LIMIT: Duration = Duration::from_secs(10);

/// Waits until `proxy` has seen more than `before` `UpdateService` calls; when the next one
/// arrived.
async fn next_update(proxy: &FaultProxy, before: u32, what: &str) -> Result<std::time::Instant> {
    let t0 = Instant::now();
    loop {
        if let Some(&at) = proxy.times("UpdateService").get(before as usize) {
            return Ok(at);
        }
        if t0.elapsed() > LIMIT {
            bail!("no UpdateService within {LIMIT:?}: {what}");
        }
        sleep(Duration::from_millis(1)).await;
    }
}

/// The figure: `o.steps` events each way.
pub async fn events(o: &Opts) -> Result<(Value, Vec<Row>)> {
    moto::fake_credentials();
    tokio::net::TcpStream::connect(("127.0.0.1", 5000))
        .await
        .context("moto server on 127.0.0.1:5000 (scripts/source-services.sh starts it)")?;
    let ecs = moto::ecs().await;
    let sqs = moto::sqs().await;
    let cluster = unique("bench-ecs");
    moto::cluster(&ecs, &cluster, 1).await;
    moto::plain_service(&ecs, &cluster, "agent", 0, "REPLICA").await;
    moto::plain_service(&ecs, &cluster, "raw-agent", 0, "REPLICA").await;
    let queue = |name: &str| {
        let sqs = sqs.clone();
        let name = unique(name);
        async move {
            sqs.create_queue()
                .queue_name(name)
                .send()
                .await
                .context("CreateQueue")?
                .queue_url
                .context("a queue URL")
        }
    };
    let (ours, raw) = (
        queue("bench-ecs-events").await?,
        queue("bench-ecs-raw").await?,
    );
    let proxy = FaultProxy::start(moto::ENDPOINT).await;

    // The baseline: a plain consumer of its queue, through the proxy.
    let via_proxy = moto::sdk_config(&proxy.address()).await;
    let raw_task = {
        let (sqs, ecs) = (
            aws_sdk_sqs::Client::new(&via_proxy),
            aws_sdk_ecs::Client::new(&via_proxy),
        );
        let (raw, cluster) = (raw.clone(), cluster.clone());
        tokio::spawn(async move {
            let mut desired = 0;
            loop {
                let Ok(got) = sqs
                    .receive_message()
                    .queue_url(&raw)
                    .max_number_of_messages(10)
                    .wait_time_seconds(20)
                    .send()
                    .await
                else {
                    sleep(Duration::from_millis(100)).await;
                    continue;
                };
                for m in got.messages() {
                    desired += 1;
                    let _ = ecs
                        .update_service()
                        .cluster(&cluster)
                        .service("raw-agent")
                        .desired_count(desired)
                        .send()
                        .await;
                    if let Some(h) = m.receipt_handle() {
                        let _ = sqs
                            .delete_message()
                            .queue_url(&raw)
                            .receipt_handle(h)
                            .send()
                            .await;
                    }
                }
            }
        })
    };

    let cfg = Config::from_toml(&format!(
        r#"
        instance = "{instance}"
        tick = "20s"
        on_exit = "leave"
        [capacity]
        slots_per_host = 3
        [backend]
        type = "ecs"
        cluster = "{cluster}"
        region = "{region}"
        endpoint_url = "{endpoint}"
        events_queue = "{ours}"
        [[services]]
        name = "agent"
        per_host = true
        [services.reference]
        service = "agent"
        "#,
        instance = unique("bench-ecs"),
        region = moto::REGION,
        endpoint = proxy.address(),
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let backend = build_backend(&cfg, &std::env::temp_dir()).await?;
    let cluster_arn = format!(
        "arn:aws:ecs:{}:123456789012:cluster/{cluster}",
        moto::REGION
    );
    let steps = o.steps;
    let r = with_backend(cfg, backend, |_controls| {
        let (ecs, sqs, proxy, cluster) = (&ecs, &sqs, &proxy, &cluster);
        let (ours, raw, cluster_arn) = (&ours, &raw, &cluster_arn);
        async move {
            // The loop's first tick sets the agent to the one instance.
            let t0 = Instant::now();
            while moto::desired(ecs, cluster, "agent").await != Some(1) {
                if t0.elapsed() > LIMIT {
                    bail!("the first tick did not set the agent to 1");
                }
                sleep(Duration::from_millis(10)).await;
            }
            let send = |queue: &str, arn: &str| {
                sqs.send_message()
                    .queue_url(queue)
                    .message_body(moto::instance_event(cluster_arn, arn, "ACTIVE"))
                    .send()
            };
            let (mut micro, mut base, mut raced) = (Vec::new(), Vec::new(), 0);
            for i in 0..steps {
                sleep(Duration::from_millis(200)).await;
                let before = proxy.seen("UpdateService");
                let arn = moto::add_instance(ecs, cluster).await;
                let t0 = std::time::Instant::now();
                send(ours, &arn).await.context("SendMessage")?;
                let at = next_update(proxy, before, "microscaler's agent").await?;
                if at < t0 {
                    // The 20 s periodic tick came between the registration and the event.
                    raced += 1;
                } else {
                    micro.push(at - t0);
                }
                if std::env::var_os("BENCH_ECS_TRACE").is_some() {
                    let mut trace: Vec<(f64, &str)> = Vec::new();
                    for op in [
                        "ReceiveMessage",
                        "ListContainerInstances",
                        "DescribeContainerInstances",
                        "DescribeServices",
                        "UpdateService",
                        "DeleteMessage",
                    ] {
                        for t in proxy.times(op) {
                            if t >= t0 {
                                trace.push(((t - t0).as_secs_f64() * 1e3, op));
                            }
                        }
                    }
                    trace.sort_by(|a, b| a.0.total_cmp(&b.0));
                    eprintln!("step {i}: {trace:?}");
                }
                let want = Some(i as u32 + 2);
                if moto::desired(ecs, cluster, "agent").await != want {
                    bail!("step {i}: the agent is not at {want:?}");
                }

                sleep(Duration::from_millis(200)).await;
                let before = proxy.seen("UpdateService");
                let t0 = std::time::Instant::now();
                send(raw, &arn).await.context("SendMessage")?;
                let at = next_update(proxy, before, "the raw consumer's agent").await?;
                base.push(at - t0);
            }
            Ok((micro, base, raced))
        }
    })
    .await;
    raw_task.abort();
    let ((micro, base, raced), _stats) = r?;
    let (micro, base) = (Dist::new(&micro), Dist::new(&base));
    let rows = vec![Row::dist(
        "ecs: instance event on SQS -> per-host UpdateService, vs a raw SQS consumer",
        &micro,
        &base,
        "< 100 ms",
    )];
    let v = json!({
        "steps": steps,
        "tick_s": 20,
        "steps_raced_by_the_periodic_tick": raced,
        "event_to_update": { "microscaler": micro.json(), "baseline_raw_consumer": base.json(),
                             "ratio_p50": ratio(micro.p50, base.p50) },
    });
    Ok((v, rows))
}
