//! What a job's state does to its project. Applied in the transaction that changes the
//! job, by workers (outcomes, rescues) and by the API (cancel, retry).

use sqlx::PgConnection;

use crate::model::{job_type, Job};

/// Applies `job`'s current state to its project.
pub async fn apply(conn: &mut PgConnection, job: &Job) -> sqlx::Result<()> {
    let Some(project_id) = job.project_id else {
        return Ok(());
    };
    let sql = match job.job_type.as_str() {
        // completed → ready; failed or cancelled → error; pending or claimed (a retry is
        // on its way) → provisioning, with the last error still shown. A project being
        // deleted is left alone.
        job_type::PROJECT_CREATE => {
            "update projects set
                 state = case $2 when 'completed' then 'ready'
                                 when 'failed' then 'error'
                                 when 'cancelled' then 'error'
                                 else 'provisioning' end,
                 last_error = case $2 when 'completed' then null
                                      when 'cancelled' then 'provisioning was cancelled'
                                      else $3 end,
                 updated_at = now()
             where id = $1 and state in ('provisioning', 'error')"
        }
        // The settings are already recorded; the job only applies them. Its failure is
        // shown, and cleared by the next success.
        job_type::PROJECT_UPDATE => {
            "update projects set
                 last_error = case $2 when 'completed' then null
                                      when 'failed' then 'applying settings failed: ' || $3
                                      else last_error end,
                 updated_at = now()
             where id = $1 and state in ('ready', 'error') and $2 in ('completed', 'failed')"
        }
        // completed → deleted (gone from lists); failed or cancelled → still deleting,
        // with the reason: a project once asked to go never comes back to life (its
        // other jobs stay refused); DELETE again, or a retry of this job, finishes it.
        job_type::PROJECT_DELETE => {
            "update projects set
                 state = case $2 when 'completed' then 'deleted' else 'deleting' end,
                 deleted_at = case $2 when 'completed' then now() end,
                 last_error = case $2 when 'completed' then null
                                      when 'failed' then 'deletion failed: ' || $3
                                      when 'cancelled' then 'deletion was cancelled'
                                      else last_error end,
                 updated_at = now()
             where id = $1 and state = 'deleting'"
        }
        // The version is the one asked for, else the cluster's default.
        job_type::PROJECT_EXTENSION_ENABLE => {
            "insert into project_extensions (project_id, name, version)
             select p.id, $4->>'name',
                    coalesce($4->>'version',
                             (select e.default_version from cluster_extensions e
                              where e.cluster_id = p.cluster_id and e.name = $4->>'name'))
             from projects p where p.id = $1 and $2 = 'completed' and $4->>'name' is not null
             on conflict (project_id, name) do update
                 set version = excluded.version, enabled_at = now()"
        }
        job_type::PROJECT_EXTENSION_DISABLE => {
            "delete from project_extensions
             where project_id = $1 and $2 = 'completed' and name = $4->>'name'"
        }
        _ => return Ok(()),
    };
    sqlx::query(sql)
        .bind(project_id)
        .bind(&job.state)
        .bind(&job.error)
        .bind(&job.args)
        .execute(conn)
        .await?;
    Ok(())
}
