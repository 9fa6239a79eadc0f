use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::effects;
use std::time::{Duration, Instant};

use capy_shared::model::{Job, JobAttempt, JOB_COLUMNS};
use capy_shared::queue::{self, Transition};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::{Principal, SCOPE_READ, SCOPE_WRITE};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Path, Query};
use crate::AppState;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    /// Seconds to wait for the job's state to change before answering (at most 60).
    wait: Option<u64>,
}

/// The job; with `?wait=N`, answers as soon as its state changes, or after N seconds,
/// so clients need not poll in a tight loop.
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    Query(query): Query<ShowQuery>,
) -> ApiResult<Json<Value>> {
    principal.require_scope(SCOPE_READ)?;
    let wait = match query.wait {
        Some(seconds) if seconds > 60 => {
            return Err(ApiError::BadRequest("wait is at most 60 seconds".into()))
        }
        Some(seconds) => Duration::from_secs(seconds),
        None => Duration::ZERO,
    };
    let first = visible_job(&state, &principal, id).await?;
    let deadline = Instant::now() + wait;
    let mut job = first.clone();
    while job.state == first.state && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50).min(deadline - Instant::now())).await;
        job = visible_job(&state, &principal, id).await?;
    }
    Ok(Json(json!({ "job": job })))
}

/// Every attempt of the job, oldest first: worker, times, exit code, classification,
/// stdout and stderr.
pub async fn attempts(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Value>> {
    principal.require_scope(SCOPE_READ)?;
    visible_job(&state, &principal, id).await?;
    let attempts: Vec<JobAttempt> = sqlx::query_as(
        "select attempt, worker, started_at, finished_at, exit_code, classification, error, stdout, stderr
         from job_attempts where job_id = $1 order by attempt",
    )
    .bind(id)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(json!({ "attempts": attempts })))
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
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    principal.require_scope(SCOPE_WRITE)?;
    transition(&state, &principal, id, Change::Cancel).await
}

/// Queues a failed or cancelled job again.
pub async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let change = Change::Retry {
        extra_attempts: state.settings.job_max_attempts,
    };
    transition(&state, &principal, id, change).await
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
    id: Uuid,
    change: Change,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut tx = state.pool.begin().await?;
    // Visibility first, so another organization's job id reveals nothing.
    let owner: Option<(Option<Uuid>, Option<Uuid>)> =
        sqlx::query_as("select organization_id, project_id from jobs where id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match owner {
        Some((org, project)) if principal.can_see(org, project) => {}
        _ => return Err(ApiError::NotFound("job")),
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
            tx.commit().await?;
            let status = if job.state == "claimed" {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(json!({ "job": job }))))
        }
        Transition::Refused(job) => Err(ApiError::Conflict(format!(
            "a {} job cannot be {verb}",
            job.state
        ))),
        Transition::NotFound => Err(ApiError::NotFound("job")),
    }
}
