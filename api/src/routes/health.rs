use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::AppState;

/// Liveness: the process answers.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the control database answers too (503 otherwise).
pub async fn readyz(state: axum::extract::State<AppState>) -> ApiResult<Json<Value>> {
    sqlx::query("select 1").execute(&state.pool).await?;
    Ok(Json(json!({"status": "ready"})))
}
