//! What a job's state does to its project. Applied in the transaction that changes the
//! job, by workers (outcomes, rescues) and by the API (cancel, retry).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::model::{job_type, Job, JobState};
use crate::queue::{self, NewJob, PROJECT_IS_LIVE};

/// The start of the error a failed rotation leaves on its project.
const ROTATION_FAILED: &str = "rotating the credentials failed: ";

/// Whether [`apply`] may write anything for `job`: a job of no project and of none of
/// the backup, restore or preview types changes nothing but itself.
pub fn may_apply(job: &Job) -> bool {
    job.project_id.is_some() || EFFECT_TYPES_WITHOUT_PROJECT.contains(&job.job_type.as_str())
}

/// The job types whose effects do not go through `project_id` (see [`apply`]).
const EFFECT_TYPES_WITHOUT_PROJECT: [&str; 7] = [
    job_type::PROJECT_BACKUP,
    job_type::PROJECT_BACKUP_VERIFY,
    job_type::BACKUP_DELETE,
    job_type::PROJECT_RESTORE,
    job_type::PREVIEW_CREATE,
    job_type::PREVIEW_RESET,
    job_type::PREVIEW_DELETE,
];

/// Applies `job`'s current state to its project.
pub async fn apply(conn: &mut PgConnection, job: &Job) -> sqlx::Result<()> {
    // The one gate: a type missing from `may_apply` has no effect anywhere.
    if !may_apply(job) {
        return Ok(());
    }
    match job.job_type.as_str() {
        job_type::PROJECT_BACKUP | job_type::PROJECT_BACKUP_VERIFY | job_type::BACKUP_DELETE => {
            return crate::backups::apply(conn, job).await
        }
        job_type::PROJECT_RESTORE => return crate::restores::apply(conn, job).await,
        job_type::PREVIEW_CREATE | job_type::PREVIEW_RESET | job_type::PREVIEW_DELETE => {
            return crate::previews::apply(conn, job).await
        }
        _ => {}
    }
    let Some(project_id) = job.project_id else {
        return Ok(());
    };
    if job.job_type == job_type::PROJECT_DELETE && job.state == JobState::Completed {
        forget_deleted_project(conn, project_id).await?;
    }
    if job.job_type == job_type::PROJECT_ROTATE_CREDENTIALS && job.state == JobState::Completed {
        return rotation_completed(conn, job, project_id).await;
    }
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
             where id = $1 and state in ('ready', 'stopped', 'error') and $2 in ('completed', 'failed')"
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
        // A completed stop leaves the project stopped, a completed start ready again (a
        // project being deleted is left alone); a failure is shown, and the state stays
        // as it was: the logins are as the last completed job left them, or on their
        // way there (a retry converges).
        job_type::PROJECT_STOP | job_type::PROJECT_START => {
            "update projects set
                 state = case when $2 <> 'completed' then state
                              when $4->>'to' = 'stopped' then 'stopped' else 'ready' end,
                 last_error = case $2 when 'completed' then null
                                      when 'failed' then
                                          case $4->>'to' when 'stopped' then 'stopping'
                                                         else 'starting' end
                                          || ' failed: ' || $3
                                      else last_error end,
                 updated_at = now()
             where id = $1 and state in ('ready', 'stopped') and $2 in ('completed', 'failed')"
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
        // Completion is `rotation_completed`; a failure is shown. The pending login
        // stays: the next rotation reuses it, a delete drops it.
        job_type::PROJECT_ROTATE_CREDENTIALS => {
            "update projects set last_error = 'rotating the credentials failed: ' || $3,
                                 updated_at = now()
             where id = $1 and $2 = 'failed' and state in ('ready', 'stopped', 'error')"
        }
        // The login the job dropped (`args.role`) is no longer the previous one; a
        // failure leaves it working, which is shown. (A retire whose login a later
        // rotation already dropped changes nothing.)
        job_type::PROJECT_RETIRE_CREDENTIALS => {
            "update projects set
                 previous_role_name = case $2 when 'completed' then null else previous_role_name end,
                 previous_expires_at = case $2 when 'completed' then null else previous_expires_at end,
                 last_error = case $2 when 'failed'
                                  then 'retiring the previous login ' || ($4->>'role') || ' failed: ' || $3
                                  else last_error end,
                 updated_at = now()
             where id = $1 and previous_role_name = $4->>'role' and $2 in ('completed', 'failed')"
        }
        _ => return Ok(()),
    };
    sqlx::query(sql)
        .bind(project_id)
        .bind(job.state)
        .bind(&job.error)
        .bind(&job.args)
        .execute(conn)
        .await?;
    Ok(())
}

/// A deleted project's schedules go, and its backups expire within a week (a week in
/// which it can still be restored into a new project; after that its data is gone).
async fn forget_deleted_project(conn: &mut PgConnection, project_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("delete from periodic_jobs where project_id = $1")
        .bind(project_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "update backups set expires_at = least(coalesce(expires_at, 'infinity'), now() + interval '7 days'),
                            updated_at = now()
         where project_id = $1 and deleted_at is null",
    )
    .bind(project_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A completed rotation: the pending login becomes the project's, the one it replaces
/// becomes the previous, and a `project.retire_credentials` job is queued for the end of
/// its grace (`args.grace_hours`). Not serialised with the project's other jobs (no
/// `locked_resource`): it waits for its hour, and must not hold them up meanwhile.
async fn rotation_completed(
    conn: &mut PgConnection,
    job: &Job,
    project_id: Uuid,
) -> sqlx::Result<()> {
    let grace_hours = job
        .args
        .get("grace_hours")
        .and_then(serde_json::Value::as_i64)
        .and_then(|h| i32::try_from(h).ok())
        .unwrap_or(0);
    let replaced: Option<(String, DateTime<Utc>)> = sqlx::query_as(&format!(
        "update projects set
             previous_role_name = role_name,
             previous_expires_at = now() + make_interval(hours => $2),
             role_name = pending_role_name, password_encrypted = pending_password_encrypted,
             pending_role_name = null, pending_password_encrypted = null,
             last_error = case when starts_with(last_error, $3) then null else last_error end,
             updated_at = now()
         where id = $1 and pending_role_name is not null and {PROJECT_IS_LIVE}
         returning previous_role_name, previous_expires_at"
    ))
    .bind(project_id)
    .bind(grace_hours)
    .bind(ROTATION_FAILED)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((role, expires_at)) = replaced else {
        return Ok(());
    };
    queue::enqueue(
        conn,
        &NewJob {
            job_type: job_type::PROJECT_RETIRE_CREDENTIALS.into(),
            organization_id: job.organization_id,
            project_id: Some(project_id),
            preview_database_id: None,
            cluster_id: job.cluster_id,
            locked_resource: None,
            max_attempts: job.max_attempts,
            args: serde_json::json!({ "role": role }),
            run_at: Some(expires_at),
        },
    )
    .await?;
    Ok(())
}
