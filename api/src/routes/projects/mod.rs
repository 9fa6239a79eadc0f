//! Projects: logical databases on a cluster. The API records what is asked and queues
//! the job that does it; workers run the steps on the cluster.

mod change;
mod create;
mod credentials;
mod extensions;
mod stop_start;
pub(crate) mod validate;

pub use change::*;
pub use create::*;
pub use credentials::*;
pub use extensions::*;
pub use stop_start::*;
pub(crate) use validate::name as validate_name;
pub(crate) use validate::{LABEL_PATTERN, MAX_CONNECTIONS_RANGE, NAME_PATTERN};

use axum::extract::State;
use axum::Json;
use capy_shared::model::{Engine, Job, PreviewDatabase, Project, PROJECT_SELECT};
use capy_shared::queue::{self, NewJob};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{Principal, SCOPE_CREDENTIALS, SCOPE_READ};
use crate::bodies::{ErrorResponses, ProjectBody};
use crate::error::{ApiError, ApiResult};
use crate::extract::Path;
use crate::pagination::{self, Listing, OrganizationFilter, PageParams};
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectList {
    pub projects: Vec<Project>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The caller's live projects, newest first.
#[utoipa::path(get, path = "/v1/projects", tag = "projects",
    params(OrganizationFilter, PageParams),
    responses((status = 200, body = ProjectList), ErrorResponses))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Listing(filter, page): Listing<OrganizationFilter>,
) -> ApiResult<Json<ProjectList>> {
    principal.require_scope(SCOPE_READ)?;
    let limit = page.limit()?;
    let organization_id = principal.listed_organization(filter.organization_id)?;
    let rows: Vec<Project> = sqlx::query_as(&format!(
        "{PROJECT_SELECT}
         where p.deleted_at is null and p.organization_id is not null
           and ($1::uuid is null or p.organization_id = $1)
           and ($2::uuid is null or p.id = $2)
           and ($3::uuid is null or p.id < $3)
         order by p.id desc
         limit $4"
    ))
    .bind(organization_id)
    .bind(principal.project_id)
    .bind(page.after::<Uuid>()?)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (projects, next_cursor) = pagination::page(rows, limit, |p| p.id);
    Ok(Json(ProjectList {
        projects,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id")),
    responses((status = 200, body = ProjectBody), ErrorResponses))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ProjectBody>> {
    principal.require_scope(SCOPE_READ)?;
    let project = visible_project(&state, &principal, id).await?;
    Ok(Json(ProjectBody { project }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Connections {
    pub direct_url: String,
    /// Through the cluster's pooler; PostgreSQL projects only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pooled_url: Option<String>,
    pub username: String,
}

/// Connection strings with the password (needs the `credentials:read` scope).
#[utoipa::path(get, path = "/v1/projects/{id}/connections", tag = "projects",
    params(("id" = Uuid, Path, description = "Project id")),
    responses((status = 200, body = Connections), ErrorResponses))]
pub async fn connections(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Connections>> {
    principal.require_scope(SCOPE_CREDENTIALS)?;
    let project = visible_project(&state, &principal, id).await?;
    require_provisioned(&project)?;
    let password = open_password(&state, id).await?;
    let url = |endpoint| connection_url(&project, endpoint, &password);
    Ok(Json(Connections {
        direct_url: url(Endpoint::Direct)?.unwrap_or_default(),
        pooled_url: url(Endpoint::Pooled)?,
        username: project.role_name.clone(),
    }))
}

/// Credentials are answered for a ready or stopped project (a stopped one's work again
/// once it is started): 409 otherwise.
fn require_provisioned(project: &Project) -> ApiResult<()> {
    if project.state == "stopped" {
        return Ok(());
    }
    require_ready(project)
}

/// Credentials are rotated only for a ready project: 409 otherwise.
fn require_ready(project: &Project) -> ApiResult<()> {
    if project.state == "ready" {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "the project is not ready (state: {}); poll its latest job",
        project.state
    )))
}

/// The project's current password, opened.
async fn open_password(state: &AppState, id: Uuid) -> ApiResult<String> {
    let sealed: Vec<u8> =
        sqlx::query_scalar("select password_encrypted from projects where id = $1")
            .bind(id)
            .fetch_one(&state.pool)
            .await?;
    open_sealed(state, &sealed)
}

/// A password as stored (`SecretBox::seal`), opened.
pub(crate) fn open_sealed(state: &AppState, sealed: &[u8]) -> ApiResult<String> {
    state
        .secrets
        .open(sealed)
        .map_err(|e| ApiError::Internal(e.into()))
}

/// Where and as whom a login connects: a project's, or a preview database's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Login<'a> {
    pub engine: Engine,
    pub role_name: &'a str,
    pub database_name: &'a str,
    pub public_host: &'a str,
    pub direct_port: i32,
    pub pooled_host: &'a str,
    pub pooled_port: i32,
    pub ssl_mode: &'a str,
}

impl<'a> From<&'a Project> for Login<'a> {
    fn from(project: &'a Project) -> Self {
        Self {
            engine: project.engine,
            role_name: &project.role_name,
            database_name: &project.database_name,
            public_host: &project.public_host,
            direct_port: project.direct_port,
            pooled_host: &project.pooled_host,
            pooled_port: project.pooled_port,
            ssl_mode: &project.ssl_mode,
        }
    }
}

impl<'a> From<&'a PreviewDatabase> for Login<'a> {
    fn from(preview: &'a PreviewDatabase) -> Self {
        Self {
            engine: Engine::Postgresql,
            role_name: &preview.role_name,
            database_name: &preview.database_name,
            public_host: &preview.public_host,
            direct_port: preview.direct_port,
            pooled_host: &preview.pooled_host,
            pooled_port: preview.pooled_port,
            ssl_mode: &preview.ssl_mode,
        }
    }
}

/// Which of the project's addresses a connection string points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// The cluster itself: `public_host:direct_port`.
    Direct,
    /// The cluster's pooler: `pooled_host:pooled_port`.
    Pooled,
}

/// The one place connection strings are built: the login's role and password, its
/// database, the endpoint's host and port, and the cluster's `sslmode`, in the URL
/// form of the login's engine (a Redis URL has no database; MySQL's and Redis's have
/// no pooled endpoint, so `None`).
pub(crate) fn connection_url<'a>(
    login: impl Into<Login<'a>>,
    endpoint: Endpoint,
    password: &str,
) -> ApiResult<Option<String>> {
    let login = login.into();
    let (host, port) = match endpoint {
        Endpoint::Direct => (login.public_host, login.direct_port),
        Endpoint::Pooled if login.engine.is_postgresql() => (login.pooled_host, login.pooled_port),
        Endpoint::Pooled => return Ok(None),
    };
    let base = match login.engine {
        Engine::Postgresql => format!("postgresql://{host}:{port}/{}", login.database_name),
        Engine::Mysql => format!("mysql://{host}:{port}/{}", login.database_name),
        Engine::Redis => format!("redis://{host}:{port}"),
    };
    let mut url = url::Url::parse(&base).map_err(|e| ApiError::Internal(e.into()))?;
    url.set_username(login.role_name)
        .and_then(|()| url.set_password(Some(password)))
        .map_err(|()| ApiError::Internal(anyhow::anyhow!("cannot set URL credentials")))?;
    if login.engine.is_postgresql() {
        url.query_pairs_mut().append_pair("sslmode", login.ssl_mode);
    }
    Ok(Some(url.to_string()))
}

/// Refuses (422) what only PostgreSQL projects have (`feature`) for a project of
/// another engine; nothing is queued then.
pub(crate) fn require_postgresql(project: &Project, feature: &str) -> ApiResult<()> {
    if project.engine.is_postgresql() {
        return Ok(());
    }
    Err(ApiError::Unprocessable(format!(
        "{feature}: not available for {} projects",
        project.engine.as_str()
    )))
}

/// The live project `id`, if the caller may see it; 404 otherwise.
pub(crate) async fn visible_project(
    state: &AppState,
    principal: &Principal,
    id: Uuid,
) -> ApiResult<Project> {
    let mut conn = state.pool.acquire().await?;
    fetch_project(&mut conn, id)
        .await?
        .filter(|p| principal.can_see(p.organization_id, Some(p.id)))
        .ok_or(ApiError::NotFound("project"))
}

/// As [`visible_project`], inside the caller's transaction, with the row locked so
/// concurrent changes to one project take turns.
pub(crate) async fn lock_visible_project(
    conn: &mut sqlx::PgConnection,
    principal: &Principal,
    id: Uuid,
) -> ApiResult<Project> {
    sqlx::query("select 1 from projects where id = $1 for update")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    fetch_project(conn, id)
        .await?
        .filter(|p| principal.can_see(p.organization_id, Some(p.id)))
        .ok_or(ApiError::NotFound("project"))
}

pub(crate) async fn fetch_project(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
) -> sqlx::Result<Option<Project>> {
    sqlx::query_as(&format!(
        "{PROJECT_SELECT} where p.id = $1 and p.deleted_at is null"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Queues a job of the project behind its other jobs (`locked_resource`) and records it
/// as the project's latest.
pub(crate) async fn queue_project_job(
    tx: &mut sqlx::PgConnection,
    state: &AppState,
    project_id: Uuid,
    job_type: &str,
    args: serde_json::Value,
) -> ApiResult<Job> {
    let (organization_id, cluster_id): (Option<Uuid>, Uuid) =
        sqlx::query_as("select organization_id, cluster_id from projects where id = $1")
            .bind(project_id)
            .fetch_one(&mut *tx)
            .await?;
    let job = queue::enqueue(
        &mut *tx,
        &NewJob {
            job_type: job_type.into(),
            organization_id,
            project_id: Some(project_id),
            preview_database_id: None,
            cluster_id: Some(cluster_id),
            locked_resource: Some(format!("project:{project_id}")),
            max_attempts: state.settings.job_max_attempts,
            args,
            run_at: None,
        },
    )
    .await?;
    sqlx::query("update projects set latest_job_id = $2, updated_at = now() where id = $1")
        .bind(project_id)
        .bind(job.id)
        .execute(&mut *tx)
        .await?;
    Ok(job)
}
