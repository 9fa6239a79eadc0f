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
pub mod rate_limit;
mod routes;

use axum::Router;
use capy_shared::crypto::SecretBox;
use sqlx::PgPool;

/// Settings of the API that handlers read.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Attempts a new job gets before it fails for good.
    pub job_max_attempts: i32,
    /// The API's address as clients reach it, for links such as `claim_url`.
    pub public_url: String,
    /// Instant databases handed to one client address per minute, at most.
    pub instant_rate_limit_per_minute: i64,
    /// How long a request for an instant database waits for one made on the spot.
    pub instant_wait: std::time::Duration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            job_max_attempts: 5,
            public_url: "http://127.0.0.1:8080".into(),
            instant_rate_limit_per_minute: 30,
            instant_wait: std::time::Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub secrets: SecretBox,
    pub settings: ApiSettings,
    /// Instant databases handed out per client address.
    pub instant_limiter: std::sync::Arc<rate_limit::RateLimiter>,
}

pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// The OpenAPI document of every endpoint, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes::router_and_openapi().1
}
