//! A project's extensions: what its cluster offers (from the catalog recorded at the
//! last access check) and what is enabled in its database. Enabling and disabling are
//! jobs, queued behind the project's other jobs.
//!
//! A tenant may enable an extension PostgreSQL marks trusted (the step creates it as the
//! project's role), or an untrusted one the cluster's operator allows (the step creates
//! it as the admin in a schema the tenant cannot write). Anything else is refused here,
//! and again by the step.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::model::job_type;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{lock_visible_project, queue_project_job, visible_project};
use crate::auth::{Principal, SCOPE_READ, SCOPE_WRITE};
use crate::bodies::{ErrorResponses, JobBody};
use crate::cluster_access;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::idempotency::Idempotent;
use crate::pagination::{self, Listing, NamePageParams, NoFilter};
use crate::AppState;

/// The one rule for what a tenant may enable, as the columns `allowed` and `reason` of
/// a query over `cluster_extensions e` joined with its `clusters c`.
const POLICY_COLUMNS: &str = "e.trusted or e.name = any(c.allowed_extensions) as allowed,
    case when not (e.trusted or e.name = any(c.allowed_extensions))
         then 'untrusted; not on the cluster''s allow-list' end as reason";

/// A catalog older than this is read again before an extension is refused as unknown,
/// so one installed on the cluster since is found.
const CATALOG_FRESH_SECONDS: i64 = 60;

#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub struct Extension {
    #[schema(example = "pgcrypto")]
    pub name: String,
    pub description: Option<String>,
    pub default_version: Option<String>,
    pub installed_version: Option<String>,
    pub enabled: bool,
    /// Whether a non-superuser with CREATE on the database could install it.
    pub trusted: bool,
    /// Whether this project may enable it: trusted, or allowed by the cluster's operator.
    pub allowed: bool,
    /// Why it may not be enabled; null when it may.
    #[schema(example = json!(null))]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExtensionList {
    pub extensions: Vec<Extension>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnableExtension {
    #[schema(example = "pgcrypto", pattern = "^[a-z0-9_-]{1,63}$")]
    name: String,
    /// A version the cluster offers; the default version when left out.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    version: Option<String>,
}

/// The extensions the project's cluster offers, with those enabled in its database.
#[utoipa::path(get, path = "/v1/projects/{id}/extensions", tag = "extensions",
    params(("id" = Uuid, Path, description = "Project id"), NamePageParams),
    responses((status = 200, body = ExtensionList), ErrorResponses))]
pub async fn list_extensions(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    Listing(NoFilter {}, page): Listing<NoFilter>,
) -> ApiResult<Json<ExtensionList>> {
    principal.require_scope(SCOPE_READ)?;
    let limit = page.limit()?;
    let project = visible_project(&state, &principal, id).await?;
    let known: bool = sqlx::query_scalar(
        "select exists (select 1 from cluster_extensions where cluster_id = $1)",
    )
    .bind(project.cluster_id)
    .fetch_one(&state.pool)
    .await?;
    if !known {
        refresh_catalog(&state, project.cluster_id).await?;
    }
    let rows: Vec<Extension> = sqlx::query_as(&format!(
        "select e.name, e.description, e.default_version, pe.version as installed_version,
                pe.name is not null as enabled, e.trusted, {POLICY_COLUMNS}
         from cluster_extensions e
         join clusters c on c.id = e.cluster_id
         left join project_extensions pe on pe.project_id = $2 and pe.name = e.name
         where e.cluster_id = $1 and ($3::text is null or e.name > $3)
         order by e.name
         limit $4"
    ))
    .bind(project.cluster_id)
    .bind(id)
    .bind(page.after::<String>()?)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (extensions, next_cursor) = pagination::page(rows, limit, |e| e.name.clone());
    Ok(Json(ExtensionList {
        extensions,
        next_cursor,
    }))
}

/// Queues a `project.extension_enable` job. An extension the cluster lacks is refused,
/// and so is one PostgreSQL does not mark trusted unless the cluster's operator allows
/// it (422, naming why); nothing is queued then.
#[utoipa::path(post, path = "/v1/projects/{id}/extensions", tag = "extensions",
    params(("id" = Uuid, Path, description = "Project id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    request_body = EnableExtension,
    responses((status = 202, body = JobBody), ErrorResponses))]
pub async fn enable_extension(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<EnableExtension>,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    principal.require_scope(SCOPE_WRITE)?;
    check_extension_name(&body.name)?;
    if let Some(version) = &body.version {
        let valid = (1..=64).contains(&version.len())
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(ApiError::BadRequest(
                "version must be 1 to 64 characters: letters, digits, '.', '_' and '-'".into(),
            ));
        }
    }
    let args = json!({ "name": body.name, "version": body.version });
    queue_extension_job(
        state,
        principal,
        &idempotent,
        id,
        &body.name,
        job_type::PROJECT_EXTENSION_ENABLE,
        args,
    )
    .await
}

/// Queues a `project.extension_disable` job.
#[utoipa::path(delete, path = "/v1/projects/{id}/extensions/{name}", tag = "extensions",
    params(("id" = Uuid, Path, description = "Project id"),
           ("name" = String, Path, description = "Extension name", pattern = "^[a-z0-9_-]{1,63}$")),
    responses((status = 202, body = JobBody), ErrorResponses))]
pub async fn disable_extension(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, name)): Path<(Uuid, String)>,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    principal.require_scope(SCOPE_WRITE)?;
    check_extension_name(&name)?;
    let args = json!({ "name": name });
    // A DELETE carries no Idempotency-Key: it is idempotent by itself.
    queue_extension_job(
        state,
        principal,
        &Idempotent::default(),
        id,
        &name,
        job_type::PROJECT_EXTENSION_DISABLE,
        args,
    )
    .await
}

/// Extension names: wider than capy's identifiers (`uuid-ossp`), always quoted in SQL.
pub(crate) fn check_extension_name(name: &str) -> ApiResult<()> {
    let valid = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "extension name must be 1 to 63 characters: lowercase letters, digits, '_' and '-'"
                .into(),
        ))
    }
}

async fn queue_extension_job(
    state: AppState,
    principal: Principal,
    idempotent: &Idempotent,
    id: Uuid,
    name: &str,
    job_type: &str,
    args: serde_json::Value,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    let project = visible_project(&state, &principal, id).await?;
    if !cluster_offers(&state, project.cluster_id, name).await? {
        return Err(ApiError::Unprocessable(format!(
            "the project's cluster does not offer the extension '{name}'"
        )));
    }
    if job_type == job_type::PROJECT_EXTENSION_ENABLE {
        require_allowed(&state, project.cluster_id, name).await?;
    }
    let mut tx = state.pool.begin().await?;
    let project = lock_visible_project(&mut tx, &principal, id).await?;
    if project.state == "deleting" {
        return Err(ApiError::Conflict("the project is being deleted".into()));
    }
    let job = queue_project_job(&mut tx, &state, id, job_type, args).await?;
    idempotent
        .commit(&state, tx, StatusCode::ACCEPTED, JobBody { job })
        .await
}

/// 422 unless the tenant may enable `name` on the cluster (see [`POLICY_COLUMNS`]).
async fn require_allowed(state: &AppState, cluster_id: Uuid, name: &str) -> ApiResult<()> {
    let row: Option<(bool, Option<String>, String)> = sqlx::query_as(&format!(
        "select {POLICY_COLUMNS}, c.name
         from cluster_extensions e join clusters c on c.id = e.cluster_id
         where e.cluster_id = $1 and e.name = $2"
    ))
    .bind(cluster_id)
    .bind(name)
    .fetch_optional(&state.pool)
    .await?;
    match row {
        Some((true, _, _)) => Ok(()),
        Some((false, _, cluster)) => Err(ApiError::Unprocessable(format!(
            "extension {name} is not trusted; an operator can allow it on cluster {cluster}"
        ))),
        None => Err(ApiError::Unprocessable(format!(
            "the project's cluster does not offer the extension '{name}'"
        ))),
    }
}

/// Whether the cluster offers `name`, reading its catalog again when it is stale.
async fn cluster_offers(state: &AppState, cluster_id: Uuid, name: &str) -> ApiResult<bool> {
    let (offered, fresh): (bool, bool) = sqlx::query_as(
        "select coalesce(bool_or(name = $2), false),
                coalesce(max(refreshed_at) > now() - make_interval(secs => $3), false)
         from cluster_extensions where cluster_id = $1",
    )
    .bind(cluster_id)
    .bind(name)
    .bind(CATALOG_FRESH_SECONDS as f64)
    .fetch_one(&state.pool)
    .await?;
    if offered || fresh {
        return Ok(offered);
    }
    refresh_catalog(state, cluster_id).await?;
    let offered: bool = sqlx::query_scalar(
        "select exists (select 1 from cluster_extensions where cluster_id = $1 and name = $2)",
    )
    .bind(cluster_id)
    .bind(name)
    .fetch_one(&state.pool)
    .await?;
    Ok(offered)
}

/// Reads the cluster's catalog again; 503 when the cluster does not answer.
async fn refresh_catalog(state: &AppState, cluster_id: Uuid) -> ApiResult<()> {
    let report = cluster_access::check_cluster(&state.pool, &state.secrets, cluster_id)
        .await
        .map_err(ApiError::from_anyhow)?;
    match report.error {
        None => Ok(()),
        Some(error) => Err(ApiError::ClusterUnavailable(format!(
            "the project's cluster did not answer, so its extensions are unknown: {error}"
        ))),
    }
}
