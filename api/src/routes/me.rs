use axum::Json;
use serde_json::{json, Value};

use crate::auth::Principal;

/// Who the key belongs to: its organization, project (if narrowed), scopes and role.
pub async fn show(principal: Principal) -> Json<Value> {
    Json(json!({
        "key_id": principal.key_id,
        "organization_id": principal.organization_id,
        "project_id": principal.project_id,
        "scopes": principal.scopes,
        "admin": principal.is_admin,
    }))
}
