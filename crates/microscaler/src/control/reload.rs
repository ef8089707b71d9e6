//! Reloading the configuration while the loop runs (`SIGHUP`).
//!
//! A reload is all or nothing. The new configuration must keep what cannot change under a
//! running loop: the instance, the backend, the HTTP server and `[ha]`, and for each service
//! that stays, what its replicas run (`image`, `command`, `env`, or the reference) and their
//! `resources` (replicas that run cannot be changed in place). Anything else may change:
//! services added, removed or edited (priority, min, max, triggers, rules, pool), the
//! capacity, the tick and the timeouts. The new triggers' start-up checks and the backend's
//! `prepare` run first; if one fails, nothing changes and the old configuration goes on.
//!
//! What is kept: a service whose settings did not change keeps its live sources (a random
//! walk goes on from where it is, a manual demand stays), its engine memory (windows, rate
//! limits), its pause and its backoff. An edited service keeps its current target and its
//! pause, and gets new sources (its manual demand carried over when the trigger keeps its
//! name) and a fresh rule memory. A removed service that microscaler created is scaled to 0
//! (its replicas are ours and hold capacity) and what the orchestrator kept of it is removed
//! at shutdown with `on_exit = "stop"`; a removed reference is left at its count.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use microscaler_backends::{Backend, Config, Service};
use microscaler_core::ServiceKind;

use super::{check_sources, live_triggers, Controller, Controls, LiveTrigger, PrepareError};
use crate::repeat::Repeats;

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Services new in the file.
    pub added: Vec<String>,
    /// Services no longer in the file.
    pub removed: Vec<String>,
    /// Services whose settings changed.
    pub changed: Vec<String>,
    /// Services left exactly as they were.
    pub unchanged: usize,
    /// Top-level settings that changed (`tick`, `capacity`, ...).
    pub settings: Vec<&'static str>,
}

impl Reloaded {
    /// Whether the new configuration is the running one.
    pub fn is_noop(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.settings.is_empty()
    }
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_noop() {
            return write!(f, "nothing changed");
        }
        let mut parts = Vec::new();
        for (what, list) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("changed", &self.changed),
        ] {
            if !list.is_empty() {
                parts.push(format!("{what} {}", list.join(", ")));
            }
        }
        if !self.settings.is_empty() {
            parts.push(format!("settings {}", self.settings.join(", ")));
        }
        parts.push(format!("{} unchanged", self.unchanged));
        write!(f, "{}", parts.join("; "))
    }
}

/// Why a reload was refused. The running configuration goes on.
#[derive(Debug)]
pub enum ReloadError {
    /// What cannot change while microscaler runs, one entry per key, each with its path.
    Refused(Vec<String>),
    /// A new trigger's start-up check or the backend's `prepare` failed.
    Prepare(PrepareError),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Refused(why) => {
                write!(f, "cannot be changed without a restart:")?;
                for w in why {
                    write!(f, "\n  {w}")?;
                }
                Ok(())
            }
            ReloadError::Prepare(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ReloadError {}

/// What in `new` cannot replace `old` in a running loop, each with its path.
pub fn refusals(old: &Config, new: &Config) -> Vec<String> {
    let mut why = Vec::new();
    let restart = "restart microscaler to change it";
    if new.instance != old.instance {
        why.push(format!(
            "instance: {:?} -> {:?}: the instance names the replicas microscaler owns; {restart}",
            old.instance, new.instance
        ));
    }
    if new.backend != old.backend {
        why.push(format!("backend: changed; {restart}"));
    }
    if new.server != old.server {
        why.push(format!(
            "server: changed (the HTTP server is bound at start); {restart}"
        ));
    }
    if new.ha != old.ha {
        why.push(format!("ha: changed; {restart}"));
    }
    for (i, s) in new.services.iter().enumerate() {
        let Some(o) = old.service(s.name.as_str()) else {
            continue;
        };
        let path = format!("services[{i}] ({})", s.name);
        if s.workload != o.workload {
            why.push(format!(
                "{path}: what its replicas run changed, and running replicas cannot be changed \
                 in place: give the service a new name (its replicas are then replaced) or \
                 restart microscaler"
            ));
        }
        if s.resources != o.resources {
            why.push(format!(
                "{path}.resources: changed, and running replicas keep the resources they were \
                 started with: give the service a new name (its replicas are then replaced)"
            ));
        }
    }
    why
}

/// The top-level settings that differ.
fn changed_settings(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.tick != new.tick {
        out.push("tick");
    }
    if old.sample_timeout != new.sample_timeout {
        out.push("sample_timeout");
    }
    if old.converge_timeout != new.converge_timeout {
        out.push("converge_timeout");
    }
    if old.on_exit != new.on_exit {
        out.push("on_exit");
    }
    if old.capacity != new.capacity {
        out.push("capacity");
    }
    out
}

impl<B: Backend + 'static> Controller<B> {
    /// Replaces the configuration with `new` (see the module's documentation): all of it or,
    /// on an error, none of it. Changes still running go on and are recorded as usual. Wakes
    /// the loop, so the next tick acts on the new configuration at once.
    pub async fn reload(&mut self, mut new: Config) -> Result<Reloaded, ReloadError> {
        new.share_trigger_names();
        let old = Arc::clone(&self.cfg);
        let refused = refusals(&old, &new);
        if !refused.is_empty() {
            return Err(ReloadError::Refused(refused));
        }
        let same = |s: &Service| {
            old.service(s.name.as_str())
                .is_some_and(|o| o == s && old.scaling_of(&s.name) == new.scaling_of(&s.name))
        };
        let mut summary = Reloaded {
            settings: changed_settings(&old, &new),
            ..Reloaded::default()
        };
        for s in &new.services {
            if old.service(s.name.as_str()).is_none() {
                summary.added.push(s.name.to_string());
            } else if same(s) {
                summary.unchanged += 1;
            } else {
                summary.changed.push(s.name.to_string());
            }
        }
        let removed: Vec<Service> = old
            .services
            .iter()
            .filter(|o| new.service(o.name.as_str()).is_none())
            .cloned()
            .collect();
        summary.removed = removed.iter().map(|s| s.name.to_string()).collect();

        // The new and edited services' sources, checked as at start.
        let mut fresh_controls = Controls {
            wake: Arc::clone(&self.controls.wake),
            paused: Arc::clone(&self.controls.paused),
            ..Controls::default()
        };
        let mut fresh: HashMap<_, Vec<LiveTrigger>> = new
            .services
            .iter()
            .filter(|s| !same(s))
            .map(|s| {
                let live = live_triggers(&new, s, self.clock_seed, &mut fresh_controls);
                (s.name.clone(), live)
            })
            .collect();
        check_sources(fresh.iter_mut(), "reloading")
            .await
            .map_err(ReloadError::Prepare)?;
        if !summary.added.is_empty() || !summary.changed.is_empty() || !removed.is_empty() {
            if let Err(e) = self.prepare_backend(&new.services).await {
                // What the backend took of the new services is put back (best effort).
                if let Err(again) = self.prepare_backend(&old.services).await {
                    tracing::warn!(error = %again, "re-preparing the running configuration after the failed reload failed too");
                }
                return Err(ReloadError::Prepare(PrepareError::Backend(e)));
            }
        }

        // Nothing can fail from here on.
        let mut kept: HashMap<_, Vec<LiveTrigger>> =
            std::mem::take(&mut self.triggers).into_iter().collect();
        self.triggers = new
            .services
            .iter()
            .map(|s| {
                let live = if same(s) {
                    let mut live = kept.remove(&s.name).unwrap_or_default();
                    // The new configuration's names, which the engine matches by pointer.
                    if let ServiceKind::Triggered(ts) = &s.kind {
                        for (l, t) in live.iter_mut().zip(ts) {
                            if l.name == t.name {
                                l.name = Arc::clone(&t.name);
                            }
                        }
                    }
                    live
                } else {
                    fresh.remove(&s.name).unwrap_or_default()
                };
                (s.name.clone(), live)
            })
            .collect();
        // Handles: the unchanged services' stay; an edited service's manual demand carries
        // over to its trigger of the same name.
        let unchanged: BTreeSet<&str> = new
            .services
            .iter()
            .filter(|s| same(s))
            .map(|s| s.name.as_str())
            .collect();
        for (key, h) in &fresh_controls.manual {
            if let Some(before) = self.controls.manual.get(key) {
                let value = before.get();
                if value != 0.0 {
                    if let Err(e) = h.set(value) {
                        tracing::debug!(service = %key.0, trigger = %key.1, "manual demand not carried over: {e}");
                    }
                }
            }
        }
        self.controls
            .manual
            .retain(|(s, _), _| unchanged.contains(s.as_str()));
        self.controls
            .random
            .retain(|(s, _), _| unchanged.contains(s.as_str()));
        self.controls
            .push
            .retain(|(s, _), _| unchanged.contains(s.as_str()));
        self.controls.manual.append(&mut fresh_controls.manual);
        self.controls.random.append(&mut fresh_controls.random);
        self.controls.push.append(&mut fresh_controls.push);

        let names: BTreeSet<_> = new.services.iter().map(|s| s.name.clone()).collect();
        let edited: BTreeSet<_> = new
            .services
            .iter()
            .filter(|s| !same(s))
            .map(|s| s.name.clone())
            .collect();
        self.controls
            .paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| names.contains(s));
        self.memory.retain_commitments(|s| names.contains(s));
        self.memory.paused.retain(|s| names.contains(s));
        self.memory.paused_replicas.retain(|s, _| names.contains(s));
        self.memory
            .rules
            .retain(|s, _| names.contains(s) && !edited.contains(s));
        self.backoff.retain(|s, _| names.contains(s));
        self.written.retain(|s, _| names.contains(s));
        self.external.retain(|s, _| names.contains(s));
        // Failing triggers are keyed by their service's position, which may have moved.
        self.repeats = Repeats::default();
        self.index = new
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        self.cfg = Arc::new(new);
        self.retire(removed);
        self.controls.wake.notify_one();
        Ok(summary)
    }

    /// `prepare` (or its dry run) of the backend for `services`.
    async fn prepare_backend(
        &self,
        services: &[Service],
    ) -> Result<(), microscaler_backends::BackendError> {
        if self.dry_run {
            self.backend.prepare_dry_run(services).await
        } else {
            self.backend.prepare(services).await
        }
    }

    /// Services a reload removed: those microscaler created are scaled to 0 in the
    /// background (a leader's job; a follower or a dry run leaves them) and kept for the
    /// shutdown, which removes what the orchestrator keeps of them with `on_exit = "stop"`.
    fn retire(&mut self, removed: Vec<Service>) {
        for svc in removed {
            if svc.workload.reference().is_some() {
                tracing::info!(service = %svc.name, "removed from the configuration: no longer scaled; the orchestrator's object is left at its count");
                continue;
            }
            if self.may_act() {
                let backend = Arc::clone(&self.backend);
                let s = svc.clone();
                tokio::spawn(async move {
                    match backend.scale(&s, 0).await {
                        Ok(o) => {
                            tracing::info!(service = %s.name, stopped = o.stopped, "removed from the configuration: its replicas are stopped")
                        }
                        Err(e) => {
                            tracing::error!(service = %s.name, "removed from the configuration, but stopping its replicas failed: {e}")
                        }
                    }
                });
            } else {
                tracing::info!(service = %svc.name, "removed from the configuration; not acting, so its replicas are left to the leader");
            }
            self.retired.retain(|r| r.name != svc.name);
            self.retired.push(svc);
        }
        // A service added back is no longer retired.
        let cfg = Arc::clone(&self.cfg);
        self.retired
            .retain(|r| cfg.service(r.name.as_str()).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &str) -> Config {
        Config::from_toml(&format!(
            "instance = \"reload-test\"\ntick = \"100ms\"\n[capacity]\nslots = 10\n\
             [backend]\ntype = \"process\"\n{services}"
        ))
        .unwrap()
    }

    /// The service `web`, with `extra` keys.
    fn web(extra: &str) -> String {
        format!(
            "[[services]]\nname = \"web\"\npriority = 1\nmax = 5\n{extra}\n\
             [[services.triggers]]\ntype = \"manual\"\n"
        )
    }

    #[test]
    fn instance_backend_server_and_workloads_are_refused_with_their_paths() {
        let old = config(&web(""));
        let mut new = old.clone();
        new.instance = "other".into();
        new.server.open_read = true;
        let why = refusals(&old, &new);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].starts_with("instance: \"reload-test\" -> \"other\""));
        assert!(why[1].starts_with("server: changed"));

        let resized = config(&web("resources = { cpu = \"1\", memory = \"1Gi\" }"));
        let why = refusals(&old, &resized);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(
            why[0].starts_with("services[0] (web).resources: changed"),
            "{why:?}"
        );

        let rerun = config(&web("command = [\"/bin/sleep\", \"100\"]"));
        let why = refusals(&old, &rerun);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("services[0] (web): what its replicas run changed"));

        // Everything else may change.
        let edited = config(
            "[[services]]\nname = \"web\"\npriority = 2\nmax = 7\n\
             [[services.triggers]]\ntype = \"manual\"\n\
             [[services]]\nname = \"batch\"\npriority = 3\nremainder = true\n",
        );
        assert!(refusals(&old, &edited).is_empty());
        let mut faster = old.clone();
        faster.tick = std::time::Duration::from_millis(200);
        assert!(refusals(&old, &faster).is_empty());
        assert_eq!(changed_settings(&old, &faster), vec!["tick"]);
    }

    #[test]
    fn the_summary_reads_as_a_sentence() {
        let r = Reloaded {
            added: vec!["batch".into()],
            removed: vec!["old".into()],
            changed: vec!["web".into()],
            unchanged: 2,
            settings: vec!["tick"],
        };
        assert_eq!(
            r.to_string(),
            "added batch; removed old; changed web; settings tick; 2 unchanged"
        );
        assert_eq!(Reloaded::default().to_string(), "nothing changed");
    }
}
