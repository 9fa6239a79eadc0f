use axum::extract::State;
use axum::Json;
use capy_shared::model::{Job, JOB_COLUMNS};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::{Principal, SCOPE_READ};
use crate::error::{ApiError, ApiResult};
use crate::extract::Path;
use crate::AppState;

pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Value>> {
    principal.require_scope(SCOPE_READ)?;
    let job: Option<Job> = sqlx::query_as(&format!("select {JOB_COLUMNS} from jobs where id = $1"))
        .bind(id)
        .fetch_optional(&state.pool)
        .await?;
    let job = job
        .filter(|job| principal.can_see(job.organization_id, job.project_id))
        .ok_or(ApiError::NotFound("job"))?;
    Ok(Json(json!({ "job": job })))
}
