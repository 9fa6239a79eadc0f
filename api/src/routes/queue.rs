//! The queue at a glance for operators: depth, oldest wait, jobs per type and state,
//! the last hour's throughput and failures, and (for platform admins) the workers.
//! Every figure reads a partial index (live jobs, or jobs finished in the last hour),
//! never the whole history.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use capy_shared::model::JobState;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Principal, SCOPE_READ};
use crate::bodies::ErrorResponses;
use crate::error::ApiResult;
use crate::extract::Query;
use crate::AppState;

/// The last hour in buckets of this many seconds.
const BUCKET_SECONDS: i64 = 300;
const BUCKETS: i64 = 3600 / BUCKET_SECONDS;
/// A worker that finished a job this recently, or holds one, is listed.
const WORKER_SEEN_MINUTES: i64 = 10;
/// In-flight job ids listed per worker, at most.
const JOBS_PER_WORKER: i64 = 20;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct QueueQuery {
    /// Platform admins only: one organization's queue instead of the fleet's.
    organization_id: Option<Uuid>,
}

/// Whose jobs the figures count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueueScope {
    Fleet,
    Organization,
    Project,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct TypeCounts {
    #[serde(rename = "type")]
    pub job_type: String,
    pub pending: i64,
    pub claimed: i64,
    /// Finished in the last hour.
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LastHour {
    pub bucket_seconds: i64,
    /// Oldest first; the last one ends now.
    pub buckets: Vec<Bucket>,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Failed over finished (completed and failed); 0 when none finished.
    pub failure_rate: f64,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct WorkerSeen {
    pub worker: String,
    pub in_flight: i64,
    /// The jobs it holds now (at most 20).
    pub jobs: Vec<Uuid>,
    pub last_seen_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueOverview {
    pub scope: QueueScope,
    /// Jobs waiting to be claimed (including those scheduled for later).
    pub pending: i64,
    /// Jobs a worker holds now.
    pub claimed: i64,
    /// How long the oldest due pending job has waited; null when none waits.
    pub oldest_pending_age_seconds: Option<f64>,
    pub by_type: Vec<TypeCounts>,
    pub last_hour: LastHour,
    /// Workers that hold a job or finished one in the last 10 minutes; platform admins
    /// only (null for other keys).
    pub workers: Option<Vec<WorkerSeen>>,
}

/// The filter every figure applies: an organization, a project, or neither (the fleet).
#[derive(Debug, Clone, Copy)]
struct Scope {
    organization_id: Option<Uuid>,
    project_id: Option<Uuid>,
    is_admin: bool,
}

/// Depth, oldest wait, per-type counts, the last hour and the workers, for the
/// caller's jobs (an organization key: its organization; a project key: its project;
/// a platform admin: the fleet, or one organization).
#[utoipa::path(get, path = "/v1/queue", tag = "jobs",
    params(QueueQuery),
    responses((status = 200, body = QueueOverview), ErrorResponses))]
pub async fn overview(
    State(state): State<AppState>,
    principal: Principal,
    Query(query): Query<QueueQuery>,
) -> ApiResult<Json<QueueOverview>> {
    principal.require_scope(SCOPE_READ)?;
    let scope = Scope {
        organization_id: principal.listed_organization(query.organization_id)?,
        project_id: principal.project_id,
        is_admin: principal.is_admin,
    };
    let scope_name = match (scope.project_id, scope.organization_id) {
        (Some(_), _) => QueueScope::Project,
        (None, Some(_)) => QueueScope::Organization,
        (None, None) => QueueScope::Fleet,
    };
    let mut tx = state.pool.begin().await?;
    // One snapshot for every figure, read-only.
    sqlx::query("set transaction isolation level repeatable read read only")
        .execute(&mut *tx)
        .await?;
    let counts = count_by_type(&mut tx, scope).await?;
    let oldest_pending_age_seconds = oldest_pending_age(&mut tx, scope).await?;
    let last_hour = last_hour(&mut tx, scope).await?;
    let workers = match principal.is_admin {
        true => Some(workers_seen(&mut tx, scope).await?),
        false => None,
    };
    tx.commit().await?;
    Ok(Json(QueueOverview {
        scope: scope_name,
        pending: counts.iter().map(|c| c.pending).sum(),
        claimed: counts.iter().map(|c| c.claimed).sum(),
        oldest_pending_age_seconds,
        by_type: counts,
        last_hour,
        workers,
    }))
}

/// The condition of [`Scope`] on `jobs`, with its organization as `$1` and project as
/// `$2`, `$3` whether internal jobs (no organization) count.
const SCOPED: &str = "($1::uuid is null or organization_id = $1)
       and ($2::uuid is null or project_id = $2)
       and ($3 or organization_id is not null)";

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

async fn count_by_type(tx: &mut Tx, scope: Scope) -> ApiResult<Vec<TypeCounts>> {
    let rows: Vec<(String, JobState, i64)> = sqlx::query_as(&format!(
        "select type, state, count(*) from jobs
         where state in ('pending', 'claimed') and {SCOPED}
         group by 1, 2
         union all
         select type, state, count(*) from jobs
         where state in ('completed', 'failed', 'cancelled')
           and completed_at > now() - interval '1 hour' and {SCOPED}
         group by 1, 2"
    ))
    .bind(scope.organization_id)
    .bind(scope.project_id)
    .bind(scope.is_admin)
    .fetch_all(&mut **tx)
    .await?;
    let mut by_type: BTreeMap<String, TypeCounts> = BTreeMap::new();
    for (job_type, job_state, count) in rows {
        let entry = by_type
            .entry(job_type.clone())
            .or_insert_with(|| TypeCounts {
                job_type,
                ..TypeCounts::default()
            });
        *match job_state {
            JobState::Pending => &mut entry.pending,
            JobState::Claimed => &mut entry.claimed,
            JobState::Completed => &mut entry.completed,
            JobState::Failed => &mut entry.failed,
            JobState::Cancelled => &mut entry.cancelled,
        } += count;
    }
    Ok(by_type.into_values().collect())
}

async fn oldest_pending_age(tx: &mut Tx, scope: Scope) -> ApiResult<Option<f64>> {
    let age: Option<f64> = sqlx::query_scalar(&format!(
        "select extract(epoch from now() - min(run_at))::float8 from jobs
         where state = 'pending' and run_at <= now() and {SCOPED}"
    ))
    .bind(scope.organization_id)
    .bind(scope.project_id)
    .bind(scope.is_admin)
    .fetch_one(&mut **tx)
    .await?;
    Ok(age.map(|seconds| seconds.max(0.0)))
}

async fn last_hour(tx: &mut Tx, scope: Scope) -> ApiResult<LastHour> {
    let (now, rows): (DateTime<Utc>, Vec<(i64, JobState, i64)>) = {
        let now: DateTime<Utc> = sqlx::query_scalar("select now()")
            .fetch_one(&mut **tx)
            .await?;
        let rows = sqlx::query_as(&format!(
            "select least(floor(extract(epoch from completed_at - (now() - interval '1 hour'))
                               / $4)::int8, $5 - 1),
                    state, count(*)
             from jobs
             where state in ('completed', 'failed', 'cancelled')
               and completed_at > now() - interval '1 hour' and {SCOPED}
             group by 1, 2"
        ))
        .bind(scope.organization_id)
        .bind(scope.project_id)
        .bind(scope.is_admin)
        .bind(BUCKET_SECONDS as f64)
        .bind(BUCKETS)
        .fetch_all(&mut **tx)
        .await?;
        (now, rows)
    };
    let hour_ago = now - chrono::Duration::seconds(3600);
    let mut buckets: Vec<Bucket> = (0..BUCKETS)
        .map(|i| Bucket {
            start: hour_ago + chrono::Duration::seconds(i * BUCKET_SECONDS),
            completed: 0,
            failed: 0,
            cancelled: 0,
        })
        .collect();
    for (index, job_state, count) in rows {
        let Some(bucket) = usize::try_from(index).ok().and_then(|i| buckets.get_mut(i)) else {
            continue;
        };
        match job_state {
            JobState::Completed => bucket.completed += count,
            JobState::Failed => bucket.failed += count,
            JobState::Cancelled => bucket.cancelled += count,
            JobState::Pending | JobState::Claimed => {}
        }
    }
    Ok(LastHour::from_buckets(buckets))
}

impl LastHour {
    fn from_buckets(buckets: Vec<Bucket>) -> Self {
        let completed = buckets.iter().map(|b| b.completed).sum();
        let failed = buckets.iter().map(|b| b.failed).sum();
        let cancelled = buckets.iter().map(|b| b.cancelled).sum();
        Self {
            bucket_seconds: BUCKET_SECONDS,
            failure_rate: failure_rate(completed, failed),
            buckets,
            completed,
            failed,
            cancelled,
        }
    }
}

fn failure_rate(completed: i64, failed: i64) -> f64 {
    match completed + failed {
        0 => 0.0,
        finished => failed as f64 / finished as f64,
    }
}

async fn workers_seen(tx: &mut Tx, scope: Scope) -> ApiResult<Vec<WorkerSeen>> {
    let workers = sqlx::query_as(&format!(
        "with held as (
             select claimed_by as worker, id, claimed_at as seen_at from jobs
             where state = 'claimed' and claimed_by is not null and {SCOPED}
         ), finished as (
             select claimed_by as worker, max(completed_at) as seen_at from jobs
             where state in ('completed', 'failed', 'cancelled') and claimed_by is not null
               and completed_at > now() - make_interval(mins => $4) and {SCOPED}
             group by 1
         )
         select w.worker,
                (select count(*) from held h where h.worker = w.worker) as in_flight,
                array(select h.id from held h where h.worker = w.worker
                      order by h.seen_at limit $5) as jobs,
                max(w.seen_at) as last_seen_at
         from (select worker, seen_at from held union all select worker, seen_at from finished) w
         group by w.worker
         order by w.worker"
    ))
    .bind(scope.organization_id)
    .bind(scope.project_id)
    .bind(scope.is_admin)
    .bind(WORKER_SEEN_MINUTES as i32)
    .bind(JOBS_PER_WORKER)
    .fetch_all(&mut **tx)
    .await?;
    Ok(workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_rate_counts_failed_over_finished() {
        assert_eq!(failure_rate(0, 0), 0.0);
        assert_eq!(failure_rate(3, 1), 0.25);
        assert_eq!(failure_rate(0, 2), 1.0);
    }
}
