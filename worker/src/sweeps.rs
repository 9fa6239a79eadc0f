//! capy's own periodic sweeps: jobs the worker does itself in SQL (no step process),
//! queued by `periodic_jobs` rows the workers register at start, so each slot runs
//! once however many workers there are.

use std::time::Duration;

use capy_shared::model::job_type;
use capy_shared::periodic::{NewPeriodicJob, Schedule};
use capy_shared::{backups, previews, restores};
use sqlx::PgPool;

/// The periodic job that sweeps expired backups and exports.
pub const BACKUP_EXPIRE_SCHEDULE: &str = "capy:backup_expire";
/// The periodic job that deletes preview databases past their TTL.
pub const PREVIEW_EXPIRE_SCHEDULE: &str = "capy:preview_expire";
/// Rows one sweep marks, at most (the next slot takes the rest).
const SWEEP_BATCH: i64 = 1000;

/// Whether the worker does jobs of `job_type` itself (see [`run`]).
pub fn is_sweep(job_type: &str) -> bool {
    matches!(job_type, job_type::BACKUP_EXPIRE | job_type::PREVIEW_EXPIRE)
}

/// The periodic rows of capy's sweeps: backups every minute, previews every
/// `preview_every` (tests shorten it).
pub fn schedules(preview_every: Duration) -> Vec<NewPeriodicJob> {
    let sweep = |name: &str, job_type: &str, seconds: u64| NewPeriodicJob {
        name: name.into(),
        job_type: job_type.into(),
        organization_id: None,
        project_id: None,
        cluster_id: None,
        args: serde_json::json!({}),
        schedule: Schedule::Every {
            seconds: i32::try_from(seconds.max(1)).unwrap_or(i32::MAX),
        },
        is_active: true,
    };
    vec![
        sweep(BACKUP_EXPIRE_SCHEDULE, job_type::BACKUP_EXPIRE, 60),
        sweep(
            PREVIEW_EXPIRE_SCHEDULE,
            job_type::PREVIEW_EXPIRE,
            preview_every.as_secs(),
        ),
    ]
}

/// Does sweep `job_type` in one transaction; answers what it did (the job's stdout).
/// `max_attempts` is what the jobs it queues get.
pub async fn run(pool: &PgPool, job_type: &str, max_attempts: i32) -> sqlx::Result<String> {
    let mut tx = pool.begin().await?;
    let done = match job_type {
        // Backups past retention and expired exports: marked, their deletes queued.
        job_type::BACKUP_EXPIRE => {
            let marked = backups::expire(&mut tx, SWEEP_BATCH).await?;
            restores::purge_approvals(&mut tx).await?;
            format!("marked {marked} backups for deletion\n")
        }
        job_type::PREVIEW_EXPIRE => {
            let marked = previews::expire(&mut tx, max_attempts, SWEEP_BATCH).await?;
            format!("queued the deletion of {marked} expired preview databases\n")
        }
        other => format!("{other} is not a sweep; nothing done\n"),
    };
    tx.commit().await?;
    Ok(done)
}
