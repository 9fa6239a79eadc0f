//! `GET /v1/plans`: the catalogue of plans a project may name on create.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::bodies::ErrorResponses;
use crate::plans::Plan;
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    pub plans: Vec<Plan>,
}

/// Every plan, each with its engine and the defaults it gives a project; an engine's
/// first plan is what its projects get when they name none.
#[utoipa::path(get, path = "/v1/plans", tag = "plans",
    responses((status = 200, body = PlanList), ErrorResponses))]
pub async fn list(State(state): State<AppState>, _principal: Principal) -> Json<PlanList> {
    Json(PlanList {
        plans: state.settings.plans.all().to_vec(),
    })
}
