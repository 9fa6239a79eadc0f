//! A project's credentials as fields (the managed-databases API's shape), and their
//! rotation: a new login with a new password, the old one working until its grace ends.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::crypto;
use capy_shared::ident::is_valid_identifier;
use capy_shared::model::{job_type, redis_prefix, Engine};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::change::job_in_flight;
use super::{
    connection_url, lock_visible_project, open_password, queue_project_job, require_postgresql,
    require_provisioned, require_ready, validate, visible_project, Endpoint, Login,
};
use crate::auth::{Principal, SCOPE_CREDENTIALS, SCOPE_WRITE};
use crate::bodies::{ErrorResponses, JobBody};
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::idempotency::Idempotent;
use crate::AppState;

/// How long the old login works after a rotation when the request does not say.
const DEFAULT_GRACE_HOURS: i32 = 24;

#[derive(Debug, Serialize, ToSchema)]
pub struct Credentials {
    pub engine: Engine,
    pub host: String,
    pub port: i32,
    pub username: String,
    pub password: String,
    /// PostgreSQL and MySQL: the project's database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// PostgreSQL: the sslmode of the connection strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssl_mode: Option<String>,
    /// Redis: the prefix of every key and channel the user may touch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// A URL with all of the above.
    pub connection_string: String,
    /// The same, through the cluster's pooled endpoint (PostgreSQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pooled_connection_string: Option<String>,
    /// While a rotation's grace runs: the login it replaced (it works until
    /// `previous_expires_at`; its password is not shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_expires_at: Option<DateTime<Utc>>,
}

/// The project's credentials as fields, with its password (needs the
/// `credentials:read` scope).
#[utoipa::path(get, path = "/v1/projects/{id}/credentials", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id")),
    responses((status = 200, body = Credentials), ErrorResponses))]
pub async fn credentials(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Credentials>> {
    principal.require_scope(SCOPE_CREDENTIALS)?;
    let project = visible_project(&state, &principal, id).await?;
    require_provisioned(&project)?;
    let password = open_password(&state, id).await?;
    let (previous_username, previous_expires_at): (Option<String>, Option<DateTime<Utc>>) =
        sqlx::query_as(
            "select previous_role_name, previous_expires_at from projects where id = $1",
        )
        .bind(id)
        .fetch_one(&state.pool)
        .await?;
    Ok(Json(Credentials {
        previous_username,
        previous_expires_at,
        key_prefix: (project.engine == Engine::Redis).then(|| redis_prefix(project.id)),
        ..Credentials::of(&project, password)?
    }))
}

impl Credentials {
    /// Login `login`'s credentials with its `password` (opened), no login in grace: the
    /// one place the fields are filled, for projects and preview databases alike.
    pub(crate) fn of<'a>(login: impl Into<Login<'a>>, password: String) -> ApiResult<Self> {
        let login = login.into();
        Ok(Self {
            engine: login.engine,
            connection_string: connection_url(login, Endpoint::Direct, &password)?
                .unwrap_or_default(),
            pooled_connection_string: connection_url(login, Endpoint::Pooled, &password)?,
            host: login.public_host.to_string(),
            port: login.direct_port,
            username: login.role_name.to_string(),
            password,
            database: (login.engine != Engine::Redis).then(|| login.database_name.to_string()),
            ssl_mode: login
                .engine
                .is_postgresql()
                .then(|| login.ssl_mode.to_string()),
            key_prefix: None,
            previous_username: None,
            previous_expires_at: None,
        })
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateCredentials {
    /// Hours the old login keeps working (0: it is dropped as soon as the new one
    /// works). 24 when left out.
    // Any JSON, checked by the handler: every wrong kind of value gets its message.
    #[schema(value_type = Option<i32>, minimum = 0, maximum = 720, default = 24)]
    grace_hours: Option<serde_json::Value>,
}

/// Rotates the project's credentials: a `project.rotate_credentials` job makes a new
/// login with a new password, which works at once; the old one keeps working for
/// `grace_hours`, then a `project.retire_credentials` job drops it (what it owns goes to
/// the new login). A login still in its grace is retired by the next rotation.
#[utoipa::path(post, path = "/v1/projects/{id}/credentials/rotate", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    request_body = RotateCredentials,
    responses((status = 202, body = JobBody), ErrorResponses))]
pub async fn rotate_credentials(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<RotateCredentials>,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let grace_hours = validate::grace_hours(body.grace_hours.as_ref(), DEFAULT_GRACE_HOURS)?;
    let mut tx = state.pool.begin().await?;
    let project = lock_visible_project(&mut tx, &principal, id).await?;
    require_postgresql(&project, "credential rotation")?;
    require_ready(&project)?;
    if let Some(job) = job_in_flight(&mut tx, id, job_type::PROJECT_ROTATE_CREDENTIALS).await? {
        return Err(ApiError::Conflict(format!(
            "a rotation of this project's credentials is already in progress (job {})",
            job.id
        )));
    }
    prepare_pending_login(&mut tx, &state, id).await?;
    let args = json!({ "grace_hours": grace_hours });
    let job = queue_project_job(
        &mut tx,
        &state,
        id,
        job_type::PROJECT_ROTATE_CREDENTIALS,
        args,
    )
    .await?;
    idempotent
        .commit(&state, tx, StatusCode::ACCEPTED, JobBody { job })
        .await
}

/// Records the login the rotation makes, unless one is already pending (a failed or
/// cancelled rotation's, which may exist on the cluster): `<database>_r<n>`, with a new
/// password sealed like the project's. Kept in the project's row, never in the job's
/// args (which the API shows).
async fn prepare_pending_login(
    tx: &mut sqlx::PgConnection,
    state: &AppState,
    id: Uuid,
) -> ApiResult<()> {
    let sealed = state.secrets.seal(&crypto::generate_password());
    let name: String = sqlx::query_scalar(
        "update projects set
             pending_role_name = coalesce(pending_role_name,
                                          database_name || '_r' || (credential_rotations + 1)),
             pending_password_encrypted = coalesce(pending_password_encrypted, $2),
             credential_rotations = credential_rotations
                                    + case when pending_role_name is null then 1 else 0 end,
             updated_at = now()
         where id = $1
         returning pending_role_name",
    )
    .bind(id)
    .bind(&sealed)
    .fetch_one(&mut *tx)
    .await?;
    if !is_valid_identifier(&name) {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "the new login's name {name:?} is not a valid identifier"
        )));
    }
    Ok(())
}
