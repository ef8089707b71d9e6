//! NATS JetStream consumer backlog against a real nats-server (-js, 127.0.0.1:4222, monitoring
//! on :8222). The stream and consumer are made with the plain NATS protocol over TCP (the
//! JetStream API is request/reply on `$JS.API.*` subjects), so the test needs no NATS client.

mod common;

use std::time::Duration;

use common::{absent, dead_port, net, unique};
use microscaler_sources::{AnySource, NatsJetstreamConfig, Source, SourceConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Nats {
    /// This connection's reply subject (tests run at once, each with its own).
    inbox: String,
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Nats {
    async fn connect() -> Nats {
        let (r, w) = TcpStream::connect("127.0.0.1:4222")
            .await
            .unwrap()
            .into_split();
        let mut n = Nats {
            inbox: unique("reply").replace('-', "_"),
            r: BufReader::new(r),
            w,
        };
        let info = n.line().await;
        assert!(info.starts_with("INFO"), "{info}");
        let sub = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {} 1\r\n",
            n.inbox
        );
        n.send(&sub).await;
        n
    }

    async fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).await.unwrap();
        l
    }

    async fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).await.unwrap();
    }

    /// A JetStream API request; returns the reply's payload.
    async fn request(&mut self, subject: &str, body: &str) -> String {
        self.send(&format!(
            "PUB {subject} {} {}\r\n{body}\r\n",
            self.inbox,
            body.len()
        ))
        .await;
        loop {
            let l = self.line().await;
            if l.starts_with("MSG") {
                let payload = self.line().await;
                return payload;
            }
            if l.starts_with("PING") {
                self.send("PONG\r\n").await;
            }
            assert!(!l.starts_with("-ERR"), "{l}");
        }
    }

    /// A new in-memory stream named after `prefix`, on its own subject, with a durable
    /// consumer `workers` (explicit acks); returns the stream's name and subject.
    async fn stream_with_consumer(&mut self, prefix: &str) -> (String, String) {
        let stream = unique(prefix).replace('-', "_");
        let subject = format!("{}.new", stream.to_lowercase());
        let created = self
            .request(
                &format!("$JS.API.STREAM.CREATE.{stream}"),
                &format!(
                    "{{\"name\":\"{stream}\",\"subjects\":[\"{subject}\"],\"storage\":\"memory\"}}"
                ),
            )
            .await;
        assert!(!created.contains("\"error\""), "{created}");
        let consumer = self
            .request(
                &format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.workers"),
                &format!("{{\"stream_name\":\"{stream}\",\"config\":{{\"durable_name\":\"workers\",\"ack_policy\":\"explicit\"}}}}"),
            )
            .await;
        assert!(!consumer.contains("\"error\""), "{consumer}");
        (stream, subject)
    }

    async fn publish(&mut self, subject: &str, body: &str) {
        // With a reply subject JetStream acknowledges the store, so counts are settled after.
        let ack = self.request(subject, body).await;
        assert!(ack.contains("\"seq\""), "{ack}");
    }
}

fn source(stream: &str, consumer: &str, include_ack_pending: bool) -> AnySource {
    AnySource::build(
        &SourceConfig::NatsJetstream(NatsJetstreamConfig {
            url: "http://127.0.0.1:8222".into(),
            account: None,
            stream: stream.into(),
            consumer: consumer.into(),
            include_ack_pending,
            net: net(),
        }),
        9,
        1,
    )
    .unwrap()
}

#[tokio::test]
async fn consumer_pending_follows_the_stream() {
    if absent("nats-server", 4222).await || absent("nats monitoring", 8222).await {
        return;
    }
    let mut n = Nats::connect().await;
    let (stream, subject) = n.stream_with_consumer("JOBS").await;

    let mut s = source(&stream, "workers", false);
    s.check().await.unwrap();
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 0.0);
    for i in 0..6 {
        n.publish(&subject, &format!("job {i}")).await;
    }
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 6.0);
    // A worker fetches 2 without acking: 4 undelivered, 2 awaiting ack.
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.workers");
    n.request(&next, "{\"batch\":1}").await;
    n.request(&next, "{\"batch\":1}").await;
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 4.0);
    assert_eq!(
        source(&stream, "workers", true)
            .sample(Duration::ZERO)
            .await
            .unwrap(),
        6.0
    );

    let e = source(&stream, "nobody", false)
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no consumer \"nobody\" (it has: workers)"),
        "{e}"
    );
    let e = source("NO_SUCH_STREAM", "workers", false)
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no stream \"NO_SUCH_STREAM\""), "{e}");

    n.request(&format!("$JS.API.STREAM.DELETE.{stream}"), "")
        .await;
}

/// The source contract suite against the real server's monitoring endpoint and a dead port.
#[tokio::test]
async fn source_contract() {
    if absent("nats-server", 4222).await || absent("nats monitoring", 8222).await {
        return;
    }
    let mut n = Nats::connect().await;
    let (stream, _) = n.stream_with_consumer("CONTRACT").await;
    let config = |url: String| {
        SourceConfig::NatsJetstream(NatsJetstreamConfig {
            url,
            account: None,
            stream: stream.clone(),
            consumer: "workers".into(),
            include_ack_pending: false,
            net: net(),
        })
    };
    let port = dead_port();
    microscaler_testkit::source_contract::run(
        &config("http://127.0.0.1:8222".into()),
        &config(format!("http://127.0.0.1:{port}")),
        &format!("127.0.0.1:{port}"),
    )
    .await;
    n.request(&format!("$JS.API.STREAM.DELETE.{stream}"), "")
        .await;
}
