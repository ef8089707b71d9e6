//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! several microscalers of one instance share a Lease and only its holder acts.
//!
//! Every `retry_period` each candidate reads the Lease. Its holder writes `renewTime` again;
//! another candidate takes the Lease only when its record (holder, renew time, version) has not
//! changed for `lease_duration` as measured on its own monotonic clock (so clocks need not
//! agree), and every write carries the `resourceVersion` read, so two candidates can never both
//! win (the apiserver answers 409 to the second). A leader acts only while its last successful
//! renewal, counted from the moment it sent it, is younger than `renew_deadline`: a leader that
//! cannot reach the apiserver (or is frozen, then thawed) stops acting before anyone else may
//! take the Lease.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::kubernetes::LeaderElection;

/// What a candidate knows of the Lease.
#[derive(Default)]
struct State {
    /// When the last successful renewal (or acquisition) was sent.
    renewed: Option<Instant>,
    /// The other holder's record as last read, and when it was first seen so.
    observed: Option<(String, Instant)>,
    /// Whether the last round ended as leader (for the transitions' log lines).
    was_leader: bool,
}

/// One candidate of a Lease.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderElection,
    identity: String,
    state: Mutex<State>,
}

impl Elector {
    /// A candidate named `identity` for the Lease of `cfg`.
    pub fn new(client: Client, cfg: LeaderElection, identity: String) -> Arc<Elector> {
        Arc::new(Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            identity,
            state: Mutex::new(State::default()),
        })
    }

    /// This candidate's name in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this candidate may act now.
    pub fn leading(&self) -> bool {
        self.lock()
            .renewed
            .is_some_and(|t| t.elapsed() < self.cfg.renew_deadline)
    }

    /// Tries to take or renew the Lease every `retry_period`, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            let sent = Instant::now();
            match self.round().await {
                Ok(true) => self.lock().renewed = Some(sent),
                Ok(false) => self.lock().renewed = None,
                Err(e) => {
                    warn!(lease = %self.cfg.lease, namespace = %self.cfg.namespace, error = %e, "cannot read or renew the Lease; a leader stops acting {}s after its last renewal", self.cfg.renew_deadline.as_secs_f64())
                }
            }
            let leading = self.leading();
            let was = std::mem::replace(&mut self.lock().was_leader, leading);
            if leading && !was {
                info!(lease = %self.cfg.lease, identity = %self.identity, "leading: this microscaler acts");
            } else if !leading && was {
                warn!(lease = %self.cfg.lease, identity = %self.identity, "no longer leading: this microscaler observes and changes nothing");
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }

    /// Gives the Lease up (at shutdown) so another candidate takes it at its next try.
    pub async fn release(&self) {
        if !self.leading() {
            return;
        }
        self.lock().renewed = None;
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.lease).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(&self.identity) {
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
                match self
                    .api
                    .replace(&self.cfg.lease, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => info!(lease = %self.cfg.lease, "released the Lease"),
                    Err(e) => {
                        warn!(lease = %self.cfg.lease, error = %e, "could not release the Lease; the others take it when it expires")
                    }
                }
            }
        }
    }

    fn now() -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::now())
    }

    fn seconds(d: Duration) -> i32 {
        (d.as_secs_f64().ceil() as i32).max(1)
    }

    /// One try: `Ok(true)` if this candidate holds the Lease now.
    async fn round(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.lease).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.lease.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(Self::seconds(self.cfg.lease_duration)),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity && !holder.is_empty() {
            // Someone else's: theirs while its record keeps changing.
            let record = format!(
                "{holder} {:?} {:?}",
                spec.renew_time.as_ref().map(|t| t.0),
                lease.metadata.resource_version
            );
            let duration = spec
                .lease_duration_seconds
                .map_or(self.cfg.lease_duration, |s| {
                    Duration::from_secs(s.max(1) as u64)
                });
            let mut st = self.lock();
            let since = match &st.observed {
                Some((r, t)) if *r == record => *t,
                _ => {
                    st.observed = Some((record, Instant::now()));
                    return Ok(false);
                }
            };
            if since.elapsed() < duration {
                return Ok(false);
            }
            drop(st);
            info!(lease = %self.cfg.lease, previous = %holder, "the Lease expired; taking it");
        }
        let spec = lease.spec.get_or_insert_with(Default::default);
        if holder != self.identity {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(Self::now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(Self::seconds(self.cfg.lease_duration));
        spec.renew_time = Some(Self::now());
        // The version read is the precondition: a change meanwhile is a 409 and this round
        // is lost.
        match self
            .api
            .replace(&self.cfg.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.lock().observed = None;
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
