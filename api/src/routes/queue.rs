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
use sqlx::postgres::PgArguments;
use sqlx::Arguments as _;
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
    let (now, oldest_pending_age_seconds) = oldest_pending_age(&mut tx, scope).await?;
    let mut tally = Tally::new(now);
    tally.add_live(live_counts(&mut tx, scope).await?);
    tally.add_finished(finished_last_hour(&mut tx, scope).await?);
    let workers = match principal.is_admin {
        true => Some(workers_seen(&mut tx, scope).await?),
        false => None,
    };
    tx.commit().await?;
    let by_type: Vec<TypeCounts> = tally.by_type.into_values().collect();
    Ok(Json(QueueOverview {
        scope: scope_name,
        pending: by_type.iter().map(|c| c.pending).sum(),
        claimed: by_type.iter().map(|c| c.claimed).sum(),
        oldest_pending_age_seconds,
        by_type,
        last_hour: LastHour::from_buckets(tally.buckets),
        workers,
    }))
}

/// The condition of [`Scope`] on `jobs`, with its organization as `$1` and project as
/// `$2`, `$3` whether internal jobs (no organization) count: the binds of
/// [`Scope::arguments`].
const SCOPED: &str = "($1::uuid is null or organization_id = $1)
       and ($2::uuid is null or project_id = $2)
       and ($3 or organization_id is not null)";

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

impl Scope {
    /// `$1`, `$2` and `$3` of [`SCOPED`]; every query here takes these and no others.
    fn arguments(self) -> ApiResult<PgArguments> {
        let mut arguments = PgArguments::default();
        arguments
            .add(self.organization_id)
            .and_then(|()| arguments.add(self.project_id))
            .and_then(|()| arguments.add(self.is_admin))
            .map_err(sqlx::Error::Encode)?;
        Ok(arguments)
    }
}

fn of_type(by_type: &mut BTreeMap<String, TypeCounts>, job_type: String) -> &mut TypeCounts {
    by_type
        .entry(job_type.clone())
        .or_insert_with(|| TypeCounts {
            job_type,
            ..TypeCounts::default()
        })
}

/// The per-type counts and the last hour's buckets, filled from the live jobs and
/// from one scan of the jobs finished in the last hour.
struct Tally {
    by_type: BTreeMap<String, TypeCounts>,
    buckets: Vec<Bucket>,
}

impl Tally {
    fn new(now: DateTime<Utc>) -> Self {
        let hour_ago = now - chrono::Duration::seconds(3600);
        let buckets = (0..BUCKETS)
            .map(|i| Bucket {
                start: hour_ago + chrono::Duration::seconds(i * BUCKET_SECONDS),
                completed: 0,
                failed: 0,
                cancelled: 0,
            })
            .collect();
        Self {
            by_type: BTreeMap::new(),
            buckets,
        }
    }

    fn add_live(&mut self, rows: Vec<(String, JobState, i64)>) {
        for (job_type, job_state, count) in rows {
            let counts = of_type(&mut self.by_type, job_type);
            match job_state {
                JobState::Pending => counts.pending += count,
                JobState::Claimed => counts.claimed += count,
                JobState::Completed | JobState::Failed | JobState::Cancelled => {}
            }
        }
    }

    fn add_finished(&mut self, rows: Vec<(String, JobState, i64, i64)>) {
        for (job_type, job_state, index, count) in rows {
            let counts = of_type(&mut self.by_type, job_type);
            let bucket = usize::try_from(index)
                .ok()
                .and_then(|i| self.buckets.get_mut(i));
            let (in_type, in_bucket) = match job_state {
                JobState::Completed => (&mut counts.completed, bucket.map(|b| &mut b.completed)),
                JobState::Failed => (&mut counts.failed, bucket.map(|b| &mut b.failed)),
                JobState::Cancelled => (&mut counts.cancelled, bucket.map(|b| &mut b.cancelled)),
                JobState::Pending | JobState::Claimed => continue,
            };
            *in_type += count;
            if let Some(in_bucket) = in_bucket {
                *in_bucket += count;
            }
        }
    }
}

/// The transaction's `now()` (the buckets end there) and how long the oldest due
/// pending job has waited.
async fn oldest_pending_age(tx: &mut Tx, scope: Scope) -> ApiResult<(DateTime<Utc>, Option<f64>)> {
    let (now, age): (DateTime<Utc>, Option<f64>) = sqlx::query_as_with(
        &format!(
            "select now(), extract(epoch from now() - min(run_at))::float8 from jobs
             where state = 'pending' and run_at <= now() and {SCOPED}"
        ),
        scope.arguments()?,
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok((now, age.map(|seconds| seconds.max(0.0))))
}

async fn live_counts(tx: &mut Tx, scope: Scope) -> ApiResult<Vec<(String, JobState, i64)>> {
    Ok(sqlx::query_as_with(
        &format!(
            "select type, state, count(*) from jobs
             where state in ('pending', 'claimed') and {SCOPED}
             group by 1, 2"
        ),
        scope.arguments()?,
    )
    .fetch_all(&mut **tx)
    .await?)
}

/// Jobs finished in the last hour per type, state and bucket (0: the oldest), read
/// once for both the per-type counts and the chart.
async fn finished_last_hour(
    tx: &mut Tx,
    scope: Scope,
) -> ApiResult<Vec<(String, JobState, i64, i64)>> {
    Ok(sqlx::query_as_with(
        &format!(
            "select type, state,
                    least(floor(extract(epoch from completed_at - (now() - interval '1 hour'))
                                / {BUCKET_SECONDS})::int8, {last}),
                    count(*)
             from jobs
             where state in ('completed', 'failed', 'cancelled')
               and completed_at > now() - interval '1 hour' and {SCOPED}
             group by 1, 2, 3",
            last = BUCKETS - 1
        ),
        scope.arguments()?,
    )
    .fetch_all(&mut **tx)
    .await?)
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
    let workers = sqlx::query_as_with(
        &format!(
            "with held as (
             select claimed_by as worker, id, claimed_at as seen_at from jobs
             where state = 'claimed' and claimed_by is not null and {SCOPED}
         ), finished as (
             select claimed_by as worker, max(completed_at) as seen_at from jobs
             where state in ('completed', 'failed', 'cancelled') and claimed_by is not null
               and completed_at > now() - make_interval(mins => {WORKER_SEEN_MINUTES}) and {SCOPED}
             group by 1
         )
         select w.worker,
                (select count(*) from held h where h.worker = w.worker) as in_flight,
                array(select h.id from held h where h.worker = w.worker
                      order by h.seen_at limit {JOBS_PER_WORKER}) as jobs,
                max(w.seen_at) as last_seen_at
         from (select worker, seen_at from held union all select worker, seen_at from finished) w
         group by w.worker
         order by w.worker"
        ),
        scope.arguments()?,
    )
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
