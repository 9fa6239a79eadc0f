//! Jobs: listing, one job (with long-polling), its attempts, cancel and retry.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::effects;
use capy_shared::model::{job_type, Job, JobAttempt, JobState, JOB_COLUMNS};
use capy_shared::queue::{self, Transition};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Principal, SCOPE_READ, SCOPE_WRITE};
use crate::bodies::{ErrorResponses, JobBody};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Path, Query};
use crate::idempotency::Idempotent;
use crate::pagination::{self, Filter, Listing, NoFilter, NumberPageParams, PageParams};
use crate::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobFilter {
    project_id: Option<Uuid>,
    /// `pending`, `claimed`, `completed`, `failed` or `cancelled`.
    #[param(pattern = "^(pending|claimed|completed|failed|cancelled)$")]
    state: Option<String>,
    /// A job type such as `project.create`.
    #[serde(rename = "type", default, deserialize_with = "pagination::job_type")]
    #[param(rename = "type", schema_with = pagination::job_type_schema)]
    job_type: Option<String>,
    /// Platform admins only: one organization's jobs.
    organization_id: Option<Uuid>,
}

impl Filter for JobFilter {
    const PARAMS: &'static [&'static str] = &["project_id", "state", "type", "organization_id"];
}

/// The `state` filter as a [`JobState`]; a 400 naming the states for any other text.
fn parse_state(name: &str) -> ApiResult<JobState> {
    JobState::parse(name).ok_or_else(|| {
        let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        ApiError::BadRequest(format!("state must be one of {}", names.join(", ")))
    })
}

/// What one page of the list asks for, every field optional.
struct ListFilter {
    organization_id: Option<Uuid>,
    project_id: Option<Uuid>,
    state: Option<JobState>,
    job_type: Option<String>,
    /// The cursor: jobs older than this id.
    before: Option<Uuid>,
    /// Whether internal jobs (no organization) are listed: platform admins only.
    internal: bool,
}

/// The list's query with only the conditions asked for, so each combination is planned
/// on its own index (`jobs_org_id`, `jobs_org_state`, `jobs_org_type`,
/// `jobs_project_id`, `jobs_failed_or_cancelled`) rather than one generic plan with
/// `$n is null or …` that reads the whole history.
fn list_query(filter: &ListFilter, rows: i64) -> sqlx::QueryBuilder<'static, sqlx::Postgres> {
    let mut query = sqlx::QueryBuilder::new(format!("select {JOB_COLUMNS} from jobs where true"));
    if let Some(id) = filter.organization_id {
        query.push(" and organization_id = ").push_bind(id);
    } else if !filter.internal {
        query.push(" and organization_id is not null");
    }
    if let Some(id) = filter.project_id {
        query.push(" and project_id = ").push_bind(id);
    }
    if let Some(state) = filter.state {
        query.push(" and state = ").push_bind(state);
    }
    if let Some(job_type) = &filter.job_type {
        query.push(" and type = ").push_bind(job_type.clone());
    }
    if let Some(id) = filter.before {
        query.push(" and id < ").push_bind(id);
    }
    query.push(" order by id desc limit ").push_bind(rows);
    query
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    pub next_cursor: Option<String>,
}

/// The caller's jobs, newest first, filtered by project, state and type.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(JobFilter, PageParams),
    responses((status = 200, body = JobList), ErrorResponses))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Listing(filter, page): Listing<JobFilter>,
) -> ApiResult<Json<JobList>> {
    principal.require_scope(SCOPE_READ)?;
    let limit = page.limit()?;
    let job_state = filter.state.as_deref().map(parse_state).transpose()?;
    let organization_id = principal.listed_organization(filter.organization_id)?;
    // A project-scoped key sees its project's jobs only, whatever it asks for.
    let project_id = match (principal.project_id, filter.project_id) {
        (Some(own), Some(asked)) if own != asked => {
            return Ok(Json(JobList {
                jobs: Vec::new(),
                next_cursor: None,
            }))
        }
        (Some(own), _) => Some(own),
        (None, asked) => asked,
    };
    let filter = ListFilter {
        organization_id,
        project_id,
        state: job_state,
        job_type: filter.job_type,
        before: page.after::<Uuid>()?,
        internal: principal.is_admin,
    };
    let rows = list_query(&filter, limit + 1)
        .build_query_as::<Job>()
        .fetch_all(&state.pool)
        .await?;
    let (jobs, next_cursor) = pagination::page(rows, limit, |j| j.id);
    Ok(Json(JobList { jobs, next_cursor }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    /// Seconds to wait for the job's state to change before answering (at most 60).
    #[param(minimum = 0, maximum = 60)]
    wait: Option<u64>,
}

/// The job; with `?wait=N`, answers as soon as its state changes (or at once if it has
/// finished), or after N seconds, so clients need not poll in a tight loop.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"), ShowQuery),
    responses((status = 200, body = JobBody), ErrorResponses))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    Query(query): Query<ShowQuery>,
) -> ApiResult<Json<JobBody>> {
    principal.require_scope(SCOPE_READ)?;
    let wait = match query.wait {
        Some(seconds) if seconds > 60 => {
            return Err(ApiError::BadRequest("wait is at most 60 seconds".into()))
        }
        Some(seconds) => Duration::from_secs(seconds),
        None => Duration::ZERO,
    };
    // Subscribed first: a change between the first look and the subscription is not
    // missed.
    let mut changes = state.job_changes.subscribe();
    let first = visible_job(&state, &principal, id).await?;
    let deadline = Instant::now() + wait;
    let mut job = first.clone();
    // A finished job is answered at once: nothing is left to wait for.
    while job.state == first.state && !job.state.is_finished() && Instant::now() < deadline {
        changes.next_look(id, deadline - Instant::now()).await;
        job = visible_job(&state, &principal, id).await?;
    }
    Ok(Json(JobBody { job }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptList {
    pub attempts: Vec<JobAttempt>,
    pub next_cursor: Option<String>,
}

/// Every finished attempt of the job, oldest first: worker, times, exit code,
/// classification, stdout and stderr.
#[utoipa::path(get, path = "/v1/jobs/{id}/attempts", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"), NumberPageParams),
    responses((status = 200, body = AttemptList), ErrorResponses))]
pub async fn attempts(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    Listing(NoFilter {}, page): Listing<NoFilter>,
) -> ApiResult<Json<AttemptList>> {
    principal.require_scope(SCOPE_READ)?;
    let limit = page.limit()?;
    visible_job(&state, &principal, id).await?;
    let rows: Vec<JobAttempt> = sqlx::query_as(
        "select attempt, worker, started_at, finished_at, exit_code, classification, error, stdout, stderr
         from job_attempt_history where job_id = $1 and ($2::int is null or attempt > $2)
         order by attempt limit $3",
    )
    .bind(id)
    .bind(page.after::<i32>()?)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (attempts, next_cursor) = pagination::page(rows, limit, |a| a.attempt);
    Ok(Json(AttemptList {
        attempts,
        next_cursor,
    }))
}

/// Job `id`, if the caller may see it; 404 otherwise.
async fn visible_job(state: &AppState, principal: &Principal, id: Uuid) -> ApiResult<Job> {
    let job: Option<Job> = sqlx::query_as(&format!("select {JOB_COLUMNS} from jobs where id = $1"))
        .bind(id)
        .fetch_optional(&state.pool)
        .await?;
    job.filter(|job| principal.can_see(job.organization_id, job.project_id))
        .ok_or(ApiError::NotFound("job"))
}

/// Cancels a pending job at once (200), or asks a running job's worker to stop its
/// step (202: the job turns `cancelled` once the step is stopped).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    responses((status = 200, description = "Cancelled", body = JobBody),
              (status = 202, description = "The running step is being stopped", body = JobBody),
              ErrorResponses))]
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    principal.require_scope(SCOPE_WRITE)?;
    transition(&state, &principal, &idempotent, id, Change::Cancel).await
}

/// Queues a failed or cancelled job again; 409 for a job of a project that is deleted
/// or being deleted (except its `project.delete`).
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    responses((status = 200, body = JobBody), ErrorResponses))]
pub async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let change = Change::Retry {
        extra_attempts: state.settings.job_max_attempts,
    };
    transition(&state, &principal, &idempotent, id, change).await
}

/// What a caller asks of a job.
enum Change {
    Cancel,
    Retry { extra_attempts: i32 },
}

/// Runs a cancel or retry in a transaction with its effect on the project.
async fn transition(
    state: &AppState,
    principal: &Principal,
    idempotent: &Idempotent,
    id: Uuid,
    change: Change,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    let mut tx = state.pool.begin().await?;
    // Visibility first, so another organization's job id reveals nothing.
    let owner: Option<(Option<Uuid>, Option<Uuid>, String)> =
        sqlx::query_as("select organization_id, project_id, type from jobs where id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let kind = match owner {
        Some((org, project, kind)) if principal.can_see(org, project) => kind,
        _ => return Err(ApiError::NotFound("job")),
    };
    // The end of a rotation's grace is a promise: whoever holds a key may not keep
    // the old login alive by cancelling it (a rotation or the delete retires it).
    if matches!(change, Change::Cancel) && kind == job_type::PROJECT_RETIRE_CREDENTIALS {
        return Err(ApiError::Conflict(
            "a project.retire_credentials job cannot be cancelled: it ends a replaced login \
             when its grace is over"
                .into(),
        ));
    }
    let (outcome, verb) = match change {
        Change::Cancel => (queue::cancel(&mut tx, id).await?, "cancelled"),
        Change::Retry { extra_attempts } => {
            (queue::retry(&mut tx, id, extra_attempts).await?, "retried")
        }
    };
    match outcome {
        Transition::Done(job) => {
            effects::apply(&mut tx, &job).await?;
            let status = if job.state == JobState::Claimed {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            idempotent
                .commit(state, tx, status, JobBody { job })
                .await
        }
        Transition::Refused(job) => Err(ApiError::Conflict(format!(
            "a {} job cannot be {verb}",
            job.state
        ))),
        Transition::ProjectGone(job) => Err(ApiError::Conflict(format!(
            "this {} job belongs to a project that is deleted or being deleted: it cannot run again",
            job.job_type
        ))),
        Transition::NotFound => Err(ApiError::NotFound("job")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document's `state` pattern and the 400 agree: both are [`JobState`]'s names.
    #[test]
    fn the_state_pattern_names_every_state() {
        let params = JobFilter::into_params(|| None);
        let state = params
            .iter()
            .find(|p| p.name == "state")
            .expect("a state parameter");
        let schema = serde_json::to_value(&state.schema).expect("serializes");
        let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(schema["pattern"], format!("^({})$", names.join("|")));
        for name in names {
            assert!(parse_state(name).is_ok(), "{name}");
        }
        assert!(parse_state("retry").is_err());
    }
}
