//! capy's REST API. It only records (organizations, keys, clusters, projects, jobs);
//! workers do the work. [`router`] builds the whole app for a state, so tests can drive
//! it without a port.

pub mod admin;
pub mod auth;
mod bodies;
pub mod bootstrap;
pub mod cluster_access;
pub mod config;
pub mod console;
pub mod error;
pub mod extract;
mod idempotency;
pub mod job_changes;
pub mod job_metrics;
mod pagination;
pub mod plans;
pub mod rate_limit;
mod routes;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::IntoResponse as _;
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
    /// Pool entries and unclaimed instant databases one cluster may hold at once.
    pub instant_max_per_cluster: i64,
    /// The warm pool's size per cluster (the workers' `CAPY_INSTANT_POOL_SIZE`): a
    /// request that takes an entry refills the pool to it (0: only the workers do).
    pub instant_pool_size: i64,
    /// Whether `POST /v1/databases` may hand out roles with REPLICATION at all.
    pub instant_logical_replication: bool,
    /// Live unclaimed instant databases per client key, and per IPv6 /48.
    pub instant_client_caps: capy_shared::instant::ClientCaps,
    /// Peers whose `X-Forwarded-For` names the client (for the rate limit).
    pub trusted_proxies: Vec<rate_limit::Cidr>,
    /// `capy_jobs_finished_recent` counts finished jobs (completed, failed, cancelled) of this last
    /// period: a range of the `jobs_finished` index, never the whole history.
    pub metrics_finished_window: std::time::Duration,
    /// How long preview databases live.
    pub preview_ttl: PreviewTtl,
    /// The plans projects may name.
    pub plans: plans::Plans,
}

/// How long preview databases live: `ttl_hours` as asked (or the default), within
/// 1..=`max_hours`, each hour lasting `hour`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviewTtl {
    /// Given to a preview whose request says nothing (`CAPY_PREVIEW_DEFAULT_TTL_HOURS`).
    pub default_hours: i64,
    /// The most a create or an extend may ask for (`CAPY_PREVIEW_MAX_TTL_HOURS`).
    pub max_hours: i64,
    /// How long one of those hours lasts (`CAPY_PREVIEW_TTL_HOUR_SECONDS`): an hour,
    /// shorter in tests.
    pub hour: std::time::Duration,
}

impl Default for PreviewTtl {
    fn default() -> Self {
        Self {
            default_hours: 24,
            max_hours: 168,
            hour: std::time::Duration::from_secs(3600),
        }
    }
}

impl PreviewTtl {
    /// The settings, unless the default is past the maximum.
    pub fn new(default_hours: i64, max_hours: i64, hour_seconds: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=max_hours).contains(&default_hours),
            "CAPY_PREVIEW_DEFAULT_TTL_HOURS ({default_hours}) must be from 1 to \
             CAPY_PREVIEW_MAX_TTL_HOURS ({max_hours})"
        );
        Ok(Self {
            default_hours,
            max_hours,
            hour: std::time::Duration::from_secs(hour_seconds),
        })
    }

    /// The seconds a preview lives for `hours` asked (the default when none), or the
    /// 422 naming the bounds.
    pub fn seconds(&self, hours: Option<i64>) -> error::ApiResult<i64> {
        let hours = hours.unwrap_or(self.default_hours);
        if !(1..=self.max_hours).contains(&hours) {
            return Err(error::ApiError::Unprocessable(format!(
                "ttl_hours must be a whole number of hours from 1 to {}, not {hours}",
                self.max_hours
            )));
        }
        let hour = i64::try_from(self.hour.as_secs()).unwrap_or(3600);
        Ok(hours.saturating_mul(hour))
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            job_max_attempts: 5,
            public_url: "http://127.0.0.1:8080".into(),
            instant_rate_limit_per_minute: 30,
            instant_wait: std::time::Duration::from_secs(30),
            instant_max_per_cluster: capy_shared::instant::DEFAULT_MAX_PER_CLUSTER,
            instant_pool_size: 0,
            instant_logical_replication: false,
            instant_client_caps: capy_shared::instant::ClientCaps {
                per_key: capy_shared::instant::DEFAULT_MAX_PER_CLIENT,
                per_site: capy_shared::instant::DEFAULT_MAX_PER_IPV6_48,
            },
            trusted_proxies: Vec::new(),
            metrics_finished_window: std::time::Duration::from_secs(300),
            preview_ttl: PreviewTtl::default(),
            plans: plans::Plans::default(),
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
    /// The backup store; `None`: backups, exports and restores are refused (409).
    pub backup_store: Option<capy_shared::store::BackupStore>,
    /// Job state changes the workers announce, for requests that wait on a job.
    pub job_changes: job_changes::JobChanges,
}

impl AppState {
    /// The backup store, or the 409 that says none is configured.
    pub fn require_backup_store(&self) -> error::ApiResult<&capy_shared::store::BackupStore> {
        self.backup_store.as_ref().ok_or_else(|| {
            error::ApiError::Conflict(
                "no backup store is configured (CAPY_BACKUP_STORE); backups, exports and \
                 restores are unavailable"
                    .into(),
            )
        })
    }
}

pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// The paths the metrics listener serves.
const METRICS_PATHS: [&str; 2] = ["/metrics", "/healthz"];

/// The public port's app: [`router`], less `/metrics` when `metrics_apart` (it is
/// served on its own listener, [`metrics_router`]).
pub fn public_router(state: AppState, metrics_apart: bool) -> Router {
    let app = router(state);
    if !metrics_apart {
        return app;
    }
    app.layer(axum::middleware::from_fn(|request: Request, next: Next| {
        let hidden = request.uri().path() == "/metrics";
        async move {
            if hidden {
                return error::ApiError::NotFound("route").into_response();
            }
            next.run(request).await
        }
    }))
}

/// The metrics listener's app (`CAPY_METRICS_ADDR`): `/metrics` and `/healthz`, nothing
/// else.
pub fn metrics_router(state: AppState) -> Router {
    router(state).layer(axum::middleware::from_fn(|request: Request, next: Next| {
        let served = METRICS_PATHS.contains(&request.uri().path());
        async move {
            if !served {
                return error::ApiError::NotFound("route").into_response();
            }
            next.run(request).await
        }
    }))
}

/// The OpenAPI document of every endpoint, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes::router_and_openapi().1
}
