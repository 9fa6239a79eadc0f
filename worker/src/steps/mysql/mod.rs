//! The built-in steps of mysql projects (to be written).

use capy_shared::step::StepInput;

use super::StepError;

/// Runs the mysql step for the input's job type.
pub async fn run(input: &StepInput) -> Result<(), StepError> {
    Err(StepError::permanent(format!(
        "capy-step has no mysql step for job type '{}'",
        input.job.job_type
    )))
}
