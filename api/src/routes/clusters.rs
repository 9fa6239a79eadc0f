//! Target clusters (platform admins): registered by admin URL, listed, shown (never
//! with the admin password) and checked for access; each carries the untrusted
//! extensions its operator allows tenants to enable.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::admin::{self, ClusterSpec};
use crate::auth::Principal;
use crate::bodies::ErrorResponses;
use crate::cluster_access::{self, AccessReport};
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::pagination::{self, Listing, NoFilter, PageParams};
use crate::routes::projects::{check_extension_name, extension_names_schema};
use crate::AppState;
use capy_shared::model::Engine;
use capy_shared::tls::{self, TlsConfigError};

const SSL_MODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// The longest CA bundle taken (a few certificates).
const MAX_CA_PEM_BYTES: usize = 65_536;

#[derive(Debug, Serialize, ToSchema)]
pub struct Cluster {
    pub id: Uuid,
    pub name: String,
    pub engine: Engine,
    pub region: String,
    /// The admin URL without its password.
    pub admin_url: String,
    pub public_host: String,
    pub direct_port: i32,
    /// Where `pooled_url` points: `pooled_host:pooled_port`.
    pub pooled_port: i32,
    /// The pooler's host; null: `public_host`.
    pub pooled_host: Option<String>,
    /// The role the cluster's PgBouncer runs its `auth_query` as; null: no pooler
    /// (nothing is installed in project databases for it).
    pub pooler_auth_user: Option<String>,
    /// The sslmode in tenants' connection strings.
    pub ssl_mode: String,
    /// The CA certificate (PEM) the server's certificate chains to, if registered; also
    /// served without a key at `/v1/clusters/{id}/ca.pem` for clients' `sslrootcert`.
    pub ca_pem: Option<String>,
    /// How many live projects the cluster takes; null is no limit.
    pub max_projects: Option<i32>,
    pub project_count: i64,
    pub last_checked_at: Option<DateTime<Utc>>,
    /// Extensions PostgreSQL does not mark trusted that tenants may still enable: the
    /// admin installs them into a schema the tenant cannot write.
    #[schema(example = json!(["file_fdw"]))]
    pub allowed_extensions: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct ClusterRow {
    id: Uuid,
    name: String,
    engine: Engine,
    region: String,
    admin_url_encrypted: Vec<u8>,
    public_host: String,
    direct_port: i32,
    pooled_port: i32,
    pooled_host: Option<String>,
    pooler_auth_user: Option<String>,
    ssl_mode: String,
    ca_pem: Option<String>,
    max_projects: Option<i32>,
    project_count: i64,
    last_checked_at: Option<DateTime<Utc>>,
    allowed_extensions: Vec<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const CLUSTER_SELECT: &str = "select c.id, c.name, c.engine, c.region, c.admin_url_encrypted, c.public_host,
    c.direct_port, c.pooled_port, c.pooled_host, c.pooler_auth_user, c.ssl_mode, c.ca_pem,
    c.max_projects,
    (select count(*) from projects p where p.cluster_id = c.id and p.deleted_at is null) as project_count,
    c.last_checked_at, c.allowed_extensions, c.created_at, c.updated_at from clusters c";

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterBody {
    pub cluster: Cluster,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegisteredCluster {
    pub cluster: Cluster,
    /// The access check run at registration.
    pub access: AccessReport,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterList {
    pub clusters: Vec<Cluster>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccessBody {
    pub access: AccessReport,
}

/// `ssl_mode`: one of [`SSL_MODES`], or null.
fn ssl_mode_schema() -> utoipa::openapi::schema::Object {
    crate::bodies::enum_or_null(
        &SSL_MODES,
        "`disable`, `allow`, `prefer` (default), `require`, `verify-ca` or `verify-full`.",
    )
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterCluster {
    /// Unique: 1–63 lowercase letters, digits, '-' and '_'.
    #[schema(pattern = "^[a-z0-9_-]{1,63}$")]
    name: String,
    /// What the cluster runs (default `postgresql`); projects take their cluster's.
    engine: Option<Engine>,
    /// `postgresql://user:password@host:port/database`, a role that may create roles
    /// and databases. Its `sslmode` (libpq's: `disable`, `allow`, `prefer`, `require`,
    /// `verify-ca`, `verify-full`) governs capy's own connections; without one, capy
    /// uses `verify-full` when `ca_pem` is given, else `prefer`. `sslrootcert` is not
    /// taken: give the CA as `ca_pem`. A MySQL cluster: `mysql://user:password@host:port/`
    /// (a user that may create users and databases and grant on them); a Redis one:
    /// `redis://user:password@host:port` (a user that may run `ACL SETUSER`).
    #[schema(pattern = "^(postgres(ql)?|mysql|mariadb|rediss?)://.")]
    url: String,
    /// The CA certificate(s), PEM, that the server's certificate chains to. Workers
    /// verify against it; tenants can download it.
    #[schema(max_length = 65536, pattern = "-----BEGIN CERTIFICATE-----")]
    ca_pem: Option<String>,
    #[schema(pattern = "^[a-z0-9_-]{1,32}$")]
    region: String,
    /// Host clients connect to; the URL's host when left out.
    #[schema(pattern = "^[A-Za-z0-9.:\\[\\]-]{1,253}$")]
    public_host: Option<String>,
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 1, maximum = 65535)]
    direct_port: Option<i32>,
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 1, maximum = 65535)]
    pooled_port: Option<i32>,
    /// Host of the cluster's pooler (PgBouncer); `public_host` when left out. The
    /// projects' `pooled_url` points at `pooled_host:pooled_port`.
    #[schema(pattern = "^[A-Za-z0-9.:\\[\\]-]{1,253}$")]
    pooled_host: Option<String>,
    /// The login role the cluster's PgBouncer runs `auth_query` as (`SELECT usename,
    /// passwd FROM capy_pooler.lookup($1)`): 1–63 lowercase letters, digits and '_',
    /// starting with a letter, not `pg_…`. The operator creates it (LOGIN, not a
    /// superuser); project jobs then install `capy_pooler.lookup` in each project
    /// database, executable by this role alone. Left out: no pooler.
    #[schema(
        pattern = "^([a-oq-z][a-z0-9_]{0,62}|p([a-fh-z0-9_][a-z0-9_]{0,61})?|pg([a-z0-9][a-z0-9_]{0,60})?)$"
    )]
    pooler_auth_user: Option<String>,
    /// The sslmode of tenants' connection strings: `disable`, `allow`, `prefer`
    /// (default), `require`, `verify-ca` or `verify-full`.
    #[schema(schema_with = ssl_mode_schema)]
    ssl_mode: Option<String>,
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 0)]
    max_projects: Option<i32>,
}

/// Registers a cluster and checks its access at once; it takes projects whatever the
/// check found, so a cluster may be registered before it is up.
#[utoipa::path(post, path = "/v1/clusters", tag = "clusters",
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    request_body = RegisterCluster,
    responses((status = 201, body = RegisteredCluster), ErrorResponses))]
pub async fn register(
    State(state): State<AppState>,
    principal: Principal,
    extract::Json(body): extract::Json<RegisterCluster>,
) -> ApiResult<(StatusCode, Json<RegisteredCluster>)> {
    principal.require_admin()?;
    let spec = body.validate()?;
    // One statement decides, so of two registrations of one name only one succeeds.
    let id = admin::register_cluster(&state.pool, &state.secrets, &spec)
        .await
        .map_err(ApiError::from_anyhow)?
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "a cluster named '{}' is already registered",
                spec.name
            ))
        })?;
    let access = cluster_access::check_engine_and_record(
        &state.pool,
        id,
        spec.engine,
        &spec.admin_url,
        spec.ca_pem.as_deref(),
    )
    .await
    .map_err(ApiError::from_anyhow)?;
    let cluster = fetch(&state, id).await?;
    Ok((
        StatusCode::CREATED,
        Json(RegisteredCluster { cluster, access }),
    ))
}

impl RegisterCluster {
    fn validate(self) -> ApiResult<ClusterSpec> {
        let bad = |m: &str| Err(ApiError::BadRequest(m.to_string()));
        let label = |v: &str, max: usize| {
            (1..=max).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        };
        if !label(&self.name, 63) {
            return bad("name must be 1 to 63 characters: lowercase letters, digits, '-' and '_'");
        }
        if !label(&self.region, 32) {
            return bad(
                "region must be 1 to 32 characters: lowercase letters, digits, '-' and '_'",
            );
        }
        if self
            .ca_pem
            .as_ref()
            .is_some_and(|pem| pem.len() > MAX_CA_PEM_BYTES)
        {
            return bad("ca_pem must be at most 65536 bytes");
        }
        let engine = self.engine.unwrap_or_default();
        let parsed = match engine {
            Engine::Postgresql => self.postgresql_url()?,
            Engine::Mysql | Engine::Redis => self.engine_url(engine)?,
        };
        let url_port = i32::from(parsed.port().unwrap_or(default_port(engine)));
        let direct_port = self.direct_port.unwrap_or(url_port);
        let pooled_port = self.pooled_port.unwrap_or(direct_port);
        if ![direct_port, pooled_port]
            .iter()
            .all(|p| (1..=65535).contains(p))
        {
            return bad("ports must be between 1 and 65535");
        }
        let public_host = self
            .public_host
            .unwrap_or_else(|| parsed.host_str().unwrap_or_default().to_string());
        check_host(&public_host, "public_host")?;
        if let Some(host) = &self.pooled_host {
            check_host(host, "pooled_host")?;
        }
        if let Some(role) = &self.pooler_auth_user {
            check_pooler_auth_user(role)?;
        }
        let ssl_mode = self.ssl_mode.unwrap_or_else(|| match engine {
            Engine::Postgresql => "prefer".into(),
            Engine::Mysql | Engine::Redis => "disable".into(),
        });
        if !SSL_MODES.contains(&ssl_mode.as_str()) {
            return bad(
                "ssl_mode must be one of disable, allow, prefer, require, verify-ca, verify-full",
            );
        }
        if self.max_projects.is_some_and(|m| m < 0) {
            return bad("max_projects must not be negative");
        }
        Ok(ClusterSpec {
            engine,
            name: self.name,
            region: self.region,
            admin_url: self.url,
            public_host,
            direct_port,
            pooled_port,
            pooled_host: self.pooled_host,
            pooler_auth_user: self.pooler_auth_user,
            ssl_mode,
            ca_pem: self.ca_pem,
            max_projects: self.max_projects,
        })
    }
}

impl RegisterCluster {
    /// The PostgreSQL admin URL, whose TLS settings and CA workers will connect with
    /// (each parsed once).
    fn postgresql_url(&self) -> ApiResult<url::Url> {
        let connectable = match tls::ClusterTarget::new(&self.url, self.ca_pem.as_deref()) {
            Ok(_) => true,
            Err(TlsConfigError::InvalidUrl) => false,
            Err(
                e @ (TlsConfigError::UnknownSslMode
                | TlsConfigError::RootCertFile
                | TlsConfigError::ClientCertificate(_)
                | TlsConfigError::VerifyCaWithoutCa),
            ) => return Err(ApiError::BadRequest(format!("url: {e}"))),
            // The CA's own errors name ca_pem.
            Err(e) => return Err(ApiError::BadRequest(e.to_string())),
        };
        url::Url::parse(&self.url)
            .ok()
            .filter(|u| Engine::Postgresql.url_schemes().contains(&u.scheme()))
            .filter(|u| u.host_str().is_some_and(|h| !h.is_empty()))
            .filter(|_| connectable)
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "url must be a PostgreSQL URL: postgresql://user:password@host:port/database"
                        .into(),
                )
            })
    }

    /// A MySQL or Redis admin URL. What only PostgreSQL clusters have (a CA, a pooler,
    /// TLS for tenants) is refused rather than ignored.
    fn engine_url(&self, engine: Engine) -> ApiResult<url::Url> {
        let only_postgresql = [
            ("ca_pem", self.ca_pem.is_some()),
            ("pooler_auth_user", self.pooler_auth_user.is_some()),
            ("pooled_host", self.pooled_host.is_some()),
            ("pooled_port", self.pooled_port.is_some()),
        ];
        if let Some((field, _)) = only_postgresql.iter().find(|(_, given)| *given) {
            return Err(ApiError::BadRequest(format!(
                "{field} is for PostgreSQL clusters, not {} ones",
                engine.as_str()
            )));
        }
        if self.ssl_mode.as_deref().is_some_and(|m| m != "disable") {
            return Err(ApiError::BadRequest(format!(
                "ssl_mode of a {} cluster must be disable (capy does not yet speak TLS to it)",
                engine.as_str()
            )));
        }
        url::Url::parse(&self.url)
            .ok()
            .filter(|u| engine.url_schemes().contains(&u.scheme()))
            .filter(|u| u.host_str().is_some_and(|h| !h.is_empty()))
            .ok_or_else(|| {
                ApiError::BadRequest(
                    match engine {
                        Engine::Redis => "url must be a Redis URL: redis://user:password@host:port",
                        _ => "url must be a MySQL URL: mysql://user:password@host:port/",
                    }
                    .into(),
                )
            })
    }
}

/// The port an admin URL without one means.
fn default_port(engine: Engine) -> u16 {
    match engine {
        Engine::Postgresql => 5432,
        Engine::Mysql => 3306,
        Engine::Redis => 6379,
    }
}

/// A host name or IP address clients connect to (`field` names it in the error).
fn check_host(host: &str, field: &str) -> ApiResult<()> {
    // It goes into connection strings as their host: it must make one (an IPv6
    // address in brackets).
    let ok = (1..=253).contains(&host.len())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        && url::Url::parse(&format!("postgresql://{host}:5432/d"))
            .is_ok_and(|u| u.port() == Some(5432) && u.host_str().is_some());
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{field} must be a host name or IP address (an IPv6 address in brackets)"
        )))
    }
}

fn check_pooler_auth_user(role: &str) -> ApiResult<()> {
    if admin::is_valid_pooler_auth_user(role) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "pooler_auth_user {}",
            admin::POOLER_AUTH_USER_RULE
        )))
    }
}

#[utoipa::path(get, path = "/v1/clusters", tag = "clusters",
    params(PageParams),
    responses((status = 200, body = ClusterList), ErrorResponses))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Listing(NoFilter {}, page): Listing<NoFilter>,
) -> ApiResult<Json<ClusterList>> {
    principal.require_admin()?;
    let limit = page.limit()?;
    let rows: Vec<ClusterRow> = sqlx::query_as(&format!(
        "{CLUSTER_SELECT} where ($1::uuid is null or c.id < $1) order by c.id desc limit $2"
    ))
    .bind(page.after::<Uuid>()?)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (rows, next_cursor) = pagination::page(rows, limit, |c| c.id);
    let clusters = rows
        .into_iter()
        .map(|row| present(&state, row))
        .collect::<ApiResult<_>>()?;
    Ok(Json(ClusterList {
        clusters,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/clusters/{id}", tag = "clusters",
    params(("id" = Uuid, Path, description = "Cluster id")),
    responses((status = 200, body = ClusterBody), ErrorResponses))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ClusterBody>> {
    principal.require_admin()?;
    Ok(Json(ClusterBody {
        cluster: fetch(&state, id).await?,
    }))
}

/// Connects with the admin URL and reports reachability, server version, whether the
/// role may create roles and databases, and latency; a wrong password, host or port is
/// named as such. Also refreshes the cluster's extension catalog.
#[utoipa::path(post, path = "/v1/clusters/{id}/check-access", tag = "clusters",
    params(("id" = Uuid, Path, description = "Cluster id")),
    responses((status = 200, body = AccessBody), ErrorResponses))]
pub async fn check_access(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<AccessBody>> {
    principal.require_admin()?;
    fetch(&state, id).await?;
    let access = cluster_access::check_cluster(&state.pool, &state.secrets, id)
        .await
        .map_err(ApiError::from_anyhow)?;
    Ok(Json(AccessBody { access }))
}

/// At most this many names on one cluster's allow-list.
const MAX_ALLOWED_EXTENSIONS: usize = 200;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowedExtensions {
    /// The whole list (it replaces the one recorded; empty allows none). Each is an
    /// extension name: 1–63 lowercase letters, digits, '_' and '-'.
    #[schema(schema_with = allowed_names_schema)]
    names: Vec<String>,
}

fn allowed_names_schema() -> utoipa::openapi::schema::Array {
    extension_names_schema(MAX_ALLOWED_EXTENSIONS)
}

/// Sets the untrusted extensions tenants of this cluster may enable. A trusted
/// extension needs no entry. An allowed one is installed by the cluster's admin into
/// the schema `extensions` of the project's database, which the tenant may use but not
/// write; removing a name stops new installs, not those done.
#[utoipa::path(put, path = "/v1/clusters/{id}/allowed-extensions", tag = "clusters",
    params(("id" = Uuid, Path, description = "Cluster id")),
    request_body = AllowedExtensions,
    responses((status = 200, body = ClusterBody), ErrorResponses))]
pub async fn set_allowed_extensions(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<AllowedExtensions>,
) -> ApiResult<Json<ClusterBody>> {
    principal.require_admin()?;
    let mut names = body.names;
    if names.len() > MAX_ALLOWED_EXTENSIONS {
        return Err(ApiError::BadRequest(format!(
            "names takes at most {MAX_ALLOWED_EXTENSIONS} extensions"
        )));
    }
    for name in &names {
        check_extension_name(name)?;
    }
    names.sort();
    names.dedup();
    let updated = sqlx::query(
        "update clusters set allowed_extensions = $2, updated_at = now() where id = $1",
    )
    .bind(id)
    .bind(&names)
    .execute(&state.pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::NotFound("cluster"));
    }
    Ok(Json(ClusterBody {
        cluster: fetch(&state, id).await?,
    }))
}

async fn fetch(state: &AppState, id: Uuid) -> ApiResult<Cluster> {
    let row: Option<ClusterRow> = sqlx::query_as(&format!("{CLUSTER_SELECT} where c.id = $1"))
        .bind(id)
        .fetch_optional(&state.pool)
        .await?;
    present(state, row.ok_or(ApiError::NotFound("cluster"))?)
}

/// The cluster as shown: its admin URL opened, then stripped of the password.
fn present(state: &AppState, row: ClusterRow) -> ApiResult<Cluster> {
    let admin_url = state
        .secrets
        .open(&row.admin_url_encrypted)
        .map_err(|e| ApiError::Internal(e.into()))?;
    let admin_url = match url::Url::parse(&admin_url) {
        Ok(mut url) => {
            let _ = url.set_password(None);
            // libpq also takes the password as a query parameter.
            let kept: Vec<(String, String)> = url
                .query_pairs()
                .filter(|(k, _)| k != "password")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            url.set_query(None);
            if !kept.is_empty() {
                url.query_pairs_mut().extend_pairs(kept);
            }
            url.to_string()
        }
        Err(_) => "[unparseable]".into(),
    };
    Ok(Cluster {
        id: row.id,
        name: row.name,
        engine: row.engine,
        region: row.region,
        admin_url,
        public_host: row.public_host,
        direct_port: row.direct_port,
        pooled_port: row.pooled_port,
        pooled_host: row.pooled_host,
        pooler_auth_user: row.pooler_auth_user,
        ssl_mode: row.ssl_mode,
        ca_pem: row.ca_pem,
        max_projects: row.max_projects,
        project_count: row.project_count,
        last_checked_at: row.last_checked_at,
        allowed_extensions: row.allowed_extensions,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// The cluster's CA certificate, for clients' `sslrootcert` (libpq reads
/// `~/.postgresql/root.crt` by default). Public like any CA certificate: no key needed.
#[utoipa::path(get, path = "/v1/clusters/{id}/ca.pem", tag = "clusters",
    security(()),
    params(("id" = Uuid, Path, description = "Cluster id")),
    responses((status = 200, description = "PEM", content_type = "application/x-pem-file", body = String),
        ErrorResponses))]
pub async fn ca_certificate(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> ApiResult<impl axum::response::IntoResponse> {
    let pem: Option<Option<String>> =
        sqlx::query_scalar("select ca_pem from clusters where id = $1")
            .bind(id)
            .fetch_optional(&state.pool)
            .await?;
    let pem = pem.ok_or(ApiError::NotFound("cluster"))?;
    let pem = pem.ok_or(ApiError::NotFound("CA certificate of this cluster"))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        pem,
    ))
}
