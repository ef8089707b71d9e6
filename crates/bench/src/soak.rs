//! Soak: the real `microscaler run` binary (process backend) for a long time at a fast tick,
//! with its demand changed through the API every few hundred milliseconds and N clients of the
//! live stream (`GET /api/v1/stream`, server-sent events) that each stay a few seconds, read
//! every event, hang up and come back. Every few seconds the daemon's resident memory (VmRSS)
//! and open files (`/proc/<pid>/fd`) are sampled; after a warm-up their linear-regression slope
//! says whether they are flat. Every tick's own duration comes from one more stream client that
//! stays connected the whole run (the tick's `took_ms`), and is checked against twice the
//! period; the daemon's `/metrics` histogram counts the ticks too, as a cross-check.
//!
//! The HTTP client is a few lines over a TCP stream (HTTP/1.1, chunked bodies decoded here):
//! the clients must be many, cheap and behave like a browser's EventSource.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use microscaler_testkit::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::memory::{self, MemoryBackend};
use crate::report::{Dist, Row};

/// Slots of the soak's capacity, and the largest manual demand it sets.
const SLOTS: u32 = 8;
/// The services whose manual demand the churn moves (the third, `batch`, is the remainder).
const CHURNED: [&str; 2] = ["web", "worker"];
/// Time between two demand changes.
const CHURN_EVERY: Duration = Duration::from_millis(300);
/// How long a stream client stays connected: uniformly in this range (milliseconds).
const STAY_MS: (u64, u64) = (1_000, 10_000);
/// Time between samples of memory and open files.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// One sample of the daemon.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Seconds since the daemon's API answered.
    t: f64,
    rss_kib: u64,
    /// The anonymous part of the RSS (heap, stacks): what a leak would grow. The rest is
    /// mostly the binary's own pages, read in once as code paths first run.
    anon_kib: u64,
    fds: usize,
    threads: u64,
}

/// What the stream clients counted.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    failed: AtomicU64,
    events: AtomicU64,
    demand_changes: AtomicU64,
    demand_failed: AtomicU64,
}

/// Every tick the long-lived client saw: (t_ms, took_ms).
#[derive(Default)]
struct Ticks {
    seen: Vec<(u64, f64)>,
    /// Times the long-lived client had to reconnect (the run's tick figures have gaps then).
    reconnects: u64,
}

/// The soak figure: `duration` of `bin` at `tick` with `clients` reconnecting stream clients.
pub async fn run(
    bin: &Path,
    duration: Duration,
    clients: usize,
    tick: Duration,
) -> Result<(Value, Vec<Row>)> {
    memory::require(bin)?;
    let mut demand_rng = Rng::from_env("BENCH_SOAK_SEED");
    let clients_rng = Arc::new(Mutex::new(demand_rng.clone()));
    let token = format!("soak-{:016x}", demand_rng.below(u64::MAX));
    let instance = format!("bench-soak-{}", std::process::id());
    let config = format!(
        "instance = \"{instance}\"\ntick = \"{}ms\"\non_exit = \"stop\"\n\
         [capacity]\nslots = {SLOTS}\n[backend]\ntype = \"process\"\n\
         [[services]]\nname = \"web\"\npriority = 1\nmax = {SLOTS}\nstop_grace = \"1s\"\n\
         [[services.triggers]]\ntype = \"manual\"\ninitial = 3\n\
         [[services]]\nname = \"worker\"\npriority = 2\nmax = {SLOTS}\nstop_grace = \"1s\"\n\
         [[services.triggers]]\ntype = \"manual\"\ninitial = 2\n\
         [[services]]\nname = \"batch\"\npriority = 3\nremainder = true\nstop_grace = \"1s\"\n",
        tick.as_millis()
    );
    let mut daemon = memory::launch(
        bin,
        MemoryBackend::Process,
        instance,
        &config,
        &[("MICROSCALER_TOKEN", &token)],
        true,
    )?;
    let pid = daemon.child.id();
    let addr = listening(&mut daemon).await?;
    let token: Arc<str> = token.into();
    eprintln!(
        "bench: soak: microscaler pid {pid} on http://{addr}/, {clients} stream clients, \
         demand changed every {} ms, for {}",
        CHURN_EVERY.as_millis(),
        humantime::format_duration(duration)
    );

    let t0 = Instant::now();
    let end = tokio::time::Instant::now() + duration;
    let counters = Arc::new(Counters::default());
    let ticks = Arc::new(Mutex::new(Ticks::default()));
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(watch_ticks(
        addr,
        token.clone(),
        end,
        ticks.clone(),
    )));
    for _ in 0..clients {
        tasks.push(tokio::spawn(stream_client(
            addr,
            token.clone(),
            end,
            clients_rng.clone(),
            counters.clone(),
        )));
    }
    tasks.push(tokio::spawn(churn(
        addr,
        token.clone(),
        end,
        demand_rng,
        counters.clone(),
    )));

    let warmup = (duration / 4).min(Duration::from_secs(300));
    let progress_every = if duration >= Duration::from_secs(1200) {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(15)
    };
    let mut samples = Vec::new();
    let mut last_progress = Instant::now();
    let mut next = tokio::time::Instant::now();
    loop {
        if let Ok(Some(st)) = daemon.child.try_wait() {
            bail!(
                "microscaler exited during the soak ({st}); its log:\n{}",
                tail(&daemon.dir().join("daemon.log"), 20)
            );
        }
        let s = sample(pid, t0.elapsed().as_secs_f64())
            .context("cannot read the daemon's /proc entries: did it exit?")?;
        samples.push(s);
        if last_progress.elapsed() >= progress_every {
            last_progress = Instant::now();
            progress(&s, &samples, warmup, &counters, &ticks, tick);
        }
        next += SAMPLE_EVERY;
        if next > end {
            break;
        }
        tokio::time::sleep_until(next).await;
    }
    tokio::time::sleep_until(end).await;
    for t in tasks {
        let _ = t.await;
    }
    // Once every client has left: what the daemon keeps of the load.
    tokio::time::sleep(SAMPLE_EVERY).await;
    let after = sample(pid, t0.elapsed().as_secs_f64()).ok();
    let metrics = get(addr, &token, "/metrics").await.unwrap_or_default();
    let log_tail = tail(&daemon.dir().join("daemon.log"), 20);
    drop(daemon);

    let ticks = std::mem::take(&mut *ticks.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(summarise(
        Run {
            duration,
            clients,
            tick,
            warmup,
            samples: &samples,
            after,
            counters: &counters,
            ticks: &ticks,
            metrics: &metrics,
        },
        log_tail,
    ))
}

fn sample(pid: u32, t: f64) -> Result<Sample> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let rss_kib = memory::status_kb(pid, "VmRSS:").context("no VmRSS")?;
    let threads = memory::status_kb(pid, "Threads:").unwrap_or(0);
    Ok(Sample {
        t,
        rss_kib,
        anon_kib: memory::status_kb(pid, "RssAnon:").unwrap_or(0),
        fds,
        threads,
    })
}

/// The address the daemon's server listens on, from its log line "dashboard and API on
/// http://ADDR/", once `/healthz` answers there.
async fn listening(daemon: &mut memory::Daemon) -> Result<SocketAddr> {
    let log = daemon.dir().join("daemon.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text.lines().find_map(|l| {
            let rest = l.split("dashboard and API on http://").nth(1)?;
            rest.split('/').next()?.parse::<SocketAddr>().ok()
        });
        if let Some(addr) = found {
            if request(addr, "GET", "/healthz", None, None).await.is_ok() {
                return Ok(addr);
            }
        }
        if Instant::now() > deadline || daemon.child.try_wait()?.is_some() {
            bail!(
                "microscaler's server did not come up within 30 s; its log:\n{}",
                tail(&log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The request's head.
fn head(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, extra: &str) -> String {
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{extra}\r\n")
}

/// One request on a connection of its own; the status and the (decoded) body.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let extra = match body {
        Some(b) => format!(
            "Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ),
        None => "Connection: close\r\n".into(),
    };
    let mut s = TcpStream::connect(addr).await?;
    let mut req = head(addr, method, path, token, &extra);
    req.push_str(body.unwrap_or_default());
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .context("no answer within 10 s")??;
    let (status, chunked, at) = parse_head(&raw).context("malformed answer")?;
    let body = if chunked {
        let mut out = Vec::new();
        Chunked::default().feed(&raw[at..], &mut out)?;
        out
    } else {
        raw[at..].to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A GET that must answer 200.
async fn get(addr: SocketAddr, token: &str, path: &str) -> Result<String> {
    let (status, body) = request(addr, "GET", path, Some(token), None).await?;
    if status != 200 {
        bail!("GET {path}: {status} {body}");
    }
    Ok(body)
}

/// Status, whether the body is chunked, and where the body starts, once `raw` holds the head.
fn parse_head(raw: &[u8]) -> Option<(u16, bool, usize)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    Some((status, chunked, end))
}

/// A decoder of a chunked body fed piece by piece.
#[derive(Default)]
struct Chunked {
    pending: Vec<u8>,
    /// Bytes of the current chunk still to come.
    left: usize,
    /// The CRLF after a chunk's data is still to come.
    crlf: bool,
    /// The last chunk arrived (what follows, the trailer, is ignored).
    done: bool,
}

impl Chunked {
    /// Appends the decoded bytes of `input` to `out`; true once the last chunk arrived.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        if self.done {
            return Ok(true);
        }
        self.pending.extend_from_slice(input);
        let mut at = 0;
        let ended = loop {
            let rest = &self.pending[at..];
            if self.left > 0 {
                let n = self.left.min(rest.len());
                if n == 0 {
                    break false;
                }
                out.extend_from_slice(&rest[..n]);
                at += n;
                self.left -= n;
                self.crlf = self.left == 0;
            } else if self.crlf {
                if rest.len() < 2 {
                    break false;
                }
                if &rest[..2] != b"\r\n" {
                    bail!("chunk not followed by CRLF");
                }
                at += 2;
                self.crlf = false;
            } else {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                    break false;
                };
                let line = std::str::from_utf8(&rest[..eol])?;
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16)
                    .with_context(|| format!("bad chunk size {line:?}"))?;
                at += eol + 2;
                if size == 0 {
                    break true;
                }
                self.left = size;
            }
        };
        self.pending.drain(..at);
        self.done = ended;
        Ok(ended)
    }
}

/// One connection to the live stream until `until`; `on_event` gets every complete event's
/// text. Errors if the stream could not be opened or broke before `until`.
async fn stream_once(
    addr: SocketAddr,
    token: &str,
    until: tokio::time::Instant,
    mut on_event: impl FnMut(&str),
) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let req = head(
        addr,
        "GET",
        "/api/v1/stream",
        Some(token),
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n",
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut raw = Vec::new();
    let mut body: Option<Chunked> = None;
    let mut text = Vec::new();
    loop {
        let n = match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => return Ok(()),
            Ok(r) => r?,
        };
        if n == 0 {
            bail!("the stream ended");
        }
        let ended = match &mut body {
            Some(d) => d.feed(&buf[..n], &mut text)?,
            None => {
                raw.extend_from_slice(&buf[..n]);
                let Some((status, chunked, at)) = parse_head(&raw) else {
                    continue;
                };
                if status != 200 || !chunked {
                    bail!("the stream answered {status} (chunked: {chunked})");
                }
                body.insert(Chunked::default())
                    .feed(&raw[at..], &mut text)?
            }
        };
        let mut start = 0;
        while let Some(end) = text[start..].windows(2).position(|w| w == b"\n\n") {
            on_event(&String::from_utf8_lossy(&text[start..start + end]));
            start += end + 2;
        }
        text.drain(..start);
        if ended {
            bail!("the stream ended");
        }
    }
}

/// The JSON of an event of type `tick`.
fn tick_data(event: &str) -> Option<&str> {
    let mut is_tick = false;
    let mut data = None;
    for l in event.lines() {
        if l == "event: tick" || l == "event:tick" {
            is_tick = true;
        } else if let Some(d) = l.strip_prefix("data:") {
            data = Some(d.trim_start());
        }
    }
    data.filter(|_| is_tick)
}

/// A client of the live stream that stays a random few seconds, hangs up and comes back.
async fn stream_client(
    addr: SocketAddr,
    token: Arc<str>,
    end: tokio::time::Instant,
    rng: Arc<Mutex<Rng>>,
    counters: Arc<Counters>,
) {
    let pick = |lo: u64, hi: u64| {
        let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
        lo + r.below(hi - lo + 1)
    };
    // Spread the first connections over the first second.
    tokio::time::sleep(Duration::from_millis(pick(0, 1000))).await;
    while tokio::time::Instant::now() < end {
        let stay = Duration::from_millis(pick(STAY_MS.0, STAY_MS.1));
        let until = (tokio::time::Instant::now() + stay).min(end);
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let mut events = 0;
        let r = stream_once(addr, &token, until, |e| {
            if tick_data(e).is_some() {
                events += 1;
            }
        })
        .await;
        counters.events.fetch_add(events, Ordering::Relaxed);
        if r.is_err() {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(pick(0, 500))).await;
    }
}

/// The client that stays connected the whole run and keeps every tick's `t_ms` and `took_ms`.
async fn watch_ticks(
    addr: SocketAddr,
    token: Arc<str>,
    end: tokio::time::Instant,
    ticks: Arc<Mutex<Ticks>>,
) {
    let mut first = true;
    while tokio::time::Instant::now() < end {
        if !first {
            ticks.lock().unwrap_or_else(|e| e.into_inner()).reconnects += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        first = false;
        let _ = stream_once(addr, &token, end, |e| {
            let Some(data) = tick_data(e) else { return };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                return;
            };
            if let (Some(t), Some(took)) = (v["t_ms"].as_u64(), v["took_ms"].as_f64()) {
                let mut g = ticks.lock().unwrap_or_else(|e| e.into_inner());
                // The first event of a connection repeats the latest tick.
                if g.seen.last().is_none_or(|&(last, _)| t > last) {
                    g.seen.push((t, took));
                }
            }
        })
        .await;
    }
}

/// Moves the manual demand of the churned services by a seeded walk every [`CHURN_EVERY`].
async fn churn(
    addr: SocketAddr,
    token: Arc<str>,
    end: tokio::time::Instant,
    mut rng: Rng,
    counters: Arc<Counters>,
) {
    let mut values = [3u32, 2];
    let mut at = tokio::time::Instant::now();
    loop {
        at += CHURN_EVERY;
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        let i = rng.below(CHURNED.len() as u64) as usize;
        let step = rng.below(5) as i64 - 2;
        values[i] = (i64::from(values[i]) + step).clamp(0, i64::from(SLOTS)) as u32;
        let path = format!("/api/v1/services/{}/demand", CHURNED[i]);
        let body = format!("{{\"value\": {}}}", values[i]);
        match request(addr, "PUT", &path, Some(&token), Some(&body)).await {
            Ok((200, _)) => counters.demand_changes.fetch_add(1, Ordering::Relaxed),
            _ => counters.demand_failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Least-squares slope of `(x, y)`, per unit of x; `None` under 2 distinct x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Slope per hour of `f` over the samples after `warmup`.
fn per_hour(samples: &[Sample], warmup: Duration, f: fn(&Sample) -> f64) -> Option<f64> {
    let after: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t >= warmup.as_secs_f64())
        .map(|s| (s.t / 3600.0, f(s)))
        .collect();
    slope(&after)
}

fn rss(s: &Sample) -> f64 {
    s.rss_kib as f64
}

fn anon(s: &Sample) -> f64 {
    s.anon_kib as f64
}

fn fds(s: &Sample) -> f64 {
    s.fds as f64
}

fn progress(
    s: &Sample,
    samples: &[Sample],
    warmup: Duration,
    counters: &Counters,
    ticks: &Mutex<Ticks>,
    tick: Duration,
) {
    let rss_slope = per_hour(samples, warmup, rss);
    let anon_slope = per_hour(samples, warmup, anon);
    let fd_slope = per_hour(samples, warmup, fds);
    let g = ticks.lock().unwrap_or_else(|e| e.into_inner());
    let over = g
        .seen
        .iter()
        .filter(|(_, took)| *took > 2.0 * crate::report::ms(tick))
        .count();
    let max = g.seen.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    eprintln!(
        "bench: soak {:>6.0} s: RSS {:.1} MiB (slope {}; anonymous {:.1} MiB, slope {}), {} open files (slope {}), {} threads, \
         {} ticks ({over} over {:.0} ms, max {max:.1} ms), {} stream connections, {} demand changes",
        s.t,
        s.rss_kib as f64 / 1024.0,
        rss_slope.map_or_else(|| "after warm-up".into(), |v| format!("{v:+.0} KiB/h")),
        s.anon_kib as f64 / 1024.0,
        anon_slope.map_or_else(|| "after warm-up".into(), |v| format!("{v:+.0} KiB/h")),
        s.fds,
        fd_slope.map_or_else(|| "after warm-up".into(), |v| format!("{v:+.1}/h")),
        s.threads,
        g.seen.len(),
        2.0 * crate::report::ms(tick),
        counters.connections.load(Ordering::Relaxed),
        counters.demand_changes.load(Ordering::Relaxed),
    );
}

/// A Prometheus sample's value in `metrics`, by its full name with labels.
fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

/// What a soak measured.
struct Run<'a> {
    duration: Duration,
    clients: usize,
    tick: Duration,
    warmup: Duration,
    samples: &'a [Sample],
    /// A sample [`SAMPLE_EVERY`] after the load ended.
    after: Option<Sample>,
    counters: &'a Counters,
    ticks: &'a Ticks,
    metrics: &'a str,
}

fn summarise(r: Run<'_>, log_tail: String) -> (Value, Vec<Row>) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let period = crate::report::ms(r.tick);
    let limit = 2.0 * period;
    let first = r.samples.first().copied();
    let last = r.samples.last().copied();
    let warm = r
        .samples
        .iter()
        .find(|s| s.t >= r.warmup.as_secs_f64())
        .copied();
    let max_rss = r.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let max_fds = r.samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let rss_slope = per_hour(r.samples, r.warmup, rss);
    let anon_slope = per_hour(r.samples, r.warmup, anon);
    let fd_slope = per_hour(r.samples, r.warmup, fds);
    let took: Vec<f64> = r.ticks.seen.iter().map(|(_, t)| *t).collect();
    let took_dist = Dist::from_ms(&took);
    let over = took.iter().filter(|t| **t > limit).count();
    let gaps: Vec<f64> = r
        .ticks
        .seen
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) as f64)
        .collect();
    let gap_dist = Dist::from_ms(&gaps);
    let gaps_over = gaps.iter().filter(|g| **g > limit).count();
    let metric_ticks = metric(r.metrics, "microscaler_tick_duration_seconds_count");
    let metric_le_250 = metric(
        r.metrics,
        "microscaler_tick_duration_seconds_bucket{le=\"0.25\"}",
    );
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let name = format!(
        "soak {} (tick {:.0} ms, {} stream clients)",
        humantime::format_duration(r.duration),
        period,
        r.clients
    );
    let (s0, s1, sw) = (
        first.map_or(0, |s| s.rss_kib),
        last.map_or(0, |s| s.rss_kib),
        warm.map_or(0, |s| s.rss_kib),
    );
    let rows = vec![
        Row::values(
            &format!("{name}: resident memory"),
            format!(
                "start {:.1} / after warm-up {:.1} / end {:.1} / max {:.1} MiB; {:.1} once the clients left",
                mib(s0),
                mib(sw),
                mib(s1),
                mib(max_rss),
                mib(r.after.map_or(0, |s| s.rss_kib))
            ),
            format!(
                "{} (anonymous {:.1} -> {:.1} MiB, {}) after a {} s warm-up",
                rss_slope.map_or_else(|| "-".into(), |v| format!("slope {v:+.0} KiB/h")),
                mib(warm.map_or(0, |s| s.anon_kib)),
                mib(last.map_or(0, |s| s.anon_kib)),
                anon_slope.map_or_else(|| "-".into(), |v| format!("{v:+.0} KiB/h")),
                r.warmup.as_secs()
            ),
            crate::report::ratio(s1 as f64, sw as f64),
            "flat",
        ),
        Row::values(
            &format!("{name}: open files"),
            format!(
                "start {} / after warm-up {} / end {} / max {}; {} once the clients left",
                first.map_or(0, |s| s.fds),
                warm.map_or(0, |s| s.fds),
                last.map_or(0, |s| s.fds),
                max_fds,
                r.after.map_or(0, |s| s.fds)
            ),
            fd_slope.map_or_else(|| "-".into(), |v| format!("slope {v:+.1}/h after warm-up")),
            None,
            "flat",
        ),
        Row::values(
            &format!("{name}: tick duration"),
            format!(
                "{} ticks: p50 {:.1} / p95 {:.1} / max {:.1} ms; {over} over {limit:.0} ms",
                took_dist.n, took_dist.p50, took_dist.p95, took_dist.max
            ),
            format!(
                "start to start: p50 {:.0} / max {:.0} ms, {gaps_over} over {limit:.0} ms",
                gap_dist.p50, gap_dist.max
            ),
            None,
            &format!("none over {limit:.0} ms"),
        ),
        Row::text(
            &format!("{name}: load"),
            format!(
                "{} stream connections ({} failed), {} tick events read, {} demand changes ({} failed)",
                c(&r.counters.connections),
                c(&r.counters.failed),
                c(&r.counters.events),
                c(&r.counters.demand_changes),
                c(&r.counters.demand_failed)
            ),
        ),
    ];
    let v = json!({
        "duration_s": r.duration.as_secs_f64(), "tick_ms": period, "stream_clients": r.clients,
        "warmup_s": r.warmup.as_secs_f64(), "sample_every_s": SAMPLE_EVERY.as_secs_f64(),
        "churn_every_ms": crate::report::ms(CHURN_EVERY), "stay_ms": [STAY_MS.0, STAY_MS.1],
        "rss_kib": { "start": s0, "after_warmup": sw, "end": s1, "max": max_rss,
                     "slope_kib_per_hour": rss_slope,
                     "clients_gone": r.after.map(|s| s.rss_kib) },
        "rss_anon_kib": { "start": first.map(|s| s.anon_kib), "after_warmup": warm.map(|s| s.anon_kib),
                          "end": last.map(|s| s.anon_kib), "slope_kib_per_hour": anon_slope,
                          "clients_gone": r.after.map(|s| s.anon_kib) },
        "open_files": { "start": first.map(|s| s.fds), "after_warmup": warm.map(|s| s.fds),
                        "end": last.map(|s| s.fds), "max": max_fds,
                        "slope_per_hour": fd_slope,
                        "clients_gone": r.after.map(|s| s.fds) },
        "ticks": { "seen": took_dist.n, "took": took_dist.json(), "over_2x_period": over,
                   "start_to_start": gap_dist.json(), "start_to_start_over_2x_period": gaps_over,
                   "watcher_reconnects": r.ticks.reconnects,
                   "metrics_count": metric_ticks,
                   "metrics_over_250ms": metric_ticks.zip(metric_le_250).map(|(a, b)| a - b) },
        "stream_connections": c(&r.counters.connections),
        "stream_failed": c(&r.counters.failed),
        "tick_events_read": c(&r.counters.events),
        "demand_changes": c(&r.counters.demand_changes),
        "demand_failed": c(&r.counters.demand_failed),
        "samples": r.samples.iter().map(|s| json!([s.t, s.rss_kib, s.anon_kib, s.fds, s.threads])).collect::<Vec<_>>(),
        "samples_columns": ["t_s", "rss_kib", "rss_anon_kib", "open_files", "threads"],
        "daemon_log_tail": log_tail,
    });
    (v, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_decoded_across_pieces() {
        let mut d = Chunked::default();
        let mut out = Vec::new();
        let body = b"5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n";
        let mut ended = false;
        for piece in body.chunks(3) {
            ended = d.feed(piece, &mut out).unwrap();
        }
        assert!(ended);
        assert_eq!(out, b"hello, world");
    }

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 1.0)).collect();
        assert!((slope(&pts).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
    }

    #[test]
    fn tick_events_are_recognised() {
        assert_eq!(tick_data("event: tick\ndata: {\"a\":1}"), Some("{\"a\":1}"));
        assert_eq!(tick_data(":keep-alive"), None);
    }
}
