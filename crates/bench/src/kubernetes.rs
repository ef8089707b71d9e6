//! The Kubernetes figure, on the test rig's real control plane (scripts/k8s-rig.sh start):
//! a demand step of a managed priority-1 service, timed to its Deployment's `spec.replicas`
//! patched and to its new pod Ready, against a raw `PATCH /scale` of a plain Deployment (the
//! same pod template, no microscaler) in the same run, interleaved step by step. Both are
//! timed from one watch of the namespace's Deployments and pods, so the watch's own delay is
//! in both. kwok plays the kubelets: a pod is Ready as soon as kwok sees it scheduled, so "pod
//! Ready" is apiserver + controllers + scheduler + kwok, without any container start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Resource};
use microscaler_backends::kubernetes::KubernetesBackend;
use microscaler_backends::{labels, BackendConfig, Config};
use microscaler_testkit::kube_rig::{admin, kubeconfig, NamespaceGuard, IMAGE};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

use crate::engine::{set_demand, with_backend};
use crate::report::{ms, ratio, Dist, Row};
use crate::Opts;

const P1: &str = "priority1";
const BASE: &str = "baseline";
const LIMIT: Duration = Duration::from_secs(60);

/// What the watch shows: per group (a managed service's name, or the baseline's `app`
/// label), the Deployment's `spec.replicas`, its Ready pods and its pods not yet gone.
#[derive(Debug, Clone, Default)]
struct Seen {
    at: Option<Instant>,
    replicas: BTreeMap<String, i32>,
    ready: BTreeMap<String, u32>,
    pods: BTreeMap<String, u32>,
}

fn group(labels: &BTreeMap<String, String>) -> Option<String> {
    labels
        .get(labels::SERVICE)
        .or_else(|| labels.get("app"))
        .cloned()
}

/// Follows `api` with a reflector; after every event, `update` rewrites its part of `Seen`.
fn follow<K>(
    api: Api<K>,
    tx: Arc<watch::Sender<Seen>>,
    update: fn(&[Arc<K>], &mut Seen),
) -> tokio::task::JoinHandle<()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while stream.next().await.is_some() {
            let now = Instant::now();
            let state = reader.state();
            tx.send_modify(|s| {
                s.at = Some(now);
                update(&state, s);
            });
        }
    })
}

fn deployments(all: &[Arc<Deployment>], s: &mut Seen) {
    s.replicas = all
        .iter()
        .filter_map(|d| {
            let g = group(d.metadata.labels.as_ref()?)?;
            Some((g, d.spec.as_ref()?.replicas.unwrap_or(1)))
        })
        .collect();
}

fn pods(all: &[Arc<Pod>], s: &mut Seen) {
    s.ready.clear();
    s.pods.clear();
    for p in all {
        let Some(g) = p.metadata.labels.as_ref().and_then(group) else {
            continue;
        };
        *s.pods.entry(g.clone()).or_default() += 1;
        let ready = p.metadata.deletion_timestamp.is_none()
            && p.status
                .as_ref()
                .and_then(|st| st.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            *s.ready.entry(g).or_default() += 1;
        }
    }
}

async fn wait(
    rx: &mut watch::Receiver<Seen>,
    what: &str,
    pred: impl Fn(&Seen) -> bool,
) -> Result<Instant> {
    let got = match tokio::time::timeout(LIMIT, rx.wait_for(|s| pred(s))).await {
        Ok(Ok(s)) => Some(s.at.unwrap_or_else(Instant::now)),
        Ok(Err(_)) => bail!("the watch ended while waiting for {what}"),
        Err(_) => None,
    };
    match got {
        Some(at) => Ok(at),
        None => bail!(
            "timed out after {}s waiting for {what}; seen: {:?}",
            LIMIT.as_secs(),
            *rx.borrow()
        ),
    }
}

fn get<T: Copy + Default>(m: &BTreeMap<String, T>, k: &str) -> T {
    m.get(k).copied().unwrap_or_default()
}

/// The plain Deployment of the baseline: microscaler's pod template, no microscaler.
fn baseline_deployment(namespace: &str) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": BASE, "namespace": namespace, "labels": {"app": BASE}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": BASE}},
            "template": {
                "metadata": {"labels": {"app": BASE}},
                "spec": {
                    "containers": [{"name": "replica", "image": IMAGE}],
                    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
                    "terminationGracePeriodSeconds": 1,
                },
            },
        },
    }))?)
}

fn config(o: &Opts, namespace: &str, instance: &str) -> Result<Config> {
    Config::from_toml(&format!(
        "instance = \"{instance}\"\ntick = \"{}ms\"\non_exit = \"stop\"\n\
         [capacity]\nslots_per_host = 3\n\
         [backend]\ntype = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespace = \"{namespace}\"\n\
         tolerations = [{{ key = \"kwok.x-k8s.io/node\", operator = \"Exists\", effect = \"NoSchedule\" }}]\n\
         [[services]]\nname = \"{P1}\"\npriority = 1\nmax = 4\nimage = \"{IMAGE}\"\nstop_grace = \"1s\"\n\
         [[services.triggers]]\ntype = \"manual\"\ninitial = 1\n",
        o.tick.as_millis(),
        kubeconfig(),
    ))
    .map_err(|e| anyhow::anyhow!("the benchmark's configuration: {e}"))
}

/// `bench kubernetes`: see the module's documentation.
pub async fn reaction(o: &Opts) -> Result<(Value, Vec<Row>)> {
    let client: Client = admin()
        .await
        .context("the Kubernetes test rig is not up: run scripts/k8s-rig.sh start (as root)")?;
    let namespace = format!("bench-{}-k8s", std::process::id());
    let _ns = NamespaceGuard::create(&client, &namespace).await;
    let tx = Arc::new(watch::Sender::new(Seen::default()));
    let mut rx = tx.subscribe();
    let watches = [
        follow(
            Api::<Deployment>::namespaced(client.clone(), &namespace),
            tx.clone(),
            deployments,
        ),
        follow(
            Api::<Pod>::namespaced(client.clone(), &namespace),
            tx.clone(),
            pods,
        ),
    ];
    let base_api: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    base_api
        .create(&PostParams::default(), &baseline_deployment(&namespace)?)
        .await
        .context("create the baseline Deployment")?;

    let instance = format!("bench-{}", std::process::id());
    let cfg = config(o, &namespace, &instance)?;
    let BackendConfig::Kubernetes(spec) = &cfg.backend else {
        unreachable!("a kubernetes configuration")
    };
    let backend = KubernetesBackend::connect(spec, &instance).await?;
    let steps = o.steps;
    let settle = Duration::from_millis(300);
    let scale = |n: i32| {
        let api = base_api.clone();
        async move {
            api.patch_scale(
                BASE,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": n}})),
            )
            .await
            .context("raw PATCH /scale of the baseline")
        }
    };
    let r = with_backend(cfg, backend, |c| {
        let rx = &mut rx;
        async move {
            wait(rx, "priority1 and the baseline at 1 Ready pod each", |s| {
                get(&s.ready, P1) == 1
                    && get(&s.pods, P1) == 1
                    && get(&s.ready, BASE) == 1
                    && get(&s.pods, BASE) == 1
            })
            .await?;
            let (mut patched, mut ready) = (Vec::new(), Vec::new());
            let (mut base_patched, mut base_ready, mut base_call) =
                (Vec::new(), Vec::new(), Vec::new());
            for i in 0..steps {
                // Steps at varying phases of the tick, as demand arrives in production.
                let jitter = o.tick.mul_f64((i as f64 * 0.618_034) % 1.0);
                sleep(settle + jitter).await;
                let t0 = Instant::now();
                set_demand(&c, P1, 2)?;
                let at = wait(rx, "spec.replicas = 2", |s| get(&s.replicas, P1) >= 2).await?;
                patched.push(at - t0);
                let at = wait(rx, "a second Ready pod", |s| get(&s.ready, P1) >= 2).await?;
                ready.push(at - t0);
                set_demand(&c, P1, 1)?;
                wait(rx, "priority1 back to 1 pod", |s| {
                    get(&s.replicas, P1) == 1 && get(&s.pods, P1) == 1
                })
                .await?;

                sleep(settle).await;
                let t0 = Instant::now();
                scale(2).await?;
                base_call.push(t0.elapsed());
                let at = wait(rx, "the baseline's spec.replicas = 2", |s| {
                    get(&s.replicas, BASE) >= 2
                })
                .await?;
                base_patched.push(at - t0);
                let at = wait(rx, "the baseline's second Ready pod", |s| {
                    get(&s.ready, BASE) >= 2
                })
                .await?;
                base_ready.push(at - t0);
                scale(1).await?;
                wait(rx, "the baseline back to 1 pod", |s| {
                    get(&s.replicas, BASE) == 1 && get(&s.pods, BASE) == 1
                })
                .await?;
            }
            Ok((patched, ready, base_patched, base_ready, base_call))
        }
    })
    .await;
    for w in watches {
        w.abort();
    }
    let ((patched, ready, base_patched, base_ready, base_call), stats) = r?;
    let (patched, ready) = (Dist::new(&patched), Dist::new(&ready));
    let (base_patched, base_ready, base_call) = (
        Dist::new(&base_patched),
        Dist::new(&base_ready),
        Dist::new(&base_call),
    );
    let tick = Dist::from_ms(&stats.tick_ms);
    let rows = vec![
        Row::dist(
            "kubernetes: demand step -> spec.replicas patched, vs raw PATCH /scale",
            &patched,
            &base_patched,
            "",
        ),
        Row::dist(
            "kubernetes: demand step -> new pod Ready (kwok), vs raw PATCH /scale",
            &ready,
            &base_ready,
            "",
        ),
        Row::text(
            "profile: the raw PATCH /scale call itself",
            format!(
                "p50 {:.1} / p95 {:.1} / max {:.1} ms",
                base_call.p50, base_call.p95, base_call.max
            ),
        ),
        Row::text(
            "profile: loop tick on kubernetes",
            format!(
                "p50 {:.1} / p95 {:.1} / max {:.1} ms (tick {} ms)",
                tick.p50,
                tick.p95,
                tick.max,
                ms(o.tick)
            ),
        ),
    ];
    let v = json!({
        "tick_ms": ms(o.tick),
        "steps": steps,
        "patched": { "microscaler": patched.json(), "baseline_raw_patch_scale": base_patched.json(),
                     "ratio_p50": ratio(patched.p50, base_patched.p50) },
        "pod_ready": { "microscaler": ready.json(), "baseline_raw_patch_scale": base_ready.json(),
                       "ratio_p50": ratio(ready.p50, base_ready.p50) },
        "raw_patch_call_ms": base_call.json(),
        "loop_tick_ms": tick.json(),
    });
    Ok((v, rows))
}
