//! Bearer API keys. A key belongs to an organization (or is a platform admin key), may
//! be narrowed to one project, and carries scopes. A key works only while it, every key
//! that made it (transitively) and the project it is narrowed to are live.

use std::sync::LazyLock;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;
use capy_shared::crypto;
use capy_shared::queue::PROJECT_IS_LIVE;

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
    /// When this key stops working: its own expiry or the earliest of the keys that
    /// made it, whichever comes first. A key it makes expires no later.
    pub expires_at: Option<DateTime<Utc>>,
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
    /// none), always the caller's own for anyone else. A non-admin key without an
    /// organization (the keys table's constraint forbids one) is refused rather than
    /// shown every organization's rows.
    pub fn listed_organization(&self, asked: Option<Uuid>) -> Result<Option<Uuid>, ApiError> {
        if self.is_admin {
            Ok(asked)
        } else {
            self.organization().map(Some)
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

/// A key with what its lineage says: whether a key that made it (transitively) is
/// revoked, the earliest expiry among them, and whether the project it is narrowed to
/// is deleted or being deleted.
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    organization_id: Option<Uuid>,
    is_admin: bool,
    project_id: Option<Uuid>,
    scopes: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    maker_revoked: bool,
    maker_expires_at: Option<DateTime<Utc>>,
    project_gone: bool,
}

/// How deep authentication follows a key's makers (keys make keys a few levels deep
/// at most; the bound only guards the query).
const MAX_LINEAGE: i32 = 64;

/// One query: the key by its hash, its makers up the lineage (a primary-key probe per
/// level) and its project's state.
static KEY_QUERY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with recursive lineage as (
             select k.id, k.created_by_key_id, k.revoked_at, k.expires_at, 0 as depth
             from api_keys k where k.key_hash = $1
           union all
             select m.id, m.created_by_key_id, m.revoked_at, m.expires_at, l.depth + 1
             from lineage l join api_keys m on m.id = l.created_by_key_id
             where l.depth < $2
         )
         select k.id, k.organization_id, k.is_admin, k.project_id, k.scopes, k.expires_at,
                k.revoked_at,
                coalesce((select bool_or(revoked_at is not null) from lineage where depth > 0),
                         false) as maker_revoked,
                (select min(expires_at) from lineage where depth > 0) as maker_expires_at,
                coalesce((select not {PROJECT_IS_LIVE} from projects where id = k.project_id),
                         k.project_id is not null) as project_gone
         from api_keys k where k.key_hash = $1"
    )
});

impl KeyRow {
    /// The principal this key stands for, or why it no longer works.
    fn into_principal(self) -> Result<Principal, ApiError> {
        let now = Utc::now();
        if self.revoked_at.is_some() {
            return Err(ApiError::Unauthorized("this API key has been revoked"));
        }
        if self.expires_at.is_some_and(|at| at <= now) {
            return Err(ApiError::Unauthorized("this API key has expired"));
        }
        if self.maker_revoked {
            return Err(ApiError::Unauthorized(
                "the API key that made this key has been revoked, which ends this key too",
            ));
        }
        if self.maker_expires_at.is_some_and(|at| at <= now) {
            return Err(ApiError::Unauthorized(
                "the API key that made this key has expired, which ends this key too",
            ));
        }
        if self.project_gone {
            return Err(ApiError::Unauthorized(
                "the project this API key is narrowed to is deleted, which ends the key",
            ));
        }
        let expires_at = match (self.expires_at, self.maker_expires_at) {
            (Some(own), Some(maker)) => Some(own.min(maker)),
            (own, maker) => own.or(maker),
        };
        Ok(Principal {
            key_id: self.id,
            organization_id: self.organization_id,
            is_admin: self.is_admin,
            project_id: self.project_id,
            scopes: self.scopes,
            expires_at,
        })
    }
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
        let row: Option<KeyRow> = sqlx::query_as(KEY_QUERY.as_str())
            .bind(crypto::hash_api_key(key))
            .bind(MAX_LINEAGE)
            .fetch_optional(&state.pool)
            .await?;
        row.ok_or(ApiError::Unauthorized("invalid API key"))?
            .into_principal()
    }
}
