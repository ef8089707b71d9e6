//! microscaler's HTTP server: the JSON API under `/api/v1`, the live dashboard, Prometheus
//! metrics at `/metrics` and the decision history in SQLite.
//!
//! The control loop hands every tick to a [`Hub`] ([`Hub::record`]); the hub updates the
//! metrics, queues the tick for the history store and pushes it to every open live stream.
//! Requests that change something go through the [`Control`] trait, which the binary implements
//! on top of the loop's thread-safe handles.
//!
//! Security: mutating routes need `Authorization: Bearer <token>` (the scheme in any case),
//! and are refused (403) when the server has no token. Read-only routes answer without a token
//! only loopback clients whose `Host` is a loopback name or one of
//! [`ServerOptions::allowed_hosts`] (against DNS rebinding), unless [`ServerOptions::open_read`]
//! is set. No CORS headers are sent, so other origins' pages cannot read the API. Request bodies
//! are limited to [`BODY_LIMIT`] bytes; a request's head and body must arrive within
//! [`ServerOptions::read_timeout`] (slowloris). Every error, the HTTP layer's own included
//! (400, 414, 431), is `{"error": message}` with the security headers.
#![deny(missing_docs)]

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub mod api;
mod conn;
pub mod metrics;
pub mod model;
pub mod store;

pub use api::{router, routes, Access, BODY_LIMIT};
pub use model::{Setup, Tick, TickError, TickParts};
pub use store::{Store, StoreError};

use tokio::sync::{broadcast, watch};

/// The live settings of a random trigger.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RandomState {
    /// Largest move per interval.
    pub delta: u32,
    /// Time between moves, in milliseconds.
    pub interval_ms: u64,
}

/// What the API may change in the running control loop. Every method takes effect at the next
/// tick. Implementations must be cheap and never block on I/O.
pub trait Control: Send + Sync + 'static {
    /// The value of `service`'s manual trigger, `None` if it has none.
    fn manual(&self, service: &str) -> Option<f64>;
    /// Sets `service`'s manual trigger (callers have checked it exists and `value` is valid);
    /// it overrides the service's random walk, if it has one, until cleared.
    fn set_manual(&self, service: &str, value: f64) -> Result<(), String>;
    /// Clears an operator's demand: the random walk walks on, the manual trigger is back to 0.
    fn clear_manual(&self, service: &str) -> Result<(), String>;
    /// Whether an operator's demand overrides `service`'s random walk.
    fn overriding(&self, service: &str) -> bool;
    /// The settings of `service`'s random trigger, `None` if it has none.
    fn random(&self, service: &str) -> Option<RandomState>;
    /// Changes `service`'s random trigger.
    fn set_random(&self, service: &str, settings: RandomState) -> Result<(), String>;
    /// Whether an operator paused `service`.
    fn paused(&self, service: &str) -> bool;
    /// Pauses or resumes `service`.
    fn set_paused(&self, service: &str, paused: bool);
    /// Whether `service` has a push trigger called `trigger`: `None` if not, else its own
    /// token (`None` inside: only the operator's token may push to it). Default: no push
    /// triggers.
    fn push_trigger(&self, service: &str, trigger: &str) -> Option<Option<String>> {
        let _ = (service, trigger);
        None
    }
    /// Pushes `value` into `service`'s push trigger `trigger` (callers have checked that it
    /// exists and that `value` is valid). Default: no push triggers.
    fn push(&self, service: &str, trigger: &str, value: f64) -> Result<(), String> {
        let _ = (service, trigger, value);
        Err("no push trigger".into())
    }
}

/// How the server guards its routes and its connections.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Bearer token for mutating routes (and for read-only routes from non-loopback clients).
    /// `None`: mutating routes are refused.
    pub token: Option<String>,
    /// Let any client read without a token (default: only loopback clients).
    pub open_read: bool,
    /// Host names (without port) that token-less reads may name in their `Host` besides the
    /// loopback ones (`localhost`, `127.0.0.1`, `[::1]`), e.g. the name a reverse proxy on the
    /// same machine forwards. Any other `Host` needs the token, so that a page whose name
    /// was rebound to 127.0.0.1 (DNS rebinding) cannot read the state.
    pub allowed_hosts: Vec<String>,
    /// How long a client has to send a request's head (and, between requests, how long an
    /// idle connection stays open), and then its body. Default [`READ_TIMEOUT`].
    pub read_timeout: Duration,
}

/// The default [`ServerOptions::read_timeout`].
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            token: None,
            open_read: false,
            allowed_hosts: Vec::new(),
            read_timeout: READ_TIMEOUT,
        }
    }
}

/// The shared state of the server: what the loop recorded, and how to reach the loop.
pub struct Hub {
    setup: RwLock<Arc<Setup>>,
    options: ServerOptions,
    control: Arc<dyn Control>,
    store: Store,
    latest: RwLock<Option<Arc<Tick>>>,
    metrics: Mutex<metrics::Metrics>,
    live: broadcast::Sender<Arc<str>>,
    closing: watch::Sender<bool>,
    started: std::time::Instant,
}

impl Hub {
    /// A hub for `setup`, changing the loop through `control`, keeping history in `store`.
    pub fn new(
        setup: Setup,
        options: ServerOptions,
        control: Arc<dyn Control>,
        store: Store,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            setup: RwLock::new(Arc::new(setup)),
            options,
            control,
            store,
            latest: RwLock::new(None),
            metrics: Mutex::new(metrics::Metrics::default()),
            live: broadcast::channel(64).0,
            closing: watch::channel(false).0,
            started: std::time::Instant::now(),
        })
    }

    /// Records one tick: metrics, history, live streams. Never blocks on I/O.
    pub fn record(&self, tick: Tick) {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(&tick);
        self.store.record(&tick);
        let json: Arc<str> = serde_json::to_string(&tick).unwrap_or_default().into();
        *self.latest.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(tick));
        let _ = self.live.send(json);
    }

    /// The setup.
    pub fn setup(&self) -> Arc<Setup> {
        self.setup.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the setup (the configuration was reloaded): the API and the dashboard show
    /// the new services from the next request on.
    pub fn set_setup(&self, setup: Setup) {
        *self.setup.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(setup);
    }

    /// The history store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The latest tick.
    pub fn latest(&self) -> Option<Arc<Tick>> {
        self.latest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ends the live streams (so a graceful shutdown does not wait for them) and flushes the
    /// history.
    pub fn close(&self) {
        let _ = self.closing.send(true);
        self.store.close();
    }
}

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Serves `hub` on `listener` until `shutdown` resolves, then waits for the connections to
/// end (live streams end with [`Hub::close`]). Each connection has
/// [`ServerOptions::read_timeout`] to send a request's head, and then its body; an idle one is
/// closed after it too.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Arc<Hub>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(hub.clone());
    let mut closing = hub.closing.subscribe();
    let timeout = hub.options.read_timeout;
    conn::serve(listener, app, timeout, async move {
        tokio::select! {
            _ = shutdown => {},
            _ = closing.wait_for(|c| *c) => {},
        }
        // Leave a moment for responses in flight.
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await
}
