//! Exports: a project's database as a `pg_dump -Fc` archive to download, kept 7 days.
//! A download is a short-lived URL: S3's own presigned URL, or for a folder store
//! capy's `GET /v1/exports/{id}/file`, authorized by its HMAC signature alone.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use capy_shared::model::{Backup, BackupKind, Job};
use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::backups::{create_kind, is_readable, list_kind, visible_backup};
use crate::auth::{Principal, SCOPE_CREDENTIALS, SCOPE_READ};
use crate::bodies::ErrorResponses;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path, Query};
use crate::idempotency::Idempotent;
use crate::pagination::{Listing, NoFilter, PageParams};
use crate::AppState;

/// How long a download URL works.
const DOWNLOAD_TTL: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateExport {
    /// What this export is for: at most 100 characters, no control characters.
    #[schema(max_length = 100)]
    label: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExportAndJob {
    pub export: Backup,
    pub job: Job,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExportBody {
    pub export: Backup,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExportList {
    pub exports: Vec<Backup>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Download {
    /// Fetch the archive here (no Authorization header) until `expires_at`.
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// Exports the project's database: a `project.backup` job dumps it (`pg_dump -Fc`)
/// into the backup store, downloadable for 7 days once completed. Needs a configured
/// backup store (409 without).
#[utoipa::path(post, path = "/v1/projects/{id}/exports", tag = "exports",
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = CreateExport,
    responses((status = 202, body = ExportAndJob), ErrorResponses))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<CreateExport>,
) -> ApiResult<(StatusCode, Json<ExportAndJob>)> {
    let (tx, export, job) =
        create_kind(&state, &principal, id, BackupKind::Export, body.label).await?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::ACCEPTED,
            ExportAndJob { export, job },
        )
        .await
}

/// The project's exports (not deleted ones), newest first.
#[utoipa::path(get, path = "/v1/projects/{id}/exports", tag = "exports",
    params(("id" = Uuid, Path, description = "Project id"), PageParams),
    responses((status = 200, body = ExportList), ErrorResponses))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    Listing(NoFilter {}, page): Listing<NoFilter>,
) -> ApiResult<Json<ExportList>> {
    let (exports, next_cursor) =
        list_kind(&state, &principal, id, BackupKind::Export, &page).await?;
    Ok(Json(ExportList {
        exports,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/exports/{id}", tag = "exports",
    params(("id" = Uuid, Path, description = "Export id")),
    responses((status = 200, body = ExportBody), ErrorResponses))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ExportBody>> {
    principal.require_scope(SCOPE_READ)?;
    let owned = visible_backup(&state, &principal, id, BackupKind::Export).await?;
    Ok(Json(ExportBody {
        export: owned.backup,
    }))
}

fn require_completed(export: &Backup) -> ApiResult<()> {
    if is_readable(export) {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "the export is {}; only a completed export can be downloaded",
        export.state.as_str()
    )))
}

/// A URL that downloads the export for 5 minutes (needs `credentials:read`: it is all
/// of the project's data).
#[utoipa::path(get, path = "/v1/exports/{id}/download", tag = "exports",
    params(("id" = Uuid, Path, description = "Export id")),
    responses((status = 200, body = Download), ErrorResponses))]
pub async fn download(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Download>> {
    principal.require_scope(SCOPE_CREDENTIALS)?;
    let export = visible_backup(&state, &principal, id, BackupKind::Export)
        .await?
        .backup;
    require_completed(&export)?;
    let store = state.require_backup_store()?;
    let expires_at = Utc::now() + DOWNLOAD_TTL;
    let signed = store
        .signed_url(&export.backup_key, DOWNLOAD_TTL)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let url = match signed {
        Some(url) => url.to_string(),
        None => {
            let expires = expires_at.timestamp();
            let signature = state.secrets.sign(&signed_message(id, expires));
            format!(
                "{}/v1/exports/{id}/file?expires={expires}&signature={signature}",
                state.settings.public_url.trim_end_matches('/')
            )
        }
    };
    Ok(Json(Download { url, expires_at }))
}

/// What a download URL's signature covers.
/// What a download URL's signature covers: its purpose, the export and the expiry, so
/// it is good for nothing else the secret key signs.
fn signed_message(id: Uuid, expires: i64) -> String {
    format!("capy-export-download:v1:{id}:{expires}")
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileParams {
    /// When the URL stops working (Unix seconds).
    expires: Option<i64>,
    /// HMAC-SHA256 of `<export id>.<expires>`, hex.
    #[param(pattern = "^[0-9a-f]{64}$")]
    signature: Option<String>,
}

/// The export's archive, for a URL made by `GET /v1/exports/{id}/download` (folder
/// stores): no key, the signature authorizes; 403 once expired or if altered.
#[utoipa::path(get, path = "/v1/exports/{id}/file", tag = "exports", security(()),
    params(("id" = Uuid, Path, description = "Export id"), FileParams),
    responses((status = 200, description = "The archive (`pg_dump -Fc`)",
               content_type = "application/octet-stream"),
              ErrorResponses))]
pub async fn file(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    Query(params): Query<FileParams>,
) -> ApiResult<Response> {
    let (Some(expires), Some(signature)) = (params.expires, params.signature) else {
        return Err(ApiError::Forbidden("this download link is not signed"));
    };
    if !state
        .secrets
        .verify(&signed_message(id, expires), &signature)
    {
        return Err(ApiError::Forbidden(
            "this download link's signature is wrong",
        ));
    }
    if expires < Utc::now().timestamp() {
        return Err(ApiError::Forbidden("this download link has expired"));
    }
    let mut conn = state.pool.acquire().await?;
    let export = capy_shared::backups::find(&mut conn, id, BackupKind::Export)
        .await?
        .ok_or(ApiError::NotFound("export"))?
        .backup;
    drop(conn);
    require_completed(&export)?;
    let store = state.require_backup_store()?;
    let object = store
        .object_store()
        .get(&store.path(&export.backup_key))
        .await
        .map_err(|e| match e {
            object_store::Error::NotFound { .. } => ApiError::NotFound("export archive"),
            other => ApiError::Internal(other.into()),
        })?;
    let stream = object.into_stream().map_err(std::io::Error::other);
    let disposition = format!(
        "attachment; filename=\"{}-{id}.dump\"",
        export.database_name
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
