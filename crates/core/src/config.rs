//! Configuration: TOML text -> raw structures -> validated, typed [`Config`].
//!
//! The core validates what the engine uses; each plugin validates its own tables (see
//! [`crate::plugin`]): a trigger's source keys, the `[backend]` section and the keys of a
//! service the core does not know. Parsing and validation are separate passes, as in Vector: the raw pass rejects unknown keys
//! and wrong types, the validation pass checks meaning. Both collect every error they find, each
//! with its path (`services[2].max: must be >= min (3), got 1`), so a user fixes a file in one go.
//! Parts of the document are deserialized one by one, so a type error in one service does not
//! hide the errors of the others.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use crate::model::*;
use crate::plugin::{
    BackendPlugins, Capabilities, Plugins, ServiceContext, SourceContext, SourcePlugins,
};
pub use crate::validate::{check_url, join, ConfigError, ConfigErrors, Validator};

/// What happens to managed replicas when the daemon stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Leave them running for the next start to adopt (the default for `run`).
    Leave,
    /// Stop and remove them (the demo's default).
    Stop,
}

/// A validated configuration. Every value in it has been checked; nothing downstream re-checks.
/// `P` is the plugin set whose options it holds ([`Plugins`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Config<P: Plugins> {
    /// Identifies this microscaler; its replicas carry it as a label so two instances on one
    /// engine never touch each other's replicas.
    pub instance: String,
    /// Time between ticks.
    pub tick: Duration,
    /// Longest wait for one demand sample; a slower source counts as missing for that tick.
    pub sample_timeout: Duration,
    /// After this long without converging, a service may be changed again.
    pub converge_timeout: Duration,
    /// What to do with replicas on shutdown.
    pub on_exit: OnExit,
    /// The cluster's capacity.
    pub capacity: Capacity,
    /// The orchestrator: the backend's validated options.
    pub backend: P::Backend,
    /// The services, in file order.
    pub services: Vec<Service<P>>,
    /// Scaling behaviour (`[services.scaling]`) of the services that set one; the others use
    /// [`Scaling::DEFAULT`]. Kept beside the services, keyed by name, so a [`Service`] built in
    /// code needs no scaling section.
    pub scaling: BTreeMap<ServiceName, Scaling>,
    /// The HTTP server (dashboard, API, /metrics, history); command-line flags override it.
    pub server: ServerSpec,
    /// High availability off Kubernetes (`[ha]`): only the holder of an etcd lease acts.
    pub ha: Option<HaSpec>,
}

/// `[ha]`: several microscalers of one instance share a lease in etcd and only its holder acts;
/// the others observe, decide and report, and take over when the holder stops renewing.
#[derive(Debug, Clone, PartialEq)]
pub struct HaSpec {
    /// etcd's client URLs (`http://host:2379`), tried in turn.
    pub endpoints: Vec<String>,
    /// The lease's time to live (whole seconds): how long after the holder's last renewal
    /// another microscaler may take over.
    pub ttl: Duration,
    /// A holder stops acting this long after the last renewal it sent, whether or not it could
    /// renew since (shorter than `ttl`, so it stops before anyone else may start).
    pub renew_deadline: Duration,
    /// How often each microscaler tries to take or renew the lease.
    pub retry_period: Duration,
    /// The election's key in etcd.
    pub key: String,
    /// This microscaler's name in the key (`None`: its host name and process id).
    pub identity: Option<String>,
}

/// `[server]`: the dashboard, API, /metrics and history. Every key is optional; the command
/// line (`--listen`, `--token` / `MICROSCALER_TOKEN`, `--open-read`, `--history`, `--retention`)
/// overrides the file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServerSpec {
    /// Address to listen on (`127.0.0.1:8080` when unset), or `None` with `enabled = false`.
    pub listen: Option<std::net::SocketAddr>,
    /// False when `listen = "off"`.
    pub disabled: bool,
    /// Bearer token for the API's changes.
    pub token: Option<String>,
    /// Let any client read without the token (default: loopback clients only).
    pub open_read: bool,
    /// Host names that token-less reads from loopback clients may name in their `Host`
    /// besides `localhost`, `127.0.0.1` and `[::1]` (e.g. a reverse proxy's name).
    pub allowed_hosts: Vec<String>,
    /// SQLite file of the history (default: `<state dir>/history.sqlite`).
    pub history: Option<String>,
    /// How long the history keeps ticks and decisions (default 24 h when unset).
    pub retention: Option<Duration>,
}

impl<P: Plugins> Config<P> {
    /// Parses and validates TOML text: every error of the file at once, each with its path.
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("invalid TOML: {}", e.to_string().trim_end()),
            }])
        })?;
        let mut v = Validator::default();
        let cfg = v.config::<P>(doc);
        let mut cfg = v.finish(cfg)?;
        cfg.share_trigger_names();
        Ok(cfg)
    }

    /// Makes the triggers of the same name share one copy of it (parsing does; call it after
    /// building a configuration by hand). Each tick's samples carry a clone of each trigger's
    /// name, which the engine matches by pointer: at thousands of services, clones of a few
    /// shared names stay in the cache where one copy per trigger would miss on every count.
    pub fn share_trigger_names(&mut self) {
        let mut shared: BTreeSet<std::sync::Arc<str>> = BTreeSet::new();
        for s in &mut self.services {
            let ServiceKind::Triggered(ts) = &mut s.kind else {
                continue;
            };
            for t in ts {
                match shared.get(&t.name) {
                    Some(one) => t.name = std::sync::Arc::clone(one),
                    None => {
                        shared.insert(std::sync::Arc::clone(&t.name));
                    }
                }
            }
        }
    }

    /// What the configured backend can do.
    pub fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&Service<P>> {
        self.services.iter().find(|s| s.name.as_str() == name)
    }

    /// The scaling behaviour of `service` (the default when it sets none).
    pub fn scaling_of(&self, service: &ServiceName) -> &Scaling {
        self.scaling.get(service).unwrap_or(&DEFAULT_SCALING)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw structures: what the TOML may contain. Durations stay strings here so that a bad one is a
// validation error with a path, collected with the others.

#[derive(Deserialize)]
struct RawTop {
    instance: Option<String>,
    tick: Option<String>,
    sample_timeout: Option<String>,
    converge_timeout: Option<String>,
    on_exit: Option<String>,
    capacity: Option<toml::Value>,
    backend: Option<toml::Value>,
    server: Option<toml::Value>,
    ha: Option<toml::Value>,
    #[serde(default)]
    services: Vec<toml::Value>,
}

#[derive(Deserialize)]
struct RawHa {
    etcd: Option<Vec<String>>,
    ttl: Option<String>,
    renew_deadline: Option<String>,
    retry_period: Option<String>,
    key: Option<String>,
    identity: Option<String>,
}

#[derive(Deserialize)]
struct RawServer {
    listen: Option<String>,
    token: Option<String>,
    #[serde(default)]
    open_read: bool,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    history: Option<String>,
    retention: Option<String>,
}

#[derive(Deserialize)]
struct RawCapacity {
    slots: Option<u32>,
    slots_per_host: Option<u32>,
    #[serde(default)]
    resources: bool,
    reserve_cpu: Option<toml::Value>,
    reserve_memory: Option<toml::Value>,
}

#[derive(Deserialize)]
struct RawResources {
    cpu: Option<toml::Value>,
    memory: Option<toml::Value>,
}

/// The keys of a service the core reads; the others belong to the backend
/// ([`BackendPlugins::workload`]).
#[derive(Deserialize)]
struct RawService {
    name: Option<String>,
    priority: Option<u32>,
    min: Option<u32>,
    max: Option<u32>,
    max_step: Option<u32>,
    #[serde(default)]
    remainder: bool,
    #[serde(default)]
    per_host: bool,
    #[serde(default)]
    triggers: Vec<toml::Value>,
    stop_grace: Option<String>,
    scaling: Option<toml::Value>,
    pool: Option<toml::Value>,
    resources: Option<toml::Value>,
}

/// The keys of [`RawService`], split off before the backend's own.
const SERVICE_KEYS: &[&str] = &[
    "name",
    "priority",
    "min",
    "max",
    "max_step",
    "remainder",
    "per_host",
    "triggers",
    "stop_grace",
    "scaling",
    "pool",
    "resources",
];

#[derive(Deserialize)]
struct RawPool {
    size: Option<u32>,
    preempt: Option<String>,
    paused_takes_slot: Option<bool>,
}

#[derive(Deserialize)]
struct RawTriggerHead {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    rule: Option<String>,
    target: Option<f64>,
    tolerance: Option<f64>,
    activation: Option<f64>,
    kp: Option<f64>,
    kd: Option<f64>,
    failure_threshold: Option<u32>,
    fallback: Option<toml::Value>,
}

/// The trigger keys the rules use; split off before the source's own keys.
const TRIGGER_HEAD_KEYS: &[&str] = &[
    "type",
    "name",
    "rule",
    "target",
    "tolerance",
    "activation",
    "kp",
    "kd",
    "failure_threshold",
    "fallback",
];

/// Rule names, listed in errors.
pub const RULES: &[&str] = &["value", "average", "utilisation", "pd"];

#[derive(Deserialize)]
struct RawFallback {
    replicas: Option<u32>,
}

#[derive(Deserialize)]
struct RawScaling {
    formula: Option<String>,
    up: Option<toml::Value>,
    down: Option<toml::Value>,
}

#[derive(Deserialize)]
struct RawDirection {
    stabilisation: Option<String>,
    select: Option<String>,
    #[serde(default)]
    policies: Vec<toml::Value>,
}

#[derive(Deserialize)]
struct RawPolicy {
    replicas: Option<u32>,
    percent: Option<u32>,
    period: Option<String>,
}

static DEFAULT_SCALING: Scaling = Scaling::DEFAULT;

/// The longest stabilisation window or rate-limit period.
const MAX_WINDOW: Duration = Duration::from_secs(3600);

const MIN_TICK: Duration = Duration::from_millis(100);
const MAX_TICK: Duration = Duration::from_secs(60);

impl Validator {
    fn config<P: Plugins>(&mut self, doc: toml::Table) -> Option<Config<P>> {
        let top: RawTop = self.part(toml::Value::Table(doc), "")?;

        let instance = top.instance.unwrap_or_else(|| "default".into());
        if let Err(e) = ServiceName::try_new(instance.clone()) {
            self.err("instance", e);
        }
        let tick = self.duration(
            top.tick.as_deref(),
            "tick",
            Duration::from_millis(500),
            (MIN_TICK, MAX_TICK),
        );
        let sample_timeout = self.duration(
            top.sample_timeout.as_deref(),
            "sample_timeout",
            tick / 2,
            (Duration::from_millis(1), MAX_TICK),
        );
        let converge_timeout = self.duration(
            top.converge_timeout.as_deref(),
            "converge_timeout",
            Duration::from_secs(30),
            (MIN_TICK, Duration::from_secs(3600)),
        );
        let on_exit = match top.on_exit.as_deref() {
            None | Some("leave") => OnExit::Leave,
            Some("stop") => OnExit::Stop,
            Some(other) => {
                self.err(
                    "on_exit",
                    format!("must be \"leave\" or \"stop\", got {other:?}"),
                );
                OnExit::Leave
            }
        };
        let capacity = self.capacity(top.capacity);
        let backend = self.backend::<P::Backend>(top.backend);
        let server = self.server(top.server);
        let ha = top.ha.and_then(|raw| self.ha(raw, &instance));

        if top.services.is_empty() {
            self.err("services", "at least one [[services]] entry is required");
        }
        let mut services = Vec::new();
        let mut scaling = BTreeMap::new();
        let mut names = BTreeSet::new();
        for (i, raw) in top.services.into_iter().enumerate() {
            let path = format!("services[{i}]");
            if let Some((s, sc)) = self.service::<P>(raw, &path, capacity, backend.as_ref()) {
                if !names.insert(s.name.clone()) {
                    self.err(
                        format!("{path}.name"),
                        format!("duplicate service name {:?}", s.name.as_str()),
                    );
                }
                if let Some(sc) = sc {
                    scaling.insert(s.name.clone(), sc);
                }
                services.push(s);
            }
        }
        if let (Some(Capacity::Resources { .. }), Some(b)) = (capacity, backend.as_ref()) {
            if !b.capabilities().host_resources {
                self.err(
                    "capacity.resources",
                    format!(
                        "the {} backend does not report its hosts' CPU and memory, so capacity cannot be counted in resources with it; count it in slots",
                        b.type_name()
                    ),
                );
            }
        }
        if let Some(Capacity::Slots(slots)) = capacity {
            let mins: u64 = services.iter().map(|s| s.min as u64).sum();
            if mins > slots as u64 {
                self.err(
                    "services",
                    format!("the sum of min over all services ({mins}) exceeds capacity.slots ({slots})"),
                );
            }
        }
        Some(Config {
            instance,
            tick,
            sample_timeout,
            converge_timeout,
            on_exit,
            capacity: capacity?,
            backend: backend?,
            services,
            scaling,
            server,
            ha,
        })
    }

    fn ha(&mut self, raw: toml::Value, instance: &str) -> Option<HaSpec> {
        let r: RawHa = self.part(raw, "ha")?;
        let endpoints = r.etcd.unwrap_or_default();
        if endpoints.is_empty() {
            self.err(
                "ha.etcd",
                "missing: etcd's client URLs, like [\"http://127.0.0.1:2379\"]",
            );
        }
        for (i, e) in endpoints.iter().enumerate() {
            if let Err(m) = check_url(e, &["http", "https"]) {
                self.err(format!("ha.etcd[{i}]"), m);
            }
        }
        let ttl = self.duration(
            r.ttl.as_deref(),
            "ha.ttl",
            Duration::from_secs(10),
            (Duration::from_secs(2), Duration::from_secs(3600)),
        );
        if ttl.subsec_nanos() != 0 {
            self.err(
                "ha.ttl",
                format!(
                    "must be whole seconds (etcd's leases count in seconds), got {:?}",
                    r.ttl.unwrap_or_default()
                ),
            );
        }
        let renew_deadline = self.duration(
            r.renew_deadline.as_deref(),
            "ha.renew_deadline",
            ttl * 2 / 3,
            (Duration::from_millis(100), Duration::from_secs(3600)),
        );
        if renew_deadline >= ttl {
            self.err(
                "ha.renew_deadline",
                "must be shorter than ha.ttl, so a leader that cannot renew stops acting before another may take over",
            );
        }
        let retry_period = self.duration(
            r.retry_period.as_deref(),
            "ha.retry_period",
            (ttl / 5).min(Duration::from_secs(2)),
            (Duration::from_millis(50), Duration::from_secs(600)),
        );
        if retry_period * 2 > renew_deadline {
            self.err(
                "ha.retry_period",
                "must be at most half of ha.renew_deadline, so a leader has two tries to renew before it stops acting",
            );
        }
        let key = match r.key {
            Some(k) if k.trim().is_empty() => {
                self.err("ha.key", "must not be empty");
                k
            }
            Some(k) => k,
            None => format!("/microscaler/{instance}/leader"),
        };
        let identity = match r.identity {
            Some(i) if i.trim().is_empty() => {
                self.err("ha.identity", "must not be empty");
                None
            }
            other => other,
        };
        Some(HaSpec {
            endpoints,
            ttl,
            renew_deadline,
            retry_period,
            key,
            identity,
        })
    }

    fn server(&mut self, raw: Option<toml::Value>) -> ServerSpec {
        let Some(raw) = raw else {
            return ServerSpec::default();
        };
        let Some(r) = self.part::<RawServer>(raw, "server") else {
            return ServerSpec::default();
        };
        let mut spec = ServerSpec {
            open_read: r.open_read,
            ..ServerSpec::default()
        };
        match r.listen.as_deref() {
            None => {}
            Some("off") => spec.disabled = true,
            Some(a) => match a.parse() {
                Ok(addr) => spec.listen = Some(addr),
                Err(_) => self.err(
                    "server.listen",
                    format!("must be an address like \"127.0.0.1:8080\" or \"off\", got {a:?}"),
                ),
            },
        }
        if let Some(t) = r.token {
            if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.err(
                    "server.token",
                    "must be at least 16 characters with no spaces (prefer the MICROSCALER_TOKEN environment variable to a token in a file)",
                );
            } else {
                spec.token = Some(t);
            }
        }
        for (i, h) in r.allowed_hosts.into_iter().enumerate() {
            let name_chars = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
            let ipv6 = h
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
            if ipv6 || (!h.is_empty() && h.chars().all(name_chars)) {
                spec.allowed_hosts.push(h);
            } else {
                self.err(
                    format!("server.allowed_hosts[{i}]"),
                    format!("must be a host name or address without a port, got {h:?}"),
                );
            }
        }
        if let Some(h) = r.history {
            if h.trim().is_empty() {
                self.err("server.history", "must not be empty");
            } else {
                spec.history = Some(h);
            }
        }
        if r.retention.is_some() {
            spec.retention = Some(self.duration(
                r.retention.as_deref(),
                "server.retention",
                Duration::from_secs(86400),
                (Duration::from_secs(60), Duration::from_secs(366 * 86400)),
            ));
        }
        spec
    }

    fn capacity(&mut self, raw: Option<toml::Value>) -> Option<Capacity> {
        let Some(raw) = raw else {
            self.err(
                "capacity",
                "missing: set [capacity] slots = N (or slots_per_host = N)",
            );
            return None;
        };
        let c: RawCapacity = self.part(raw, "capacity")?;
        if c.resources {
            if c.slots.is_some() || c.slots_per_host.is_some() {
                self.err(
                    "capacity",
                    "set exactly one of slots, slots_per_host or resources = true",
                );
                return None;
            }
            let reserve = Resources {
                cpu_milli: match &c.reserve_cpu {
                    None => 0,
                    Some(v) => self.cpu(v, "capacity.reserve_cpu")?,
                },
                memory: match &c.reserve_memory {
                    None => 0,
                    Some(v) => self.memory(v, "capacity.reserve_memory")?,
                },
            };
            return Some(Capacity::Resources { reserve });
        }
        if c.reserve_cpu.is_some() || c.reserve_memory.is_some() {
            self.err(
                "capacity",
                "reserve_cpu and reserve_memory go with resources = true",
            );
        }
        match (c.slots, c.slots_per_host) {
            (Some(0), None) => {
                self.err("capacity.slots", "must be >= 1, got 0");
                None
            }
            (None, Some(0)) => {
                self.err("capacity.slots_per_host", "must be >= 1, got 0");
                None
            }
            (Some(n), None) => Some(Capacity::Slots(n)),
            (None, Some(n)) => Some(Capacity::SlotsPerHost(n)),
            _ => {
                self.err(
                    "capacity",
                    "set exactly one of slots, slots_per_host or resources = true",
                );
                None
            }
        }
    }

    /// A CPU quantity: cores as a number or string (`0.5`, `"2"`), or millicores (`"250m"`).
    fn cpu(&mut self, v: &toml::Value, path: &str) -> Option<u64> {
        let text = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => {
                self.err(
                    path,
                    format!(
                        "must be a number of cores or a string like \"250m\", got {}",
                        other.type_str()
                    ),
                );
                return None;
            }
        };
        match Resources::parse_cpu(&text) {
            Ok(m) => Some(m),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    /// A memory quantity: bytes as a number, or a string like `"256Mi"`.
    fn memory(&mut self, v: &toml::Value, path: &str) -> Option<u64> {
        let text = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            other => {
                self.err(
                    path,
                    format!(
                        "must be a string like \"256Mi\" or a number of bytes, got {}",
                        other.type_str()
                    ),
                );
                return None;
            }
        };
        match Resources::parse_memory(&text) {
            Ok(m) => Some(m),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    /// `{ cpu = ..., memory = ... }` (a service's `resources`, a backend's `allocatable`):
    /// both, not both zero; every error with its path.
    pub fn resources(&mut self, raw: toml::Value, path: &str) -> Option<Resources> {
        let r: RawResources = self.part(raw, path)?;
        let cpu = match &r.cpu {
            None => {
                self.err(format!("{path}.cpu"), "missing (e.g. cpu = \"250m\")");
                None
            }
            Some(v) => self.cpu(v, &format!("{path}.cpu")),
        };
        let memory = match &r.memory {
            None => {
                self.err(
                    format!("{path}.memory"),
                    "missing (e.g. memory = \"256Mi\")",
                );
                None
            }
            Some(v) => self.memory(v, &format!("{path}.memory")),
        };
        let (cpu_milli, memory) = (cpu?, memory?);
        if cpu_milli == 0 && memory == 0 {
            self.err(path, "a replica must ask for some CPU or memory");
            return None;
        }
        Some(Resources { cpu_milli, memory })
    }

    fn backend<B: BackendPlugins>(&mut self, raw: Option<toml::Value>) -> Option<B> {
        let Some(raw) = raw else {
            self.err(
                "backend",
                format!(
                    "missing: set [backend] type = one of {}",
                    B::TYPES.join(", ")
                ),
            );
            return None;
        };
        let mut table = match raw {
            toml::Value::Table(t) => t,
            other => {
                self.err(
                    "backend",
                    format!("must be a table, got {}", other.type_str()),
                );
                return None;
            }
        };
        let kind = match table.remove("type") {
            Some(toml::Value::String(k)) => k,
            Some(other) => {
                self.err(
                    "backend.type",
                    format!("must be a string, got {}", other.type_str()),
                );
                return None;
            }
            None => {
                self.err(
                    "backend.type",
                    format!("missing: must be one of {}", B::TYPES.join(", ")),
                );
                return None;
            }
        };
        if !B::TYPES.contains(&kind.as_str()) {
            self.err(
                "backend.type",
                format!(
                    "unknown backend {kind:?}: valid types are {}",
                    B::TYPES.join(", ")
                ),
            );
            return None;
        }
        B::validate(&kind, table, self, "backend")
    }

    fn service<P: Plugins>(
        &mut self,
        raw: toml::Value,
        path: &str,
        capacity: Option<Capacity>,
        backend: Option<&P::Backend>,
    ) -> Option<(Service<P>, Option<Scaling>)> {
        let mut rest = match raw {
            toml::Value::Table(t) => t,
            other => {
                self.err(path, format!("must be a table, got {}", other.type_str()));
                return None;
            }
        };
        // Split the core's keys from the backend's, so the backend rejects keys it does not
        // know and the core never reads them.
        let mut own = toml::Table::new();
        for &key in SERVICE_KEYS {
            if let Some(v) = rest.remove(key) {
                own.insert(key.into(), v);
            }
        }
        let s: RawService = self.part(toml::Value::Table(own), path)?;
        let p = |key: &str| format!("{path}.{key}");
        let name = match s.name {
            None => {
                self.err(p("name"), "missing");
                None
            }
            Some(n) => match ServiceName::try_new(n) {
                Ok(n) => Some(n),
                Err(e) => {
                    self.err(p("name"), e);
                    None
                }
            },
        };
        let priority = match Priority::try_new(s.priority.unwrap_or(1)) {
            Ok(pr) => pr,
            Err(e) => {
                self.err(p("priority"), e);
                Priority::HIGHEST
            }
        };
        let min = s.min.unwrap_or(0);
        let max = s.max.unwrap_or(u32::MAX);
        if max == 0 {
            self.err(p("max"), "must be >= 1, got 0");
        } else if max < min {
            self.err(p("max"), format!("must be >= min ({min}), got {max}"));
        }
        if let (Some(Capacity::Slots(slots)), true) = (capacity, min > 0) {
            if min > slots {
                self.err(
                    p("min"),
                    format!("must be <= capacity.slots ({slots}), got {min}"),
                );
            }
        }
        if s.max_step == Some(0) {
            self.err(p("max_step"), "must be >= 1, got 0");
        }
        let stop_grace = self.duration(
            s.stop_grace.as_deref(),
            &p("stop_grace"),
            Duration::from_secs(10),
            (Duration::ZERO, Duration::from_secs(600)),
        );

        let modes = [!s.triggers.is_empty(), s.remainder, s.per_host];
        if modes.iter().filter(|m| **m).count() != 1 {
            self.err(
                path,
                "set exactly one of: [[services.triggers]], remainder = true, per_host = true",
            );
        }
        let kind = if s.remainder {
            ServiceKind::Remainder
        } else if s.per_host {
            ServiceKind::PerHost
        } else {
            let mut triggers = Vec::new();
            let mut seen = BTreeSet::new();
            for (j, t) in s.triggers.into_iter().enumerate() {
                let tp = format!("{path}.triggers[{j}]");
                let cx = SourceContext {
                    capacity,
                    service: name.as_ref(),
                };
                if let Some(t) = self.trigger::<P::Source>(t, &tp, &cx) {
                    if !seen.insert(t.name.clone()) {
                        self.err(
                            format!("{tp}.name"),
                            format!(
                                "duplicate trigger name {:?}; give each trigger a distinct name",
                                t.name
                            ),
                        );
                    }
                    triggers.push(t);
                }
            }
            ServiceKind::Triggered(triggers)
        };
        let scaling = match (s.scaling, &kind) {
            (None, _) => None,
            (Some(raw), ServiceKind::Triggered(ts)) => self.scaling(raw, &p("scaling"), ts, path),
            (Some(_), _) => {
                self.err(
                    p("scaling"),
                    "only services with [[services.triggers]] scale by rules; remove it",
                );
                None
            }
        };

        let caps = backend.map(BackendPlugins::capabilities);
        let workload = backend.and_then(|b| {
            let cx = ServiceContext {
                name: name.as_ref(),
                per_host: s.per_host,
            };
            b.workload(rest, &cx, self, path)
        });

        let pool = match s.pool {
            None => PoolSpec::default(),
            Some(raw) => self.pool(raw, &p("pool"), backend.map(|b| (b.type_name(), caps)), max),
        };

        let resources = match s.resources {
            Some(raw) => self.resources(raw, &p("resources")),
            None => {
                if matches!(capacity, Some(Capacity::Resources { .. })) {
                    self.err(
                        p("resources"),
                        "missing: capacity is counted in resources, so every service says what one replica asks for (resources = { cpu = \"250m\", memory = \"256Mi\" })",
                    );
                }
                None
            }
        };

        let service = Service {
            name: name?,
            priority,
            min,
            max,
            max_step: s.max_step,
            kind,
            workload: workload?,
            stop_grace,
            pool,
            resources,
        };
        Some((service, scaling))
    }

    /// `[services.pool]`: the warm pool and what a scale-down does.
    fn pool(
        &mut self,
        raw: toml::Value,
        path: &str,
        backend: Option<(&str, Option<Capabilities>)>,
        max: u32,
    ) -> PoolSpec {
        let Some(r) = self.part::<RawPool>(raw, path) else {
            return PoolSpec::default();
        };
        let p = |key: &str| format!("{path}.{key}");
        let preempt = match r.preempt.as_deref() {
            None | Some("stop") => Preempt::Stop,
            Some("pause") => Preempt::Pause,
            Some(other) => {
                self.err(
                    p("preempt"),
                    format!("must be \"stop\" or \"pause\", got {other:?}"),
                );
                Preempt::Stop
            }
        };
        let pool = PoolSpec {
            size: r.size.unwrap_or(0),
            preempt,
            paused_takes_slot: r.paused_takes_slot.unwrap_or(false),
        };
        if pool.size > max {
            self.err(
                p("size"),
                format!("must be <= max ({max}): a pool larger than the service can never be used, got {}", pool.size),
            );
        }
        if pool.preempt == Preempt::Pause && pool.paused_takes_slot {
            self.err(
                p("paused_takes_slot"),
                "with preempt = \"pause\" a paused replica would keep the slot it gives up, so preemption could never free capacity; set paused_takes_slot = false or preempt = \"stop\"",
            );
        }
        if let Some((kind, Some(caps))) = backend {
            if pool.pauses() && !caps.pause {
                self.err(
                    path,
                    format!("the {kind} backend cannot pause replicas: remove [services.pool] or use a backend that can (docker)"),
                );
            }
        }
        pool
    }

    fn trigger<S: SourcePlugins>(
        &mut self,
        raw: toml::Value,
        path: &str,
        cx: &SourceContext<'_>,
    ) -> Option<Trigger<S>> {
        let mut table = match raw {
            toml::Value::Table(t) => t,
            other => {
                self.err(path, format!("must be a table, got {}", other.type_str()));
                return None;
            }
        };
        // Split the common keys from the source's own, so each source type rejects keys it
        // does not know.
        let mut head = toml::Table::new();
        for &key in TRIGGER_HEAD_KEYS {
            if let Some(v) = table.remove(key) {
                head.insert(key.into(), v);
            }
        }
        let head: RawTriggerHead = self.part(toml::Value::Table(head), path)?;
        let Some(kind) = head.kind else {
            self.err(
                format!("{path}.type"),
                format!("missing: must be one of {}", S::TYPES.join(", ")),
            );
            return None;
        };
        if !S::TYPES.contains(&kind.as_str()) {
            self.err(
                format!("{path}.type"),
                format!(
                    "unknown source type {kind:?}: valid types are {}",
                    S::TYPES.join(", ")
                ),
            );
            return None;
        }
        let p = |key: &str| format!("{path}.{key}");
        let positive = |v: &mut Validator, key: &str, x: Option<f64>| -> Option<f64> {
            match x {
                Some(x) if x.is_finite() && x > 0.0 => Some(x),
                Some(x) => {
                    v.err(p(key), format!("must be a finite number > 0, got {x}"));
                    None
                }
                None => None,
            }
        };
        let target = positive(self, "target", head.target);
        let rule_name = head.rule.as_deref().unwrap_or("value");
        let rule = match rule_name {
            "value" => Rule::Value,
            "average" | "utilisation" | "pd" => match target {
                None if head.target.is_none() => {
                    self.err(
                        p("target"),
                        format!("missing: rule {rule_name:?} needs a target > 0"),
                    );
                    Rule::Value
                }
                None => Rule::Value,
                Some(target) => match rule_name {
                    "average" => Rule::Average { target },
                    "utilisation" => Rule::Utilisation { target },
                    _ => {
                        let gain = |v: &mut Validator, key: &str, x: Option<f64>, d: f64| match x {
                            None => d,
                            Some(x) if x.is_finite() && x >= 0.0 => x,
                            Some(x) => {
                                v.err(p(key), format!("must be a finite number >= 0, got {x}"));
                                d
                            }
                        };
                        let kp = gain(self, "kp", head.kp, 0.1);
                        let kd = gain(self, "kd", head.kd, 0.0);
                        Rule::Pd(PdSpec { target, kp, kd })
                    }
                },
            },
            other => {
                self.err(
                    p("rule"),
                    format!(
                        "unknown rule {other:?}: valid rules are {}",
                        RULES.join(", ")
                    ),
                );
                Rule::Value
            }
        };
        if rule_name == "value" && head.target.is_some() {
            self.err(
                p("target"),
                "not used by rule \"value\" (the value is the replica count); set rule = \"average\", \"utilisation\" or \"pd\"",
            );
        }
        if rule_name != "pd" {
            for (key, x) in [("kp", head.kp), ("kd", head.kd)] {
                if x.is_some() {
                    self.err(p(key), "only used by rule = \"pd\"");
                }
            }
        }
        let tolerance = match head.tolerance {
            None => DEFAULT_TOLERANCE,
            Some(t) if t.is_finite() && (0.0..1.0).contains(&t) => {
                if !matches!(rule, Rule::Average { .. } | Rule::Utilisation { .. }) {
                    self.err(
                        p("tolerance"),
                        "only used by rule = \"average\" or \"utilisation\"",
                    );
                }
                t
            }
            Some(t) => {
                self.err(p("tolerance"), format!("must be >= 0 and < 1, got {t}"));
                DEFAULT_TOLERANCE
            }
        };
        let activation = match head.activation {
            None => 0.0,
            Some(a) if a.is_finite() && a >= 0.0 => a,
            Some(a) => {
                self.err(
                    p("activation"),
                    format!("must be a finite number >= 0, got {a}"),
                );
                0.0
            }
        };
        let fallback = match head.fallback {
            None => None,
            Some(toml::Value::String(f)) if f == "current" => Some(Fallback::Current),
            Some(toml::Value::String(f)) if f == "ignore" => Some(Fallback::Ignore),
            Some(v @ toml::Value::Table(_)) => {
                let f: Option<RawFallback> = self.part(v, &p("fallback"));
                match f.and_then(|f| f.replicas) {
                    Some(n) => Some(Fallback::Replicas(n)),
                    None => {
                        self.err(
                            p("fallback.replicas"),
                            "missing: write fallback = { replicas = N }",
                        );
                        None
                    }
                }
            }
            Some(other) => {
                self.err(
                    p("fallback"),
                    format!("must be {{ replicas = N }}, \"current\" or \"ignore\", got {other}"),
                );
                None
            }
        };
        let failure = match (fallback, head.failure_threshold) {
            (Some(fallback), threshold) => Some(FailurePolicy {
                threshold: threshold.unwrap_or(3),
                fallback,
            }),
            (None, Some(_)) => {
                self.err(
                    p("failure_threshold"),
                    "has no effect without a fallback; set fallback = { replicas = N }, \"current\" or \"ignore\"",
                );
                None
            }
            (None, None) => None,
        };
        let source = S::validate(&kind, table, cx, self, path)?;
        Some(Trigger {
            name: head.name.unwrap_or_else(|| kind.clone()).into(),
            source,
            rule,
            tolerance,
            activation,
            failure,
        })
    }

    fn scaling<S>(
        &mut self,
        raw: toml::Value,
        path: &str,
        triggers: &[Trigger<S>],
        service_path: &str,
    ) -> Option<Scaling> {
        let s: RawScaling = self.part(raw, path)?;
        let formula = s.formula.and_then(|text| {
            let mut names: Vec<&str> = triggers.iter().map(|t| &*t.name).collect();
            names.push(crate::rules::CURRENT);
            match Formula::parse(&text, &names) {
                Ok(f) => {
                    for (j, t) in triggers.iter().enumerate() {
                        if t.rule != Rule::Value {
                            self.err(
                                format!("{service_path}.triggers[{j}].rule"),
                                format!(
                                    "not used when {path}.formula is set (the formula gets the raw values); remove it or the formula"
                                ),
                            );
                        }
                    }
                    Some(f)
                }
                Err(e) => {
                    self.err(format!("{path}.formula"), e);
                    None
                }
            }
        });
        let up = self.direction(s.up, &format!("{path}.up"));
        let down = self.direction(s.down, &format!("{path}.down"));
        Some(Scaling { formula, up, down })
    }

    fn direction(&mut self, raw: Option<toml::Value>, path: &str) -> Direction {
        let Some(raw) = raw else {
            return Direction::NONE;
        };
        let Some(d) = self.part::<RawDirection>(raw, path) else {
            return Direction::NONE;
        };
        let stabilisation = self.duration(
            d.stabilisation.as_deref(),
            &format!("{path}.stabilisation"),
            Duration::ZERO,
            (Duration::ZERO, MAX_WINDOW),
        );
        let select = match d.select.as_deref() {
            None | Some("max") => Select::Max,
            Some("min") => Select::Min,
            Some(other) => {
                self.err(
                    format!("{path}.select"),
                    format!("must be \"max\" or \"min\", got {other:?}"),
                );
                Select::Max
            }
        };
        let mut policies = Vec::new();
        for (k, raw) in d.policies.into_iter().enumerate() {
            let pp = format!("{path}.policies[{k}]");
            let Some(r) = self.part::<RawPolicy>(raw, &pp) else {
                continue;
            };
            let amount = match (r.replicas, r.percent) {
                (Some(0), None) => {
                    self.err(format!("{pp}.replicas"), "must be >= 1, got 0");
                    None
                }
                (None, Some(0)) => {
                    self.err(format!("{pp}.percent"), "must be >= 1, got 0");
                    None
                }
                (Some(n), None) => Some(Amount::Replicas(n)),
                (None, Some(n)) => Some(Amount::Percent(n)),
                _ => {
                    self.err(&pp, "set exactly one of replicas or percent");
                    None
                }
            };
            let period = match r.period {
                None => {
                    self.err(format!("{pp}.period"), "missing: write it like \"15s\"");
                    None
                }
                Some(raw) => {
                    let d = self.duration(
                        Some(&raw),
                        &format!("{pp}.period"),
                        Duration::ZERO,
                        (Duration::from_millis(1), MAX_WINDOW),
                    );
                    (!d.is_zero()).then_some(d)
                }
            };
            if let (Some(amount), Some(period)) = (amount, period) {
                policies.push(RatePolicy { amount, period });
            }
        }
        Direction {
            stabilisation,
            select,
            policies,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::opaque::{self, Opaque};

    type Config = super::Config<Opaque>;

    const GOOD: &str = r#"
        instance = "demo"
        tick = "250ms"
        on_exit = "stop"
        [capacity]
        slots = 9
        [backend]
        type = "docker"
        [[services]]
        name = "priority1"
        priority = 1
        max_step = 3
        [[services.triggers]]
        type = "random"
        delta = 3
        interval = "3s"
        seed = 7
        [[services]]
        name = "priority2"
        priority = 2
        remainder = true
    "#;

    fn errors(text: &str) -> Vec<String> {
        match Config::from_toml(text) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn good_config_validates() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.instance, "demo");
        assert_eq!(c.tick, Duration::from_millis(250));
        assert_eq!(c.sample_timeout, Duration::from_millis(125));
        assert_eq!(c.on_exit, OnExit::Stop);
        assert_eq!(c.capacity, Capacity::Slots(9));
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].max_step, Some(3));
        match &c.services[0].kind {
            ServiceKind::Triggered(t) => {
                assert_eq!(&*t[0].name, "random");
                // The source's own keys reach the source's plugin, and only those.
                let keys: Vec<&str> = t[0].source.options.keys().map(|k| k.as_str()).collect();
                assert_eq!(
                    (t[0].source.kind.as_str(), keys),
                    ("random", vec!["delta", "interval", "seed"])
                );
            }
            k => panic!("unexpected kind {k:?}"),
        }
        assert!(c.services[1].is_remainder());
    }

    #[test]
    fn all_errors_reported_with_paths() {
        let text = r#"
            tick = "5ms"
            bogus = 1
            [capacity]
            slots = 9
            [backend]
            type = "docker"
            [[services]]
            name = "a"
            min = 3
            max = 1
            [[services.triggers]]
            type = "random"
            interval = "soon"
            [[services]]
            name = "Bad_Name"
            remainder = true
            colour = "red"
            [[services]]
            name = "c"
            max = "three"
            remainder = true
        "#;
        let e = errors(text);
        assert!(e.contains(&"bogus: unknown key".to_string()), "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.starts_with("tick: must be between 100ms and 1m")),
            "{e:?}"
        );
        assert!(
            e.contains(&"services[0].max: must be >= min (3), got 1".to_string()),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("services[1].name: must contain only")),
            "{e:?}"
        );
        // A source's keys (`interval`) and a service's backend keys (`colour`) are checked by
        // their plugins, with the same paths: see the sources' and backends' own tests.
        assert!(
            e.iter()
                .any(|m| m.starts_with("services[2].max: invalid type")),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_types_list_valid_ones() {
        let e = errors(&GOOD.replace("type = \"random\"", "type = \"kafka\""));
        assert_eq!(
            e,
            vec![format!(
                "services[0].triggers[0].type: unknown source type \"kafka\": valid types are {}",
                <opaque::Source as SourcePlugins>::TYPES.join(", ")
            )]
        );
        let e = errors(&GOOD.replace("type = \"docker\"", "type = \"k8s\""));
        assert_eq!(
            e,
            vec!["backend.type: unknown backend \"k8s\": valid types are docker, swarm, process"]
        );
    }

    #[test]
    fn service_mode_must_be_exactly_one() {
        let e = errors(&GOOD.replace("remainder = true", ""));
        assert_eq!(
            e,
            vec!["services[1]: set exactly one of: [[services.triggers]], remainder = true, per_host = true"]
        );
        let e = errors(&GOOD.replace("remainder = true", "remainder = true\nper_host = true"));
        assert_eq!(e.len(), 1, "{e:?}");
    }

    #[test]
    fn duplicate_names_and_capacity_checks() {
        let text = GOOD.replace("name = \"priority2\"", "name = \"priority1\"\nmin = 10");
        let e = errors(&text);
        assert!(
            e.contains(&"services[1].name: duplicate service name \"priority1\"".to_string()),
            "{e:?}"
        );
        assert!(
            e.contains(&"services[1].min: must be <= capacity.slots (9), got 10".to_string()),
            "{e:?}"
        );
        assert!(
            e.iter().any(|m| m.starts_with("services: the sum of min")),
            "{e:?}"
        );
    }

    #[test]
    fn missing_sections_and_bad_toml() {
        let e = errors("instance = \"x\"");
        assert!(
            e.iter().any(|m| m.starts_with("capacity: missing")),
            "{e:?}"
        );
        assert!(e.iter().any(|m| m.starts_with("backend: missing")), "{e:?}");
        assert!(
            e.iter().any(|m| m.starts_with("services: at least one")),
            "{e:?}"
        );
        let e = errors("[capacity\nslots=1");
        assert!(e[0].starts_with("invalid TOML"), "{e:?}");
    }

    #[test]
    fn ha_section_is_validated() {
        let c = Config::from_toml(&format!(
            "{GOOD}\n[ha]\netcd = [\"http://127.0.0.1:2379\"]\nttl = \"3s\"\n"
        ))
        .unwrap();
        let ha = c.ha.expect("[ha]");
        assert_eq!(ha.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(ha.ttl, Duration::from_secs(3));
        assert_eq!(ha.renew_deadline, Duration::from_secs(2));
        assert_eq!(ha.retry_period, Duration::from_millis(600));
        assert_eq!(ha.key, "/microscaler/demo/leader");
        assert_eq!(ha.identity, None);
        assert_eq!(Config::from_toml(GOOD).unwrap().ha, None);
        let e = errors(&format!(
            "{GOOD}\n[ha]\netcd = [\"etcd:2379\"]\nttl = \"2500ms\"\nrenew_deadline = \"5s\"\nretry_period = \"2s\"\nkey = \"\"\nleader = 1\n"
        ));
        for want in [
            "ha.leader: unknown key",
            "ha.etcd[0]: \"etcd:2379\" is not a URL: write it like http://host:port",
            "ha.ttl: must be whole seconds (etcd's leases count in seconds), got \"2500ms\"",
            "ha.renew_deadline: must be shorter than ha.ttl, so a leader that cannot renew stops acting before another may take over",
            "ha.key: must not be empty",
        ] {
            assert!(e.contains(&want.to_string()), "{want:?} not in {e:?}");
        }
        let e = errors(&format!(
            "{GOOD}\n[ha]\nttl = \"4s\"\nretry_period = \"2s\"\n"
        ));
        assert!(e.iter().any(|m| m.starts_with("ha.etcd: missing")), "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.starts_with("ha.retry_period: must be at most half")),
            "{e:?}"
        );
    }

    #[test]
    fn server_section_is_validated() {
        let c = Config::from_toml(&format!(
            "{GOOD}\n[server]\nlisten = \"0.0.0.0:9000\"\ntoken = \"0123456789abcdef\"\nopen_read = true\nretention = \"2h\"\n"
        ))
        .unwrap();
        assert_eq!(c.server.listen, Some("0.0.0.0:9000".parse().unwrap()));
        assert_eq!(c.server.token.as_deref(), Some("0123456789abcdef"));
        assert!(c.server.open_read && !c.server.disabled);
        assert_eq!(c.server.retention, Some(Duration::from_secs(7200)));
        let hosts = |list: &str| format!("{GOOD}\n[server]\nallowed_hosts = {list}\n");
        let c = Config::from_toml(&hosts(r#"["scaler.internal", "10.0.0.5", "[fd00::1]"]"#));
        assert_eq!(
            c.unwrap().server.allowed_hosts,
            ["scaler.internal", "10.0.0.5", "[fd00::1]"]
        );
        assert_eq!(
            errors(&hosts(r#"["ok", "", "a b", "host:8080"]"#)),
            [
                "server.allowed_hosts[1]: must be a host name or address without a port, got \"\"",
                "server.allowed_hosts[2]: must be a host name or address without a port, got \"a b\"",
                "server.allowed_hosts[3]: must be a host name or address without a port, got \"host:8080\"",
            ]
        );
        let off = Config::from_toml(&format!("{GOOD}\n[server]\nlisten = \"off\"\n")).unwrap();
        assert!(off.server.disabled);
        assert_eq!(
            Config::from_toml(GOOD).unwrap().server,
            ServerSpec::default()
        );

        let e = errors(&format!(
            "{GOOD}\n[server]\nlisten = \"localhost\"\ntoken = \"short\"\nretention = \"1s\"\nport = 1\n"
        ));
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.contains(&"server.port: unknown key".to_string()), "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.starts_with("server.listen: must be an address")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("server.token: must be at least 16")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("server.retention: must be between 1m")),
            "{e:?}"
        );
    }

    #[test]
    fn service_keys_the_core_does_not_know_go_to_the_backend() {
        let c = Config::from_toml(&GOOD.replace(
            "remainder = true",
            "remainder = true\nimage = \"nginx\"\n[services.reference]\nservice = \"web\"",
        ))
        .unwrap();
        let keys: Vec<&str> = c.services[1].workload.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, vec!["image", "reference"]);
        assert!(c.services[0].workload.is_empty());
    }

    #[test]
    fn a_pool_needs_a_backend_that_pauses() {
        let pool = "remainder = true\n[services.pool]\nsize = 1";
        assert!(Config::from_toml(&GOOD.replace("remainder = true", pool)).is_ok());
        let e = errors(
            &GOOD
                .replace("type = \"docker\"", "type = \"swarm\"")
                .replace("remainder = true", pool),
        );
        assert_eq!(
            e,
            vec!["services[1].pool: the swarm backend cannot pause replicas: remove [services.pool] or use a backend that can (docker)"]
        );
    }
}
