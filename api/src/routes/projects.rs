//! Projects: logical databases on a cluster, provisioned by `project.create` jobs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::model::{job_type, Project, PROJECT_SELECT};
use capy_shared::queue::{self, NewJob};
use capy_shared::{crypto, ident};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::{Principal, SCOPE_CREDENTIALS, SCOPE_READ, SCOPE_WRITE};
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::AppState;

const DEFAULT_MAX_CONNECTIONS: i32 = 20;
const DEFAULT_STATEMENT_TIMEOUT: &str = "60s";
const DEFAULT_IDLE_TRANSACTION_TIMEOUT: &str = "60s";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    name: String,
    region: Option<String>,
    environment: Option<String>,
    max_connections: Option<i32>,
    statement_timeout: Option<String>,
    idle_transaction_timeout: Option<String>,
    storage_limit_bytes: Option<i64>,
}

/// A project's settings once validated and defaulted.
struct ProjectSpec {
    name: String,
    region: Option<String>,
    environment: String,
    max_connections: i32,
    statement_timeout: String,
    idle_transaction_timeout: String,
    storage_limit_bytes: Option<i64>,
}

impl CreateProject {
    fn validate(self) -> ApiResult<ProjectSpec> {
        let bad = |m: String| Err(ApiError::BadRequest(m));
        if !is_valid_name(&self.name) {
            return bad("name must be 1 to 63 characters: letters, digits, '-' and '_', starting with a letter or digit".into());
        }
        for (field, value) in [("region", &self.region), ("environment", &self.environment)] {
            if value.as_deref().is_some_and(|v| !is_valid_label(v)) {
                return bad(format!(
                    "{field} must be 1 to 32 characters: lowercase letters, digits and '-'"
                ));
            }
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=1000).contains(&max_connections) {
            return bad("max_connections must be between 1 and 1000".into());
        }
        for (field, value) in [
            ("statement_timeout", &self.statement_timeout),
            ("idle_transaction_timeout", &self.idle_transaction_timeout),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| !ident::is_valid_duration(v))
            {
                return bad(format!("{field} must be a duration such as \"30s\", \"500ms\", \"5min\" or \"0\" (no limit)"));
            }
        }
        if self.storage_limit_bytes.is_some_and(|b| b < 0) {
            return bad("storage_limit_bytes must not be negative".into());
        }
        Ok(ProjectSpec {
            name: self.name,
            region: self.region,
            environment: self.environment.unwrap_or_else(|| "development".into()),
            max_connections,
            statement_timeout: self
                .statement_timeout
                .unwrap_or_else(|| DEFAULT_STATEMENT_TIMEOUT.into()),
            idle_transaction_timeout: self
                .idle_transaction_timeout
                .unwrap_or_else(|| DEFAULT_IDLE_TRANSACTION_TIMEOUT.into()),
            storage_limit_bytes: self.storage_limit_bytes,
        })
    }
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn is_valid_label(label: &str) -> bool {
    (1..=32).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[derive(sqlx::FromRow)]
struct Placement {
    id: Uuid,
    region: String,
}

pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    extract::Json(body): extract::Json<CreateProject>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let organization_id = principal.organization()?;
    if principal.project_id.is_some() {
        return Err(ApiError::Forbidden(
            "a project-scoped API key cannot create projects",
        ));
    }
    let spec = body.validate()?;

    let mut tx = state.pool.begin().await?;
    // The cluster of the requested region (any region if none) with the most room.
    let placement: Option<Placement> = sqlx::query_as(
        "select c.id, c.region from clusters c
         left join projects p on p.cluster_id = c.id and p.deleted_at is null
         where $1::text is null or c.region = $1
         group by c.id
         having c.max_projects is null or count(p.id) < c.max_projects
         order by count(p.id), c.created_at
         limit 1",
    )
    .bind(&spec.region)
    .fetch_optional(&mut *tx)
    .await?;
    let placement = placement.ok_or_else(|| {
        ApiError::Unprocessable(match &spec.region {
            Some(region) => format!("no cluster in region '{region}' has room for a new project"),
            None => "no cluster has room for a new project".into(),
        })
    })?;

    let id = Uuid::now_v7();
    // Database and role names come from the id, never from user input.
    let database_name = format!("capy_{}", id.simple());
    let password = state.secrets.seal(&crypto::generate_password());
    let inserted = sqlx::query(
        "insert into projects (id, organization_id, cluster_id, name, slug, region, environment,
             state, database_name, role_name, password_encrypted, max_connections,
             statement_timeout, idle_transaction_timeout, storage_limit_bytes)
         values ($1, $2, $3, $4, $5, $6, $7, 'provisioning', $8, $8, $9, $10, $11, $12, $13)",
    )
    .bind(id)
    .bind(organization_id)
    .bind(placement.id)
    .bind(&spec.name)
    .bind(spec.name.to_ascii_lowercase())
    .bind(&placement.region)
    .bind(&spec.environment)
    .bind(&database_name)
    .bind(&password)
    .bind(spec.max_connections)
    .bind(&spec.statement_timeout)
    .bind(&spec.idle_transaction_timeout)
    .bind(spec.storage_limit_bytes)
    .execute(&mut *tx)
    .await;
    if let Err(sqlx::Error::Database(db)) = &inserted {
        if db.constraint() == Some("projects_org_name") {
            return Err(ApiError::Conflict(format!(
                "a project named '{}' already exists",
                spec.name
            )));
        }
    }
    inserted?;

    let job = queue::enqueue(
        &mut tx,
        &NewJob {
            job_type: job_type::PROJECT_CREATE.into(),
            organization_id: Some(organization_id),
            project_id: Some(id),
            cluster_id: Some(placement.id),
            locked_resource: Some(format!("project:{id}")),
            max_attempts: state.settings.job_max_attempts,
            args: json!({}),
        },
    )
    .await?;
    sqlx::query("update projects set latest_job_id = $2 where id = $1")
        .bind(id)
        .bind(job.id)
        .execute(&mut *tx)
        .await?;
    let project = fetch_project(&mut tx, id)
        .await?
        .ok_or(ApiError::NotFound("project"))?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": job, "project": project })),
    ))
}

pub async fn list(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Value>> {
    principal.require_scope(SCOPE_READ)?;
    let projects: Vec<Project> = sqlx::query_as(&format!(
        "{PROJECT_SELECT}
         where p.deleted_at is null
           and ($1 or p.organization_id = $2)
           and ($3::uuid is null or p.id = $3)
         order by p.created_at desc, p.id desc"
    ))
    .bind(principal.is_admin)
    .bind(principal.organization_id)
    .bind(principal.project_id)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(json!({ "projects": projects })))
}

pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Value>> {
    principal.require_scope(SCOPE_READ)?;
    let project = visible_project(&state, &principal, id).await?;
    Ok(Json(json!({ "project": project })))
}

#[derive(sqlx::FromRow)]
struct Credentials {
    password_encrypted: Vec<u8>,
}

pub async fn connections(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Value>> {
    principal.require_scope(SCOPE_CREDENTIALS)?;
    let project = visible_project(&state, &principal, id).await?;
    if project.state != "ready" {
        return Err(ApiError::Conflict(format!(
            "the project is not ready (state: {}); poll its latest job",
            project.state
        )));
    }
    let credentials: Credentials =
        sqlx::query_as("select password_encrypted from projects where id = $1")
            .bind(id)
            .fetch_one(&state.pool)
            .await?;
    let password = state
        .secrets
        .open(&credentials.password_encrypted)
        .map_err(|e| ApiError::Internal(e.into()))?;
    let url = |port: i32| connection_url(&project, port, &password);
    Ok(Json(json!({
        "direct_url": url(project.direct_port)?,
        "pooled_url": url(project.pooled_port)?,
        "username": project.role_name,
    })))
}

fn connection_url(project: &Project, port: i32, password: &str) -> ApiResult<String> {
    let mut url = url::Url::parse(&format!(
        "postgresql://{}:{port}/{}",
        project.public_host, project.database_name
    ))
    .map_err(|e| ApiError::Internal(e.into()))?;
    url.set_username(&project.role_name)
        .and_then(|()| url.set_password(Some(password)))
        .map_err(|()| ApiError::Internal(anyhow::anyhow!("cannot set URL credentials")))?;
    url.query_pairs_mut()
        .append_pair("sslmode", &project.ssl_mode);
    Ok(url.to_string())
}

/// The live project `id`, if the caller may see it; 404 otherwise.
async fn visible_project(state: &AppState, principal: &Principal, id: Uuid) -> ApiResult<Project> {
    let mut conn = state.pool.acquire().await?;
    fetch_project(&mut conn, id)
        .await?
        .filter(|p| principal.can_see(Some(p.organization_id), Some(p.id)))
        .ok_or(ApiError::NotFound("project"))
}

async fn fetch_project(conn: &mut sqlx::PgConnection, id: Uuid) -> sqlx::Result<Option<Project>> {
    sqlx::query_as(&format!(
        "{PROJECT_SELECT} where p.id = $1 and p.deleted_at is null"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}
