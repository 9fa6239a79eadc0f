//! Instant databases, after Instagres: `POST /v1/databases` needs no key and answers
//! at once with a working connection string, taken from the warm pool (or made on the
//! spot when the pool is empty). Unclaimed, a database expires after 72 hours; an
//! organization's key claims it within 7 days, and it becomes an ordinary project.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use capy_shared::instant::{self, ClientCaps, ClientRoom, Entry, InstantLimits};
use capy_shared::model::{job_type, JobState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::projects::{
    connection_url, fetch_project, queue_project_job, Endpoint, ProjectUpdated,
    DEFAULT_MAX_CONNECTIONS,
};
use crate::auth::{Principal, SCOPE_WRITE};
use crate::bodies::{ErrorBody, ErrorResponses};
use crate::cluster_access;
use crate::error::{ApiError, ApiResult};
use crate::extract::Path;
use crate::rate_limit;
use crate::AppState;
use capy_shared::model::{Project, PROJECT_SELECT};

/// An unclaimed database lives this long.
const TTL: Duration = Duration::from_secs(72 * 3600);
/// How long a request waits for its client's other requests before a 429.
const CLIENT_LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long after handing out a pool entry its replacement is queued: the client's
/// first connection, which follows the answer within milliseconds, then does not share
/// the cluster with the replacement's `CREATE DATABASE` (tens of ms of disk and CPU).
const REFILL_AFTER: Duration = Duration::from_millis(250);
/// Retry-After of a refusal at the bound of instant databases.
const AT_CAPACITY_RETRY_SECONDS: u64 = 60;
/// It may be claimed this long after creation.
const CLAIM_WINDOW: chrono::Duration = chrono::Duration::days(7);

/// Instagres's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstantDatabase {
    pub id: Uuid,
    /// `UNCLAIMED` or `CLAIMED`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Where an organization claims it (within 7 days).
    pub claim_url: String,
    pub connection_string: String,
}

/// An error of this endpoint (Instagres's shape) or of the Idempotency-Key check that
/// precedes it (capy's), for the OpenAPI document.
#[allow(dead_code)] // Only read by the OpenAPI generator.
#[derive(ToSchema)]
#[serde(untagged)]
pub enum InstantOrApiError {
    Instant(InstantError),
    Api(ErrorBody),
}

/// Instagres's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstantError {
    pub status: u16,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDatabase {
    /// Who is asking (your app's name).
    #[serde(rename = "ref")]
    #[schema(rename = "ref", required = true, schema_with = crate::bodies::reference)]
    reference: Option<String>,
    /// The role may replicate; needs a cluster whose `wal_level` is `logical`.
    #[serde(rename = "logicalReplication")]
    #[schema(rename = "logicalReplication")]
    logical_replication: Option<bool>,
}

/// A refusal in Instagres's shape; 429 and 503 carry Retry-After.
struct Refusal {
    status: StatusCode,
    message: String,
    hint: Option<String>,
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            hint: None,
            retry_after: None,
        }
    }

    /// The client holds its cap of live unclaimed databases: nothing was recorded.
    fn at_client_cap(caps: ClientCaps, retry_after_seconds: i64) -> Self {
        Self {
            retry_after: Some(u64::try_from(retry_after_seconds).unwrap_or(1).max(1)),
            hint: Some(
                "Claim one of your databases with an API key (POST /v1/databases/{id}/claim), or wait until one expires (see Retry-After).".into(),
            ),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Too many unclaimed databases: at most {} from one address (IPv6: one /64; {} per /48)",
                    caps.per_key, caps.per_site
                ),
            )
        }
    }

    /// The rate limit refused the request.
    fn rate_limited(limited: rate_limit::Limited, per_minute: i64) -> Self {
        let (wait, message) = match limited {
            rate_limit::Limited::Client(wait) => (
                wait,
                format!(
                    "Too many databases: {per_minute} per minute from one address (IPv6: one /64)"
                ),
            ),
            rate_limit::Limited::Full(wait) => (
                wait,
                "Too many clients are asking for databases right now; try again shortly.".into(),
            ),
        };
        Self {
            retry_after: Some(wait.as_secs().max(1)),
            hint: Some("Wait for the time in the Retry-After header.".into()),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    /// Every cluster holds its bound of instant databases: nothing was recorded.
    fn at_capacity() -> Self {
        Self {
            retry_after: Some(AT_CAPACITY_RETRY_SECONDS),
            hint: Some(
                "Instant databases free up as others expire or are claimed; try again later, or create a project with an API key.".into(),
            ),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "No more instant databases can be created right now.",
            )
        }
    }
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        error.log();
        let status = error.status();
        let message = if status == StatusCode::SERVICE_UNAVAILABLE {
            "The service is unavailable; try again shortly.".to_string()
        } else if status.is_server_error() {
            "Failed to create the database.".to_string()
        } else {
            status.canonical_reason().unwrap_or("error").to_string()
        };
        Self {
            retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(2),
            ..Self::new(status, message)
        }
    }
}

impl From<sqlx::Error> for Refusal {
    fn from(error: sqlx::Error) -> Self {
        ApiError::from(error).into()
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = InstantError {
            status: self.status.as_u16(),
            message: self.message,
            hint: self.hint,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The client's address (`X-Forwarded-For` believed only from a trusted proxy), the
/// key the rate limit and the cap count it under (its /64 for IPv6) and its site (its
/// /48 for IPv6); "unknown" without a socket, as in tests driving the router directly.
pub struct ClientAddr {
    pub address: String,
    pub limit_key: String,
    pub site: String,
}

impl ClientAddr {
    fn as_client(&self) -> instant::Client<'_> {
        instant::Client {
            address: &self.address,
            key: &self.limit_key,
            site: &self.site,
        }
    }
}

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
            return Ok(Self {
                address: "unknown".into(),
                limit_key: "unknown".into(),
                site: "unknown".into(),
            });
        };
        let forwarded = parts
            .headers
            .get_all(rate_limit::FORWARDED_FOR)
            .iter()
            // An unreadable header is an unreadable entry: the walk stops there.
            .map(|value| value.to_str().unwrap_or(""));
        let client = rate_limit::client_ip(peer.ip(), forwarded, &state.settings.trusted_proxies);
        Ok(Self {
            address: client.to_string(),
            limit_key: rate_limit::limit_key(client),
            site: rate_limit::site_key(client),
        })
    }
}

/// Creates a database at once, with no key: 201 with its connection string.
#[utoipa::path(post, path = "/v1/databases", tag = "databases", security(()),
    request_body = CreateDatabase,
    responses((status = 201, body = InstantDatabase),
              (status = 400, description = "Missing referrer or bad input (a malformed Idempotency-Key: capy's error body)", body = InstantOrApiError),
              (status = 401, description = "An Idempotency-Key sent with an invalid Authorization header", body = ErrorBody),
              (status = 409, description = "An Idempotency-Key reused with another request, or still in use", body = ErrorBody),
              (status = 413, description = "Request body over 64 KiB", body = ErrorBody),
              (status = 422, description = "Logical replication is turned off on this server, or needs a cluster with wal_level 'logical' whose pg_hba.conf keeps physical replication to the admin", body = InstantError),
              (status = 429, description = "Too many databases from this address (IPv6: its /64) in the last minute, or too many of them unclaimed; see Retry-After", body = InstantError),
              (status = 500, description = "Creating the database failed", body = InstantError),
              (status = 503, description = "Every cluster holds its bound of instant databases, no database could be made in time, or the control database is unavailable; see Retry-After", body = InstantOrApiError)))]
pub async fn create(State(state): State<AppState>, client: ClientAddr, body: Bytes) -> Response {
    match create_database(&state, &client, &body).await {
        Ok(database) => (StatusCode::CREATED, Json(database)).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn create_database(
    state: &AppState,
    client: &ClientAddr,
    body: &[u8],
) -> Result<InstantDatabase, Refusal> {
    let request: CreateDatabase = serde_json::from_slice(body).map_err(|e| Refusal {
        hint: Some("Send a JSON body such as {\"ref\": \"my-app\"}.".into()),
        ..Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("Invalid request body: {e}"),
        )
    })?;
    let reference = request
        .reference
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| Refusal {
            hint: Some(
                "Pass a `ref` to the request body to identify the source of the request.".into(),
            ),
            ..Refusal::new(StatusCode::BAD_REQUEST, "Missing referrer")
        })?;
    if reference.chars().count() > 100 || reference.chars().any(char::is_control) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "Invalid referrer: at most 100 characters, without control characters",
        ));
    }
    let logical_replication = request.logical_replication.unwrap_or(false);
    if logical_replication && !state.settings.instant_logical_replication {
        return Err(Refusal {
            hint: Some(
                "A role with REPLICATION can create replication slots that hold WAL for the whole server and drop any other slot, so an operator turns this on (CAPY_INSTANT_LOGICAL_REPLICATION=true) only for clusters set aside for it. Ask without logicalReplication, or create a project with an API key.".into(),
            ),
            ..Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Logical replication is turned off on this server",
            )
        });
    }
    let ttl = TTL.as_secs() as i64;
    let limits = InstantLimits {
        max_attempts: state.settings.job_max_attempts,
        max_per_cluster: state.settings.instant_max_per_cluster,
        ..InstantLimits::default()
    };

    let per_minute = state.settings.instant_rate_limit_per_minute;
    if let Err(limited) = state.instant_limiter.check(&client.limit_key, per_minute) {
        return Err(Refusal::rate_limited(limited, per_minute));
    }
    let client = &client.as_client();
    let caps = state.settings.instant_client_caps;
    if !logical_replication {
        let mut tx = begin_within_client_cap(state, client, caps).await?;
        // A pool entry already holds its place under the bound: taking it adds none.
        if let Some((id, cluster_id)) =
            instant::take_from_pool(&mut tx, reference, client, ttl).await?
        {
            tx.commit().await?;
            // The pool refills to its size as it is taken from, off the request's
            // path and a moment later. Should this be lost (a crash), the workers'
            // top-up makes it good.
            let refill = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REFILL_AFTER).await;
                if let Err(error) = refill_pool(&refill, cluster_id, limits).await {
                    tracing::warn!(error = %error, "queueing a pool replacement failed");
                }
            });
            return answer(state, id).await;
        }
    }
    // (Outside any transaction: it may use connections of its own.)
    let cluster_id = pick_cluster(state, logical_replication, limits.max_per_cluster).await?;
    let entry = Entry::OnTheSpot {
        logical_replication,
    };
    let mut tx = begin_within_client_cap(state, client, caps).await?;
    // Counted again under the cluster's lock: another request may have taken the
    // last place since it was picked.
    let (id, job_id) = instant::create_within(&mut tx, &state.secrets, cluster_id, entry, limits)
        .await?
        .ok_or_else(Refusal::at_capacity)?;
    instant::assign(&mut tx, id, reference, client, ttl).await?;
    tx.commit().await?;
    match wait_for(state, job_id).await? {
        Some(JobState::Completed) => answer(state, id).await,
        ended => {
            // Not handed out after all: expiry deletes it soon.
            sqlx::query("update projects set expires_at = now() where id = $1")
                .bind(id)
                .execute(&state.pool)
                .await?;
            Err(if ended.is_none() {
                Refusal {
                    retry_after: Some(5),
                    ..Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "The database was not ready in time; try again.",
                    )
                }
            } else {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Failed to create the database.",
                )
            })
        }
    }
}

/// A transaction holding the lock of `client`'s site, or a refusal at its cap of live
/// unclaimed databases: what it is handed out in the transaction is counted by the
/// next request's check. While another request of the site holds the lock, it retries
/// without holding a connection, for [`CLIENT_LOCK_WAIT`] at most.
async fn begin_within_client_cap(
    state: &AppState,
    client: &instant::Client<'_>,
    caps: ClientCaps,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, Refusal> {
    let deadline = Instant::now() + CLIENT_LOCK_WAIT;
    let mut pause = Duration::from_millis(2);
    loop {
        let mut tx = state.pool.begin().await?;
        match instant::lock_client(&mut tx, client, caps).await? {
            ClientRoom::Free => return Ok(tx),
            ClientRoom::Full {
                retry_after_seconds,
            } => return Err(Refusal::at_client_cap(caps, retry_after_seconds)),
            ClientRoom::Busy if Instant::now() < deadline => {
                tx.rollback().await?;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(25));
            }
            ClientRoom::Busy => {
                return Err(Refusal {
                    retry_after: Some(1),
                    hint: Some("Send fewer requests at once.".into()),
                    ..Refusal::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Too many requests from this address at once",
                    )
                })
            }
        }
    }
}

async fn refill_pool(
    state: &AppState,
    cluster_id: Uuid,
    limits: InstantLimits,
) -> sqlx::Result<()> {
    let mut tx = state.pool.begin().await?;
    let size = state.settings.instant_pool_size;
    let made = instant::fill_cluster(&mut tx, &state.secrets, cluster_id, size, limits).await?;
    tx.commit().await?;
    if made == 0 {
        tracing::debug!(%cluster_id, "no pool replacement: the pool is full or the cluster at its bound");
    }
    Ok(())
}

/// The cluster holding the fewest instant databases, under the bound; for logical
/// replication, one fit for it (`wal_level` logical and physical replication closed,
/// read again from clusters where either is unknown). At the bound everywhere: 503,
/// before anything is recorded.
async fn pick_cluster(
    state: &AppState,
    logical_replication: bool,
    max_per_cluster: i64,
) -> Result<Uuid, Refusal> {
    let mut clusters = instant::clusters_by_load(&state.pool, logical_replication).await?;
    if clusters.is_empty() && logical_replication {
        let unchecked: Vec<Uuid> = sqlx::query_scalar(
            "select id from clusters
             where engine = 'postgresql' and (wal_level is null or physical_replication_open is null)",
        )
        .fetch_all(&state.pool)
        .await?;
        for cluster_id in unchecked {
            cluster_access::check_cluster(&state.pool, &state.secrets, cluster_id)
                .await
                .map_err(ApiError::from_anyhow)?;
        }
        clusters = instant::clusters_by_load(&state.pool, logical_replication).await?;
    }
    if let Some((id, _)) = clusters.iter().find(|(_, held)| *held < max_per_cluster) {
        return Ok(*id);
    }
    if !clusters.is_empty() {
        return Err(Refusal::at_capacity());
    }
    if !logical_replication {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "No cluster has room for a new database.",
        ));
    }
    Err(no_cluster_for_logical(state).await?)
}

/// 422 naming why no cluster may hold a role with REPLICATION, and what the operator
/// must change.
async fn no_cluster_for_logical(state: &AppState) -> Result<Refusal, Refusal> {
    let found: Vec<(String, Option<bool>)> = sqlx::query_as(
        "select distinct coalesce(wal_level, 'unknown'), physical_replication_open
         from clusters order by 1, 2",
    )
    .fetch_all(&state.pool)
    .await?;
    let clusters: Vec<String> = found
        .iter()
        .map(|(level, open)| {
            let physical = match open {
                Some(true) => "open",
                Some(false) => "closed",
                None => "unknown",
            };
            format!("wal_level {level} with physical replication {physical}")
        })
        .collect();
    Ok(Refusal {
        hint: Some("Ask without logicalReplication, or have an operator set wal_level = logical on a cluster and limit its pg_hba.conf `replication` lines to the admin role, then run check-access.".into()),
        ..Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "Logical replication needs a cluster whose wal_level is 'logical' and whose pg_hba.conf keeps physical replication (which streams every database's WAL) to the admin; the clusters have {}",
                clusters.join("; ")
            ),
        )
    })
}

/// Waits for a job to end: its finished state, or `None` if it did not end in time.
async fn wait_for(state: &AppState, job_id: Uuid) -> Result<Option<JobState>, Refusal> {
    let deadline = Instant::now() + state.settings.instant_wait;
    let mut changes = state.job_changes.subscribe();
    loop {
        let job_state: JobState = sqlx::query_scalar("select state from jobs where id = $1")
            .bind(job_id)
            .fetch_one(&state.pool)
            .await?;
        if job_state.is_finished() {
            return Ok(Some(job_state));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        changes.next_look(job_id, left).await;
    }
}

#[derive(sqlx::FromRow)]
struct InstantRow {
    #[sqlx(flatten)]
    project: Project,
    instant_status: Option<String>,
    assigned_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    password_encrypted: Vec<u8>,
}

/// The answer for database `id`, read in one query.
async fn answer(state: &AppState, id: Uuid) -> Result<InstantDatabase, Refusal> {
    let row: InstantRow = sqlx::query_as(&format!(
        "select x.*, p.instant_status, p.assigned_at, p.expires_at, p.password_encrypted
         from ({PROJECT_SELECT} where p.id = $1) x join projects p on p.id = x.id"
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Failed to create the database.",
        )
    })?;
    let password = state
        .secrets
        .open(&row.password_encrypted)
        .map_err(|e| ApiError::Internal(e.into()))?;
    let project = &row.project;
    Ok(InstantDatabase {
        id,
        status: match row.instant_status.as_deref() {
            Some("claimed") => "CLAIMED".into(),
            _ => "UNCLAIMED".into(),
        },
        created_at: row.assigned_at.unwrap_or(project.created_at),
        updated_at: project.updated_at,
        expires_at: row.expires_at,
        claim_url: format!(
            "{}/claim/{id}",
            state.settings.public_url.trim_end_matches('/')
        ),
        // Instant databases are PostgreSQL: there is always a pooled endpoint.
        connection_string: connection_url(project, Endpoint::Pooled, &password)?
            .unwrap_or_default(),
    })
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimDatabase {
    /// The project's name in the organization; `instant-…` when left out.
    #[schema(schema_with = crate::bodies::project_name_or_null)]
    name: Option<String>,
}

/// Claims an unclaimed database for the key's organization (within 7 days of its
/// creation): it becomes an ordinary project that no longer expires, with the usual
/// connection limit, applied by a `project.update` job.
#[utoipa::path(post, path = "/v1/databases/{id}/claim", tag = "databases",
    params(("id" = Uuid, Path, description = "Instant database id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    request_body(content = Option<ClaimDatabase>, description = "Optional"),
    responses((status = 200, body = ProjectUpdated), ErrorResponses))]
pub async fn claim(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> ApiResult<Json<ProjectUpdated>> {
    principal.require_scope(SCOPE_WRITE)?;
    let organization_id = principal.organization()?;
    if principal.project_id.is_some() {
        return Err(ApiError::Forbidden(
            "a project-scoped API key cannot claim databases",
        ));
    }
    // No body, or `null`, is an empty claim.
    let request: ClaimDatabase = crate::extract::optional_json(&body)?;
    if let Some(name) = &request.name {
        super::projects::validate_name(name)?;
    }
    let mut tx = state.pool.begin().await?;
    lock_room(&mut tx, id).await?;
    let found: Option<(Option<String>, Option<DateTime<Utc>>, String)> = sqlx::query_as(
        "select instant_status, assigned_at, name from projects
         where id = $1 and deleted_at is null and state <> 'deleting' for update",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let (status, assigned_at, default_name) = match found {
        Some((Some(status), assigned_at, name)) if status != "pool" => (status, assigned_at, name),
        _ => return Err(ApiError::NotFound("database")),
    };
    if status == "claimed" {
        return Err(ApiError::Conflict(
            "this database is already claimed".into(),
        ));
    }
    if assigned_at.is_none_or(|at| at + CLAIM_WINDOW < Utc::now()) {
        return Err(ApiError::Conflict(
            "the claim window (7 days after creation) is over".into(),
        ));
    }
    let name = request.name.unwrap_or(default_name);
    let claimed = sqlx::query(
        "update projects set organization_id = $2, name = $3, slug = lower($3),
             instant_status = 'claimed', claimed_at = now(), expires_at = null,
             max_connections = $4, storage_limit_bytes = null, updated_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(organization_id)
    .bind(&name)
    .bind(DEFAULT_MAX_CONNECTIONS)
    .execute(&mut *tx)
    .await;
    if let Err(sqlx::Error::Database(db)) = &claimed {
        if db.constraint() == Some("projects_org_name") {
            return Err(ApiError::Conflict(format!(
                "a project named '{name}' already exists; claim with another \"name\""
            )));
        }
    }
    claimed?;
    // Its history becomes the organization's, and its limits an ordinary project's.
    sqlx::query("update jobs set organization_id = $2 where project_id = $1")
        .bind(id)
        .bind(organization_id)
        .execute(&mut *tx)
        .await?;
    let job = queue_project_job(&mut tx, &state, id, job_type::PROJECT_UPDATE, json!({})).await?;
    let project = fetch_project(&mut tx, id)
        .await?
        .ok_or(ApiError::NotFound("database"))?;
    tx.commit().await?;
    Ok(Json(ProjectUpdated {
        project,
        job: Some(job),
    }))
}

/// Locks the cluster of database `id` (before the database's row, as placement does)
/// and refuses with 422 when the organizations' projects on it already reach its
/// `max_projects`: once claimed, the database is one of them. Anything but an unclaimed
/// database passes, for the caller to answer 404 or 409.
async fn lock_room(tx: &mut sqlx::PgConnection, id: Uuid) -> ApiResult<()> {
    let cluster_id: Option<Uuid> = sqlx::query_scalar(
        "select cluster_id from projects
         where id = $1 and instant_status = 'unclaimed' and deleted_at is null",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(cluster_id) = cluster_id else {
        return Ok(());
    };
    let rooms = super::projects::lock_clusters(tx, None, Some(cluster_id)).await?;
    if rooms.iter().all(|room| room.has_room()) {
        return Ok(());
    }
    Err(ApiError::Unprocessable(format!(
        "cluster {cluster_id}, which holds this database, is full (its project limit is reached); delete a project there or ask an operator to raise max_projects"
    )))
}

/// An instant database's status and expiry.
type ClaimState = (Option<String>, Option<DateTime<Utc>>);

/// The page behind `claim_url`: how to claim this database.
pub async fn claim_page(State(state): State<AppState>, Path(id): Path<Uuid>) -> Response {
    let found: Result<Option<ClaimState>, _> = sqlx::query_as(
        "select instant_status, expires_at from projects where id = $1 and deleted_at is null",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await;
    let (status, text) = match found {
        Ok(Some((Some(s), expires_at))) if s == "unclaimed" => (
            StatusCode::OK,
            format!(
                "<p>This database is unclaimed and expires at {}.</p>
                 <p>Claim it for your organization with an API key of it:</p>
                 <pre>curl -X POST {}/v1/databases/{id}/claim \\\n  -H \"Authorization: Bearer $CAPY_API_KEY\"</pre>",
                expires_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                state.settings.public_url.trim_end_matches('/'),
            ),
        ),
        Ok(Some((Some(s), _))) if s == "claimed" => {
            (StatusCode::OK, "<p>This database has been claimed.</p>".to_string())
        }
        Ok(_) => (
            StatusCode::NOT_FOUND,
            "<p>No such database: it never existed or has expired.</p>".to_string(),
        ),
        Err(error) => return ApiError::from(error).into_response(),
    };
    (
        status,
        Html(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Claim database {id}</title></head><body><h1>Database {id}</h1>{text}</body></html>"
        )),
    )
        .into_response()
}
