//! The queue's periodic jobs (`periodic_jobs`): rows that queue a job at each slot
//! (daily at a UTC time, or every N seconds), exactly once per slot however many
//! workers look, and once after downtime rather than once per missed slot.
//!
//! Firing a row and queueing its job happen in one transaction that also moves the
//! row's `next_run_at` past now (`periodic_next_run`, in SQL): a second worker either
//! skips the locked row or finds it no longer due.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::backups::{self, NewBackup};
use crate::model::{job_type, BackupKind};
use crate::queue::{self, NewJob};

/// When a periodic job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every day at this minute after midnight, UTC (0..=1439).
    Daily { minute_of_day: i32 },
    /// Every this many seconds.
    Every { seconds: i32 },
}

impl Schedule {
    fn columns(self) -> (Option<i32>, Option<i32>) {
        match self {
            Self::Daily { minute_of_day } => (Some(minute_of_day), None),
            Self::Every { seconds } => (None, Some(seconds)),
        }
    }
}

/// A periodic job as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PeriodicJob {
    pub name: String,
    pub job_type: String,
    pub organization_id: Option<Uuid>,
    pub project_id: Option<Uuid>,
    pub cluster_id: Option<Uuid>,
    pub args: Value,
    pub minute_of_day: Option<i32>,
    pub every_seconds: Option<i32>,
    pub is_active: bool,
    pub next_run_at: DateTime<Utc>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
}

const COLUMNS: &str = "name, job_type, organization_id, project_id, cluster_id, args, \
    minute_of_day, every_seconds, is_active, next_run_at, last_run_at, last_job_id";

/// What to run periodically, and who it belongs to.
#[derive(Debug, Clone)]
pub struct NewPeriodicJob {
    pub name: String,
    pub job_type: String,
    pub organization_id: Option<Uuid>,
    pub project_id: Option<Uuid>,
    pub cluster_id: Option<Uuid>,
    pub args: Value,
    pub schedule: Schedule,
    pub is_active: bool,
}

/// Creates or replaces the periodic job `new.name`; its next slot is the first after
/// now under the new schedule.
pub async fn upsert(conn: &mut PgConnection, new: &NewPeriodicJob) -> sqlx::Result<PeriodicJob> {
    let (minute_of_day, every_seconds) = new.schedule.columns();
    sqlx::query_as(&format!(
        "insert into periodic_jobs (name, job_type, organization_id, project_id, cluster_id, args,
                                    minute_of_day, every_seconds, is_active, next_run_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, periodic_next_run($7, $8, null, now()))
         on conflict (name) do update set
             job_type = excluded.job_type, organization_id = excluded.organization_id,
             project_id = excluded.project_id, cluster_id = excluded.cluster_id,
             args = excluded.args, minute_of_day = excluded.minute_of_day,
             every_seconds = excluded.every_seconds, is_active = excluded.is_active,
             next_run_at = excluded.next_run_at, updated_at = now()
         returning {COLUMNS}"
    ))
    .bind(&new.name)
    .bind(&new.job_type)
    .bind(new.organization_id)
    .bind(new.project_id)
    .bind(new.cluster_id)
    .bind(&new.args)
    .bind(minute_of_day)
    .bind(every_seconds)
    .bind(new.is_active)
    .fetch_one(conn)
    .await
}

/// Creates the periodic job unless one of that name exists (capy's own, at start).
pub async fn ensure(pool: &PgPool, new: &NewPeriodicJob) -> sqlx::Result<()> {
    let (minute_of_day, every_seconds) = new.schedule.columns();
    sqlx::query(
        "insert into periodic_jobs (name, job_type, args, minute_of_day, every_seconds,
                                    is_active, next_run_at)
         values ($1, $2, $3, $4, $5, $6, periodic_next_run($4, $5, null, now()))
         on conflict (name) do nothing",
    )
    .bind(&new.name)
    .bind(&new.job_type)
    .bind(&new.args)
    .bind(minute_of_day)
    .bind(every_seconds)
    .bind(new.is_active)
    .execute(pool)
    .await?;
    Ok(())
}

/// The periodic job `name`, if any.
pub async fn get(conn: &mut PgConnection, name: &str) -> sqlx::Result<Option<PeriodicJob>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from periodic_jobs where name = $1"
    ))
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Locks periodic job `name` (if it exists) until the transaction ends. Take it before
/// the rows its job touches (its project), as firing does.
pub async fn lock(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("select 1 from periodic_jobs where name = $1 for update")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes up to `limit` due periodic jobs and moves each one's `next_run_at` to its
/// first slot after now, in the caller's transaction: until it commits, other workers
/// skip these rows; after, they are no longer due.
async fn take_due(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<PeriodicJob>> {
    sqlx::query_as(&format!(
        "with due as (
             select name from periodic_jobs
             where is_active and next_run_at <= now()
             order by next_run_at
             limit $1
             for update skip locked
         )
         update periodic_jobs p set
             next_run_at = periodic_next_run(p.minute_of_day, p.every_seconds, p.next_run_at, now()),
             last_run_at = now(), updated_at = now()
         from due where p.name = due.name
         returning {}",
        crate::model::prefixed_columns(COLUMNS, "p")
    ))
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Queues the jobs of up to `limit` due periodic jobs, once per slot; answers how many
/// were queued. Safe to call from every worker at once.
pub async fn fire_due(pool: &PgPool, max_attempts: i32, limit: i64) -> sqlx::Result<usize> {
    let mut tx = pool.begin().await?;
    let due = take_due(&mut tx, limit).await?;
    let mut queued = 0;
    for periodic in &due {
        // One row's failure (say, a job its project refuses) loses that slot, not the
        // batch: each row queues in a savepoint of its own.
        let mut row = sqlx::Acquire::begin(&mut *tx).await?;
        let job_id = match queue_one(&mut row, periodic, max_attempts).await {
            Ok(job_id) => {
                row.commit().await?;
                job_id
            }
            Err(error) => {
                row.rollback().await?;
                tracing::warn!(name = periodic.name, error = %error, "a periodic job's slot queued nothing");
                None
            }
        };
        queued += usize::from(job_id.is_some());
        sqlx::query(
            "update periodic_jobs set last_job_id = coalesce($2, last_job_id) where name = $1",
        )
        .bind(&periodic.name)
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(queued)
}

/// Queues one slot's job. A scheduled backup makes its backup row first; one whose
/// project is not ready queues nothing this slot.
async fn queue_one(
    conn: &mut PgConnection,
    periodic: &PeriodicJob,
    max_attempts: i32,
) -> sqlx::Result<Option<Uuid>> {
    if periodic.job_type == job_type::PROJECT_BACKUP {
        let Some(project_id) = periodic.project_id else {
            return Ok(None);
        };
        let new = NewBackup {
            project_id,
            kind: BackupKind::Backup,
            label: arg_str(&periodic.args, "label"),
            schedule_name: arg_str(&periodic.args, "schedule_name"),
            retention_days: periodic
                .args
                .get("retention_days")
                .and_then(Value::as_i64)
                .and_then(|d| i32::try_from(d).ok()),
            max_attempts,
        };
        let queued = backups::queue_backup(conn, &new).await?;
        return Ok(queued.map(|(_, job)| job.id));
    }
    let job = queue::enqueue(
        conn,
        &NewJob {
            job_type: periodic.job_type.clone(),
            organization_id: periodic.organization_id,
            project_id: periodic.project_id,
            preview_database_id: None,
            cluster_id: periodic.cluster_id,
            locked_resource: periodic.project_id.map(|id| format!("project:{id}")),
            max_attempts,
            args: periodic.args.clone(),
            run_at: None,
        },
    )
    .await?;
    Ok(Some(job.id))
}

fn arg_str(args: &Value, key: &str) -> Option<String> {
    args.get(key).and_then(Value::as_str).map(str::to_string)
}

/// The name of a project's backup schedule (`default` for now).
pub fn backup_schedule_name(project_id: Uuid, schedule: &str) -> String {
    format!("project:{project_id}:backup:{schedule}")
}
