//! process backend: being written (placeholder so the workspace builds).

use microscaler_core::Service;

use crate::{Backend, BackendError, Observation, ScaleOutcome};

/// The process backend.
pub struct ProcessBackend;

impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }
    async fn prepare(&self, _services: &[Service]) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("the process backend is not written yet".into()))
    }
    async fn observe(&self) -> Result<Observation, BackendError> {
        Err(BackendError::Unsupported("the process backend is not written yet".into()))
    }
    async fn scale(&self, _service: &Service, _target: u32) -> Result<ScaleOutcome, BackendError> {
        Err(BackendError::Unsupported("the process backend is not written yet".into()))
    }
    async fn shutdown(&self, _services: &[Service], _remove: bool) -> Result<(), BackendError> {
        Ok(())
    }
}
