//! Waking the control loop when a Redis list changes, from the server's keyspace
//! notifications (`__keyspace@<db>__:<key>`), instead of waiting for the next tick's `LLEN`.
//!
//! Redis publishes them only when `notify-keyspace-events` has `K` and `l` (or `A`); it is
//! off by default. The listener says so once (at INFO: polling works), with the command that
//! turns them on, and keeps its subscription (they may be turned on later); polling every tick
//! stays the safety net either way. A busy list changes thousands of times a second: the listener rings at once
//! on the first change after a quiet moment, then at most once per [`MIN_GAP`] while changes
//! keep coming (the last one is always rung), so a busy queue cannot spin the loop.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Shortest time between two wake-ups from one list.
pub const MIN_GAP: Duration = Duration::from_millis(50);

/// Longest wait before subscribing again after the server went away.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The channel Redis publishes `key`'s keyspace notifications on, in `client`'s database.
pub fn channel(client: &redis::Client, key: &str) -> String {
    let db = client.get_connection_info().redis_settings().db();
    format!("__keyspace@{db}__:{key}")
}

/// Whether the server publishes list keyspace notifications: `Ok(None)` if it does,
/// `Ok(Some(what to do))` if not, `Err` if it cannot tell (`CONFIG` renamed or refused, as on
/// some managed Redis).
pub async fn notifications_off(
    client: &redis::Client,
    url: &str,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let query = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async::<Vec<String>>(&mut c)
            .await
    };
    let answer = tokio::time::timeout(timeout, query)
        .await
        .map_err(|_| format!("CONFIG GET at {url} timed out"))?
        .map_err(|e| format!("CONFIG GET at {url}: {e}"))?;
    let flags = answer.get(1).cloned().unwrap_or_default();
    let keyspace = flags.contains('K');
    let lists = flags.contains('l') || flags.contains('A');
    Ok((!(keyspace && lists)).then(|| {
        let mut want = flags.clone();
        if !keyspace {
            want.push('K');
        }
        if !lists {
            want.push('l');
        }
        format!(
            "keyspace notifications for lists are off on Redis at {url} \
             (notify-keyspace-events = {flags:?}): the list is read at each tick only; to wake \
             at once when it changes, run CONFIG SET notify-keyspace-events {want} there (or set \
             it in redis.conf)"
        )
    }))
}

/// Follows `channel` on the server of `client` until the task is aborted, ringing `waker` on
/// changes (see the module's documentation for the pace). Subscribes again after an error,
/// with a backoff from 0.5 s to 30 s; rings once after each subscription (the list may have
/// changed while it was away).
pub async fn follow(
    client: redis::Client,
    channel: String,
    url: String,
    timeout: Duration,
    waker: Arc<Notify>,
) {
    let mut backoff = Duration::from_millis(500);
    let mut told = false;
    loop {
        let subscribed = tokio::time::timeout(timeout, async {
            let mut p = client.get_async_pubsub().await?;
            p.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(p)
        })
        .await;
        match subscribed {
            Ok(Ok(pubsub)) => {
                if !told {
                    told = true;
                    match notifications_off(&client, &url, timeout).await {
                        Ok(None) => {
                            tracing::info!(%channel, redis = %url, "waking the loop on the list's keyspace notifications")
                        }
                        Ok(Some(what)) => tracing::info!("{what}"),
                        Err(e) => {
                            tracing::info!(%channel, "cannot tell whether Redis publishes keyspace notifications ({e}); subscribed anyway, the list is also read at each tick")
                        }
                    }
                }
                backoff = Duration::from_millis(500);
                waker.notify_one();
                ring_paced(pubsub.into_on_message(), &waker).await;
                tracing::debug!(%channel, "keyspace subscription ended; subscribing again");
            }
            Ok(Err(e)) => {
                tracing::debug!(%channel, retry_in = ?backoff, "cannot subscribe to keyspace notifications at {url}: {e}")
            }
            Err(_) => {
                tracing::debug!(%channel, retry_in = ?backoff, "subscribing to keyspace notifications at {url} timed out")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Rings `waker` for the messages of `stream` until it ends: at once after a quiet
/// [`MIN_GAP`], else at the end of the current gap.
async fn ring_paced<S: futures::Stream + Unpin>(mut stream: S, waker: &Notify) {
    let mut last = Instant::now() - MIN_GAP;
    let mut owed = false;
    loop {
        tokio::select! {
            m = stream.next() => {
                if m.is_none() {
                    break;
                }
                if last.elapsed() >= MIN_GAP {
                    waker.notify_one();
                    last = Instant::now();
                } else {
                    owed = true;
                }
            }
            _ = tokio::time::sleep_until(last + MIN_GAP), if owed => {
                waker.notify_one();
                last = Instant::now();
                owed = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of changes rings once at once and once more at the end of the gap, not once
    /// per change; a change after a quiet gap rings at once again.
    #[tokio::test(start_paused = true)]
    async fn a_burst_rings_at_a_bounded_pace_and_the_last_change_is_rung() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
        let waker = Arc::new(Notify::new());
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
        let pacer = tokio::spawn({
            let waker = waker.clone();
            async move { ring_paced(rx, &waker).await }
        });
        let count = || rings.load(std::sync::atomic::Ordering::SeqCst);
        tokio::task::yield_now().await;
        for _ in 0..1000 {
            tx.unbounded_send(()).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(count(), 1, "the first change rings at once");
        tokio::time::sleep(MIN_GAP).await;
        assert_eq!(
            count(),
            2,
            "the rest of the burst rings once at the end of the gap"
        );
        tokio::time::sleep(MIN_GAP * 4).await;
        assert_eq!(count(), 2, "nothing owed, nothing rung");
        tx.unbounded_send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(count(), 3, "after a quiet gap a change rings at once");
        drop(tx);
        pacer.await.unwrap();
        counter.abort();
    }
}
