//! What a job's state does to its project. Applied in the transaction that changes the
//! job, by workers (outcomes, rescues) and by the API (cancel, retry).

use sqlx::PgConnection;

use crate::model::{job_type, Job};

/// Applies `job`'s current state to its project.
pub async fn apply(conn: &mut PgConnection, job: &Job) -> sqlx::Result<()> {
    let Some(project_id) = job.project_id else {
        return Ok(());
    };
    if job.job_type == job_type::PROJECT_CREATE {
        // completed → ready; failed or cancelled → error; pending or claimed (a retry is
        // on its way) → provisioning, with the last error still shown.
        sqlx::query(
            "update projects set
                 state = case $2 when 'completed' then 'ready'
                                 when 'failed' then 'error'
                                 when 'cancelled' then 'error'
                                 else 'provisioning' end,
                 last_error = case $2 when 'completed' then null
                                      when 'cancelled' then 'provisioning was cancelled'
                                      else $3 end,
                 updated_at = now()
             where id = $1 and state in ('provisioning', 'error')",
        )
        .bind(project_id)
        .bind(&job.state)
        .bind(&job.error)
        .execute(conn)
        .await?;
    }
    Ok(())
}
