//! Demand source specifications: the validated options of each source type, and how each is
//! parsed from its trigger table.
//!
//! Adding a source means: one variant of [`SourceSpec`], one options struct, one raw struct
//! and one arm in [`Validator::source`] here; one module in the sources crate; one name in
//! [`SOURCE_TYPES`]. Options are validated here, once, at load time, never per tick.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Validator;
use crate::model::Capacity;

/// A demand source, validated. Each variant is built into a live source by the sources crate.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// Random demand as in the seeds' demo.
    Random(RandomSpec),
    /// A value set by hand (CLI now, API later).
    Manual(ManualSpec),
    /// Length of a Redis list (`LLEN`).
    RedisList(RedisListSpec),
    /// Lag of a Redis stream's consumer group (`XINFO GROUPS`, field `lag`).
    RedisStream(RedisStreamSpec),
    /// Depth of a RabbitMQ queue, from the management HTTP API.
    Rabbitmq(RabbitmqSpec),
    /// A Prometheus instant query that yields one number.
    Prometheus(PrometheusSpec),
    /// A number inside an HTTP JSON document, found by a JSON pointer.
    HttpJson(HttpJsonSpec),
    /// A request rate (or other field) from HAProxy's stats CSV.
    Haproxy(HaproxySpec),
    /// Requests per second from nginx's `stub_status`, from successive totals.
    Nginx(NginxSpec),
    /// Pending messages of a NATS JetStream consumer, from the monitoring endpoint.
    NatsJetstream(NatsJetstreamSpec),
    /// A value by time of day and weekday.
    Schedule(ScheduleSpec),
    /// CPU use of a service's own containers, from the Docker engine's stats.
    DockerCpu(DockerCpuSpec),
    /// Messages in an AWS SQS queue.
    Sqs(SqsSpec),
}

impl SourceSpec {
    /// The source's type name, as written in the configuration.
    pub fn type_name(&self) -> &'static str {
        match self {
            SourceSpec::Random(_) => "random",
            SourceSpec::Manual(_) => "manual",
            SourceSpec::RedisList(_) => "redis_list",
            SourceSpec::RedisStream(_) => "redis_stream",
            SourceSpec::Rabbitmq(_) => "rabbitmq",
            SourceSpec::Prometheus(_) => "prometheus",
            SourceSpec::HttpJson(_) => "http_json",
            SourceSpec::Haproxy(_) => "haproxy",
            SourceSpec::Nginx(_) => "nginx",
            SourceSpec::NatsJetstream(_) => "nats_jetstream",
            SourceSpec::Schedule(_) => "schedule",
            SourceSpec::DockerCpu(_) => "docker_cpu",
            SourceSpec::Sqs(_) => "sqs",
        }
    }

    /// The network options of a source that talks to a server (`None` for local ones).
    pub fn net(&self) -> Option<&NetOptions> {
        match self {
            SourceSpec::Random(_) | SourceSpec::Manual(_) | SourceSpec::Schedule(_) => None,
            SourceSpec::RedisList(s) => Some(&s.net),
            SourceSpec::RedisStream(s) => Some(&s.net),
            SourceSpec::Rabbitmq(s) => Some(&s.net),
            SourceSpec::Prometheus(s) => Some(&s.net),
            SourceSpec::HttpJson(s) => Some(&s.net),
            SourceSpec::Haproxy(s) => Some(&s.net),
            SourceSpec::Nginx(s) => Some(&s.net),
            SourceSpec::NatsJetstream(s) => Some(&s.net),
            SourceSpec::DockerCpu(s) => Some(&s.net),
            SourceSpec::Sqs(s) => Some(&s.net),
        }
    }
}

/// Options every network source has (keys `timeout` and `required` of the trigger).
#[derive(Debug, Clone, PartialEq)]
pub struct NetOptions {
    /// Connect and read timeout of each request (default 2 s). The control loop also bounds a
    /// whole sample by `sample_timeout`.
    pub timeout: Duration,
    /// Whether the server must answer the start-up check (default `true`: microscaler exits
    /// with an error naming the server). `false`: start anyway and report the trigger as
    /// failing until the server answers.
    pub required: bool,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            timeout: Duration::from_secs(2),
            required: true,
        }
    }
}

/// `LLEN key` of a Redis server.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisListSpec {
    /// `redis://[user:password@]host[:port][/db]` (TLS, `rediss://`, is not supported yet).
    pub url: String,
    /// The list's key.
    pub key: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// Consumer-group lag of a Redis stream: entries not yet delivered to the group
/// (`XINFO GROUPS stream`, field `lag`, Redis >= 7).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisStreamSpec {
    /// `redis://[user:password@]host[:port][/db]` (TLS, `rediss://`, is not supported yet).
    pub url: String,
    /// The stream's key.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// Whether to add the group's pending (delivered, not acknowledged) entries.
    pub include_pending: bool,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// Depth of a RabbitMQ queue, read from the management HTTP API
/// (`GET /api/queues/{vhost}/{queue}`).
#[derive(Debug, Clone, PartialEq)]
pub struct RabbitmqSpec {
    /// Base URL of the management API (default `http://127.0.0.1:15672`).
    pub url: String,
    /// Virtual host (default `/`).
    pub vhost: String,
    /// The queue.
    pub queue: String,
    /// User name (default `guest`).
    pub username: String,
    /// Password (default `guest`).
    pub password: String,
    /// Whether to add unacknowledged messages to the ready ones.
    pub include_unacked: bool,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// A PromQL instant query (`GET /api/v1/query`) whose result must be a scalar or a vector of
/// exactly one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct PrometheusSpec {
    /// Base URL of the server (default `http://127.0.0.1:9090`).
    pub url: String,
    /// The PromQL expression.
    pub query: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// A number in a JSON document fetched by `GET url`, at a JSON pointer (RFC 6901).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpJsonSpec {
    /// The document's URL.
    pub url: String,
    /// JSON pointer to the value (`/queue/depth`); the value must be a number or a string
    /// holding one.
    pub pointer: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// One field of one row of HAProxy's stats CSV (`/stats;csv`), by default the frontend's
/// `req_rate` (HTTP requests per second over the last second).
#[derive(Debug, Clone, PartialEq)]
pub struct HaproxySpec {
    /// URL of the stats page in CSV (`http://127.0.0.1:8404/stats;csv`).
    pub url: String,
    /// Proxy name (`pxname` column): the frontend or backend.
    pub proxy: String,
    /// Server name (`svname` column; default `FRONTEND`; `BACKEND` for a backend's total).
    pub server: String,
    /// The column (default `req_rate`; `rate` for sessions per second, `scur`, `qcur`, ...).
    pub field: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// Requests per second from nginx's `stub_status` page: the difference of successive request
/// totals over the time between them.
#[derive(Debug, Clone, PartialEq)]
pub struct NginxSpec {
    /// URL of the `stub_status` page.
    pub url: String,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// Pending messages of a JetStream consumer, from the NATS monitoring endpoint
/// (`GET /jsz?consumers=true`).
#[derive(Debug, Clone, PartialEq)]
pub struct NatsJetstreamSpec {
    /// Base URL of the monitoring endpoint (default `http://127.0.0.1:8222`).
    pub url: String,
    /// Account (default: any account that has the stream).
    pub account: Option<String>,
    /// The stream.
    pub stream: String,
    /// The durable consumer.
    pub consumer: String,
    /// Whether to add messages delivered but not yet acknowledged (`num_ack_pending`).
    pub include_ack_pending: bool,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// CPU use of the containers of one microscaler service (labelled `io.microscaler.instance` and
/// `io.microscaler.service`), from the Docker engine's stats, in percent of one CPU (100 = one
/// full core): the average over the running containers, or their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerCpuSpec {
    /// Engine address (`unix:///var/run/docker.sock`, `tcp://host:2375`); `None`: `DOCKER_HOST`
    /// or the default socket.
    pub docker_host: Option<String>,
    /// The microscaler service whose containers are measured; `None`: the trigger's own.
    pub service: Option<String>,
    /// Average per container (default) or the sum.
    pub aggregate: CpuAggregate,
    /// Timeouts and start-up policy (the default timeout is 5 s: a stats read takes ~1 s).
    pub net: NetOptions,
}

/// Messages of an AWS SQS queue (`GetQueueAttributes`: `ApproximateNumberOfMessages`,
/// optionally plus `ApproximateNumberOfMessagesNotVisible`), through the AWS SDK. Credentials
/// come from the SDK's default chain (environment, profile, instance role).
#[derive(Debug, Clone, PartialEq)]
pub struct SqsSpec {
    /// The queue's URL.
    pub queue_url: String,
    /// The region (default: the SDK's, from `AWS_REGION` or the profile; else `us-east-1`).
    pub region: Option<String>,
    /// Endpoint override (a local emulator, a VPC endpoint).
    pub endpoint_url: Option<String>,
    /// Whether to add in-flight messages (received, not yet deleted).
    pub include_in_flight: bool,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// How the CPU use of several containers is combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAggregate {
    /// The mean over the running containers (for `rule = "utilisation"`).
    Average,
    /// The total.
    Sum,
}

/// A value by weekday and time of day: the largest value of the windows open at the time, or
/// `default` when none is.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSpec {
    /// The windows.
    pub windows: Vec<ScheduleWindow>,
    /// The value outside every window.
    pub default: f64,
    /// Offset of the schedule's clock from UTC, in minutes (`utc_offset = "+02:00"` is 120).
    pub utc_offset_minutes: i32,
}

/// One window of a schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleWindow {
    /// Days the window opens on: bit 0 is Monday, bit 6 Sunday.
    pub days: u8,
    /// Opening time, minutes after midnight.
    pub from: u32,
    /// Closing time, minutes after midnight (exclusive; up to 1440). When `to <= from` the window
    /// runs past midnight into the next day.
    pub to: u32,
    /// The value while open.
    pub value: f64,
}

impl ScheduleSpec {
    /// The value at `unix_seconds` (seconds since 1970-01-01 UTC).
    pub fn value_at(&self, unix_seconds: i64) -> f64 {
        let local = unix_seconds + i64::from(self.utc_offset_minutes) * 60;
        let days = local.div_euclid(86400);
        let minute = (local.rem_euclid(86400) / 60) as u32;
        // 1970-01-01 was a Thursday (index 3 with Monday = 0).
        let weekday = (days + 3).rem_euclid(7) as u8;
        let yesterday = (weekday + 6) % 7;
        let mut best: Option<f64> = None;
        for w in &self.windows {
            let open = if w.from < w.to {
                w.days & (1 << weekday) != 0 && minute >= w.from && minute < w.to
            } else {
                (w.days & (1 << weekday) != 0 && minute >= w.from)
                    || (w.days & (1 << yesterday) != 0 && minute < w.to)
            };
            if open {
                best = Some(best.map_or(w.value, |b: f64| b.max(w.value)));
            }
        }
        best.unwrap_or(self.default)
    }
}

/// Random demand: every `interval`, the value moves by a random amount in `[-delta, +delta]`,
/// kept within `[0, max]`. The same seed gives the same sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomSpec {
    /// Largest move per interval.
    pub delta: u32,
    /// Time between moves.
    pub interval: Duration,
    /// Seed for replayable runs; `None` means seeded from the clock at start-up.
    pub seed: Option<u64>,
    /// Starting value; `None` means half of `max`.
    pub initial: Option<u32>,
    /// Upper bound; `None` means the cluster's capacity.
    pub max: Option<u32>,
}

/// A value set by hand.
#[derive(Debug, Clone, PartialEq)]
pub struct ManualSpec {
    /// The value at start-up.
    pub initial: f64,
}

/// Source types a trigger may name, listed in errors.
pub const SOURCE_TYPES: &[&str] = &[
    "random",
    "manual",
    "redis_list",
    "redis_stream",
    "rabbitmq",
    "prometheus",
    "http_json",
    "haproxy",
    "nginx",
    "nats_jetstream",
    "schedule",
    "docker_cpu",
    "sqs",
];

#[derive(Deserialize)]
struct RawRandom {
    delta: Option<u32>,
    interval: Option<String>,
    seed: Option<u64>,
    initial: Option<u32>,
    max: Option<u32>,
}

#[derive(Deserialize)]
struct RawManual {
    initial: Option<f64>,
}

#[derive(Deserialize)]
struct RawRedisList {
    url: Option<String>,
    key: Option<String>,
}

#[derive(Deserialize)]
struct RawRedisStream {
    url: Option<String>,
    stream: Option<String>,
    group: Option<String>,
    include_pending: Option<bool>,
}

#[derive(Deserialize)]
struct RawRabbitmq {
    url: Option<String>,
    vhost: Option<String>,
    queue: Option<String>,
    username: Option<String>,
    password: Option<String>,
    include_unacked: Option<bool>,
}

#[derive(Deserialize)]
struct RawPrometheus {
    url: Option<String>,
    query: Option<String>,
}

#[derive(Deserialize)]
struct RawHttpJson {
    url: Option<String>,
    pointer: Option<String>,
}

#[derive(Deserialize)]
struct RawHaproxy {
    url: Option<String>,
    proxy: Option<String>,
    server: Option<String>,
    field: Option<String>,
}

#[derive(Deserialize)]
struct RawNginx {
    url: Option<String>,
}

#[derive(Deserialize)]
struct RawNatsJetstream {
    url: Option<String>,
    account: Option<String>,
    stream: Option<String>,
    consumer: Option<String>,
    include_ack_pending: Option<bool>,
}

#[derive(Deserialize)]
struct RawDockerCpu {
    docker_host: Option<String>,
    service: Option<String>,
    aggregate: Option<String>,
}

#[derive(Deserialize)]
struct RawSqs {
    queue_url: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    include_in_flight: Option<bool>,
}

#[derive(Deserialize)]
struct RawSchedule {
    windows: Option<Vec<RawWindow>>,
    default: Option<f64>,
    utc_offset: Option<String>,
}

#[derive(Deserialize)]
struct RawWindow {
    days: Option<String>,
    from: Option<String>,
    to: Option<String>,
    value: Option<f64>,
}

const HTTP: &[&str] = &["http", "https"];
/// Only plain Redis: the Redis client is built without TLS (`rediss://` is refused at load
/// rather than failing at start-up).
const REDIS: &[&str] = &["redis"];

/// Checks the shape of a URL: `scheme://host[:port][/path...]` with one of `schemes`.
/// (The core crate has no URL library; the sources crate parses it fully when it builds.)
pub fn check_url(raw: &str, schemes: &[&str]) -> Result<(), String> {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(format!(
            "{raw:?} is not a URL: write it like {}://host:port",
            schemes[0]
        ));
    };
    if !schemes.contains(&scheme) {
        return Err(format!(
            "{raw:?}: scheme must be one of {}, got {scheme:?}",
            schemes.join(", ")
        ));
    }
    if raw.chars().any(char::is_whitespace) {
        return Err(format!("{raw:?}: a URL has no spaces"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return Err(format!("{raw:?}: unclosed [ in the host")),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{raw:?}: the host is missing"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{raw:?}: the port must be 1-65535, got {p:?}"));
        }
    }
    Ok(())
}

fn parse_days(raw: &str) -> Result<u8, String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let day = |d: &str| {
        let d = d.trim().to_ascii_lowercase();
        NAMES
            .iter()
            .position(|n| d == *n || (d.len() > 3 && n.starts_with(&d[..3]) && is_day_name(&d)))
            .ok_or_else(|| format!("unknown day {d:?}: use mon, tue, wed, thu, fri, sat, sun"))
    };
    let raw = raw.trim();
    if raw == "*" || raw.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut mask = 0u8;
    for part in raw.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut i = a;
                loop {
                    mask |= 1 << i;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => mask |= 1 << day(part)?,
        }
    }
    Ok(mask)
}

fn is_day_name(d: &str) -> bool {
    [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ]
    .contains(&d)
}

/// `HH:MM` in minutes after midnight; `24:00` only when `end` is set.
fn parse_clock(raw: &str, end: bool) -> Result<u32, String> {
    let bad = || format!("{raw:?} is not a time of day: write it like \"09:30\"");
    let (h, m) = raw.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && (m != 0 || !end)) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// `+HH:MM` / `-HH:MM` / `Z` / `UTC` in minutes.
fn parse_offset(raw: &str) -> Result<i32, String> {
    let r = raw.trim();
    if r.eq_ignore_ascii_case("z") || r.eq_ignore_ascii_case("utc") {
        return Ok(0);
    }
    let bad = || format!("{raw:?} is not a UTC offset: write it like \"+02:00\" or \"-05:30\"");
    let (sign, rest) = match r.as_bytes().first() {
        Some(b'+') => (1, &r[1..]),
        Some(b'-') => (-1, &r[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 60 + m))
}

impl Validator {
    /// Takes the network keys (`timeout`, `required`) out of a source's table.
    fn net_options(&mut self, rest: &mut toml::Value, path: &str) -> NetOptions {
        let mut net = NetOptions::default();
        let Some(table) = rest.as_table_mut() else {
            return net;
        };
        match table.remove("timeout") {
            None => {}
            Some(toml::Value::String(t)) => {
                net.timeout = self.duration(
                    Some(&t),
                    &format!("{path}.timeout"),
                    net.timeout,
                    (Duration::from_millis(10), Duration::from_secs(60)),
                );
            }
            Some(other) => self.err(
                format!("{path}.timeout"),
                format!("must be a duration like \"2s\", got {}", other.type_str()),
            ),
        }
        match table.remove("required") {
            None => {}
            Some(toml::Value::Boolean(b)) => net.required = b,
            Some(other) => self.err(
                format!("{path}.required"),
                format!("must be true or false, got {}", other.type_str()),
            ),
        }
        net
    }

    /// A required, non-empty string option.
    fn need(&mut self, raw: Option<String>, path: &str, key: &str, what: &str) -> String {
        match raw {
            Some(v) if !v.trim().is_empty() => v,
            Some(_) => {
                self.err(format!("{path}.{key}"), "must not be empty");
                String::new()
            }
            None => {
                self.err(format!("{path}.{key}"), format!("missing: {what}"));
                String::new()
            }
        }
    }

    /// A URL option with an optional default, checked for its shape.
    fn url(
        &mut self,
        raw: Option<String>,
        default: Option<&str>,
        path: &str,
        schemes: &[&str],
        what: &str,
    ) -> String {
        let Some(url) = raw.or(default.map(str::to_string)) else {
            self.err(format!("{path}.url"), format!("missing: {what}"));
            return String::new();
        };
        if let Err(e) = check_url(&url, schemes) {
            self.err(format!("{path}.url"), e);
        }
        url
    }

    fn schedule(&mut self, r: RawSchedule, path: &str) -> ScheduleSpec {
        let utc_offset_minutes = match r.utc_offset.as_deref().map(parse_offset) {
            None => 0,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                self.err(format!("{path}.utc_offset"), e);
                0
            }
        };
        let default = r.default.unwrap_or(0.0);
        if !default.is_finite() || default < 0.0 {
            self.err(
                format!("{path}.default"),
                format!("must be a finite number >= 0, got {default}"),
            );
        }
        let mut windows = Vec::new();
        let raw_windows = r.windows.unwrap_or_default();
        if raw_windows.is_empty() {
            self.err(
                format!("{path}.windows"),
                "missing: at least one window, like { days = \"mon-fri\", from = \"09:00\", to = \"17:00\", value = 5 }",
            );
        }
        for (i, w) in raw_windows.into_iter().enumerate() {
            let p = format!("{path}.windows[{i}]");
            let days = match parse_days(w.days.as_deref().unwrap_or("*")) {
                Ok(d) => d,
                Err(e) => {
                    self.err(format!("{p}.days"), e);
                    0
                }
            };
            let mut clock = |raw: Option<String>, key: &str, end: bool| match raw {
                None => {
                    self.err(format!("{p}.{key}"), "missing: a time like \"09:00\"");
                    0
                }
                Some(t) => parse_clock(&t, end).unwrap_or_else(|e| {
                    self.err(format!("{p}.{key}"), e);
                    0
                }),
            };
            let from = clock(w.from, "from", false);
            let to = clock(w.to, "to", true);
            let value = match w.value {
                Some(v) if v.is_finite() && v >= 0.0 => v,
                Some(v) => {
                    self.err(
                        format!("{p}.value"),
                        format!("must be a finite number >= 0, got {v}"),
                    );
                    0.0
                }
                None => {
                    self.err(format!("{p}.value"), "missing: the value while open");
                    0.0
                }
            };
            windows.push(ScheduleWindow {
                days,
                from,
                to: if to == 0 { 1440 } else { to },
                value,
            });
        }
        ScheduleSpec {
            windows,
            default,
            utc_offset_minutes,
        }
    }
    /// Parses the source-specific keys of a trigger (`rest`: the trigger's table without the
    /// common keys) for source type `kind`.
    pub(crate) fn source(
        &mut self,
        kind: &str,
        rest: toml::Value,
        path: &str,
        capacity: Option<Capacity>,
    ) -> Option<SourceSpec> {
        let source = match kind {
            "random" => {
                let r: RawRandom = self.part(rest.clone(), path)?;
                let interval = self.duration(
                    r.interval.as_deref(),
                    &format!("{path}.interval"),
                    Duration::from_secs(3),
                    (Duration::from_millis(10), Duration::from_secs(86400)),
                );
                let cap = match capacity {
                    Some(Capacity::Slots(n)) => Some(n),
                    _ => None,
                };
                if let (Some(initial), Some(max)) = (r.initial, r.max.or(cap)) {
                    if initial > max {
                        self.err(
                            format!("{path}.initial"),
                            format!("must be <= max ({max}), got {initial}"),
                        );
                    }
                }
                if r.max.is_none() && cap.is_none() {
                    if let Some(Capacity::SlotsPerHost(_)) = capacity {
                        self.err(
                            format!("{path}.max"),
                            "required when capacity is per host (the random walk needs a fixed bound)",
                        );
                    }
                }
                SourceSpec::Random(RandomSpec {
                    delta: r.delta.unwrap_or(3),
                    interval,
                    seed: r.seed,
                    initial: r.initial,
                    max: r.max,
                })
            }
            "manual" => {
                let m: RawManual = self.part(rest.clone(), path)?;
                let initial = m.initial.unwrap_or(0.0);
                if !initial.is_finite() || initial < 0.0 {
                    self.err(
                        format!("{path}.initial"),
                        format!("must be a finite number >= 0, got {initial}"),
                    );
                }
                SourceSpec::Manual(ManualSpec { initial })
            }
            "redis_list" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawRedisList = self.part(rest, path)?;
                SourceSpec::RedisList(RedisListSpec {
                    url: self.url(r.url, Some("redis://127.0.0.1:6379"), path, REDIS, ""),
                    key: self.need(r.key, path, "key", "the list's key"),
                    net,
                })
            }
            "redis_stream" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawRedisStream = self.part(rest, path)?;
                SourceSpec::RedisStream(RedisStreamSpec {
                    url: self.url(r.url, Some("redis://127.0.0.1:6379"), path, REDIS, ""),
                    stream: self.need(r.stream, path, "stream", "the stream's key"),
                    group: self.need(r.group, path, "group", "the consumer group"),
                    include_pending: r.include_pending.unwrap_or(false),
                    net,
                })
            }
            "rabbitmq" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawRabbitmq = self.part(rest, path)?;
                SourceSpec::Rabbitmq(RabbitmqSpec {
                    url: self.url(r.url, Some("http://127.0.0.1:15672"), path, HTTP, ""),
                    vhost: r.vhost.unwrap_or_else(|| "/".into()),
                    queue: self.need(r.queue, path, "queue", "the queue's name"),
                    username: r.username.unwrap_or_else(|| "guest".into()),
                    password: r.password.unwrap_or_else(|| "guest".into()),
                    include_unacked: r.include_unacked.unwrap_or(false),
                    net,
                })
            }
            "prometheus" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawPrometheus = self.part(rest, path)?;
                SourceSpec::Prometheus(PrometheusSpec {
                    url: self.url(r.url, Some("http://127.0.0.1:9090"), path, HTTP, ""),
                    query: self.need(r.query, path, "query", "a PromQL expression"),
                    net,
                })
            }
            "http_json" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawHttpJson = self.part(rest, path)?;
                let pointer = r.pointer.unwrap_or_default();
                if !pointer.is_empty() && !pointer.starts_with('/') {
                    self.err(
                        format!("{path}.pointer"),
                        format!("a JSON pointer starts with \"/\" (like \"/queue/depth\"), got {pointer:?}"),
                    );
                }
                SourceSpec::HttpJson(HttpJsonSpec {
                    url: self.url(r.url, None, path, HTTP, "the JSON document's URL"),
                    pointer,
                    net,
                })
            }
            "haproxy" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawHaproxy = self.part(rest, path)?;
                SourceSpec::Haproxy(HaproxySpec {
                    url: self.url(
                        r.url,
                        None,
                        path,
                        HTTP,
                        "the stats page in CSV, like \"http://127.0.0.1:8404/stats;csv\"",
                    ),
                    proxy: self.need(r.proxy, path, "proxy", "the frontend or backend (pxname)"),
                    server: r.server.unwrap_or_else(|| "FRONTEND".into()),
                    field: r.field.unwrap_or_else(|| "req_rate".into()),
                    net,
                })
            }
            "nginx" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawNginx = self.part(rest, path)?;
                SourceSpec::Nginx(NginxSpec {
                    url: self.url(r.url, None, path, HTTP, "the stub_status page's URL"),
                    net,
                })
            }
            "nats_jetstream" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawNatsJetstream = self.part(rest, path)?;
                SourceSpec::NatsJetstream(NatsJetstreamSpec {
                    url: self.url(r.url, Some("http://127.0.0.1:8222"), path, HTTP, ""),
                    account: r.account,
                    stream: self.need(r.stream, path, "stream", "the stream's name"),
                    consumer: self.need(
                        r.consumer,
                        path,
                        "consumer",
                        "the durable consumer's name",
                    ),
                    include_ack_pending: r.include_ack_pending.unwrap_or(false),
                    net,
                })
            }
            "docker_cpu" => {
                let mut rest = rest;
                let has_timeout = rest.get("timeout").is_some();
                let mut net = self.net_options(&mut rest, path);
                if !has_timeout {
                    net.timeout = Duration::from_secs(5);
                }
                let r: RawDockerCpu = self.part(rest, path)?;
                if let Some(h) = &r.docker_host {
                    let checked = match h.strip_prefix("unix://") {
                        Some(p) if p.starts_with('/') => Ok(()),
                        Some(_) => Err(format!(
                            "{h:?}: a socket address is unix:// and an absolute path, like unix:///var/run/docker.sock"
                        )),
                        None => check_url(h, &["unix", "tcp", "http"]),
                    };
                    if let Err(e) = checked {
                        self.err(format!("{path}.docker_host"), e);
                    }
                }
                let aggregate = match r.aggregate.as_deref() {
                    None | Some("average") => CpuAggregate::Average,
                    Some("sum") => CpuAggregate::Sum,
                    Some(other) => {
                        self.err(
                            format!("{path}.aggregate"),
                            format!("must be \"average\" or \"sum\", got {other:?}"),
                        );
                        CpuAggregate::Average
                    }
                };
                SourceSpec::DockerCpu(DockerCpuSpec {
                    docker_host: r.docker_host,
                    service: r.service,
                    aggregate,
                    net,
                })
            }
            "sqs" => {
                let mut rest = rest;
                let net = self.net_options(&mut rest, path);
                let r: RawSqs = self.part(rest, path)?;
                let queue_url = self.need(r.queue_url, path, "queue_url", "the queue's URL");
                if !queue_url.is_empty() {
                    if let Err(e) = check_url(&queue_url, HTTP) {
                        self.err(format!("{path}.queue_url"), e);
                    }
                }
                if let Some(e) = &r.endpoint_url {
                    if let Err(e) = check_url(e, HTTP) {
                        self.err(format!("{path}.endpoint_url"), e);
                    }
                }
                if let Some(region) = &r.region {
                    let ok = !region.is_empty()
                        && region
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                    if !ok {
                        self.err(
                            format!("{path}.region"),
                            format!("{region:?} is not a region name like \"eu-west-1\""),
                        );
                    }
                }
                SourceSpec::Sqs(SqsSpec {
                    queue_url,
                    region: r.region,
                    endpoint_url: r.endpoint_url,
                    include_in_flight: r.include_in_flight.unwrap_or(false),
                    net,
                })
            }
            "schedule" => {
                let r: RawSchedule = self.part(rest, path)?;
                SourceSpec::Schedule(self.schedule(r, path))
            }
            other => {
                self.err(
                    format!("{path}.type"),
                    format!(
                        "unknown source type {other:?}: valid types are {}",
                        SOURCE_TYPES.join(", ")
                    ),
                );
                return None;
            }
        };
        Some(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, ServiceKind};

    /// A configuration whose one service has the trigger `trigger` (TOML keys).
    fn config(trigger: &str) -> Result<Config, Vec<String>> {
        let text = format!(
            r#"
            instance = "t"
            [capacity]
            slots = 9
            [backend]
            type = "process"
            [[services]]
            name = "worker"
            priority = 1
            [[services.triggers]]
            {trigger}
            "#
        );
        Config::from_toml(&text).map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    fn spec(trigger: &str) -> SourceSpec {
        let cfg = config(trigger).unwrap_or_else(|e| panic!("{e:?}"));
        match &cfg.services[0].kind {
            ServiceKind::Triggered(ts) => ts[0].source.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn errors(trigger: &str) -> Vec<String> {
        config(trigger).expect_err("expected errors")
    }

    const P: &str = "services[0].triggers[0]";

    #[test]
    fn redis_defaults_and_required_keys() {
        let SourceSpec::RedisList(s) = spec(
            r#"type = "redis_list"
            key = "jobs""#,
        ) else {
            panic!()
        };
        assert_eq!(s.url, "redis://127.0.0.1:6379");
        assert_eq!(s.net, NetOptions::default());
        assert_eq!(
            errors(r#"type = "redis_list""#),
            vec![format!("{P}.key: missing: the list's key")]
        );
        let e = errors(
            r#"type = "redis_stream"
            url = "http://127.0.0.1:6379"
            stream = "s""#,
        );
        assert_eq!(
            e,
            vec![
                format!(
                    "{P}.url: \"http://127.0.0.1:6379\": scheme must be one of redis, got \"http\""
                ),
                format!("{P}.group: missing: the consumer group"),
            ]
        );
    }

    #[test]
    fn network_options_are_checked() {
        let SourceSpec::Rabbitmq(s) = spec(
            r#"type = "rabbitmq"
            queue = "jobs"
            timeout = "500ms"
            required = false
            include_unacked = true"#,
        ) else {
            panic!()
        };
        assert_eq!(s.net.timeout, Duration::from_millis(500));
        assert!(!s.net.required);
        assert!(s.include_unacked);
        assert_eq!((s.vhost.as_str(), s.username.as_str()), ("/", "guest"));
        let e = errors(
            r#"type = "rabbitmq"
            queue = "jobs"
            timeout = "2 hours"
            required = "yes"
            url = "http://:15672"
            exchange = "x""#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.timeout: must be between 10ms and 1m, got \"2 hours\""),
                format!("{P}.required: must be true or false, got string"),
                format!("{P}.exchange: unknown key"),
                format!("{P}.url: \"http://:15672\": the host is missing"),
            ]
        );
    }

    #[test]
    fn urls_are_checked_at_load() {
        assert!(check_url("http://127.0.0.1:9090", HTTP).is_ok());
        assert!(check_url("https://prom.example/prefix/", HTTP).is_ok());
        assert!(check_url("http://[::1]:8222", HTTP).is_ok());
        assert!(check_url("redis://user:pw@host:6379/2", REDIS).is_ok());
        assert!(check_url("127.0.0.1:9090", HTTP)
            .unwrap_err()
            .contains("not a URL"));
        assert!(check_url("http://h:99999", HTTP)
            .unwrap_err()
            .contains("port must be 1-65535"));
        assert!(check_url("http://h:0", HTTP).is_err());
        assert!(check_url("http://h x", HTTP)
            .unwrap_err()
            .contains("no spaces"));
        assert!(check_url("ftp://h", HTTP).unwrap_err().contains("scheme"));
    }

    #[test]
    fn http_sources_need_their_keys() {
        assert_eq!(
            errors(r#"type = "http_json""#),
            vec![format!("{P}.url: missing: the JSON document's URL")]
        );
        assert_eq!(
            errors(
                r#"type = "http_json"
                url = "http://h/x"
                pointer = "queue.depth""#
            ),
            vec![format!("{P}.pointer: a JSON pointer starts with \"/\" (like \"/queue/depth\"), got \"queue.depth\"")]
        );
        assert_eq!(
            errors(r#"type = "prometheus""#),
            vec![format!("{P}.query: missing: a PromQL expression")]
        );
        let SourceSpec::Haproxy(h) = spec(
            r#"type = "haproxy"
            url = "http://127.0.0.1:8404/stats;csv"
            proxy = "web""#,
        ) else {
            panic!()
        };
        assert_eq!(
            (h.server.as_str(), h.field.as_str()),
            ("FRONTEND", "req_rate")
        );
        assert_eq!(errors(r#"type = "nginx""#).len(), 1);
        let e = errors(
            r#"type = "nats_jetstream"
            stream = """#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.stream: must not be empty"),
                format!("{P}.consumer: missing: the durable consumer's name"),
            ]
        );
    }

    #[test]
    fn docker_cpu_options() {
        let SourceSpec::DockerCpu(d) = spec(r#"type = "docker_cpu""#) else {
            panic!()
        };
        assert_eq!(d.aggregate, CpuAggregate::Average);
        assert_eq!(d.net.timeout, Duration::from_secs(5));
        assert_eq!((d.service, d.docker_host), (None, None));
        let e = errors(
            r#"type = "docker_cpu"
            docker_host = "unix://docker.sock"
            aggregate = "max""#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.docker_host: \"unix://docker.sock\": a socket address is unix:// and an absolute path, like unix:///var/run/docker.sock"),
                format!("{P}.aggregate: must be \"average\" or \"sum\", got \"max\""),
            ]
        );
    }

    #[test]
    fn sqs_options() {
        let SourceSpec::Sqs(q) = spec(
            r#"type = "sqs"
            queue_url = "http://127.0.0.1:5000/123456789012/jobs"
            endpoint_url = "http://127.0.0.1:5000"
            region = "eu-west-1"
            include_in_flight = true"#,
        ) else {
            panic!()
        };
        assert_eq!(q.region.as_deref(), Some("eu-west-1"));
        assert!(q.include_in_flight);
        let e = errors(
            r#"type = "sqs"
            queue_url = "jobs"
            region = "EU West""#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.queue_url: \"jobs\" is not a URL: write it like http://host:port"),
                format!("{P}.region: \"EU West\" is not a region name like \"eu-west-1\""),
            ]
        );
    }

    #[test]
    fn schedule_windows_parse_and_evaluate() {
        let SourceSpec::Schedule(s) = spec(
            r#"type = "schedule"
            default = 1
            utc_offset = "+02:00"
            windows = [
              { days = "mon-fri", from = "09:00", to = "17:00", value = 5 },
              { days = "fri", from = "22:00", to = "02:00", value = 8 },
              { days = "sat,sun", from = "10:00", to = "24:00", value = 2 },
            ]"#,
        ) else {
            panic!()
        };
        assert_eq!(s.utc_offset_minutes, 120);
        assert_eq!(s.windows[0].days, 0b001_1111);
        assert_eq!(s.windows[2].days, 0b110_0000);
        // 2024-01-01 was a Monday; 00:00 UTC is 02:00 at +02:00.
        let monday = 1_704_067_200;
        let at = |day: i64, h: i64, m: i64| monday + day * 86400 + (h - 2) * 3600 + m * 60;
        assert_eq!(s.value_at(at(0, 8, 59)), 1.0);
        assert_eq!(s.value_at(at(0, 9, 0)), 5.0);
        assert_eq!(s.value_at(at(0, 16, 59)), 5.0);
        assert_eq!(s.value_at(at(0, 17, 0)), 1.0);
        // Friday night runs past midnight into Saturday.
        assert_eq!(s.value_at(at(4, 23, 0)), 8.0);
        assert_eq!(s.value_at(at(5, 1, 59)), 8.0);
        assert_eq!(s.value_at(at(5, 2, 0)), 1.0);
        assert_eq!(s.value_at(at(5, 12, 0)), 2.0);
        assert_eq!(s.value_at(at(6, 23, 59)), 2.0);
        // Thursday night: the Friday window has not opened.
        assert_eq!(s.value_at(at(3, 23, 0)), 1.0);
    }

    #[test]
    fn schedule_errors_have_paths() {
        let e = errors(
            r#"type = "schedule"
            utc_offset = "CET"
            windows = [
              { days = "mon-fry", from = "9", to = "24:30", value = -1 },
              { from = "09:00" },
            ]"#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.utc_offset: \"CET\" is not a UTC offset: write it like \"+02:00\" or \"-05:30\""),
                format!("{P}.windows[0].days: unknown day \"fry\": use mon, tue, wed, thu, fri, sat, sun"),
                format!("{P}.windows[0].from: \"9\" is not a time of day: write it like \"09:30\""),
                format!("{P}.windows[0].to: \"24:30\" is not a time of day: write it like \"09:30\""),
                format!("{P}.windows[0].value: must be a finite number >= 0, got -1"),
                format!("{P}.windows[1].to: missing: a time like \"09:00\""),
                format!("{P}.windows[1].value: missing: the value while open"),
            ]
        );
        assert_eq!(
            errors(r#"type = "schedule""#),
            vec![format!("{P}.windows: missing: at least one window, like {{ days = \"mon-fri\", from = \"09:00\", to = \"17:00\", value = 5 }}")]
        );
    }
}
