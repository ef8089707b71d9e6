//! Redis sources against a real redis-server on 127.0.0.1:6379.

mod common;

use std::time::Duration;

use common::{absent, dead_port, net, unique};
use microscaler_sources::{
    AnySource, RedisListConfig, RedisStreamConfig, Source, SourceConfig, SourceError,
};

const URL: &str = "redis://127.0.0.1:6379";

async fn client() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn list(key: &str) -> AnySource {
    AnySource::build(
        &SourceConfig::RedisList(RedisListConfig {
            url: URL.into(),
            key: key.into(),
            net: net(),
        }),
        9,
        1,
    )
    .unwrap()
}

#[tokio::test]
async fn list_length_follows_the_list() {
    if absent("redis", 6379).await {
        return;
    }
    let key = unique("jobs");
    let mut c = client().await;
    let mut s = list(&key);
    s.check().await.unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 0.0);
    let _: () = redis::cmd("RPUSH")
        .arg(&key)
        .arg(&["a", "b", "c"])
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 3.0);
    let _: () = redis::cmd("LPOP")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 2.0);
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_key_of_another_type_fails_the_check_and_the_sample() {
    if absent("redis", 6379).await {
        return;
    }
    let key = unique("str");
    let mut c = client().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut s = list(&key);
    let e = s.check().await.unwrap_err().to_string();
    assert!(e.contains("holds a string, not a list"), "{e}");
    let e = s.sample(Duration::ZERO).await.unwrap_err().to_string();
    assert!(e.contains("WRONGTYPE"), "{e}");
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
}

/// Creates `stream` (empty) with a consumer group `workers`.
async fn group_on_new_stream(c: &mut redis::aio::MultiplexedConnection, stream: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("workers")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(c)
        .await
        .unwrap();
}

#[tokio::test]
async fn stream_lag_counts_undelivered_entries() {
    if absent("redis", 6379).await {
        return;
    }
    let stream = unique("events");
    let mut c = client().await;
    group_on_new_stream(&mut c, &stream).await;
    for i in 0..5 {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("n")
            .arg(i)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let spec = |include_pending| {
        SourceConfig::RedisStream(RedisStreamConfig {
            url: URL.into(),
            stream: stream.clone(),
            group: "workers".into(),
            include_pending,
            net: net(),
        })
    };
    let mut s = AnySource::build(&spec(false), 9, 1).unwrap();
    let mut with_pending = AnySource::build(&spec(true), 9, 1).unwrap();
    s.check().await.unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 5.0);
    // A consumer reads 2 entries without acknowledging them: lag 3, pending 2.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("w1")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 3.0);
    assert_eq!(with_pending.sample(Duration::ZERO).await.unwrap(), 5.0);

    // A missing group is named at the check.
    let mut other = AnySource::build(
        &SourceConfig::RedisStream(RedisStreamConfig {
            url: URL.into(),
            stream: stream.clone(),
            group: "nobody".into(),
            include_pending: false,
            net: net(),
        }),
        9,
        1,
    )
    .unwrap();
    let e = other.check().await.unwrap_err().to_string();
    assert!(e.contains("has no consumer group \"nobody\""), "{e}");
    let mut none = AnySource::build(
        &SourceConfig::RedisStream(RedisStreamConfig {
            url: URL.into(),
            stream: unique("nostream"),
            group: "g".into(),
            include_pending: false,
            net: net(),
        }),
        9,
        1,
    )
    .unwrap();
    let e = none.check().await.unwrap_err().to_string();
    assert!(
        e.contains("does not exist (create it and its group with XGROUP CREATE"),
        "{e}"
    );
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut c)
        .await
        .unwrap();
}

/// The source contract suite against the real server and a dead port.
#[tokio::test]
async fn source_contract() {
    if absent("redis", 6379).await {
        return;
    }
    let port = dead_port();
    let config = |url: String| {
        SourceConfig::RedisList(RedisListConfig {
            url,
            key: unique("contract"),
            net: net(),
        })
    };
    microscaler_testkit::source_contract::run(
        &config(URL.into()),
        &config(format!("redis://127.0.0.1:{port}")),
        &format!("127.0.0.1:{port}"),
    )
    .await;
}

/// The source contract suite for a stream's consumer group, against the real server and a
/// dead port.
#[tokio::test]
async fn stream_source_contract() {
    if absent("redis", 6379).await {
        return;
    }
    let stream = unique("contract-stream");
    let mut c = client().await;
    group_on_new_stream(&mut c, &stream).await;
    let config = |url: String| {
        SourceConfig::RedisStream(RedisStreamConfig {
            url,
            stream: stream.clone(),
            group: "workers".into(),
            include_pending: true,
            net: net(),
        })
    };
    let port = dead_port();
    microscaler_testkit::source_contract::run(
        &config(URL.into()),
        &config(format!("redis://127.0.0.1:{port}")),
        &format!("127.0.0.1:{port}"),
    )
    .await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_named() {
    let port = dead_port();
    let mut s = AnySource::build(
        &SourceConfig::RedisList(RedisListConfig {
            url: format!("redis://127.0.0.1:{port}"),
            key: "jobs".into(),
            net: net(),
        }),
        9,
        1,
    )
    .unwrap();
    let e = s.check().await.unwrap_err();
    assert!(matches!(e, SourceError::Failed { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains(&format!(
            "cannot connect to Redis at redis://127.0.0.1:{port}"
        )),
        "{e}"
    );
}
