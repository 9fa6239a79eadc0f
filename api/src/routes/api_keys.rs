//! API keys: created (the plaintext is shown once), listed (never a secret) and
//! revoked. An organization's key manages its organization's keys, a project-scoped
//! key those of its project; a new key never gets a scope its creator lacks, nor
//! outlives it: revoking a key revokes every key it made, transitively.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::queue::PROJECT_IS_LIVE;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::admin::{self, KeyGrant};
use crate::auth::{Principal, SCOPES, SCOPE_READ, SCOPE_WRITE};
use crate::bodies::ErrorResponses;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::idempotency::Idempotent;
use crate::pagination::{self, Listing, OrganizationFilter, PageParams};
use crate::AppState;

const KEY_COLUMNS: &str = "id, name, key_prefix, organization_id, project_id, is_admin as admin, \
    scopes, expires_at, revoked_at, created_by_key_id, created_at";

#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    /// The key's first characters, to recognise it; the rest is never stored.
    pub key_prefix: String,
    pub organization_id: Option<Uuid>,
    /// Set when the key is narrowed to one project.
    pub project_id: Option<Uuid>,
    pub admin: bool,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The key that made this one: revoking or expiring it ends this one too.
    pub created_by_key_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyBody {
    pub api_key: ApiKey,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    pub api_key: ApiKey,
    /// The key itself (`capy_live_…`). Shown this once; store it now.
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKey>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    #[schema(schema_with = crate::bodies::display_name)]
    name: String,
    /// Platform admins: the organization the key belongs to. Others: their own
    /// (may be left out).
    organization_id: Option<Uuid>,
    /// Narrows the key to one project of the organization.
    project_id: Option<Uuid>,
    /// Any of `read`, `write`, `credentials:read`; all of the creator's when left out.
    #[schema(schema_with = crate::bodies::scopes)]
    scopes: Option<Vec<String>>,
    /// No later than the creating key's expiry (422 otherwise); the creating key's
    /// when left out.
    expires_at: Option<DateTime<Utc>>,
}

/// Creates a key; the answer carries its plaintext, once. The new key never outlives
/// the key creating it: its `expires_at` defaults to the creator's and may not be
/// later (422); revoking or expiring the creator ends it too.
#[utoipa::path(post, path = "/v1/api_keys", tag = "api_keys",
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey), ErrorResponses))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    extract::Json(body): extract::Json<CreateApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let grant = grant_for(&principal, body)?;
    let mut tx = state.pool.begin().await?;
    let organization_exists: bool =
        sqlx::query_scalar("select exists (select 1 from organizations where id = $1)")
            .bind(grant.organization_id)
            .fetch_one(&mut *tx)
            .await?;
    if !organization_exists {
        return Err(ApiError::NotFound("organization"));
    }
    if let Some(project_id) = grant.project_id {
        let live: bool = sqlx::query_scalar(&format!(
            "select exists (select 1 from projects
                            where id = $1 and organization_id = $2 and {PROJECT_IS_LIVE})"
        ))
        .bind(project_id)
        .bind(grant.organization_id)
        .fetch_one(&mut *tx)
        .await?;
        if !live {
            return Err(ApiError::NotFound("project"));
        }
    }
    let (id, key) = admin::create_api_key(&mut *tx, &grant)
        .await
        .map_err(ApiError::from_anyhow)?;
    let api_key = fetch(&mut *tx, id)
        .await?
        .ok_or(ApiError::NotFound("API key"))?;
    let created = CreatedApiKey { api_key, key };
    idempotent
        .commit(&state, tx, StatusCode::CREATED, created)
        .await
}

/// The key `principal` asks for with `body`, checked: name, scopes, owner, expiry.
fn grant_for(principal: &Principal, body: CreateApiKey) -> ApiResult<KeyGrant> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "name must be 1 to 100 characters, without control characters".into(),
        ));
    }
    let organization_id = match (principal.is_admin, body.organization_id) {
        (true, Some(id)) => id,
        (true, None) => {
            return Err(ApiError::BadRequest(
                "organization_id is required: the organization the key belongs to".into(),
            ))
        }
        (false, Some(id)) if Some(id) != principal.organization_id => {
            return Err(ApiError::NotFound("organization"))
        }
        (false, _) => principal.organization()?,
    };
    let project_id = match (principal.project_id, body.project_id) {
        (Some(own), Some(asked)) if own != asked => return Err(ApiError::NotFound("project")),
        (Some(own), _) => Some(own),
        (None, asked) => asked,
    };
    Ok(KeyGrant {
        name: name.to_string(),
        organization_id: Some(organization_id),
        is_admin: false,
        project_id,
        scopes: Some(scopes_for(principal, body.scopes)?),
        expires_at: expiry_for(principal, body.expires_at)?,
        created_by_key_id: Some(principal.key_id),
    })
}

/// The scopes asked for, none its creator lacks; all of the creator's when none.
fn scopes_for(principal: &Principal, asked: Option<Vec<String>>) -> ApiResult<Vec<String>> {
    match asked {
        Some(scopes) => {
            if scopes.is_empty() || scopes.iter().any(|s| !SCOPES.contains(&s.as_str())) {
                return Err(ApiError::BadRequest(format!(
                    "scopes must be a non-empty list of {}",
                    SCOPES.join(", ")
                )));
            }
            if scopes.iter().any(|s| principal.require_scope(s).is_err()) {
                return Err(ApiError::Forbidden(
                    "a key cannot grant a scope its creator lacks",
                ));
            }
            Ok(scopes)
        }
        None if principal.is_admin => Ok(SCOPES.iter().map(|s| s.to_string()).collect()),
        None => Ok(principal.scopes.clone()),
    }
}

/// The new key's expiry: the one asked for, never later than its creator's (which
/// already counts the creator's own makers); the creator's when none is asked.
fn expiry_for(
    principal: &Principal,
    asked: Option<DateTime<Utc>>,
) -> ApiResult<Option<DateTime<Utc>>> {
    if asked.is_some_and(|at| at <= Utc::now()) {
        return Err(ApiError::BadRequest(
            "expires_at must be in the future".into(),
        ));
    }
    match (asked, principal.expires_at) {
        (Some(at), Some(cap)) if at > cap => Err(ApiError::Unprocessable(format!(
            "expires_at must not be later than {}, when the key creating it expires: a key \
             cannot outlive the key that made it",
            cap.to_rfc3339()
        ))),
        (Some(at), _) => Ok(Some(at)),
        (None, cap) => Ok(cap),
    }
}

/// The keys the caller manages, newest first; never their secrets.
#[utoipa::path(get, path = "/v1/api_keys", tag = "api_keys",
    params(OrganizationFilter, PageParams),
    responses((status = 200, body = ApiKeyList), ErrorResponses))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Listing(filter, page): Listing<OrganizationFilter>,
) -> ApiResult<Json<ApiKeyList>> {
    principal.require_scope(SCOPE_READ)?;
    let limit = page.limit()?;
    let organization_id = principal.listed_organization(filter.organization_id)?;
    let rows: Vec<ApiKey> = sqlx::query_as(&format!(
        "select {KEY_COLUMNS} from api_keys
         where ($1::uuid is null or organization_id = $1)
           and ($2::uuid is null or project_id = $2)
           and ($3::uuid is null or id < $3)
         order by id desc limit $4"
    ))
    .bind(organization_id)
    .bind(principal.project_id)
    .bind(page.after::<Uuid>()?)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (api_keys, next_cursor) = pagination::page(rows, limit, |k| k.id);
    Ok(Json(ApiKeyList {
        api_keys,
        next_cursor,
    }))
}

/// Revokes a key at once; revoking it again answers the same.
#[utoipa::path(delete, path = "/v1/api_keys/{id}", tag = "api_keys",
    params(("id" = Uuid, Path, description = "API key id")),
    responses((status = 200, body = ApiKeyBody), ErrorResponses))]
pub async fn revoke(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ApiKeyBody>> {
    principal.require_scope(SCOPE_WRITE)?;
    let visible = fetch(&state.pool, id).await?.filter(|key| {
        principal.is_admin
            || (!key.admin
                && principal.can_see(key.organization_id, key.project_id)
                && (principal.project_id.is_none() || key.project_id == principal.project_id))
    });
    if visible.is_none() {
        return Err(ApiError::NotFound("API key"));
    }
    // The key and every key it made, transitively. (Authentication checks the lineage
    // itself, so a key made while this runs is refused too; this shows it revoked.)
    sqlx::query(
        "with recursive made as (
             select id from api_keys where id = $1
           union
             select k.id from api_keys k join made m on k.created_by_key_id = m.id
         )
         update api_keys set revoked_at = now()
         where id in (select id from made) and revoked_at is null",
    )
    .bind(id)
    .execute(&state.pool)
    .await?;
    let api_key = fetch(&state.pool, id)
        .await?
        .ok_or(ApiError::NotFound("API key"))?;
    Ok(Json(ApiKeyBody { api_key }))
}

/// Ends the keys narrowed to project `project_id` (it is being deleted), in the
/// caller's transaction. Keys they made are narrowed to it too.
pub(crate) async fn revoke_keys_of_project(
    conn: &mut sqlx::PgConnection,
    project_id: Uuid,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "update api_keys set revoked_at = now() where project_id = $1 and revoked_at is null",
    )
    .bind(project_id)
    .execute(conn)
    .await?
    .rows_affected())
}

async fn fetch(db: impl sqlx::PgExecutor<'_>, id: Uuid) -> ApiResult<Option<ApiKey>> {
    Ok(
        sqlx::query_as(&format!("select {KEY_COLUMNS} from api_keys where id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}
