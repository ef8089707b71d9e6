//! A TCP front for a Unix socket (the Docker engine's), whose connections a test can cut and
//! whose door it can close: what a client following the engine's event stream sees when the
//! stream drops (cut) or when the engine is away for a while and comes back (down, then up).
//! The engine behind it keeps running, so the other tests sharing it are not disturbed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Shared {
    connections: Mutex<Vec<JoinHandle<()>>>,
    down: AtomicBool,
    accepted: AtomicU64,
}

/// Listening on 127.0.0.1 until dropped.
pub struct SocketProxy {
    address: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for SocketProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

impl SocketProxy {
    /// Starts on a free port of 127.0.0.1, forwarding every connection to the Unix socket at
    /// `path`, byte for byte.
    pub async fn start(path: &str) -> SocketProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the socket proxy");
        let address = format!("tcp://{}", listener.local_addr().expect("its address"));
        let shared = Arc::new(Shared::default());
        let path = path.to_string();
        let task = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if shared.down.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                    let path = path.clone();
                    let conn = tokio::spawn(async move {
                        if let Ok(mut upstream) = UnixStream::connect(&path).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                    });
                    let mut conns = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
                    conns.retain(|c| !c.is_finished());
                    conns.push(conn);
                }
            }
        });
        SocketProxy {
            address,
            shared,
            task,
        }
    }

    /// The address for a Docker client: `tcp://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// Closes every connection open now (a stream being followed ends abruptly).
    pub fn cut(&self) {
        for c in self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }

    /// Down: every open connection is cut and new ones are closed as soon as accepted, until
    /// [`SocketProxy::set_down`]`(false)`.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}
