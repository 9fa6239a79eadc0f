//! Preview databases: short-lived copies of a project's database (`clone`: schema and
//! data; `empty`: schema only) with a login of their own, on the project's cluster,
//! deleted by workers once their TTL passes. The API records and queues; all of their
//! SQL is `capy_shared::previews`'s, and workers clone, reset and drop them.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::crypto;
use capy_shared::model::{Job, PreviewDatabase, PreviewMode, PreviewState, Project};
use capy_shared::previews::{self, NewPreview, Refusal};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::projects::{
    lock_clusters, lock_visible_project, open_sealed, require_postgresql, validate,
    visible_project, Credentials,
};
use crate::auth::{Principal, SCOPE_CREDENTIALS, SCOPE_READ, SCOPE_WRITE};
use crate::bodies::ErrorResponses;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::idempotency::Idempotent;
use crate::pagination::{self, Listing, NoFilter, PageParams};
use crate::AppState;

const NOT_FOUND: &str = "preview database";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePreview {
    /// `clone`: the project's schema and data, as of one snapshot; `empty`: its schema
    /// alone.
    mode: PreviewMode,
    /// 1–63 letters, digits, '-' and '_'; unique among the project's live previews.
    /// `preview-` and 8 hex digits of its id when left out.
    #[schema(schema_with = crate::bodies::project_name_or_null)]
    name: Option<String>,
    /// Hours until workers delete it: from 1 to the server's maximum
    /// (`CAPY_PREVIEW_MAX_TTL_HOURS`, 168 unless set); the server's default
    /// (`CAPY_PREVIEW_DEFAULT_TTL_HOURS`, 24 unless set) when left out.
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(value_type = Option<i64>, minimum = 1)]
    ttl_hours: Option<i64>,
    /// The project's own when left out, as the timeouts and the storage limit.
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 1, maximum = 1000)]
    max_connections: Option<i32>,
    #[schema(schema_with = crate::bodies::duration)]
    statement_timeout: Option<String>,
    #[schema(schema_with = crate::bodies::duration)]
    idle_transaction_timeout: Option<String>,
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 0)]
    storage_limit_bytes: Option<i64>,
}

impl CreatePreview {
    /// The preview to record for project `project_id`, its input checked (400 for a
    /// malformed name or limit, 422 for a TTL out of bounds); its id, default name and
    /// password are made here.
    fn into_new(self, state: &AppState, project_id: Uuid) -> ApiResult<NewPreview> {
        if let Some(name) = &self.name {
            validate::name(name)?;
        }
        validate::max_connections(self.max_connections)?;
        validate::duration("statement_timeout", self.statement_timeout.as_deref())?;
        validate::duration(
            "idle_transaction_timeout",
            self.idle_transaction_timeout.as_deref(),
        )?;
        validate::storage_limit(self.storage_limit_bytes)?;
        let ttl_seconds = state.settings.preview_ttl.seconds(self.ttl_hours)?;
        // Random (v4), not time-ordered: the default name takes its first 8 hex
        // digits, which for a v7 id would repeat for a minute.
        let id = Uuid::new_v4();
        Ok(NewPreview {
            id,
            project_id,
            name: self
                .name
                .unwrap_or_else(|| format!("preview-{}", &id.simple().to_string()[..8])),
            mode: self.mode,
            password_encrypted: state.secrets.seal(&crypto::generate_password()),
            max_connections: self.max_connections,
            statement_timeout: self.statement_timeout,
            idle_transaction_timeout: self.idle_transaction_timeout,
            storage_limit_bytes: self.storage_limit_bytes,
            ttl_seconds,
            max_attempts: state.settings.job_max_attempts,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendPreview {
    /// Hours from now until workers delete it: from 1 to the server's maximum
    /// (`CAPY_PREVIEW_MAX_TTL_HOURS`, 168 unless set).
    #[serde(deserialize_with = "crate::bodies::whole")]
    #[schema(value_type = i64, minimum = 1)]
    ttl_hours: Option<i64>,
}

/// A reset takes nothing: `{}`, `null` or no body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPreview {}

#[derive(Debug, Serialize, ToSchema)]
pub struct PreviewAndJob {
    pub preview: PreviewDatabase,
    pub job: Job,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PreviewBody {
    pub preview: PreviewDatabase,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PreviewList {
    pub preview_databases: Vec<PreviewDatabase>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Preview `id` (not deleted), if the caller may see its project; 404 otherwise. A key
/// narrowed to a project sees that project's previews.
async fn visible_preview(
    state: &AppState,
    principal: &Principal,
    id: Uuid,
) -> ApiResult<PreviewDatabase> {
    let mut conn = state.pool.acquire().await?;
    previews::find(&mut conn, id)
        .await?
        .filter(|o| principal.can_see(Some(o.organization_id), Some(o.preview.project_id)))
        .map(|o| o.preview)
        .ok_or(ApiError::NotFound(NOT_FOUND))
}

/// A refusal of the shared core as the API answers it; `message` words a refusal for
/// the preview's state (`Deleted`: it is gone, 404).
fn refused<T>(
    result: Result<T, Refusal>,
    message: impl Fn(PreviewState) -> String,
) -> ApiResult<T> {
    result.map_err(|refusal| match refusal {
        Refusal::ParentNotReady(state) => parent_not_ready(&state),
        Refusal::NameTaken => ApiError::Conflict(
            "the project already has a preview database of this name; choose another".into(),
        ),
        Refusal::Preview(PreviewState::Deleted) => ApiError::NotFound(NOT_FOUND),
        Refusal::Preview(state) => ApiError::Conflict(message(state)),
    })
}

fn parent_not_ready(state: &str) -> ApiError {
    ApiError::Conflict(format!(
        "the project is not ready (state: {state}); preview databases are made from a ready project"
    ))
}

/// Locks the cluster of `parent` (after the parent's row, as a restore into a new
/// project does) and refuses with 422 when it is full: a preview takes a place of the
/// cluster's `max_projects`, as a project does.
async fn lock_room(tx: &mut sqlx::PgConnection, parent: &Project) -> ApiResult<()> {
    // An unclaimed instant database (an admin's key sees it) has no previews; refused
    // before the cluster's lock, which a claim takes before that database's row.
    if parent.organization_id.is_none() {
        return Err(parent_not_ready(&parent.state));
    }
    let rooms = lock_clusters(tx, None, Some(parent.cluster_id)).await?;
    if rooms.iter().all(|room| room.has_room()) {
        return Ok(());
    }
    Err(ApiError::Unprocessable(format!(
        "cluster {}, which holds this project, is full (its project limit is reached, and \
         preview databases count against it); delete a project or a preview there or ask an \
         operator to raise max_projects",
        parent.cluster_id
    )))
}

/// Makes a preview database of the project: a `project.preview_create` job copies the
/// project's database (`clone`) or its schema (`empty`) into a database of its own,
/// with a login of its own (see `/connections`), the project's extensions, and the
/// project's limits unless given. Workers delete it once its TTL passes. The project
/// must be ready (409), and its cluster have room (422).
#[utoipa::path(post, path = "/v1/projects/{id}/preview-databases", tag = "previews",
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = CreatePreview,
    responses((status = 202, body = PreviewAndJob), ErrorResponses))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<CreatePreview>,
) -> ApiResult<(StatusCode, Json<PreviewAndJob>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let new = body.into_new(&state, id)?;
    let mut tx = state.pool.begin().await?;
    let parent = lock_visible_project(&mut tx, &principal, id).await?;
    require_postgresql(&parent, "preview databases")?;
    lock_room(&mut tx, &parent).await?;
    let (preview, job) = refused(previews::queue_create(&mut tx, &new).await?, |s| {
        format!("the preview database is {}", s.as_str())
    })?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::ACCEPTED,
            PreviewAndJob { preview, job },
        )
        .await
}

/// The project's preview databases (not deleted ones), newest first.
#[utoipa::path(get, path = "/v1/projects/{id}/preview-databases", tag = "previews",
    params(("id" = Uuid, Path, description = "Project id"), PageParams),
    responses((status = 200, body = PreviewList), ErrorResponses))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    Listing(NoFilter {}, page): Listing<NoFilter>,
) -> ApiResult<Json<PreviewList>> {
    principal.require_scope(SCOPE_READ)?;
    let limit = page.limit()?;
    let after = page.after::<Uuid>()?;
    visible_project(&state, &principal, id).await?;
    let mut conn = state.pool.acquire().await?;
    let rows = previews::list(&mut conn, id, after, limit + 1).await?;
    let (preview_databases, next_cursor) = pagination::page(rows, limit, |p| p.id);
    Ok(Json(PreviewList {
        preview_databases,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/preview-databases/{id}", tag = "previews",
    params(("id" = Uuid, Path, description = "Preview database id")),
    responses((status = 200, body = PreviewBody), ErrorResponses))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<PreviewBody>> {
    principal.require_scope(SCOPE_READ)?;
    let preview = visible_preview(&state, &principal, id).await?;
    Ok(Json(PreviewBody { preview }))
}

/// Deletes the preview database: it is marked `deleting` and a
/// `project.preview_delete` job ends its sessions and drops its database and login
/// (then it is gone). Asked again while that job is queued or running, answers it.
#[utoipa::path(delete, path = "/v1/preview-databases/{id}", tag = "previews",
    params(("id" = Uuid, Path, description = "Preview database id")),
    responses((status = 202, body = PreviewAndJob), ErrorResponses))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<PreviewAndJob>)> {
    principal.require_scope(SCOPE_WRITE)?;
    visible_preview(&state, &principal, id).await?;
    let mut tx = state.pool.begin().await?;
    let attempts = state.settings.job_max_attempts;
    let (preview, job) = previews::request_delete(&mut tx, id, attempts)
        .await?
        .ok_or(ApiError::NotFound(NOT_FOUND))?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(PreviewAndJob { preview, job })))
}

/// Sets the preview database's TTL to `ttl_hours` from now (shorter or longer than it
/// was). A preview being deleted cannot be extended (409).
#[utoipa::path(post, path = "/v1/preview-databases/{id}/extend", tag = "previews",
    params(("id" = Uuid, Path, description = "Preview database id")),
    request_body = ExtendPreview,
    responses((status = 200, body = PreviewBody), ErrorResponses))]
pub async fn extend(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<ExtendPreview>,
) -> ApiResult<(StatusCode, Json<PreviewBody>)> {
    principal.require_scope(SCOPE_WRITE)?;
    // Required: `whole` answers None for an explicit null.
    if body.ttl_hours.is_none() {
        return Err(ApiError::BadRequest("ttl_hours is required".into()));
    }
    let ttl_seconds = state.settings.preview_ttl.seconds(body.ttl_hours)?;
    visible_preview(&state, &principal, id).await?;
    let mut tx = state.pool.begin().await?;
    let preview = refused(previews::extend(&mut tx, id, ttl_seconds).await?, |s| {
        format!(
            "the preview database is {}; only a live one can be extended",
            s.as_str()
        )
    })?;
    idempotent
        .commit(&state, tx, StatusCode::OK, PreviewBody { preview })
        .await
}

/// Makes the preview database again from its project, as its create did (same mode,
/// login and password; what was written to it is lost): a `project.preview_reset` job,
/// the preview `provisioning` meanwhile. The preview must be ready or failed, and its
/// project ready (409).
#[utoipa::path(post, path = "/v1/preview-databases/{id}/reset", tag = "previews",
    params(("id" = Uuid, Path, description = "Preview database id")),
    request_body(content = Option<ResetPreview>, description = "Optional"),
    responses((status = 202, body = PreviewAndJob), ErrorResponses))]
pub async fn reset(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<PreviewAndJob>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let ResetPreview {} = extract::optional_json(&body)?;
    visible_preview(&state, &principal, id).await?;
    let mut tx = state.pool.begin().await?;
    let attempts = state.settings.job_max_attempts;
    let (preview, job) = refused(previews::queue_reset(&mut tx, id, attempts).await?, |s| {
        format!(
            "the preview database is {}; only a ready or failed one can be reset",
            s.as_str()
        )
    })?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::ACCEPTED,
            PreviewAndJob { preview, job },
        )
        .await
}

/// The preview database's own login as fields and URLs, with its password (needs the
/// `credentials:read` scope): never the project's. 409 until it is ready.
#[utoipa::path(get, path = "/v1/preview-databases/{id}/connections", tag = "previews",
    params(("id" = Uuid, Path, description = "Preview database id")),
    responses((status = 200, body = Credentials), ErrorResponses))]
pub async fn connections(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Credentials>> {
    principal.require_scope(SCOPE_CREDENTIALS)?;
    let preview = visible_preview(&state, &principal, id).await?;
    if preview.state != PreviewState::Ready {
        return Err(ApiError::Conflict(format!(
            "the preview database is not ready (state: {}); poll its latest job",
            preview.state.as_str()
        )));
    }
    let mut conn = state.pool.acquire().await?;
    let sealed = previews::password_encrypted(&mut conn, id).await?;
    let password = open_sealed(&state, &sealed)?;
    Ok(Json(Credentials::of(&preview, password)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PreviewTtl;
    use std::time::Duration;

    #[test]
    fn ttl_hours_are_bounded_by_the_settings() {
        let ttl = PreviewTtl::new(24, 168, 60).unwrap();
        assert_eq!(ttl.seconds(None).unwrap(), 24 * 60);
        assert_eq!(ttl.seconds(Some(1)).unwrap(), 60);
        assert_eq!(ttl.seconds(Some(168)).unwrap(), 168 * 60);
        for hours in [0, -1, 169, i64::MAX] {
            let refused = ttl.seconds(Some(hours)).unwrap_err();
            assert!(matches!(refused, ApiError::Unprocessable(_)), "{hours}");
            assert!(refused.to_string().contains("from 1 to 168"), "{refused}");
        }
        assert_eq!(PreviewTtl::default().hour, Duration::from_secs(3600));
        assert!(PreviewTtl::new(169, 168, 3600).is_err());
        assert!(PreviewTtl::new(0, 168, 3600).is_err());
    }
}
