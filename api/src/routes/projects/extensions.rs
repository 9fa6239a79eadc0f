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

use super::{lock_visible_project, queue_project_job, require_postgresql, visible_project};
use crate::auth::{Principal, SCOPE_READ, SCOPE_WRITE};
use crate::bodies::{ErrorResponses, JobBody};
use crate::cluster_access;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::idempotency::Idempotent;
use crate::pagination::{self, Listing, NamePageParams, NoFilter};
use crate::AppState;

/// The one rule for what a tenant may enable, as the columns `allowed` and `reason` of
/// a query over `cluster_extensions e` joined with its `clusters c` and the flags of
/// one of its versions, `cluster_extension_versions v` (left joined): an extension
/// PostgreSQL marks trusted, or whose control file says it needs no superuser, or one
/// the operator allows. Without a row for the version the catalog's `trusted` decides.
const POLICY_COLUMNS: &str = "coalesce(v.trusted or not v.superuser, e.trusted)
        or e.name = any(c.allowed_extensions) as allowed,
    case when not (coalesce(v.trusted or not v.superuser, e.trusted)
                   or e.name = any(c.allowed_extensions))
         then 'untrusted; not on the cluster''s allow-list' end as reason";

/// The extension-name rule of [`check_extension_name`], for the OpenAPI document.
pub(crate) const EXTENSION_NAME_PATTERN: &str = "^[a-z0-9_-]{1,63}$";

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
    /// Whether this project may enable it (its default version): trusted, needing no
    /// superuser by its control file, or allowed by the cluster's operator.
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
    #[schema(
        example = "pgcrypto",
        pattern = "^[a-z0-9_-]{1,63}$",
        min_length = 1,
        max_length = 63
    )]
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
    require_postgresql(&project, "extensions")?;
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
         left join cluster_extension_versions v
           on v.cluster_id = e.cluster_id and v.name = e.name and v.version = e.default_version
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
        (&body.name, body.version.as_deref()),
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
        (&name, None),
        job_type::PROJECT_EXTENSION_DISABLE,
        args,
    )
    .await
}

/// The OpenAPI schema of a list of extension names (at most `max_items`), each
/// following [`EXTENSION_NAME_PATTERN`].
pub(crate) fn extension_names_schema(max_items: usize) -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let name = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(EXTENSION_NAME_PATTERN))
        .min_length(Some(1))
        .max_length(Some(63));
    ArrayBuilder::new()
        .items(name)
        .max_items(Some(max_items))
        .examples([json!(["file_fdw"])])
        .build()
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
    (name, version): (&str, Option<&str>),
    job_type: &str,
    args: serde_json::Value,
) -> ApiResult<(StatusCode, Json<JobBody>)> {
    let project = visible_project(&state, &principal, id).await?;
    require_postgresql(&project, "extensions")?;
    let policy = read_policy(&state, project.cluster_id, name, version).await?;
    if !policy.offered {
        return Err(ApiError::Unprocessable(match version {
            Some(version) => format!(
                "the project's cluster does not offer version '{version}' of the extension '{name}'"
            ),
            None => format!("the project's cluster does not offer the extension '{name}'"),
        }));
    }
    if job_type == job_type::PROJECT_EXTENSION_ENABLE && !policy.allowed {
        // Clusters are the operator's: the tenant is not told which one.
        return Err(ApiError::Unprocessable(format!(
            "extension {name} is not trusted; an operator can allow it on the project's cluster"
        )));
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

/// What the catalog says of one extension (at one version) on a cluster.
#[derive(sqlx::FromRow)]
struct Policy {
    /// The cluster offers the extension (and the version, when one is asked for).
    offered: bool,
    /// The tenant may enable it (see [`POLICY_COLUMNS`]).
    allowed: bool,
    /// The catalog was read within [`CATALOG_FRESH_SECONDS`].
    fresh: bool,
}

/// The one read of the catalog behind a request: whether the cluster offers `name` (at
/// `version`, else its default version) and whether the tenant may enable it. A catalog
/// that lacks it and is stale is read again from the cluster first.
async fn read_policy(
    state: &AppState,
    cluster_id: Uuid,
    name: &str,
    version: Option<&str>,
) -> ApiResult<Policy> {
    let policy = query_policy(state, cluster_id, name, version).await?;
    if policy.offered || policy.fresh {
        return Ok(policy);
    }
    refresh_catalog(state, cluster_id).await?;
    query_policy(state, cluster_id, name, version).await
}

async fn query_policy(
    state: &AppState,
    cluster_id: Uuid,
    name: &str,
    version: Option<&str>,
) -> ApiResult<Policy> {
    let policy = sqlx::query_as(&format!(
        "with catalog as (
             select coalesce(max(refreshed_at) > now() - make_interval(secs => $4), false) as fresh
             from cluster_extensions where cluster_id = $1)
         select e.name is not null and ($3::text is null or v.version is not null) as offered,
                coalesce(p.allowed, false) as allowed, catalog.fresh
         from catalog
         left join cluster_extensions e on e.cluster_id = $1 and e.name = $2
         left join cluster_extension_versions v
           on v.cluster_id = e.cluster_id and v.name = e.name
          and v.version = coalesce($3, e.default_version)
         left join clusters c on c.id = e.cluster_id
         left join lateral (select {POLICY_COLUMNS}) p on true"
    ))
    .bind(cluster_id)
    .bind(name)
    .bind(version)
    .bind(CATALOG_FRESH_SECONDS as f64)
    .fetch_one(&state.pool)
    .await?;
    Ok(policy)
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
