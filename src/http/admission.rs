//! Admission control at the HTTP edge: a job whose estimated memory ([`crate::memory`]) exceeds
//! what its device can give is refused with 422 before it is queued, because a job that is
//! admitted and then outgrows the machine takes the process down with it, and would again
//! after every restart (issue 13, failure 1).

use super::{ApiError, ApiResult, AppState};
use crate::config::TrainSpec;
use crate::memory::{self, human};
use crate::worker::DeviceSpec;

/// The limit a job is checked against: `--max-job-memory`, else the memory available now when
/// a CPU worker may run it. GPU-only pools have no automatic limit (set `--max-job-memory` to
/// the card's size).
fn limit(state: &AppState) -> Option<u64> {
    if let Some(l) = state.settings.max_job_memory {
        return Some(l);
    }
    if state.pool.devices().contains(&DeviceSpec::Cpu) {
        memory::available_bytes()
    } else {
        None
    }
}

/// 422 naming `model` when the model's own state does not fit, else `train.batch_size` (or
/// `train.max_tokens` when that sets the batch) when the activations push it over.
pub(super) async fn admit(state: &AppState, spec: &TrainSpec) -> ApiResult<()> {
    let Some(limit) = limit(state) else {
        return Ok(());
    };
    let scan = spec.clone();
    let facts = tokio::task::spawn_blocking(move || memory::scan_corpus(&scan))
        .await
        .map_err(|e| ApiError::internal(format!("corpus scan failed: {e}")))?
        .map_err(|_| ApiError::invalid("data.train", "the corpus cannot be read"))?;
    let est = memory::estimate(spec, facts);
    if est.total_bytes() <= limit {
        tracing::debug!(
            estimate = est.total_bytes(),
            limit,
            "job admitted by its memory estimate"
        );
        return Ok(());
    }
    let detail = format!(
        "this job needs about {} ({} parameters: {} for weights, gradients and Adam moments; \
         {} of activations at its batch; {} fixed) but at most {} is available",
        human(est.total_bytes()),
        est.parameters,
        human(est.parameter_state_bytes + est.cast_bytes),
        human(est.activation_bytes),
        human(est.fixed_bytes),
        human(limit)
    );
    let field = if est.model_bytes() > limit {
        "model"
    } else if spec.train.max_tokens > 0 {
        "train.max_tokens"
    } else {
        "train.batch_size"
    };
    Err(ApiError::invalid(field, detail))
}
