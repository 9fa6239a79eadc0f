//! Changing a project: PATCH (settings, applied by `project.update`), DELETE
//! (`project.delete`) and retrying a failed provisioning. Each queues behind the
//! project's earlier jobs, never fails because one is still running.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::model::{job_type, Job, Project, JOB_COLUMNS};
use capy_shared::previews;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{fetch_project, lock_visible_project, queue_project_job, validate};
use crate::auth::{Principal, SCOPE_WRITE};
use crate::bodies::{ErrorResponses, JobBody};
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::idempotency::Idempotent;
use crate::routes::api_keys;
use crate::AppState;

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProject {
    #[schema(schema_with = crate::bodies::project_name_or_null)]
    name: Option<String>,
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 1, maximum = 1000)]
    max_connections: Option<i32>,
    #[schema(schema_with = crate::bodies::duration)]
    statement_timeout: Option<String>,
    #[schema(schema_with = crate::bodies::duration)]
    idle_transaction_timeout: Option<String>,
    /// A number sets the limit; `null` removes it.
    #[serde(default, deserialize_with = "crate::bodies::present_whole")]
    #[schema(value_type = Option<i64>, minimum = 0)]
    storage_limit_bytes: Option<Option<i64>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectUpdated {
    pub project: Project,
    /// The `project.update` job applying the new settings, when any changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
}

/// Renames the project or changes its settings; changed settings are applied on the
/// cluster by a `project.update` job.
#[utoipa::path(patch, path = "/v1/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = UpdateProject,
    responses((status = 200, body = ProjectUpdated), ErrorResponses))]
pub async fn update(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<UpdateProject>,
) -> ApiResult<Json<ProjectUpdated>> {
    principal.require_scope(SCOPE_WRITE)?;
    if let Some(name) = &body.name {
        validate::name(name)?;
    }
    validate::max_connections(body.max_connections)?;
    validate::duration("statement_timeout", body.statement_timeout.as_deref())?;
    validate::duration(
        "idle_transaction_timeout",
        body.idle_transaction_timeout.as_deref(),
    )?;
    validate::storage_limit(body.storage_limit_bytes.flatten())?;

    let mut tx = state.pool.begin().await?;
    let before = lock_visible_project(&mut tx, &principal, id).await?;
    if before.state == "deleting" {
        return Err(ApiError::Conflict(
            "the project is being deleted".to_string(),
        ));
    }
    let changed = |new: Option<&str>, old: &str| new.is_some_and(|n| n != old);
    let applies_on_cluster = body
        .max_connections
        .is_some_and(|n| n != before.max_connections)
        || changed(body.statement_timeout.as_deref(), &before.statement_timeout)
        || changed(
            body.idle_transaction_timeout.as_deref(),
            &before.idle_transaction_timeout,
        );
    let updated = sqlx::query(
        "update projects set
             name = coalesce($2, name), slug = coalesce(lower($2), slug),
             max_connections = coalesce($3, max_connections),
             statement_timeout = coalesce($4, statement_timeout),
             idle_transaction_timeout = coalesce($5, idle_transaction_timeout),
             storage_limit_bytes = case when $6 then $7 else storage_limit_bytes end,
             updated_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(&body.name)
    .bind(body.max_connections)
    .bind(&body.statement_timeout)
    .bind(&body.idle_transaction_timeout)
    .bind(body.storage_limit_bytes.is_some())
    .bind(body.storage_limit_bytes.flatten())
    .execute(&mut *tx)
    .await;
    if let Err(sqlx::Error::Database(db)) = &updated {
        if db.constraint() == Some("projects_org_name") {
            return Err(ApiError::Conflict(format!(
                "a project named '{}' already exists",
                body.name.unwrap_or_default()
            )));
        }
    }
    updated?;
    let job = if applies_on_cluster {
        Some(queue_project_job(&mut tx, &state, id, job_type::PROJECT_UPDATE, json!({})).await?)
    } else {
        None
    };
    let project = fetch_project(&mut tx, id)
        .await?
        .ok_or(ApiError::NotFound("project"))?;
    tx.commit().await?;
    Ok(Json(ProjectUpdated { project, job }))
}

/// Deletes the project: a `project.delete` job ends its connections and drops its
/// database and role; the project then leaves the list. Its preview databases are
/// deleted first (their `project.preview_delete` jobs run before it). Keys narrowed to
/// the project are revoked at once. Deleting a project already being deleted answers
/// with that job.
#[utoipa::path(delete, path = "/v1/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id")),
    responses((status = 202, body = JobBody), ErrorResponses))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let mut tx = state.pool.begin().await?;
    lock_visible_project(&mut tx, &principal, id).await?;
    if let Some(job) = job_in_flight(&mut tx, id, job_type::PROJECT_DELETE).await? {
        return Ok((StatusCode::ACCEPTED, Json(JobBody { job })));
    }
    sqlx::query(
        "update projects set state = 'deleting', last_error = null, updated_at = now() where id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    // A key narrowed to a deleted project ends with it.
    api_keys::revoke_keys_of_project(&mut tx, id).await?;
    // The delete drops every login: a retire waiting for its grace has nothing to do.
    sqlx::query(
        "update jobs set state = 'cancelled', completed_at = now(), updated_at = now(),
                error = 'the project is being deleted; its delete drops the login'
         where project_id = $1 and type = $2 and state = 'pending'",
    )
    .bind(id)
    .bind(job_type::PROJECT_RETIRE_CREDENTIALS)
    .execute(&mut *tx)
    .await?;
    // Its previews' deletes are queued first: same resource, so they run before it
    // (their databases were cloned from it and live on its cluster).
    previews::delete_all_of_project(&mut tx, id, state.settings.job_max_attempts).await?;
    let job = queue_project_job(&mut tx, &state, id, job_type::PROJECT_DELETE, json!({})).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(JobBody { job })))
}

/// Answers the `project.create` job in flight if there is one (200); otherwise queues a
/// new one (202) for a project whose provisioning failed.
#[utoipa::path(post, path = "/v1/projects/{id}/retry-provisioning", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    responses((status = 200, description = "The provisioning job already in flight", body = JobBody),
              (status = 202, description = "A new provisioning job", body = JobBody),
              ErrorResponses))]
pub async fn retry_provisioning(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let mut tx = state.pool.begin().await?;
    let project = lock_visible_project(&mut tx, &principal, id).await?;
    // A project asked to go never provisions again (its pending create is refused by
    // the workers), so there is no job to point to either.
    if project.state == "deleting" {
        return Err(ApiError::Conflict(
            "the project is being deleted; it cannot be provisioned again".into(),
        ));
    }
    if let Some(job) = job_in_flight(&mut tx, id, job_type::PROJECT_CREATE).await? {
        return Ok((StatusCode::OK, Json(JobBody { job })));
    }
    if !matches!(project.state.as_str(), "error" | "provisioning") {
        return Err(ApiError::Conflict(format!(
            "the project is {}; only a project whose provisioning failed can retry it",
            project.state
        )));
    }
    sqlx::query("update projects set state = 'provisioning', updated_at = now() where id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let job = queue_project_job(&mut tx, &state, id, job_type::PROJECT_CREATE, json!({})).await?;
    idempotent
        .commit(&state, tx, StatusCode::ACCEPTED, JobBody { job })
        .await
}

/// The project's pending or claimed job of `job_type`, if any.
pub(super) async fn job_in_flight(
    tx: &mut sqlx::PgConnection,
    project_id: Uuid,
    job_type: &str,
) -> ApiResult<Option<Job>> {
    Ok(sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs
         where project_id = $1 and type = $2 and state in ('pending', 'claimed')
         order by seq desc limit 1"
    ))
    .bind(project_id)
    .bind(job_type)
    .fetch_optional(&mut *tx)
    .await?)
}
