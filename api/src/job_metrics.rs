//! What the API's `/metrics` reads of the jobs table, without ever scanning its
//! history: the live states through their partial indexes (`jobs_claimable` for
//! pending, `jobs_claimed_lease` for claimed), and the finished states only for a
//! recent window, a range of `jobs_finished` (on `completed_at`). A scrape's cost
//! follows the live jobs and the recent throughput, not the jobs kept.

use std::time::Duration;

use capy_shared::model::JobState;
use sqlx::PgPool;

/// Pending and claimed jobs now (`live`: `capy_jobs{type,state}`); completed, failed
/// and cancelled jobs that finished in the last `$1` seconds (not `live`:
/// `capy_jobs_finished_recent{type,state}`). Each branch's condition is its partial
/// index's predicate, so the planner can use it.
pub const JOBS_BY_TYPE_AND_STATE: &str = "
    select type, 'pending' as state, count(*), true as live
    from jobs where state = 'pending' group by type
    union all
    select type, 'claimed', count(*), true from jobs where state = 'claimed' group by type
    union all
    select type, state, count(*), false from jobs
    where state in ('completed', 'failed', 'cancelled')
      and completed_at > now() - make_interval(secs => $1)
    group by type, state";

/// Jobs of one type in one state, as [`JOBS_BY_TYPE_AND_STATE`] counts them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobCount {
    #[sqlx(rename = "type")]
    pub job_type: String,
    pub state: JobState,
    pub count: i64,
    /// Pending or claimed now; otherwise finished in the window.
    pub live: bool,
}

/// The jobs by type and state, finished ones over the last `window`.
pub async fn jobs_by_type_and_state(
    pool: &PgPool,
    window: Duration,
) -> sqlx::Result<Vec<JobCount>> {
    sqlx::query_as(JOBS_BY_TYPE_AND_STATE)
        .bind(window.as_secs_f64())
        .fetch_all(pool)
        .await
}
