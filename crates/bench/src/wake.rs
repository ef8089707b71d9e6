//! Reaction to pushed demand: from an `RPUSH` to a Redis list (a `redis_list` trigger with
//! `rule = "average"`, `target = 1`, on a redis-server of the benchmark's own with keyspace
//! notifications on) to the new replica running on the real Docker engine, against a raw
//! create + start (and, with `--pool`, a raw unpause) of the same container measured in the
//! same run. The loop's tick stays at `--tick`; the push wakes it.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::engine::{cleanup, timed_unpause, wait_until, watch_instance, with_controller, Raw};
use crate::report::{ratio, Dist, Row};
use crate::Opts;

const WORKER: &str = "worker";
const BASE: &str = "baseline";
const BASE_POOL: &str = "baseline-pool";
const LIMIT: Duration = Duration::from_secs(120);

fn config(o: &Opts, inst: &str, redis: &str) -> microscaler_backends::Config {
    let mut t = format!(
        "instance = \"{inst}\"\ntick = \"{}ms\"\non_exit = \"stop\"\n[capacity]\nslots = 10\n\
         [backend]\ntype = \"docker\"\nstart_parallelism = {}\nnetwork = \"none\"\n\
         [[services]]\nname = \"{WORKER}\"\npriority = 1\nmax = 10\nstop_grace = \"2s\"\n",
        o.tick.as_millis(),
        o.parallelism,
    );
    if o.pool > 0 {
        t.push_str(&format!("[services.pool]\nsize = {}\n", o.pool));
    }
    t.push_str(&format!(
        "[[services.triggers]]\ntype = \"redis_list\"\nurl = \"{redis}\"\nkey = \"jobs\"\n\
         rule = \"average\"\ntarget = 1\n"
    ));
    microscaler_backends::Config::from_toml(&t).expect("the benchmark's configuration is valid")
}

/// `RPUSH` -> replica running, `--steps` times (each step pushes one job onto one, then takes
/// it off again), interleaved with the baselines.
pub async fn rpush(o: &Opts) -> Result<(Value, Vec<Row>)> {
    let redis = microscaler_testkit::redis_server("Kl")
        .context("redis-server is needed (Debian's redis-server package)")?;
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("RPUSH")
        .arg("jobs")
        .arg("0")
        .query_async(&mut conn)
        .await?;

    let raw = Raw::new(&format!("bench-{}-base-wake", std::process::id())).await?;
    let mut base_rx = watch_instance(&raw.docker, &raw.instance).await;
    let inst = format!("bench-{}-wake", std::process::id());
    let mut rx = watch_instance(&raw.docker, &inst).await;
    let cfg = config(o, &inst, &redis.url);
    let settle = Duration::from_millis(300);
    let steps = o.steps;
    let pool = o.pool;
    let r = with_controller(cfg, |_controls| {
        let rx = &mut rx;
        let base_rx = &mut base_rx;
        let raw = &raw;
        let conn = &mut conn;
        async move {
            wait_until(rx, LIMIT, "the first replica", |c| c.of(WORKER) == 1).await?;
            let frozen = if pool > 0 {
                Some(raw.create_paused(BASE_POOL).await?)
            } else {
                None
            };
            let (mut react, mut base, mut unpause) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..steps {
                // Spread over the tick's phase, and let a pool refill.
                sleep(settle + o.tick.mul_f64(((i * 37) % 100) as f64 / 100.0)).await;
                if pool > 0 {
                    sleep(Duration::from_millis(700)).await;
                }
                let t0 = Instant::now();
                let _: () = redis::cmd("RPUSH")
                    .arg("jobs")
                    .arg(i)
                    .query_async(conn)
                    .await?;
                let at = wait_until(rx, LIMIT, "the second replica", |c| c.of(WORKER) >= 2).await?;
                react.push(at - t0);
                let _: () = redis::cmd("RPOP").arg("jobs").query_async(conn).await?;
                wait_until(rx, LIMIT, "back to one replica", |c| c.of(WORKER) == 1).await?;

                sleep(settle).await;
                let n = base_rx.borrow().starts_of(BASE);
                let t0 = Instant::now();
                let id = raw.create_start(BASE).await?;
                let at = wait_until(base_rx, LIMIT, "the baseline start", |c| {
                    c.starts_of(BASE) > n
                })
                .await?;
                base.push(at - t0);
                raw.stop_remove(&id).await?;
                if let Some(frozen) = &frozen {
                    sleep(settle).await;
                    unpause.push(timed_unpause(raw, base_rx, frozen, BASE_POOL, LIMIT).await?);
                }
            }
            if let Some(frozen) = &frozen {
                raw.stop_remove(frozen).await?;
            }
            Ok((react, base, unpause))
        }
    })
    .await;
    cleanup(&raw.docker, &inst).await?;
    cleanup(&raw.docker, &raw.instance).await?;
    let ((react, base, unpause), _) = r?;
    let (react, base, unpause) = (Dist::new(&react), Dist::new(&base), Dist::new(&unpause));
    let name = if pool > 0 {
        format!("RPUSH -> replica running (redis_list, pool {pool})")
    } else {
        "RPUSH -> replica running (redis_list, no pool)".to_string()
    };
    let mut rows = vec![Row::dist(
        &name,
        &react,
        &base,
        if pool > 0 {
            "< 60 ms"
        } else {
            "<= 1.2x create + start"
        },
    )];
    if pool > 0 {
        rows.push(Row::dist("  against a raw unpause", &react, &unpause, ""));
    }
    Ok((
        json!({
            "steps": steps,
            "tick_ms": o.tick.as_millis() as u64,
            "pool": pool,
            "rpush_to_running": react.json(),
            "baseline_create_start": base.json(),
            "baseline_unpause": unpause.json(),
            "ratio_p50_to_create_start": ratio(react.p50, base.p50),
        }),
        rows,
    ))
}
