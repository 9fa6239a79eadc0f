use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::bodies::ErrorResponses;

#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub key_id: Uuid,
    pub organization_id: Option<Uuid>,
    /// Set when the key is narrowed to one project.
    pub project_id: Option<Uuid>,
    pub scopes: Vec<String>,
    /// A platform admin key.
    pub admin: bool,
}

/// Who the key belongs to: its organization, project (if narrowed), scopes and role.
#[utoipa::path(get, path = "/v1/me", tag = "api_keys",
    responses((status = 200, body = Me), ErrorResponses))]
pub async fn show(principal: Principal) -> Json<Me> {
    Json(Me {
        key_id: principal.key_id,
        organization_id: principal.organization_id,
        project_id: principal.project_id,
        scopes: principal.scopes,
        admin: principal.is_admin,
    })
}
