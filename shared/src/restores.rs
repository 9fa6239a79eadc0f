//! Restores and the approvals that authorize overwriting a project: their SQL, and
//! what a `project.restore` job's outcome does to its project.
//!
//! (Interface agreed for issue 12; the bodies are filled by the restores work.)

use sqlx::PgConnection;

use crate::model::Job;

/// Applies a `project.restore` job's state to its project.
pub async fn apply(_conn: &mut PgConnection, _job: &Job) -> sqlx::Result<()> {
    Ok(())
}
