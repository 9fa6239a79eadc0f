//! Backups and exports: their rows, the jobs that make, verify and delete them, and
//! what those jobs' outcomes do to them. All of their SQL lives here, schedules (the
//! `periodic_jobs` row of a project's default backup) included.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::model::{
    job_type, Backup, BackupKind, BackupState, Job, JobState, BACKUP_COLUMNS, JOB_COLUMNS,
};
use crate::periodic::{self, NewPeriodicJob, PeriodicJob};
use crate::queue::{self, NewJob};
use crate::step;
use crate::store;

/// Exports can be downloaded for this long after they complete.
pub const EXPORT_DAYS: i32 = 7;
/// A failed backup's row (and whatever partial object it left) is cleaned up after
/// this long; the row says why it failed meanwhile.
const FAILED_KEPT: &str = "1 day";
/// The name of a project's one schedule.
pub const DEFAULT_SCHEDULE: &str = "default";

/// A backup or export to make.
#[derive(Debug, Clone)]
pub struct NewBackup {
    pub project_id: Uuid,
    pub kind: BackupKind,
    pub label: Option<String>,
    /// The schedule that asks for it (`default`), if any.
    pub schedule_name: Option<String>,
    /// Kept this long after it completes (scheduled backups).
    pub retention_days: Option<i32>,
    pub max_attempts: i32,
}

/// The project columns a backup needs.
#[derive(sqlx::FromRow)]
struct ProjectRow {
    organization_id: Option<Uuid>,
    cluster_id: Uuid,
    database_name: String,
    state: String,
}

/// Records a backup row and queues its `project.backup` job (serialised with the
/// project's other jobs), in the caller's transaction. `None` when the project is not
/// ready (deleted, being deleted, still provisioning).
pub async fn queue_backup(
    conn: &mut PgConnection,
    new: &NewBackup,
) -> sqlx::Result<Option<(Backup, Job)>> {
    // Shared: a deletion (which locks the row for update) waits for us, or we for it.
    let project: Option<ProjectRow> = sqlx::query_as(
        "select organization_id, cluster_id, database_name, state from projects
         where id = $1 and deleted_at is null for share",
    )
    .bind(new.project_id)
    .fetch_optional(&mut *conn)
    .await?;
    // A stopped project is backed up too: the dump runs as the admin.
    let Some(project) = project.filter(|p| matches!(p.state.as_str(), "ready" | "stopped")) else {
        return Ok(None);
    };
    // An unclaimed instant database belongs to nobody: nothing to back up for.
    let Some(organization_id) = project.organization_id else {
        return Ok(None);
    };
    let id = Uuid::now_v7();
    let key = store::archive_key(new.project_id, id);
    let job = queue::enqueue(
        &mut *conn,
        &NewJob {
            job_type: job_type::PROJECT_BACKUP.into(),
            organization_id: Some(organization_id),
            project_id: Some(new.project_id),
            preview_database_id: None,
            cluster_id: Some(project.cluster_id),
            locked_resource: Some(format!("project:{}", new.project_id)),
            max_attempts: new.max_attempts,
            args: json!({ "backup_id": id, "backup_key": key }),
            run_at: None,
        },
    )
    .await?;
    let row = Row {
        id,
        organization_id,
        key: &key,
        database_name: &project.database_name,
        job_id: job.id,
    };
    let backup = insert(conn, new, &row).await?;
    Ok(Some((backup, job)))
}

/// What [`queue_backup`] decided for the row it inserts.
struct Row<'a> {
    id: Uuid,
    organization_id: Uuid,
    key: &'a str,
    database_name: &'a str,
    job_id: Uuid,
}

async fn insert(conn: &mut PgConnection, new: &NewBackup, row: &Row<'_>) -> sqlx::Result<Backup> {
    // Exports are downloads, not restore points: nothing to verify.
    let verification = match new.kind {
        BackupKind::Export => "skipped",
        BackupKind::Backup => "pending",
    };
    sqlx::query_as(&format!(
        "insert into backups (id, organization_id, project_id, kind, backup_key, label,
                              database_name, verification_state, schedule_name,
                              retention_days, job_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         returning {}",
        BACKUP_COLUMNS
    ))
    .bind(row.id)
    .bind(row.organization_id)
    .bind(new.project_id)
    .bind(new.kind)
    .bind(row.key)
    .bind(&new.label)
    .bind(row.database_name)
    .bind(verification)
    .bind(&new.schedule_name)
    .bind(new.retention_days)
    .bind(row.job_id)
    .fetch_one(conn)
    .await
}

/// A backup with the organization that owns it (for visibility checks).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OwnedBackup {
    pub organization_id: Uuid,
    #[sqlx(flatten)]
    pub backup: Backup,
}

/// Backup `id` of `kind`, deleted ones included (they answer with their state).
pub async fn find(
    conn: &mut PgConnection,
    id: Uuid,
    kind: BackupKind,
) -> sqlx::Result<Option<OwnedBackup>> {
    sqlx::query_as(&format!(
        "select organization_id, {} from backups where id = $1 and kind = $2",
        BACKUP_COLUMNS
    ))
    .bind(id)
    .bind(kind)
    .fetch_optional(conn)
    .await
}

/// A project's live backups (or exports), newest first: up to `limit` after the
/// cursor `after` (an id of the previous page).
pub async fn list(
    conn: &mut PgConnection,
    project_id: Uuid,
    kind: BackupKind,
    after: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<Backup>> {
    // Ids are UUIDv7: ordering by id is ordering by creation.
    sqlx::query_as(&format!(
        "select {} from backups
         where project_id = $1 and kind = $2 and deleted_at is null
           and ($3::uuid is null or id < $3)
         order by id desc limit $4",
        BACKUP_COLUMNS
    ))
    .bind(project_id)
    .bind(kind)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The row as locked for a change in the caller's transaction.
async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<OwnedBackup>> {
    sqlx::query_as(&format!(
        "select organization_id, {} from backups where id = $1 for update",
        BACKUP_COLUMNS
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// The latest job of `job_type` on backup `id` (its `args.backup_id`).
async fn latest_job(
    conn: &mut PgConnection,
    id: Uuid,
    job_type: &str,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs where args->>'backup_id' = $1 and type = $2
         order by created_at desc, id desc limit 1"
    ))
    .bind(id.to_string())
    .bind(job_type)
    .fetch_optional(conn)
    .await
}

fn in_flight(job: &Job) -> bool {
    matches!(job.state, JobState::Pending | JobState::Claimed)
}

/// Why a change to a backup was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    /// The backup is in a state the change does not apply to (its state, as text).
    State(&'static str),
}

/// Marks backup `id` for deletion and queues its `backup.delete` job. Asked again while
/// it is being (or has been) deleted, answers the backup with the job already queued
/// (a new one only if that one failed or was cancelled). Refused while the backup is
/// still being made.
pub async fn request_delete(
    conn: &mut PgConnection,
    id: Uuid,
    max_attempts: i32,
) -> sqlx::Result<Result<(Backup, Job), Refusal>> {
    let Some(owned) = lock(conn, id).await? else {
        return Ok(Err(Refusal::NotFound));
    };
    let state = owned.backup.state;
    if state == BackupState::Pending {
        return Ok(Err(Refusal::State(state.as_str())));
    }
    if restore_in_flight(conn, id).await? {
        return Ok(Err(Refusal::State("being restored")));
    }
    // The delete in flight, or the one that deleted it, answers a repeated request.
    let previous = latest_job(conn, id, job_type::BACKUP_DELETE).await?;
    if let Some(job) = previous.filter(|j| in_flight(j) || state == BackupState::Deleted) {
        return Ok(Ok((owned.backup, job)));
    }
    if state == BackupState::Deleted {
        return Ok(Err(Refusal::State(state.as_str())));
    }
    let job = queue_delete(conn, &owned, max_attempts).await?;
    let backup = set_deleting(conn, id).await?;
    Ok(Ok((backup, job)))
}

async fn set_deleting(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Backup> {
    sqlx::query_as(&format!(
        "update backups set state = 'deleting', updated_at = now() where id = $1 returning {}",
        BACKUP_COLUMNS
    ))
    .bind(id)
    .fetch_one(conn)
    .await
}

/// Queues the `backup.delete` of a backup: no project (it may be gone by then), the
/// organization's, serialised with the backup's other jobs.
async fn queue_delete(
    conn: &mut PgConnection,
    owned: &OwnedBackup,
    max_attempts: i32,
) -> sqlx::Result<Job> {
    let backup = &owned.backup;
    queue::enqueue(
        conn,
        &NewJob {
            job_type: job_type::BACKUP_DELETE.into(),
            organization_id: Some(owned.organization_id),
            project_id: None,
            preview_database_id: None,
            cluster_id: None,
            locked_resource: Some(format!("backup:{}", backup.id)),
            max_attempts,
            args: json!({ "backup_id": backup.id, "backup_key": backup.backup_key }),
            run_at: None,
        },
    )
    .await
}

/// Queues a `project.backup_verify` of backup `id` (a completed backup, not an export)
/// and marks its verification pending; one already queued or running is answered
/// instead of a second.
pub async fn request_verify(
    conn: &mut PgConnection,
    id: Uuid,
    max_attempts: i32,
) -> sqlx::Result<Result<(Backup, Job), Refusal>> {
    let Some(owned) = lock(conn, id).await? else {
        return Ok(Err(Refusal::NotFound));
    };
    let backup = owned.backup;
    if backup.kind != BackupKind::Backup || backup.state != BackupState::Completed {
        return Ok(Err(Refusal::State(backup.state.as_str())));
    }
    if let Some(job) = latest_job(conn, id, job_type::PROJECT_BACKUP_VERIFY)
        .await?
        .filter(in_flight)
    {
        return Ok(Ok((backup, job)));
    }
    let job = queue_verify(conn, &backup, max_attempts).await?;
    let backup = sqlx::query_as(&format!(
        "update backups set verification_state = 'pending', verification_error = null,
                            verified_at = null, updated_at = now()
         where id = $1 returning {}",
        BACKUP_COLUMNS
    ))
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Ok((backup, job)))
}

/// Queues the `project.backup_verify` of `backup` on its project's cluster.
async fn queue_verify(
    conn: &mut PgConnection,
    backup: &Backup,
    max_attempts: i32,
) -> sqlx::Result<Job> {
    let (organization_id, cluster_id): (Option<Uuid>, Uuid) =
        sqlx::query_as("select organization_id, cluster_id from projects where id = $1")
            .bind(backup.project_id)
            .fetch_one(&mut *conn)
            .await?;
    queue::enqueue(
        conn,
        &NewJob {
            job_type: job_type::PROJECT_BACKUP_VERIFY.into(),
            organization_id,
            project_id: Some(backup.project_id),
            preview_database_id: None,
            cluster_id: Some(cluster_id),
            // With the project's other jobs: a verification logs in as the project's
            // role, which a rotation or a delete changes, and copies its data once.
            locked_resource: Some(format!("project:{}", backup.project_id)),
            max_attempts,
            args: json!({ "backup_id": backup.id, "backup_key": backup.backup_key }),
            run_at: None,
        },
    )
    .await
}

/// Marks up to `limit` backups past their `expires_at` for deletion and queues their
/// `backup.delete` jobs; answers how many. Safe to run from many workers at once: rows
/// another transaction holds are skipped, and a row leaves the set as it is marked.
pub async fn expire(conn: &mut PgConnection, limit: i64) -> sqlx::Result<u64> {
    let due: Vec<OwnedBackup> = sqlx::query_as(&format!(
        "with due as (
             select id from backups
             where expires_at < now() and state in ('completed', 'failed')
               and not exists ({RESTORE_OF_BACKUP})
             order by expires_at limit $1
             for update skip locked)
         update backups b set state = 'deleting', updated_at = now()
         from due where b.id = due.id
         returning b.organization_id, {}",
        prefixed_columns("b")
    ))
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    for owned in &due {
        // Expiry has no caller to tell; the delete gets the queue's usual attempts.
        queue_delete(conn, owned, EXPIRED_DELETE_ATTEMPTS).await?;
    }
    Ok(due.len() as u64)
}

/// A restore of backup `backups.id` that is queued or running: while one is, the
/// backup is neither deleted on request nor expired (its archive is being read).
const RESTORE_OF_BACKUP: &str = "select 1 from jobs r
    where r.type = 'project.restore' and r.state in ('pending', 'claimed')
      and r.args->>'backup_id' = backups.id::text";

async fn restore_in_flight(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(&format!(
        "select exists ({RESTORE_OF_BACKUP}) from backups where id = $1"
    ))
    .bind(id)
    .fetch_one(conn)
    .await
}

/// Attempts of the `backup.delete` jobs [`expire`] queues.
const EXPIRED_DELETE_ATTEMPTS: i32 = 5;

/// [`crate::model::BACKUP_COLUMNS`], each prefixed with `alias.`.
fn prefixed_columns(alias: &str) -> String {
    crate::model::prefixed_columns(BACKUP_COLUMNS, alias)
}

/// Applies a backup job's state (`project.backup`, `project.backup_verify`,
/// `backup.delete`) to its backup row. Each change applies once (guarded on the row's
/// state), so applying the same outcome again does nothing.
pub async fn apply(conn: &mut PgConnection, job: &Job) -> sqlx::Result<()> {
    let Some(id) = backup_id(&job.args) else {
        return Ok(());
    };
    match (job.job_type.as_str(), job.state) {
        (job_type::PROJECT_BACKUP, JobState::Completed) => backup_completed(conn, job, id).await,
        (job_type::PROJECT_BACKUP, JobState::Failed | JobState::Cancelled) => {
            let error = job_error(job, "the backup was cancelled");
            execute(
                conn,
                &format!(
                    "update backups set state = 'failed', error = $2,
                            expires_at = now() + interval '{FAILED_KEPT}', updated_at = now()
                     where id = $1 and state = 'pending'"
                ),
                id,
                Some(error),
            )
            .await
        }
        (job_type::PROJECT_BACKUP_VERIFY, JobState::Completed) => {
            let sql = "update backups set verification_state = 'verified',
                              verification_error = null, verified_at = now(), updated_at = now()
                       where id = $1 and verification_state = 'pending'";
            execute(conn, sql, id, None).await
        }
        // A verification that never ran (cancelled, or its project deleted first)
        // says nothing against the archive: it is skipped, and the backup stays
        // restorable. Only a verification that ran and failed marks it failed.
        (job_type::PROJECT_BACKUP_VERIFY, JobState::Cancelled) => {
            skip_verification(conn, id, job).await
        }
        (job_type::PROJECT_BACKUP_VERIFY, JobState::Failed)
            if job
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(queue::PROJECT_GONE_ERROR)) =>
        {
            skip_verification(conn, id, job).await
        }
        (job_type::PROJECT_BACKUP_VERIFY, JobState::Failed) => {
            let error = job_error(job, "the verification failed");
            let sql = "update backups set verification_state = 'failed',
                              verification_error = $2, updated_at = now()
                       where id = $1 and verification_state = 'pending'";
            execute(conn, sql, id, Some(error)).await
        }
        (job_type::BACKUP_DELETE, JobState::Completed) => {
            let sql = "update backups set state = 'deleted', deleted_at = now(), updated_at = now()
                       where id = $1 and state = 'deleting'";
            execute(conn, sql, id, None).await
        }
        _ => Ok(()),
    }
}

async fn skip_verification(conn: &mut PgConnection, id: Uuid, job: &Job) -> sqlx::Result<()> {
    let sql = "update backups set verification_state = 'skipped',
                      verification_error = $2, updated_at = now()
               where id = $1 and verification_state = 'pending'";
    let reason = job_error(job, "the verification was cancelled");
    execute(conn, sql, id, Some(reason)).await
}

async fn execute(
    conn: &mut PgConnection,
    sql: &str,
    id: Uuid,
    text: Option<String>,
) -> sqlx::Result<()> {
    let query = sqlx::query(sql).bind(id);
    let query = match text {
        Some(text) => query.bind(text),
        None => query,
    };
    query.execute(conn).await?;
    Ok(())
}

fn backup_id(args: &serde_json::Value) -> Option<Uuid> {
    args.get("backup_id")?.as_str()?.parse().ok()
}

/// The job's error, or `cancelled` when it ended without one.
fn job_error(job: &Job, cancelled: &str) -> String {
    job.error.clone().unwrap_or_else(|| cancelled.to_string())
}

/// What a completed backup step reported (its result line).
#[derive(Debug, Default, PartialEq)]
pub struct BackupResult {
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub manifest: Option<serde_json::Value>,
}

impl BackupResult {
    pub fn parse(stdout: Option<&str>) -> Self {
        let Some(result) = stdout.and_then(step::parse_result) else {
            return Self::default();
        };
        Self {
            size_bytes: result.get("size_bytes").and_then(serde_json::Value::as_i64),
            sha256: result
                .get("sha256")
                .and_then(serde_json::Value::as_str)
                .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_ascii_lowercase),
            manifest: Some(result),
        }
    }
}

/// The backup is made: record what the step reported, when it expires, and (for a
/// backup, not an export) queue its verification.
async fn backup_completed(conn: &mut PgConnection, job: &Job, id: Uuid) -> sqlx::Result<()> {
    let result = BackupResult::parse(job.last_stdout.as_deref());
    if result.size_bytes.is_none() || result.sha256.is_none() {
        // Without its size and checksum nobody can trust the archive: not a backup.
        let sql = "update backups set state = 'failed', error = $2, updated_at = now()
                   where id = $1 and state = 'pending'";
        let error = "the backup step reported no size and checksum (capy-result line)";
        return execute(conn, sql, id, Some(error.into())).await;
    }
    let updated: Option<Backup> = sqlx::query_as(&format!(
        "update backups set state = 'completed', size_bytes = $2, sha256 = $3, manifest = $4,
                completed_at = now(), error = null, updated_at = now(),
                expires_at = case when kind = 'export' then now() + make_interval(days => $5)
                                  when retention_days is not null
                                      then now() + make_interval(days => retention_days) end
         where id = $1 and state = 'pending'
         returning {}",
        BACKUP_COLUMNS
    ))
    .bind(id)
    .bind(result.size_bytes)
    .bind(&result.sha256)
    .bind(&result.manifest)
    .bind(EXPORT_DAYS)
    .fetch_optional(&mut *conn)
    .await?;
    match updated {
        Some(backup) if backup.kind == BackupKind::Backup => {
            queue_verify(conn, &backup, job.max_attempts).await?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A project's daily backup schedule, as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScheduledBackup {
    pub project_id: Uuid,
    pub name: String,
    pub cron_hour: i32,
    pub cron_minute: i32,
    pub is_active: bool,
    pub label: Option<String>,
    pub retention_days: i32,
    pub next_run_at: DateTime<Utc>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
}

/// What a schedule is set to.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Minutes after midnight, UTC.
    pub minute_of_day: i32,
    pub is_active: bool,
    pub label: Option<String>,
    pub retention_days: i32,
}

/// The API's view of a backup schedule's periodic job.
fn scheduled_backup(row: PeriodicJob) -> Option<ScheduledBackup> {
    let minute_of_day = row.minute_of_day?;
    let args = &row.args;
    Some(ScheduledBackup {
        project_id: row.project_id?,
        name: DEFAULT_SCHEDULE.into(),
        cron_hour: minute_of_day / 60,
        cron_minute: minute_of_day % 60,
        is_active: row.is_active,
        label: args.get("label").and_then(|l| l.as_str()).map(String::from),
        retention_days: args
            .get("retention_days")
            .and_then(serde_json::Value::as_i64)
            .and_then(|d| i32::try_from(d).ok())
            .unwrap_or(7),
        next_run_at: row.next_run_at,
        last_run_at: row.last_run_at,
        last_job_id: row.last_job_id,
    })
}

/// Sets (creates or replaces) the default schedule of project `project_id`: a periodic
/// job whose next slot is the first after now.
pub async fn put_schedule(
    conn: &mut PgConnection,
    project_id: Uuid,
    schedule: &Schedule,
) -> sqlx::Result<ScheduledBackup> {
    let (organization_id, cluster_id): (Option<Uuid>, Uuid) =
        sqlx::query_as("select organization_id, cluster_id from projects where id = $1")
            .bind(project_id)
            .fetch_one(&mut *conn)
            .await?;
    let new = NewPeriodicJob {
        name: periodic::backup_schedule_name(project_id, DEFAULT_SCHEDULE),
        job_type: job_type::PROJECT_BACKUP.into(),
        organization_id,
        project_id: Some(project_id),
        cluster_id: Some(cluster_id),
        args: json!({
            "label": schedule.label,
            "retention_days": schedule.retention_days,
            "schedule_name": DEFAULT_SCHEDULE,
        }),
        schedule: periodic::Schedule::Daily {
            minute_of_day: schedule.minute_of_day,
        },
        is_active: schedule.is_active,
    };
    let row = periodic::upsert(conn, &new).await?;
    scheduled_backup(row).ok_or(sqlx::Error::RowNotFound)
}

/// Locks the default schedule of project `project_id` (if it has one) until the
/// transaction ends.
pub async fn lock_schedule(conn: &mut PgConnection, project_id: Uuid) -> sqlx::Result<()> {
    let name = periodic::backup_schedule_name(project_id, DEFAULT_SCHEDULE);
    periodic::lock(conn, &name).await
}

/// The default schedule of project `project_id`, if it has one.
pub async fn get_schedule(
    conn: &mut PgConnection,
    project_id: Uuid,
) -> sqlx::Result<Option<ScheduledBackup>> {
    let name = periodic::backup_schedule_name(project_id, DEFAULT_SCHEDULE);
    Ok(periodic::get(conn, &name).await?.and_then(scheduled_backup))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_line_fills_the_columns() {
        let sha = "AB".repeat(32);
        let stdout = format!(
            "noise\ncapy-result {{\"size_bytes\": 42, \"sha256\": \"{sha}\", \"tables\": 1}}\n"
        );
        let result = BackupResult::parse(Some(&stdout));
        assert_eq!(result.size_bytes, Some(42));
        assert_eq!(result.sha256, Some("ab".repeat(32)));
        assert_eq!(result.manifest.unwrap()["tables"], 1);
        assert_eq!(BackupResult::parse(None), BackupResult::default());
        assert_eq!(
            BackupResult::parse(Some("no result")),
            BackupResult::default()
        );
        let bad = BackupResult::parse(Some("capy-result {\"sha256\": \"x'; drop\"}"));
        assert_eq!(bad.sha256, None);
    }

    #[test]
    fn backup_ids_come_from_the_args() {
        let id = Uuid::now_v7();
        assert_eq!(backup_id(&json!({ "backup_id": id })), Some(id));
        assert_eq!(backup_id(&json!({ "backup_id": "nope" })), None);
        assert_eq!(backup_id(&json!({})), None);
    }

    #[test]
    fn columns_are_prefixed() {
        let prefixed = prefixed_columns("b");
        assert!(prefixed.starts_with("b.id, b.project_id, "));
        assert!(prefixed.ends_with("b.completed_at"));
    }
}
