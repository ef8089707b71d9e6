//! swarm backend: being written (placeholder so the workspace builds).

use microscaler_core::Service;

use crate::{Backend, BackendError, Observation, ScaleOutcome};

/// The swarm backend.
pub struct SwarmBackend;

impl Backend for SwarmBackend {
    fn kind(&self) -> &'static str {
        "swarm"
    }
    async fn prepare(&self, _services: &[Service]) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("the swarm backend is not written yet".into()))
    }
    async fn observe(&self) -> Result<Observation, BackendError> {
        Err(BackendError::Unsupported("the swarm backend is not written yet".into()))
    }
    async fn scale(&self, _service: &Service, _target: u32) -> Result<ScaleOutcome, BackendError> {
        Err(BackendError::Unsupported("the swarm backend is not written yet".into()))
    }
    async fn shutdown(&self, _services: &[Service], _remove: bool) -> Result<(), BackendError> {
        Ok(())
    }
}
