//! The docker backend's view of its containers, kept from the engine's event stream, so that a
//! tick asks the engine nothing at steady state.
//!
//! A task follows `GET /events` filtered on this instance's label (`type=container`) and applies
//! each event of one of our containers to a map of them: `create` adds it (created), `start`,
//! `restart` and `unpause` make it running, `pause` paused, `die` exited, `destroy` removes it,
//! `rename` renames it; other actions change nothing. `observe`, `scale` and the pool's refill
//! read the map ([`Watch::containers`]) instead of listing.
//!
//! **Resynchronising.** The task lists our containers when it subscribes (at start and after any
//! error or end of the stream) and every [`RESYNC_EVERY`] as a slow safety net. A resync is exact
//! without stopping the stream: the subscription starts [`SINCE_MARGIN`] before the engine's
//! clock said now (`since`: the engine replays what it published since), the listing is asked
//! after that, and events applied while the listing is in flight are applied again on top of it.
//! Every event names the state it leaves its container in, so events applied in order over any
//! listing asked after `since` give the engine's state. Until the first resync completes, and
//! from a stream error until the next one does, the view is not synced and the backend lists as
//! it did before (one listing per observe).
//!
//! **Our own changes.** The engine publishes a change's event before it answers the call, but
//! the task may apply it a moment after the call returned: a tick in that moment would see the
//! old state (a replica just unpaused still paused, one just removed still there). So before a
//! call that changes a container (start, unpause, pause, remove) the backend registers what it
//! expects ([`Watch::expect`]); once the call succeeded ([`Expecting::done`]) the container
//! counts in the state the call left it in until the engine's own event for that action is
//! applied. It is registered before the call, so the event cannot be applied before it. A failed
//! or abandoned call forgets it. One whose event never comes (a stream that dropped it) is
//! dropped by the next resync, whose listing shows the truth, or after [`EXPECT_MAX_AGE`].
//!
//! **Waking the loop.** A replica that exits or is removed with no change of ours expected (`die`
//! or `destroy` of a container we are not removing: killed, crashed, removed by hand) rings the
//! control loop's waker, so it is replaced at once rather than at the next tick.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::models::{ContainerSummaryStateEnum as State, EventMessage};
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures::StreamExt;
use microscaler_core::ServiceName;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{engine_message, list_ours, lock, owner, Cache, Owned};
use crate::labels;

/// How often the view is checked against a fresh listing while the stream is healthy.
pub(super) const RESYNC_EVERY: Duration = Duration::from_secs(60);

/// How far before the engine's "now" a subscription starts: the engine replays what it
/// published since, which covers the moment between the subscription and its listing.
const SINCE_MARGIN: Duration = Duration::from_secs(1);

/// How long a change of ours whose event has not come is trusted over the view.
const EXPECT_MAX_AGE: Duration = Duration::from_secs(30);

/// The first wait before subscribing again after the stream failed or ended; it doubles up to
/// [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(200);
const MAX_WAIT: Duration = Duration::from_secs(30);

/// A change of ours whose event the view waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Action {
    Start,
    Unpause,
    Pause,
    Destroy,
}

impl Action {
    /// The engine's event action that confirms it.
    fn of_event(action: &str) -> Option<Action> {
        Some(match action {
            "start" => Action::Start,
            "unpause" => Action::Unpause,
            "pause" => Action::Pause,
            "destroy" => Action::Destroy,
            _ => return None,
        })
    }
}

/// What a change of ours left a container as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    State(State),
    Gone,
}

/// A registered change of ours.
struct Expected {
    /// Registration order: the latest change's effect wins.
    seq: u64,
    /// The container as the backend knows it, for one the view has not seen yet (created a
    /// moment ago).
    template: Owned,
    /// Set when the call succeeded: what the container is until the event comes, and when.
    effect: Option<(Effect, Instant)>,
}

/// A container event of ours, as applied to the view.
#[derive(Debug, Clone)]
struct Change {
    id: String,
    kind: Kind,
    service: ServiceName,
    name: String,
    /// The event's time, seconds (a container created by it gets it as its creation time).
    time: i64,
    /// The action of ours this event confirms.
    confirms: Option<Action>,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    State(State),
    Destroyed,
    Renamed(String),
}

/// The view proper.
#[derive(Default)]
struct View {
    /// A listing has been applied and the stream has not failed since.
    synced: bool,
    /// Our containers, by id.
    containers: HashMap<String, Owned>,
    /// Changes of ours waiting for their event, by container id and action.
    expected: HashMap<(String, Action), Expected>,
    seq: u64,
    /// While a resync's listing is in flight: the events applied meanwhile, applied again on
    /// top of it.
    replay: Option<Vec<Change>>,
}

/// How the view has fared, for tests, the bench and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Whether `observe` reads the view now (else it lists).
    pub synced: bool,
    /// Container events of ours applied.
    pub events: u64,
    /// Listings taken to resynchronise (each also counts in the backend's `listings`).
    pub resyncs: u64,
    /// Containers a safety-net resync found different from the view (missed events).
    pub corrected: u64,
    /// Times the stream failed or ended.
    pub stream_failures: u64,
}

/// What the backend and its following task share.
#[derive(Default)]
struct Shared {
    view: Mutex<View>,
    waker: Mutex<Option<Arc<Notify>>>,
    events: AtomicU64,
    resyncs: AtomicU64,
    corrected: AtomicU64,
    stream_failures: AtomicU64,
}

/// The view and the task that keeps it. The task ends when the last clone of the backend is
/// dropped.
pub(super) struct Watch {
    shared: Arc<Shared>,
    /// `[backend] events = false` turns the view off: every observe lists.
    enabled: bool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

/// What the following task needs of the backend.
pub(super) struct Engine {
    pub docker: Docker,
    pub address: String,
    pub instance: String,
    pub cache: Arc<Cache>,
}

impl Watch {
    pub(super) fn new(enabled: bool) -> Watch {
        Watch {
            shared: Arc::default(),
            enabled,
            task: Mutex::new(None),
        }
    }

    /// Starts following the engine's events unless already following, turned off or outside a
    /// runtime. Cheap; called by every observe.
    pub(super) fn start(&self, engine: impl FnOnce() -> Engine) {
        if !self.enabled {
            return;
        }
        let mut task = lock(&self.task);
        if task.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = engine();
        debug!(engine = %engine.address, instance = %engine.instance, "following the engine's container events");
        *task = Some(runtime.spawn(follow(Arc::clone(&self.shared), engine)));
    }

    /// The control loop's waker, rung when a replica exits or goes with no change of ours.
    pub(super) fn set_waker(&self, waker: Arc<Notify>) {
        *lock(&self.shared.waker) = Some(waker);
    }

    pub(super) fn stats(&self) -> WatchStats {
        let s = &self.shared;
        WatchStats {
            synced: lock(&s.view).synced,
            events: s.events.load(Ordering::Relaxed),
            resyncs: s.resyncs.load(Ordering::Relaxed),
            corrected: s.corrected.load(Ordering::Relaxed),
            stream_failures: s.stream_failures.load(Ordering::Relaxed),
        }
    }

    /// Our containers (of `service`, or all), each in the state our latest unconfirmed change
    /// left it in, else as the events say; `None` while the view is not synced.
    pub(super) fn containers(&self, service: Option<&ServiceName>) -> Option<Vec<Owned>> {
        let mut v = lock(&self.shared.view);
        if !v.synced {
            return None;
        }
        let now = Instant::now();
        v.expected.retain(|_, e| {
            e.effect
                .is_none_or(|(_, at)| now.duration_since(at) < EXPECT_MAX_AGE)
        });
        let mut effects: HashMap<&str, (u64, Effect, &Owned)> = HashMap::new();
        for ((id, _), e) in &v.expected {
            let Some((effect, _)) = e.effect else {
                continue;
            };
            let latest = effects
                .get(id.as_str())
                .is_none_or(|(seq, ..)| *seq < e.seq);
            if latest {
                effects.insert(id, (e.seq, effect, &e.template));
            }
        }
        let wanted = |c: &Owned| service.is_none_or(|s| &c.service == s);
        let mut out: Vec<Owned> = Vec::new();
        for c in v.containers.values().filter(|c| wanted(c)) {
            match effects.get(&*c.id) {
                Some((_, Effect::Gone, _)) => {}
                Some((_, Effect::State(s), _)) => out.push(Owned {
                    state: *s,
                    ..c.clone()
                }),
                None => out.push(c.clone()),
            }
        }
        for (id, (_, effect, template)) in &effects {
            if let Effect::State(s) = effect {
                if !v.containers.contains_key(*id) && wanted(template) {
                    out.push(Owned {
                        state: *s,
                        ..(*template).clone()
                    });
                }
            }
        }
        Some(out)
    }

    /// Registers a change of ours to `c` before the call that makes it: once the call succeeds
    /// ([`Expecting::done`]) the view trusts its effect until the engine's event for `action`.
    pub(super) fn expect(&self, c: &Owned, action: Action) -> Expecting {
        let mut v = lock(&self.shared.view);
        v.seq += 1;
        let seq = v.seq;
        v.expected.insert(
            (c.id.to_string(), action),
            Expected {
                seq,
                template: c.clone(),
                effect: None,
            },
        );
        Expecting {
            shared: Arc::clone(&self.shared),
            key: Some((c.id.to_string(), action)),
            seq,
        }
    }
}

/// A change of ours under way ([`Watch::expect`]); dropped without [`Expecting::done`] (the call
/// failed or was abandoned), it is forgotten.
pub(super) struct Expecting {
    shared: Arc<Shared>,
    key: Option<(String, Action)>,
    seq: u64,
}

impl Expecting {
    /// The call succeeded and left the container as `effect`.
    pub(super) fn done(mut self, effect: Effect) {
        if let Some(key) = self.key.take() {
            let mut v = lock(&self.shared.view);
            if let Some(e) = v.expected.get_mut(&key).filter(|e| e.seq == self.seq) {
                e.effect = Some((effect, Instant::now()));
            }
        }
    }
}

impl Drop for Expecting {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut v = lock(&self.shared.view);
            if v.expected.get(&key).is_some_and(|e| e.seq == self.seq) {
                v.expected.remove(&key);
            }
        }
    }
}

/// The change an event makes to one of our containers; `None` for other containers and for
/// actions that change no state we count.
fn change_of(instance: &str, e: &EventMessage) -> Option<Change> {
    let action = e.action.as_deref()?;
    let actor = e.actor.as_ref()?;
    let id = actor.id.clone()?;
    let attributes = actor.attributes.as_ref()?;
    let kind = match action {
        "create" => Kind::State(State::CREATED),
        "start" | "restart" | "unpause" => Kind::State(State::RUNNING),
        "pause" => Kind::State(State::PAUSED),
        "die" => Kind::State(State::EXITED),
        "destroy" => Kind::Destroyed,
        "rename" => Kind::Renamed(attributes.get("name")?.clone()),
        _ => return None,
    };
    let service = owner(instance, attributes)?;
    Some(Change {
        id,
        kind,
        service,
        name: attributes.get("name").cloned().unwrap_or_default(),
        time: e.time.unwrap_or(0),
        confirms: Action::of_event(action),
    })
}

/// Applies `c` to `containers`.
fn apply(containers: &mut HashMap<String, Owned>, c: &Change) {
    match &c.kind {
        Kind::State(state) => {
            containers
                .entry(c.id.clone())
                .and_modify(|o| o.state = *state)
                .or_insert_with(|| Owned {
                    id: c.id.as_str().into(),
                    name: c.name.as_str().into(),
                    service: c.service.clone(),
                    state: *state,
                    created: c.time,
                });
        }
        Kind::Destroyed => {
            containers.remove(&c.id);
        }
        Kind::Renamed(name) => {
            if let Some(o) = containers.get_mut(&c.id) {
                o.name = name.as_str().into();
            }
        }
    }
}

/// Applies an event's change to the view; returns whether it is one no change of ours explains
/// (a replica that exited or went behind our back).
fn record(shared: &Shared, c: Change) -> bool {
    let mut v = lock(&shared.view);
    apply(&mut v.containers, &c);
    if let Some(action) = c.confirms {
        v.expected.remove(&(c.id.clone(), action));
    }
    let removing = v.expected.contains_key(&(c.id.clone(), Action::Destroy));
    let unexplained = match c.kind {
        Kind::State(State::EXITED) => !removing,
        Kind::Destroyed => {
            v.expected.retain(|(id, _), _| id != &c.id);
            false
        }
        _ => false,
    };
    if let Some(replay) = v.replay.as_mut() {
        replay.push(c);
    }
    unexplained
}

/// Lists our containers and makes the view that listing plus the events applied while it was
/// in flight. Returns how many containers differed from the view before (0 on the first).
async fn resync(shared: Arc<Shared>, engine: Arc<Engine>) -> Result<u64, bollard::errors::Error> {
    lock(&shared.view).replay = Some(Vec::new());
    let asked = Instant::now();
    let listed = list_ours(&engine.docker, &engine.instance, None, &engine.cache).await;
    shared.resyncs.fetch_add(1, Ordering::Relaxed);
    let mut v = lock(&shared.view);
    let replay = v.replay.take().unwrap_or_default();
    let listed = listed?;
    let mut fresh: HashMap<String, Owned> =
        listed.into_iter().map(|c| (c.id.to_string(), c)).collect();
    for c in &replay {
        apply(&mut fresh, c);
    }
    let old = std::mem::replace(&mut v.containers, fresh);
    let differ = if v.synced {
        let mut n = 0u64;
        for (id, c) in &v.containers {
            if old.get(id).is_none_or(|o| o.state != c.state) {
                debug!(container = %c.name, state = %c.state, "the event view had missed a change");
                n += 1;
            }
        }
        n + old
            .keys()
            .filter(|id| !v.containers.contains_key(*id))
            .count() as u64
    } else {
        0
    };
    // Changes of ours done before the listing was asked are in it.
    v.expected
        .retain(|_, e| e.effect.is_none_or(|(_, at)| at > asked));
    v.synced = true;
    Ok(differ)
}

/// Now on the engine's clock, from its `SystemTime` (RFC 3339, UTC or with an offset), else
/// ours.
fn engine_now(system_time: Option<&str>) -> std::time::SystemTime {
    let ours = std::time::SystemTime::now();
    let Some(t) = system_time else {
        return ours;
    };
    // Go writes the engine's local offset: `...123Z` or `...123+01:00`.
    let (base, offset_secs) = match t.len().checked_sub(6).map(|i| t.split_at(i)) {
        Some((base, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.as_bytes()[3] == b':' =>
        {
            let h: i64 = off[1..3].parse().unwrap_or(0);
            let m: i64 = off[4..6].parse().unwrap_or(0);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{base}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (t.to_string(), 0),
    };
    match humantime::parse_rfc3339(&base) {
        Ok(local) => {
            let utc = if offset_secs >= 0 {
                local.checked_sub(Duration::from_secs(offset_secs as u64))
            } else {
                local.checked_add(Duration::from_secs(offset_secs.unsigned_abs()))
            };
            utc.unwrap_or(ours)
        }
        Err(e) => {
            debug!(system_time = t, error = %e, "cannot read the engine's clock; using ours");
            ours
        }
    }
}

/// `seconds.nanoseconds` since the epoch, as the engine's `since` takes it.
fn since_param(t: std::time::SystemTime) -> String {
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

type Resync = Pin<Box<dyn Future<Output = Result<u64, bollard::errors::Error>> + Send>>;

/// Subscribes, resynchronises and applies events until the stream fails; returns why.
async fn follow_once(shared: &Arc<Shared>, engine: &Arc<Engine>) -> String {
    let info = match engine.docker.info().await {
        Ok(info) => info,
        Err(e) => return engine_message(&e),
    };
    let since = engine_now(info.system_time.as_deref())
        .checked_sub(SINCE_MARGIN)
        .unwrap_or(std::time::UNIX_EPOCH);
    let filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        (
            "label".to_string(),
            vec![format!("{}={}", labels::INSTANCE, engine.instance)],
        ),
    ]);
    let mut stream = engine.docker.events(Some(EventsOptions {
        since: Some(since_param(since)),
        until: None,
        filters: Some(filters),
    }));
    let mut pending: Option<Resync> =
        Some(Box::pin(resync(Arc::clone(shared), Arc::clone(engine))));
    let mut safety =
        tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_EVERY, RESYNC_EVERY);
    safety.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(e)) => {
                    if let Some(c) = change_of(&engine.instance, &e) {
                        shared.events.fetch_add(1, Ordering::Relaxed);
                        let (id, action) = (c.id.clone(), e.action.clone().unwrap_or_default());
                        if record(shared, c) {
                            debug!(container = %id, action, "a replica went with no change of ours; waking the loop");
                            if let Some(w) = lock(&shared.waker).as_ref() {
                                w.notify_one();
                            }
                        }
                    }
                }
                Some(Err(e)) => return engine_message(&e),
                None => return "the engine ended the stream".to_string(),
            },
            r = async { match pending.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                pending = None;
                match r {
                    Ok(0) => {}
                    Ok(n) => {
                        shared.corrected.fetch_add(n, Ordering::Relaxed);
                        info!(engine = %engine.address, corrected = n,
                            "the container event view differed from a listing (events missed or \
                             still in flight); corrected");
                    }
                    Err(e) => return engine_message(&e),
                }
            }
            _ = safety.tick(), if pending.is_none() => {
                pending = Some(Box::pin(resync(Arc::clone(shared), Arc::clone(engine))));
            }
        }
    }
}

/// Follows the engine's container events until aborted, resubscribing with backoff after
/// failures (the first logged at WARN, the rest counted until the engine answers again).
async fn follow(shared: Arc<Shared>, engine: Engine) {
    let engine = Arc::new(engine);
    let mut wait = FIRST_WAIT;
    loop {
        let why = follow_once(&shared, &engine).await;
        lock(&shared.view).synced = false;
        let failures = shared.stream_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if wait == FIRST_WAIT {
            warn!(engine = %engine.address, error = %why, failures,
                "following the engine's container events failed; listing every tick until it \
                 is back (retrying with backoff)");
        } else {
            debug!(engine = %engine.address, error = %why, "container events: still failing");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_WAIT);
        if engine.docker.ping().await.is_ok() {
            wait = FIRST_WAIT;
            info!(engine = %engine.address, "following the engine's container events again");
            // What happened while away is seen by the resync; the loop looks at once.
            if let Some(w) = lock(&shared.waker).as_ref() {
                w.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_clock_is_read_in_utc() {
        let utc = engine_now(Some("2026-12-07T01:33:33.623740848Z"));
        let plus_one = engine_now(Some("2026-12-07T02:33:33.623740848+01:00"));
        let minus = engine_now(Some("2026-12-06T20:03:33.623740848-05:30"));
        assert_eq!(utc, plus_one);
        assert_eq!(utc, minus);
        assert_eq!(since_param(utc), "1796607213.623740848");
    }

    fn event(action: &str, id: &str, labels: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            action: Some(action.into()),
            actor: Some(bollard::models::EventActor {
                id: Some(id.into()),
                attributes: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            }),
            time: Some(100),
            ..Default::default()
        }
    }

    fn ours(action: &str, id: &str) -> Change {
        change_of(
            "i1",
            &event(
                action,
                id,
                &[
                    (labels::INSTANCE, "i1"),
                    (labels::SERVICE, "web"),
                    ("name", "ms-i1-web-1"),
                ],
            ),
        )
        .expect("ours")
    }

    #[test]
    fn only_our_containers_and_state_changes_count() {
        assert!(change_of(
            "i1",
            &event(
                "start",
                "a",
                &[(labels::INSTANCE, "i2"), (labels::SERVICE, "web")]
            )
        )
        .is_none());
        assert!(change_of("i1", &event("start", "a", &[(labels::INSTANCE, "i1")])).is_none());
        assert!(change_of(
            "i1",
            &event(
                "start",
                "a",
                &[
                    (labels::INSTANCE, "i1"),
                    (labels::SERVICE, "web"),
                    ("com.docker.swarm.task.id", "t")
                ]
            )
        )
        .is_none());
        for ignored in [
            "kill",
            "stop",
            "attach",
            "exec_start: sh",
            "health_status: healthy",
            "oom",
        ] {
            assert!(
                change_of(
                    "i1",
                    &event(
                        ignored,
                        "a",
                        &[(labels::INSTANCE, "i1"), (labels::SERVICE, "web")]
                    )
                )
                .is_none(),
                "{ignored}"
            );
        }
    }

    #[test]
    fn events_in_order_over_a_listing_give_the_state() {
        let mut m = HashMap::new();
        for (action, want) in [
            ("create", Some(State::CREATED)),
            ("start", Some(State::RUNNING)),
            ("pause", Some(State::PAUSED)),
            ("unpause", Some(State::RUNNING)),
            ("die", Some(State::EXITED)),
            ("restart", Some(State::RUNNING)),
            ("destroy", None),
        ] {
            apply(&mut m, &ours(action, "a"));
            assert_eq!(m.get("a").map(|o| o.state), want, "after {action}");
        }
        // A listing that already shows the end state, then events replayed from before it.
        let mut m = HashMap::new();
        apply(&mut m, &ours("create", "b"));
        apply(&mut m, &ours("pause", "b"));
        for action in ["start", "pause"] {
            apply(&mut m, &ours(action, "b"));
        }
        assert_eq!(m["b"].state, State::PAUSED);
    }

    #[test]
    fn a_change_of_ours_counts_until_its_event_then_the_event_does() {
        let watch = Watch::new(true);
        lock(&watch.shared.view).synced = true;
        record(&watch.shared, ours("create", "a"));
        record(&watch.shared, ours("start", "a"));
        let a = watch.containers(None).unwrap().pop().unwrap();
        assert_eq!(a.state, State::RUNNING);

        // Paused by us: paused at once, though the event has not come.
        let exp = watch.expect(&a, Action::Pause);
        assert_eq!(
            watch.containers(None).unwrap()[0].state,
            State::RUNNING,
            "not done yet"
        );
        exp.done(Effect::State(State::PAUSED));
        assert_eq!(watch.containers(None).unwrap()[0].state, State::PAUSED);
        // Its event confirms it; a later unpause by someone else is then seen.
        assert!(!record(&watch.shared, ours("pause", "a")));
        assert!(lock(&watch.shared.view).expected.is_empty());
        record(&watch.shared, ours("unpause", "a"));
        assert_eq!(watch.containers(None).unwrap()[0].state, State::RUNNING);

        // A failed call leaves nothing behind.
        drop(watch.expect(&a, Action::Pause));
        assert!(lock(&watch.shared.view).expected.is_empty());

        // Removed by us: gone at once; its die and destroy wake nothing.
        let exp = watch.expect(&a, Action::Destroy);
        assert!(!record(&watch.shared, ours("die", "a")), "a die we caused");
        exp.done(Effect::Gone);
        assert!(watch.containers(None).unwrap().is_empty());
        assert!(!record(&watch.shared, ours("destroy", "a")));
        assert!(watch.containers(None).unwrap().is_empty());
        assert!(lock(&watch.shared.view).expected.is_empty());

        // Started by us before the view saw its create: there, running, from what we know.
        let b = Owned {
            id: "b".into(),
            ..a.clone()
        };
        watch
            .expect(&b, Action::Start)
            .done(Effect::State(State::RUNNING));
        assert_eq!(watch.containers(None).unwrap()[0].state, State::RUNNING);
        record(&watch.shared, ours("create", "b"));
        assert_eq!(
            watch.containers(None).unwrap()[0].state,
            State::RUNNING,
            "create is older than our start"
        );
        record(&watch.shared, ours("start", "b"));
        // Killed behind our back: seen, and it wakes the loop.
        assert!(record(&watch.shared, ours("die", "b")));
        assert_eq!(watch.containers(None).unwrap()[0].state, State::EXITED);
    }

    #[test]
    fn an_unsynced_view_is_not_used() {
        let watch = Watch::new(true);
        assert!(watch.containers(None).is_none());
    }
}
