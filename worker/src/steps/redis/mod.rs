//! The built-in steps of redis projects (to be written).

use capy_shared::step::StepInput;

use super::StepError;

/// Runs the redis step for the input's job type.
pub async fn run(input: &StepInput) -> Result<(), StepError> {
    Err(StepError::permanent(format!(
        "capy-step has no redis step for job type '{}'",
        input.job.job_type
    )))
}
