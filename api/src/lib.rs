//! capy's REST API. It only records (organizations, keys, clusters, projects, jobs);
//! workers do the work. [`router`] builds the whole app for a state, so tests can drive
//! it without a port.

pub mod admin;
pub mod auth;
mod bodies;
pub mod bootstrap;
pub mod cluster_access;
pub mod config;
pub mod error;
pub mod extract;
mod idempotency;
mod pagination;
mod routes;

use axum::Router;
use capy_shared::crypto::SecretBox;
use sqlx::PgPool;

/// Settings of the API that handlers read.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Attempts a new job gets before it fails for good.
    pub job_max_attempts: i32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            job_max_attempts: 5,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub secrets: SecretBox,
    pub settings: ApiSettings,
}

pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// The OpenAPI document of every endpoint, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes::router_and_openapi().1
}
