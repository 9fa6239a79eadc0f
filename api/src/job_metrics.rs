//! What the API's `/metrics` reads of the jobs table, without ever scanning its
//! history: the live states through their partial indexes (`jobs_claimable` for
//! pending, `jobs_claimed_lease` for claimed), and the finished states only for a
//! recent window, a range of `jobs_finished` (on `completed_at`). A scrape's cost
//! follows the live jobs and the recent throughput, not the jobs kept.

use std::time::Duration;

use sqlx::PgPool;

/// `capy_jobs{type,state}`: pending and claimed jobs now; completed, failed and
/// cancelled jobs that finished in the last `$1` seconds. Each branch's condition is
/// its partial index's predicate, so the planner can use it.
pub const JOBS_BY_TYPE_AND_STATE: &str = "
    select type, 'pending' as state, count(*) from jobs where state = 'pending' group by type
    union all
    select type, 'claimed', count(*) from jobs where state = 'claimed' group by type
    union all
    select type, state, count(*) from jobs
    where state in ('completed', 'failed', 'cancelled')
      and completed_at > now() - make_interval(secs => $1)
    group by type, state";

/// `(type, state, count)` as [`JOBS_BY_TYPE_AND_STATE`] counts them, finished jobs over
/// the last `window`.
pub async fn jobs_by_type_and_state(
    pool: &PgPool,
    window: Duration,
) -> sqlx::Result<Vec<(String, String, i64)>> {
    sqlx::query_as(JOBS_BY_TYPE_AND_STATE)
        .bind(window.as_secs_f64())
        .fetch_all(pool)
        .await
}
