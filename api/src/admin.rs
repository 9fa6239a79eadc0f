//! Creating organizations, API keys and clusters. The bootstrap command and tests use
//! these directly; the admin endpoints will too.

use anyhow::Context as _;
use capy_shared::crypto::{self, SecretBox};
use sqlx::PgPool;
use uuid::Uuid;

pub async fn create_organization(pool: &PgPool, name: &str) -> anyhow::Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query("insert into organizations (id, name) values ($1, $2)")
        .bind(id)
        .bind(name)
        .execute(pool)
        .await
        .context("creating an organization")?;
    Ok(id)
}

/// Who a new key is for.
#[derive(Debug, Clone, Default)]
pub struct KeyGrant {
    pub name: String,
    pub organization_id: Option<Uuid>,
    pub is_admin: bool,
    pub project_id: Option<Uuid>,
    /// `None`: every scope.
    pub scopes: Option<Vec<String>>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The key that made this one: revoking or expiring it ends this one too.
    pub created_by_key_id: Option<Uuid>,
}

/// Creates a key (on a pool, or inside the caller's transaction); answers its id and
/// the plaintext, which is not stored.
pub async fn create_api_key(
    db: impl sqlx::PgExecutor<'_>,
    grant: &KeyGrant,
) -> anyhow::Result<(Uuid, String)> {
    let key = crypto::generate_api_key();
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into api_keys (id, organization_id, is_admin, name, key_prefix, key_hash, project_id, scopes,
                               expires_at, created_by_key_id)
         values ($1, $2, $3, $4, $5, $6, $7, coalesce($8, '{read,write,credentials:read}'::text[]), $9, $10)",
    )
    .bind(id)
    .bind(grant.organization_id)
    .bind(grant.is_admin)
    .bind(&grant.name)
    .bind(&key.prefix)
    .bind(&key.hash)
    .bind(grant.project_id)
    .bind(&grant.scopes)
    .bind(grant.expires_at)
    .bind(grant.created_by_key_id)
    .execute(db)
    .await
    .context("creating an API key")?;
    Ok((id, key.plaintext))
}

/// Whether `plaintext` is a live key (exists, not revoked, not expired).
pub async fn api_key_is_live(pool: &PgPool, plaintext: &str) -> anyhow::Result<bool> {
    if !crypto::is_well_formed_api_key(plaintext) {
        return Ok(false);
    }
    let live: Option<bool> = sqlx::query_scalar(
        "select revoked_at is null and (expires_at is null or expires_at > now())
         from api_keys where key_hash = $1",
    )
    .bind(crypto::hash_api_key(plaintext))
    .fetch_optional(pool)
    .await?;
    Ok(live.unwrap_or(false))
}

/// A target cluster to register.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub engine: capy_shared::model::Engine,
    pub name: String,
    pub region: String,
    /// Superuser URL; stored sealed.
    pub admin_url: String,
    pub public_host: String,
    pub direct_port: i32,
    pub pooled_port: i32,
    /// Where clients reach the pooler; `None`: `public_host`.
    pub pooled_host: Option<String>,
    /// The role PgBouncer's auth_query logs in as (a validated identifier); `None`: no
    /// pooler, no lookup function in project databases.
    pub pooler_auth_user: Option<String>,
    pub ssl_mode: String,
    /// The CA certificate (PEM) the server's certificate chains to.
    pub ca_pem: Option<String>,
    pub max_projects: Option<i32>,
}

/// What [`is_valid_pooler_auth_user`] checks, for error messages.
pub const POOLER_AUTH_USER_RULE: &str = "must be 1 to 63 characters: lowercase letters, \
    digits and '_', starting with a letter, and not start with 'pg_'";

/// Whether `role` may name a cluster's pooler lookup role.
pub fn is_valid_pooler_auth_user(role: &str) -> bool {
    capy_shared::ident::is_valid_role_name(role)
}

/// Registers a new cluster; answers its id, or `None` when the name is taken.
pub async fn register_cluster(
    pool: &PgPool,
    secrets: &SecretBox,
    spec: &ClusterSpec,
) -> anyhow::Result<Option<Uuid>> {
    insert_cluster(pool, secrets, spec, "do nothing").await
}

/// Registers a cluster, or updates the one of the same name; answers its id.
pub async fn upsert_cluster(
    pool: &PgPool,
    secrets: &SecretBox,
    spec: &ClusterSpec,
) -> anyhow::Result<Uuid> {
    let on_conflict = "do update set region = excluded.region,
             admin_url_encrypted = excluded.admin_url_encrypted,
             public_host = excluded.public_host, direct_port = excluded.direct_port,
             pooled_port = excluded.pooled_port, pooled_host = excluded.pooled_host,
             pooler_auth_user = excluded.pooler_auth_user, ssl_mode = excluded.ssl_mode,
             ca_pem = excluded.ca_pem,
             max_projects = excluded.max_projects, updated_at = now()";
    insert_cluster(pool, secrets, spec, on_conflict)
        .await?
        .context("the upsert answered no cluster")
}

/// Inserts a cluster; `on_conflict` (a constant clause) says what a taken name does.
async fn insert_cluster(
    pool: &PgPool,
    secrets: &SecretBox,
    spec: &ClusterSpec,
    on_conflict: &'static str,
) -> anyhow::Result<Option<Uuid>> {
    sqlx::query_scalar(&format!(
        "insert into clusters (id, name, region, admin_url_encrypted, public_host, direct_port,
             pooled_port, ssl_mode, max_projects, pooled_host, pooler_auth_user, ca_pem, engine)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         on conflict (name) {on_conflict}
         returning id"
    ))
    .bind(Uuid::now_v7())
    .bind(&spec.name)
    .bind(&spec.region)
    .bind(secrets.seal(&spec.admin_url))
    .bind(&spec.public_host)
    .bind(spec.direct_port)
    .bind(spec.pooled_port)
    .bind(&spec.ssl_mode)
    .bind(spec.max_projects)
    .bind(&spec.pooled_host)
    .bind(&spec.pooler_auth_user)
    .bind(&spec.ca_pem)
    .bind(spec.engine)
    .fetch_optional(pool)
    .await
    .context("registering a cluster")
}
