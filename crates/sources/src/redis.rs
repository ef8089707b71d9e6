//! Redis sources: a list's length (`LLEN`) and a stream consumer group's lag
//! (`XINFO GROUPS`, field `lag`, Redis >= 7).
//!
//! One multiplexed connection per source, opened with connect and response timeouts; it is
//! dropped after any error so the next sample reconnects.

use std::time::Duration;

use microscaler_core::source_spec::{RedisListSpec, RedisStreamSpec};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::{Source, SourceError};

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
}

impl RedisListSource {
    /// Builds the source; connects on the first sample or check.
    pub fn new(spec: &RedisListSpec) -> Result<Self, SourceError> {
        let name = format!("redis list {:?} at {}", spec.key, redact(&spec.url));
        Ok(RedisListSource {
            conn: Conn::new(&spec.url, spec.net.timeout, name)?,
            key: spec.key.clone(),
        })
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
    pub fn new(spec: &RedisStreamSpec) -> Result<Self, SourceError> {
        let name = format!(
            "redis stream {:?} group {:?} at {}",
            spec.stream,
            spec.group,
            redact(&spec.url)
        );
        Ok(RedisStreamSource {
            conn: Conn::new(&spec.url, spec.net.timeout, name)?,
            stream: spec.stream.clone(),
            group: spec.group.clone(),
            include_pending: spec.include_pending,
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

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("redis://app:s3cret@10.0.0.1:6379/0"),
            "redis://app:***@10.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
