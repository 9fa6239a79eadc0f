//! Bearer API keys. A key belongs to an organization (or is a platform admin key), may
//! be narrowed to one project, and carries scopes.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;
use capy_shared::crypto;

pub const SCOPE_READ: &str = "read";
pub const SCOPE_WRITE: &str = "write";
pub const SCOPE_CREDENTIALS: &str = "credentials:read";
/// Every scope a key may carry.
pub const SCOPES: [&str; 3] = [SCOPE_READ, SCOPE_WRITE, SCOPE_CREDENTIALS];

/// Who is calling, from a valid key.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: Uuid,
    pub organization_id: Option<Uuid>,
    pub is_admin: bool,
    pub project_id: Option<Uuid>,
    pub scopes: Vec<String>,
}

impl Principal {
    pub fn require_scope(&self, scope: &str) -> Result<(), ApiError> {
        if self.is_admin || self.scopes.iter().any(|s| s == scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "this API key lacks the scope this call needs",
            ))
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden("this call needs a platform admin key"))
        }
    }

    /// The organization this caller acts for; admin keys have none.
    pub fn organization(&self) -> Result<Uuid, ApiError> {
        self.organization_id.ok_or(ApiError::Forbidden(
            "this call needs an organization's API key, not an admin key",
        ))
    }

    /// The organization a list shows: the one a platform admin asks for (all when
    /// none), always the caller's own for anyone else.
    pub fn listed_organization(&self, asked: Option<Uuid>) -> Option<Uuid> {
        if self.is_admin {
            asked
        } else {
            self.organization_id
        }
    }

    /// Whether this caller may see an object of `organization_id` / `project_id`.
    pub fn can_see(&self, organization_id: Option<Uuid>, project_id: Option<Uuid>) -> bool {
        if self.is_admin {
            return true;
        }
        let same_org = self.organization_id.is_some() && self.organization_id == organization_id;
        let same_project = self.project_id.is_none() || self.project_id == project_id;
        same_org && same_project
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    organization_id: Option<Uuid>,
    is_admin: bool,
    project_id: Option<Uuid>,
    scopes: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already checked for this request (by the Idempotency-Key layer).
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        let header =
            parts
                .headers
                .get(axum::http::header::AUTHORIZATION)
                .ok_or(ApiError::Unauthorized(
                    "missing API key: send Authorization: Bearer capy_live_…",
                ))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| crypto::is_well_formed_api_key(k))
            .ok_or(ApiError::Unauthorized(
                "malformed API key: expected Authorization: Bearer capy_live_…",
            ))?;
        let row: Option<KeyRow> = sqlx::query_as(
            "select id, organization_id, is_admin, project_id, scopes, expires_at, revoked_at
             from api_keys where key_hash = $1",
        )
        .bind(crypto::hash_api_key(key))
        .fetch_optional(&state.pool)
        .await?;
        let row = row.ok_or(ApiError::Unauthorized("invalid API key"))?;
        if row.revoked_at.is_some() {
            return Err(ApiError::Unauthorized("this API key has been revoked"));
        }
        if row.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(ApiError::Unauthorized("this API key has expired"));
        }
        Ok(Principal {
            key_id: row.id,
            organization_id: row.organization_id,
            is_admin: row.is_admin,
            project_id: row.project_id,
            scopes: row.scopes,
        })
    }
}
