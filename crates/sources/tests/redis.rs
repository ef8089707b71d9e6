//! Redis sources against a real redis-server on 127.0.0.1:6379.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{absent, dead_port, net, unique};
use microscaler_sources::redis::keyspace;
use microscaler_sources::{
    AnySource, RedisListConfig, RedisListSource, RedisStreamConfig, Source, SourceConfig,
    SourceError,
};
use tokio::sync::Notify;

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
            notify: false,
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
            notify: false,
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
            notify: false,
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

/// A source of the list `jobs` at `url` following its keyspace notifications, and its waker,
/// once subscribed: the listener rings once then (the list may have changed while it was
/// away), whether or not the server publishes notifications.
async fn listening(url: &str) -> (RedisListSource, Arc<Notify>) {
    let source = RedisListSource::new(&RedisListConfig {
        url: url.into(),
        key: "jobs".into(),
        notify: true,
        net: net(),
    })
    .unwrap();
    let waker = Arc::new(Notify::new());
    source.wake_on_change(waker.clone());
    tokio::time::timeout(Duration::from_secs(5), waker.notified())
        .await
        .expect("the listener subscribes and rings once");
    (source, waker)
}

/// With keyspace notifications on, a push to the list wakes the loop at once (well before any
/// tick would read it), a change to another key does not, and a burst of pushes rings a
/// bounded number of times; the server's setting is checked and reported.
#[tokio::test]
async fn a_push_to_the_list_wakes_the_loop_from_keyspace_notifications() {
    let Some(server) = microscaler_testkit::redis_server("Kl") else {
        return;
    };
    let client = redis::Client::open(server.url.as_str()).unwrap();
    assert_eq!(
        keyspace::notifications_off(&client, &server.url, Duration::from_secs(2)).await,
        Ok(None)
    );
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let (source, waker) = listening(&server.url).await;
    let channel = keyspace::channel(&client, "jobs");
    let subscribers: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(subscribers, vec![(channel.clone(), 1)]);

    let pushed = std::time::Instant::now();
    let _: () = redis::cmd("RPUSH")
        .arg("jobs")
        .arg("a")
        .query_async(&mut c)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), waker.notified())
        .await
        .expect("a push wakes the loop");
    eprintln!("RPUSH -> wake-up: {:?}", pushed.elapsed());
    tokio::time::sleep(keyspace::MIN_GAP * 2).await;
    let _: () = redis::cmd("RPUSH")
        .arg("other")
        .arg("a")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), waker.notified())
            .await
            .is_err(),
        "another key's change woke the loop"
    );
    // A burst of 500 pushes in one pipeline: a few rings, not 500.
    let rings = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = {
        let (waker, rings) = (waker.clone(), rings.clone());
        tokio::spawn(async move {
            loop {
                waker.notified().await;
                rings.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.cmd("RPUSH").arg("jobs").arg(i).ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    tokio::time::sleep(keyspace::MIN_GAP * 4).await;
    let n = rings.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=4).contains(&n), "500 pushes rang {n} times");
    counter.abort();
    drop(source);
}

/// With keyspace notifications off (Redis's default), the check says so and names the command
/// that turns them on; nothing wakes the loop, which still reads the list at each tick.
#[tokio::test]
async fn notifications_off_are_reported_with_the_command_that_turns_them_on() {
    let Some(server) = microscaler_testkit::redis_server("") else {
        return;
    };
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let said = keyspace::notifications_off(&client, &server.url, Duration::from_secs(2))
        .await
        .unwrap()
        .expect("reported as off");
    assert!(
        said.contains("CONFIG SET notify-keyspace-events Kl"),
        "{said}"
    );
    let (source, waker) = listening(&server.url).await;
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("jobs")
        .arg("a")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), waker.notified())
            .await
            .is_err(),
        "no notification, no wake-up"
    );
    let mut s = AnySource::RedisList(source);
    assert_eq!(
        s.sample(Duration::ZERO).await.unwrap(),
        1.0,
        "read at the tick"
    );
}
