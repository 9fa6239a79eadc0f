use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::bodies::ErrorResponses;
use crate::error::ApiResult;
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    /// `ok` or `ready`.
    pub status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, body = Status)))]
pub async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Readiness: the control database answers too (503 otherwise).
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, body = Status), ErrorResponses))]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Status>> {
    sqlx::query("select 1").execute(&state.pool).await?;
    Ok(Json(Status { status: "ready" }))
}
