//! From a validated configuration to a live backend.

use std::path::{Path, PathBuf};

use microscaler_backends::docker::DockerBackend;
use microscaler_backends::process::ProcessBackend;
use microscaler_backends::swarm::SwarmBackend;
use microscaler_backends::{AnyBackend, BackendConfig, BackendError, Config};

/// Connects to (or sets up) the backend `cfg` names. Fails with a message that names the
/// orchestrator's address and what to do when it does not answer.
pub async fn build_backend(cfg: &Config, state_dir: &Path) -> Result<AnyBackend, BackendError> {
    Ok(match &cfg.backend {
        BackendConfig::Docker(d) => {
            AnyBackend::Docker(DockerBackend::connect(d, &cfg.instance).await?)
        }
        BackendConfig::Swarm(s) => {
            let mut b = SwarmBackend::connect(s, &cfg.instance).await?;
            if matches!(cfg.capacity, microscaler_core::Capacity::Resources { .. }) {
                b.count_resources();
            }
            AnyBackend::Swarm(b)
        }
        BackendConfig::Process(p) => AnyBackend::Process(ProcessBackend::new(
            p,
            &cfg.instance,
            state_dir.to_path_buf(),
        )?),
        #[cfg(feature = "kubernetes")]
        BackendConfig::Kubernetes(k) => {
            let mut b =
                microscaler_backends::kubernetes::KubernetesBackend::connect(k, &cfg.instance)
                    .await?;
            if matches!(cfg.capacity, microscaler_core::Capacity::Resources { .. }) {
                b.count_resources().await?;
            }
            AnyBackend::Kubernetes(b)
        }
        #[cfg(not(feature = "kubernetes"))]
        BackendConfig::Kubernetes(_) => {
            return Err(BackendError::Unsupported(
                "this microscaler was built without the kubernetes backend (the slim image \
                 and --no-default-features builds leave it out): use the full image \
                 microscaler:<version>, or build with cargo build --features kubernetes (on by default)"
                    .into(),
            ))
        }
        BackendConfig::Nomad(n) => {
            let mut b =
                microscaler_backends::nomad::NomadBackend::connect(n, &cfg.instance).await?;
            if matches!(cfg.capacity, microscaler_core::Capacity::Resources { .. }) {
                b.count_resources();
            }
            AnyBackend::Nomad(b)
        }
        BackendConfig::Marathon(m) => AnyBackend::Marathon(
            microscaler_backends::marathon::MarathonBackend::connect(m, &cfg.instance).await?,
        ),
        #[cfg(feature = "ecs")]
        BackendConfig::Ecs(e) => {
            let mut b = microscaler_backends::ecs::EcsBackend::connect(e, &cfg.instance).await?;
            if matches!(cfg.capacity, microscaler_core::Capacity::Resources { .. }) {
                b.count_resources()?;
            }
            AnyBackend::Ecs(b)
        }
        #[cfg(not(feature = "ecs"))]
        BackendConfig::Ecs(_) => {
            return Err(BackendError::Unsupported(
                "this microscaler was built without the ecs backend (the slim image \
                 and --no-default-features builds leave it out): use the full image \
                 microscaler:<version>, or build with cargo build --features ecs (on by default)"
                    .into(),
            ))
        }
    })
}

/// `run --dry-run`: turns off what would write to the orchestrator outside `prepare` and
/// `scale`: Kubernetes leader election (it writes a Lease) and ECS's event queue (reading it
/// deletes the messages).
pub fn read_only(cfg: &mut Config) {
    match &mut cfg.backend {
        BackendConfig::Kubernetes(k) => k.leader_election = None,
        BackendConfig::Ecs(e) => e.events_queue = None,
        _ => {}
    }
}

/// Where the process backend keeps its records and the built-in replica:
/// `$XDG_STATE_HOME/microscaler/<instance>`, else `~/.local/state/microscaler/<instance>`, else
/// `/tmp/microscaler-<uid>/<instance>`.
pub fn default_state_dir(instance: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("microscaler").join(instance);
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h)
            .join(".local/state/microscaler")
            .join(instance);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/microscaler-{uid}")).join(instance)
}
