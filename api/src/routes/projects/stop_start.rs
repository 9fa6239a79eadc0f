//! `POST /v1/projects/{id}/stop` and `/start`: a stopped project keeps its data but
//! refuses its logins (`project.stop` ends the open sessions too); start lets them in
//! again. Both queue behind the project's other jobs, like every change.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::model::job_type;
use serde_json::json;
use uuid::Uuid;

use super::change::job_in_flight;
use super::{fetch_project, lock_visible_project, queue_project_job};
use crate::auth::{Principal, SCOPE_WRITE};
use crate::bodies::{ErrorResponses, JobAndProject};
use crate::error::{ApiError, ApiResult};
use crate::extract::Path;
use crate::idempotency::Idempotent;
use crate::AppState;

/// Stops the project: a `project.stop` job refuses its logins and ends their sessions;
/// its state is `stopped` once the job completes. A stop already on its way is
/// answered (200) rather than queued twice.
#[utoipa::path(post, path = "/v1/projects/{id}/stop", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    responses((status = 200, description = "The stop already in flight", body = JobAndProject),
              (status = 202, description = "A new stop", body = JobAndProject),
              ErrorResponses))]
pub async fn stop(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<JobAndProject>)> {
    change_power(state, principal, idempotent, id, Power::Stop).await
}

/// Starts a stopped project: a `project.start` job lets its logins in again; its state
/// is `ready` once the job completes.
#[utoipa::path(post, path = "/v1/projects/{id}/start", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    responses((status = 200, description = "The start already in flight", body = JobAndProject),
              (status = 202, description = "A new start", body = JobAndProject),
              ErrorResponses))]
pub async fn start(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<JobAndProject>)> {
    change_power(state, principal, idempotent, id, Power::Start).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    Stop,
    Start,
}

impl Power {
    fn job_type(self) -> &'static str {
        match self {
            Self::Stop => job_type::PROJECT_STOP,
            Self::Start => job_type::PROJECT_START,
        }
    }

    /// The job that undoes this one.
    fn opposite(self) -> Self {
        match self {
            Self::Stop => Self::Start,
            Self::Start => Self::Stop,
        }
    }

    /// The state the project is in once the job completes (the job's `args.to`, which
    /// its outcome applies).
    fn to_state(self) -> &'static str {
        match self {
            Self::Stop => "stopped",
            Self::Start => "ready",
        }
    }

    /// The state the project must be in, unless the opposite job is still on its way
    /// (a start right after a stop queues behind it).
    fn required_state(self) -> &'static str {
        match self {
            Self::Stop => "ready",
            Self::Start => "stopped",
        }
    }
}

async fn change_power(
    state: AppState,
    principal: Principal,
    idempotent: Idempotent,
    id: Uuid,
    power: Power,
) -> ApiResult<(StatusCode, Json<JobAndProject>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let mut tx = state.pool.begin().await?;
    let project = lock_visible_project(&mut tx, &principal, id).await?;
    if project.state == "deleting" {
        return Err(ApiError::Conflict("the project is being deleted".into()));
    }
    let latest = sqlx::query_scalar::<_, String>(
        "select type from jobs where project_id = $1 and type in ($2, $3)
           and state in ('pending', 'claimed')
         order by seq desc limit 1",
    )
    .bind(id)
    .bind(Power::Stop.job_type())
    .bind(Power::Start.job_type())
    .fetch_optional(&mut *tx)
    .await?;
    if latest.as_deref() == Some(power.job_type()) {
        if let Some(job) = job_in_flight(&mut tx, id, power.job_type()).await? {
            return Ok((StatusCode::OK, Json(JobAndProject { job, project })));
        }
    }
    if power == Power::Stop && has_live_previews(&mut tx, id).await? {
        // Each preview has a login of its own and a copy of the data.
        return Err(ApiError::Conflict(
            "the project has preview databases: delete them before stopping it".into(),
        ));
    }
    let undoing = latest.as_deref() == Some(power.opposite().job_type());
    if project.state != power.required_state() && !undoing {
        return Err(ApiError::Conflict(format!(
            "the project is {}; only a {} project can be {}",
            project.state,
            power.required_state(),
            match power {
                Power::Stop => "stopped",
                Power::Start => "started",
            }
        )));
    }
    let args = json!({ "to": power.to_state() });
    let job = queue_project_job(&mut tx, &state, id, power.job_type(), args).await?;
    let project = fetch_project(&mut tx, id)
        .await?
        .ok_or(ApiError::NotFound("project"))?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::ACCEPTED,
            JobAndProject { job, project },
        )
        .await
}

/// Whether the project has preview databases not yet being deleted.
async fn has_live_previews(tx: &mut sqlx::PgConnection, id: Uuid) -> ApiResult<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from preview_databases where project_id = $1
                          and deleted_at is null and state not in ('deleting', 'deleted'))",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?)
}
