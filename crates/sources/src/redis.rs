//! Redis sources: a list's length (`LLEN`) and a stream consumer group's lag
//! (`XINFO GROUPS`, field `lag`, Redis >= 7).
//!
//! One multiplexed connection per source, opened with connect and response timeouts; it is
//! dropped after any error so the next sample reconnects.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use microscaler_core::{SourceContext, Validator};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use serde::Deserialize;

use crate::config::{net_options, NetOptions, REDIS};
use crate::{Source, SourceError};

pub mod keyspace;

/// The server both Redis sources read when no `url` is given.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// `LLEN key` of a Redis server.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisListConfig {
    /// `redis://[user:password@]host[:port][/db]` (TLS, `rediss://`, is not supported yet).
    pub url: String,
    /// The list's key.
    pub key: String,
    /// Wake the control loop when the list changes, from the server's keyspace notifications
    /// (default true; they must be on in the server: `notify-keyspace-events` with `K` and `l`).
    pub notify: bool,
    /// Timeouts and start-up policy.
    pub net: NetOptions,
}

/// Consumer-group lag of a Redis stream: entries not yet delivered to the group
/// (`XINFO GROUPS stream`, field `lag`, Redis >= 7).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisStreamConfig {
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

#[derive(Deserialize)]
struct RawRedisList {
    url: Option<String>,
    key: Option<String>,
    notify: Option<bool>,
}

#[derive(Deserialize)]
struct RawRedisStream {
    url: Option<String>,
    stream: Option<String>,
    group: Option<String>,
    include_pending: Option<bool>,
}

impl RedisListConfig {
    /// Validates a `type = "redis_list"` trigger's options (`url`, `key`, `notify`,
    /// `timeout`, `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<RedisListConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawRedisList = v.part(toml::Value::Table(options), path)?;
        Some(RedisListConfig {
            url: v.url(r.url, Some(DEFAULT_URL), path, "url", REDIS, ""),
            key: v.need(r.key, path, "key", "the list's key"),
            notify: r.notify.unwrap_or(true),
            net,
        })
    }
}

impl RedisStreamConfig {
    /// Validates a `type = "redis_stream"` trigger's options (`url`, `stream`, `group`,
    /// `include_pending`, `timeout`, `required`).
    pub fn validate(
        mut options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<RedisStreamConfig> {
        let net = net_options(v, &mut options, path);
        let r: RawRedisStream = v.part(toml::Value::Table(options), path)?;
        Some(RedisStreamConfig {
            url: v.url(r.url, Some(DEFAULT_URL), path, "url", REDIS, ""),
            stream: v.need(r.stream, path, "stream", "the stream's key"),
            group: v.need(r.group, path, "group", "the consumer group"),
            include_pending: r.include_pending.unwrap_or(false),
            net,
        })
    }
}

/// The connection part both Redis sources share.
#[derive(Debug)]
struct Conn {
    client: redis::Client,
    config: AsyncConnectionConfig,
    conn: Option<MultiplexedConnection>,
    url: String,
    name: String,
}

impl Conn {
    fn new(url: &str, timeout: Duration, name: String) -> Result<Self, SourceError> {
        let client = redis::Client::open(url).map_err(|e| SourceError::Failed {
            source_name: name.clone(),
            reason: format!("invalid Redis URL {:?}: {e}", redact(url)),
        })?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        Ok(Conn {
            client,
            config,
            conn: None,
            url: redact(url),
            name,
        })
    }

    fn failed(&self, reason: String) -> SourceError {
        SourceError::Failed {
            source_name: self.name.clone(),
            reason,
        }
    }

    async fn query(&mut self, cmd: &redis::Cmd) -> Result<Value, SourceError> {
        if self.conn.is_none() {
            let c = self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map_err(|e| {
                    self.failed(format!(
                        "cannot connect to Redis at {}: {e}: is redis-server running there?",
                        self.url
                    ))
                })?;
            self.conn = Some(c);
        }
        let conn = self.conn.as_mut().expect("connected above");
        match cmd.query_async::<Value>(conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                self.conn = None;
                Err(self.failed(format!("Redis at {}: {e}", self.url)))
            }
        }
    }
}

/// Hides the password of a `redis://user:password@host` URL in messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `LLEN key`.
#[derive(Debug)]
pub struct RedisListSource {
    conn: Conn,
    key: String,
    notify: bool,
    timeout: Duration,
    /// The keyspace listener, once started; aborted with the source.
    listener: OnceLock<tokio::task::AbortHandle>,
}

impl Drop for RedisListSource {
    fn drop(&mut self) {
        if let Some(l) = self.listener.get() {
            l.abort();
        }
    }
}

impl RedisListSource {
    /// Builds the source; connects on the first sample or check.
    pub fn new(config: &RedisListConfig) -> Result<Self, SourceError> {
        let name = format!("redis list {:?} at {}", config.key, redact(&config.url));
        Ok(RedisListSource {
            conn: Conn::new(&config.url, config.net.timeout, name)?,
            key: config.key.clone(),
            notify: config.notify,
            timeout: config.net.timeout,
            listener: OnceLock::new(),
        })
    }

    /// With `notify` (the default), follows the list's keyspace notifications and rings
    /// `waker` when it changes ([`keyspace`]); polling stays the safety net. Started once, on
    /// the current tokio runtime (without one, nothing is started).
    pub fn wake_on_change(&self, waker: Arc<tokio::sync::Notify>) {
        if !self.notify || self.listener.get().is_some() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.conn.client.clone();
        let channel = keyspace::channel(&client, &self.key);
        let task = rt.spawn(keyspace::follow(
            client,
            channel,
            self.conn.url.clone(),
            self.timeout,
            waker,
        ));
        let _ = self.listener.set(task.abort_handle());
    }

    /// Start-up check: the server answers, and the key, if it exists, is a list.
    pub async fn check(&mut self) -> Result<(), SourceError> {
        let t = self.conn.query(redis::cmd("TYPE").arg(&self.key)).await?;
        match t {
            Value::SimpleString(s) if s == "list" || s == "none" => Ok(()),
            Value::SimpleString(s) => Err(self
                .conn
                .failed(format!("key {:?} holds a {s}, not a list", self.key))),
            other => Err(self.conn.failed(format!("TYPE answered {other:?}"))),
        }
    }
}

impl Source for RedisListSource {
    fn describe(&self) -> String {
        self.conn.name.clone()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        match self.conn.query(redis::cmd("LLEN").arg(&self.key)).await? {
            Value::Int(n) => Ok(n as f64),
            other => Err(SourceError::Garbage {
                source_name: self.describe(),
                reason: format!("LLEN answered {other:?}, not a number"),
            }),
        }
    }
}

/// Consumer-group lag of a stream, optionally plus its pending entries.
#[derive(Debug)]
pub struct RedisStreamSource {
    conn: Conn,
    stream: String,
    group: String,
    include_pending: bool,
}

impl RedisStreamSource {
    /// Builds the source; connects on the first sample or check.
    pub fn new(config: &RedisStreamConfig) -> Result<Self, SourceError> {
        let name = format!(
            "redis stream {:?} group {:?} at {}",
            config.stream,
            config.group,
            redact(&config.url)
        );
        Ok(RedisStreamSource {
            conn: Conn::new(&config.url, config.net.timeout, name)?,
            stream: config.stream.clone(),
            group: config.group.clone(),
            include_pending: config.include_pending,
        })
    }

    /// Start-up check: the stream and its group exist.
    pub async fn check(&mut self) -> Result<(), SourceError> {
        self.read().await.map(|_| ())
    }

    async fn read(&mut self) -> Result<f64, SourceError> {
        let v = self
            .conn
            .query(redis::cmd("XINFO").arg("GROUPS").arg(&self.stream))
            .await
            .map_err(|e| match e {
                SourceError::Failed { source_name, reason } if reason.contains("no such key") => {
                    SourceError::Failed {
                        source_name,
                        reason: format!(
                            "stream {:?} does not exist (create it and its group with XGROUP CREATE {} {} $ MKSTREAM)",
                            self.stream, self.stream, self.group
                        ),
                    }
                }
                e => e,
            })?;
        let garbage = |reason: String| SourceError::Garbage {
            source_name: self.conn.name.clone(),
            reason,
        };
        let Value::Array(groups) = v else {
            return Err(garbage(format!("XINFO GROUPS answered {v:?}")));
        };
        for g in groups {
            let fields = fields(g);
            if !matches!(field(&fields, "name"), Some(n) if bytes(n).as_deref() == Some(self.group.as_str()))
            {
                continue;
            }
            let lag = match field(&fields, "lag") {
                Some(Value::Int(n)) => *n,
                Some(Value::Nil) => {
                    return Err(garbage(
                        "Redis cannot tell the group's lag now (entries were deleted or trimmed after its last delivered id); no value this tick".into(),
                    ))
                }
                Some(other) => return Err(garbage(format!("lag is {other:?}, not a number"))),
                None => {
                    return Err(self.conn.failed(
                        "XINFO GROUPS has no lag field: Redis 7 or later is needed".into(),
                    ))
                }
            };
            let pending = match (self.include_pending, field(&fields, "pending")) {
                (false, _) => 0,
                (true, Some(Value::Int(n))) => *n,
                (true, other) => {
                    return Err(garbage(format!("pending is {other:?}, not a number")))
                }
            };
            return Ok((lag + pending) as f64);
        }
        Err(self.conn.failed(format!(
            "stream {:?} has no consumer group {:?} (create it with XGROUP CREATE)",
            self.stream, self.group
        )))
    }
}

/// A reply's map as (key, value) pairs: RESP3 maps and RESP2 flat arrays alike.
fn fields(v: Value) -> Vec<(Value, Value)> {
    match v {
        Value::Map(m) => m,
        Value::Array(a) => {
            let mut it = a.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
        _ => Vec::new(),
    }
}

fn field<'a>(fields: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|(k, _)| bytes(k).as_deref() == Some(name))
        .map(|(_, v)| v)
}

fn bytes(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

impl Source for RedisStreamSource {
    fn describe(&self) -> String {
        self.conn.name.clone()
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use super::redact;
    use crate::config::testing::{config, errors, P};
    use crate::{NetOptions, SourceConfig};

    #[test]
    fn redis_defaults_and_required_keys() {
        let SourceConfig::RedisList(s) = config(
            r#"type = "redis_list"
            key = "jobs""#,
        ) else {
            panic!()
        };
        assert_eq!(s.url, "redis://127.0.0.1:6379");
        assert_eq!(s.net, NetOptions::default());
        assert!(s.notify, "keyspace notifications are followed by default");
        let SourceConfig::RedisList(s) =
            config("type = \"redis_list\"\nkey = \"q\"\nnotify = false")
        else {
            panic!()
        };
        assert!(!s.notify);
        let e = errors("type = \"redis_list\"\nkey = \"q\"\nnotify = \"yes\"");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(&format!(
                "{P}.notify: invalid type: string \"yes\", expected a boolean"
            )),
            "{e:?}"
        );
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
        let SourceConfig::RedisStream(s) = config(
            r#"type = "redis_stream"
            url = "redis://app:pw@10.0.0.1:6380/2"
            stream = "s"
            group = "g"
            include_pending = true"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (
                s.url.as_str(),
                s.stream.as_str(),
                s.group.as_str(),
                s.include_pending
            ),
            ("redis://app:pw@10.0.0.1:6380/2", "s", "g", true)
        );
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("redis://app:s3cret@10.0.0.1:6379/0"),
            "redis://app:***@10.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
