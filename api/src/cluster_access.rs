//! Checking a cluster's admin access, the one place the API connects to a target
//! cluster: reachable? which version? may the role create roles and databases? It also
//! reads the extensions the cluster offers, so listing them never waits on the cluster,
//! and closes PUBLIC's CONNECT on every database capy does not manage (`postgres`,
//! `template1`, the control database if it lives there, anything else), so a tenant's
//! login reaches its own database alone.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use capy_shared::crypto::SecretBox;
use capy_shared::engines::{self, EngineAccess};
use capy_shared::ident::quote_ident;
use capy_shared::model::Engine;
use capy_shared::tls::{ClusterTarget, ConnectFailure, Verification};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a check found. `error_kind` tells a wrong password from a wrong host or port.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AccessReport {
    pub engine: Engine,
    pub reachable: bool,
    pub server_version: Option<String>,
    /// `logical` is needed for instant databases with logical replication.
    pub wal_level: Option<String>,
    pub is_superuser: bool,
    pub can_create_roles: bool,
    pub can_create_databases: bool,
    /// Connect, authenticate and read the role's rights, in milliseconds.
    pub latency_ms: f64,
    /// `authentication_failed`, `host_not_found`, `connection_refused`, `timeout`,
    /// `database_not_found`, `tls_name_mismatch` (the certificate names another host),
    /// `tls_untrusted_certificate` (not signed by the cluster's CA),
    /// `tls_invalid_certificate` (expired, not yet valid…), `tls_unsupported` (the server
    /// offers no TLS but the sslmode requires it), `tls_handshake`, `invalid_tls_settings`
    /// or `other`.
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub checked_at: DateTime<Utc>,
    /// Databases capy does not manage whose CONNECT (and TEMPORARY) for PUBLIC this
    /// check revoked.
    pub public_connect_closed: Vec<String>,
    /// Databases capy does not manage that PUBLIC may still connect to: the admin is
    /// neither superuser nor their owner, or one is the control database and the control
    /// plane's own role connects to it through PUBLIC. Close them by hand.
    pub public_connect_open: Vec<String>,
    /// Whether pg_hba.conf lets roles other than the admin (and superusers) open a
    /// physical replication connection, which streams the whole cluster's WAL; null
    /// when pg_hba_file_rules could not be read (it needs a superuser) or holds errors.
    /// Instant databases with logical replication need `false`.
    pub physical_replication_open: Option<bool>,
    /// The sslmode capy's own connections to this cluster use: the admin URL's
    /// `sslmode`, else `verify-full` when a CA certificate is registered, else `prefer`.
    pub ssl_mode: Option<String>,
    /// Whether the check's session was encrypted.
    pub tls: bool,
    /// Whether the server's certificate chained to the cluster's CA (or, without one, a
    /// public root) and named the host; null without TLS. Under `prefer` or `require` a
    /// certificate that does not verify is still used: this says so.
    pub tls_verified: Option<bool>,
}

struct Extension {
    name: String,
    description: Option<String>,
    default_version: Option<String>,
    trusted: bool,
    /// Each version offered: (version, trusted, superuser).
    versions: Vec<(String, bool, bool)>,
}

/// Checks `admin_url` and, when it answers, records the cluster's extension catalog.
pub async fn check_and_record(
    pool: &PgPool,
    cluster_id: Uuid,
    admin_url: &str,
    ca_pem: Option<&str>,
) -> anyhow::Result<AccessReport> {
    let spare = SparePublic::read(pool).await?;
    let (report, extensions) = check(admin_url, ca_pem, &spare).await;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "update clusters set last_checked_at = $2, wal_level = coalesce($3, wal_level),
             physical_replication_open = case when $3 is null then physical_replication_open else $4 end
         where id = $1",
    )
    .bind(cluster_id)
    .bind(report.checked_at)
    .bind(&report.wal_level)
    .bind(report.physical_replication_open)
    .execute(&mut *tx)
    .await?;
    if let Some(extensions) = extensions {
        sqlx::query("delete from cluster_extensions where cluster_id = $1")
            .bind(cluster_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "insert into cluster_extensions (cluster_id, name, description, default_version, trusted)
             select $1, * from unnest($2::text[], $3::text[], $4::text[], $5::bool[])",
        )
        .bind(cluster_id)
        .bind(extensions.iter().map(|e| e.name.clone()).collect::<Vec<_>>())
        .bind(extensions.iter().map(|e| e.description.clone()).collect::<Vec<_>>())
        .bind(extensions.iter().map(|e| e.default_version.clone()).collect::<Vec<_>>())
        .bind(extensions.iter().map(|e| e.trusted).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        record_versions(&mut tx, cluster_id, &extensions).await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// The flags of every offered version, next to the extensions just recorded.
async fn record_versions(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    cluster_id: Uuid,
    extensions: &[Extension],
) -> anyhow::Result<()> {
    let versions = extensions
        .iter()
        .flat_map(|e| e.versions.iter().map(move |v| (e.name.clone(), v)));
    let (mut names, mut numbers, mut trusted, mut superuser) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, (version, is_trusted, needs_superuser)) in versions {
        names.push(name);
        numbers.push(version.clone());
        trusted.push(*is_trusted);
        superuser.push(*needs_superuser);
    }
    sqlx::query(
        "insert into cluster_extension_versions (cluster_id, name, version, trusted, superuser)
         select $1, * from unnest($2::text[], $3::text[], $4::bool[], $5::bool[])",
    )
    .bind(cluster_id)
    .bind(names)
    .bind(numbers)
    .bind(trusted)
    .bind(superuser)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Checks cluster `cluster_id` with its sealed admin URL.
pub async fn check_cluster(
    pool: &PgPool,
    secrets: &SecretBox,
    cluster_id: Uuid,
) -> anyhow::Result<AccessReport> {
    let (sealed, ca_pem, engine): (Vec<u8>, Option<String>, Engine) =
        sqlx::query_as("select admin_url_encrypted, ca_pem, engine from clusters where id = $1")
            .bind(cluster_id)
            .fetch_one(pool)
            .await?;
    let admin_url = secrets.open(&sealed)?;
    check_engine_and_record(pool, cluster_id, engine, &admin_url, ca_pem.as_deref()).await
}

/// Checks a cluster of any engine and records when. Only PostgreSQL clusters have an
/// extension catalog and databases to close.
pub async fn check_engine_and_record(
    pool: &PgPool,
    cluster_id: Uuid,
    engine: Engine,
    admin_url: &str,
    ca_pem: Option<&str>,
) -> anyhow::Result<AccessReport> {
    let access = match engine {
        Engine::Postgresql => return check_and_record(pool, cluster_id, admin_url, ca_pem).await,
        Engine::Mysql => engines::mysql::check_access(admin_url).await,
        Engine::Redis => engines::redis::check_access(admin_url).await,
    };
    let report = engine_report(engine, access);
    sqlx::query("update clusters set last_checked_at = $2 where id = $1")
        .bind(cluster_id)
        .bind(report.checked_at)
        .execute(pool)
        .await?;
    Ok(report)
}

/// A MySQL or Redis check in the report's shape (PostgreSQL's own fields left empty).
fn engine_report(engine: Engine, access: EngineAccess) -> AccessReport {
    AccessReport {
        engine,
        reachable: access.reachable,
        server_version: access.server_version,
        wal_level: None,
        is_superuser: false,
        can_create_roles: access.can_create_roles,
        can_create_databases: access.can_create_databases,
        latency_ms: access.latency_ms,
        error_kind: access.error_kind,
        error: access.error,
        checked_at: Utc::now(),
        public_connect_closed: Vec::new(),
        public_connect_open: Vec::new(),
        physical_replication_open: None,
        ssl_mode: None,
        tls: access.tls,
        tls_verified: None,
    }
}

async fn check(
    admin_url: &str,
    ca_pem: Option<&str>,
    spare: &SparePublic,
) -> (AccessReport, Option<Vec<Extension>>) {
    let started = Instant::now();
    let mut report = AccessReport {
        engine: Engine::Postgresql,
        reachable: false,
        server_version: None,
        wal_level: None,
        is_superuser: false,
        can_create_roles: false,
        can_create_databases: false,
        latency_ms: 0.0,
        error_kind: None,
        error: None,
        checked_at: Utc::now(),
        public_connect_closed: Vec::new(),
        public_connect_open: Vec::new(),
        physical_replication_open: None,
        ssl_mode: None,
        tls: false,
        tls_verified: None,
    };
    let outcome = connect_and_read(admin_url, ca_pem, spare, &mut report).await;
    report.latency_ms = (started.elapsed().as_secs_f64() * 1e5).round() / 100.0;
    match outcome {
        Ok(extensions) => (report, Some(extensions)),
        Err((kind, message)) => {
            report.error_kind = Some(kind.into());
            report.error = Some(message);
            (report, None)
        }
    }
}

type Failure = (&'static str, String);

async fn connect_and_read(
    admin_url: &str,
    ca_pem: Option<&str>,
    spare: &SparePublic,
    report: &mut AccessReport,
) -> Result<Vec<Extension>, Failure> {
    let target = ClusterTarget::new(admin_url, ca_pem)
        .map_err(|e| ("invalid_tls_settings", e.to_string()))?;
    report.ssl_mode = Some(target.ssl_mode.to_string());
    let mut config = target.config.clone();
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .application_name("capy-check-access");
    let described = describe_target(&config);
    let user = config.get_user().unwrap_or("").to_string();
    let (client, verification) = tokio::time::timeout(CONNECT_TIMEOUT, target.connect(&config))
        .await
        .map_err(|_| ("timeout", format!("timed out connecting to {described}")))?
        .map_err(|failure| match failure {
            ConnectFailure::Config(e) => ("invalid_tls_settings", e.to_string()),
            ConnectFailure::Postgres { tls: Some(tls), .. } => tls,
            ConnectFailure::Postgres { error, tls: None } => classify(&error, &described, &user),
        })?;
    report.tls = verification.is_some();
    report.tls_verified = verification.map(|v| v == Verification::Verified);
    report.reachable = true;
    let row = client
        .query_one(
            "select current_setting('server_version'), rolsuper, rolcreaterole, rolcreatedb,
                    current_setting('wal_level')
             from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| ("other", format!("reading the role's rights: {e}")))?;
    report.server_version = Some(row.get(0));
    report.wal_level = Some(row.get(4));
    report.is_superuser = row.get(1);
    report.can_create_roles = row.get::<_, bool>(1) || row.get::<_, bool>(2);
    report.can_create_databases = row.get::<_, bool>(1) || row.get::<_, bool>(3);
    report.physical_replication_open = physical_replication_open(&client).await;
    close_public_connect(&client, spare, report).await?;
    let rows = client
        .query(
            "select e.name::text, e.comment, e.default_version, coalesce(v.trusted, false),
                    array(select a.version from pg_available_extension_versions a
                          where a.name = e.name order by a.version),
                    array(select a.trusted from pg_available_extension_versions a
                          where a.name = e.name order by a.version),
                    array(select a.superuser from pg_available_extension_versions a
                          where a.name = e.name order by a.version)
             from pg_available_extensions e
             left join pg_available_extension_versions v
               on v.name = e.name and v.version = e.default_version
             order by e.name",
            &[],
        )
        .await
        .map_err(|e| ("other", format!("reading the available extensions: {e}")))?;
    Ok(rows
        .iter()
        .map(|row| Extension {
            name: row.get(0),
            description: row.get(1),
            default_version: row.get(2),
            trusted: row.get(3),
            versions: version_flags(row.get(4), row.get(5), row.get(6)),
        })
        .collect())
}

/// Whether a pg_hba.conf rule (not `reject`) for the `replication` keyword names a
/// role other than the admin and the superusers: `all`, a group (`+g`), a regular
/// expression or a file all count as open. Only `replication` matches a physical
/// replication connection; logical ones (`replication=database`) match the ordinary
/// database rules. None when the rules cannot be read or one has an error.
async fn physical_replication_open(client: &tokio_postgres::Client) -> Option<bool> {
    let row = client
        .query_one(
            "select coalesce(bool_or(r.error is not null), false),
                    coalesce(bool_or(r.error is null and 'replication' = any(r.database)
                        and r.auth_method <> 'reject'
                        and exists (select 1 from unnest(r.user_name) u
                                    where u <> current_user::text
                                      and not exists (select 1 from pg_roles s
                                                      where s.rolname = u and s.rolsuper))),
                             false)
             from pg_hba_file_rules r",
            &[],
        )
        .await
        .ok()?;
    let (broken, open): (bool, bool) = (row.get(0), row.get(1));
    (!broken).then_some(open)
}

fn version_flags(
    versions: Vec<String>,
    trusted: Vec<bool>,
    superuser: Vec<bool>,
) -> Vec<(String, bool, bool)> {
    versions
        .into_iter()
        .zip(trusted)
        .zip(superuser)
        .map(|((version, trusted), superuser)| (version, trusted, superuser))
        .collect()
}

/// What closing PUBLIC's CONNECT must leave alone: capy's project databases
/// (capy grants those itself) and, when the control plane's own role connects to its
/// database only through PUBLIC, a database of that name.
struct SparePublic {
    project_databases: Vec<String>,
    control_database: Option<String>,
}

impl SparePublic {
    async fn read(pool: &PgPool) -> anyhow::Result<Self> {
        // Every cluster's: two registrations may name one server.
        let project_databases = sqlx::query_scalar("select database_name from projects")
            .fetch_all(pool)
            .await?;
        // Superuser or (a member of) the owner keeps CONNECT without PUBLIC.
        let control_database = sqlx::query_scalar(
            "select d.datname::text from pg_database d, pg_roles me
             where d.datname = current_database() and me.rolname = current_user
               and not me.rolsuper and not pg_has_role(current_user, d.datdba, 'USAGE')",
        )
        .fetch_optional(pool)
        .await?;
        Ok(Self {
            project_databases,
            control_database,
        })
    }
}

/// Revokes CONNECT and TEMPORARY from PUBLIC on every database that takes connections
/// and that capy does not manage, where the admin may (superuser, or the owner's
/// privileges); reports the rest as open. Never revokes what the admin itself needs:
/// its rights come from superuser or ownership, which PUBLIC's grant does not touch.
async fn close_public_connect(
    client: &tokio_postgres::Client,
    spare: &SparePublic,
    report: &mut AccessReport,
) -> Result<(), Failure> {
    let rows = client
        .query(
            "select d.datname::text, me.rolsuper or pg_has_role(current_user, d.datdba, 'USAGE')
             from pg_database d, pg_roles me
             where me.rolname = current_user and d.datallowconn
               and not d.datname = any($1)
               and (has_database_privilege('public', d.oid, 'CONNECT')
                    or has_database_privilege('public', d.oid, 'TEMPORARY'))
             order by d.datname",
            &[&spare.project_databases],
        )
        .await
        .map_err(|e| ("other", format!("reading the databases' grants: {e}")))?;
    for row in rows {
        let (name, may_change): (String, bool) = (row.get(0), row.get(1));
        if !may_change || spare.control_database.as_deref() == Some(name.as_str()) {
            report.public_connect_open.push(name);
            continue;
        }
        let revoke = format!(
            "REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC",
            quote_ident(&name)
        );
        match client.batch_execute(&revoke).await {
            Ok(()) => report.public_connect_closed.push(name),
            Err(_) => report.public_connect_open.push(name),
        }
    }
    Ok(())
}

fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// Names the cause: a wrong password, an unknown host, a closed port.
fn classify(error: &tokio_postgres::Error, target: &str, user: &str) -> Failure {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        return match code {
            "28P01" => (
                "authentication_failed",
                format!("password authentication failed for user '{user}'"),
            ),
            "28000" => ("authentication_failed", db.message().to_string()),
            "3D000" => ("database_not_found", db.message().to_string()),
            _ => ("other", format!("{} (SQLSTATE {code})", db.message())),
        };
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => (
                    "connection_refused",
                    format!("connection refused by {target}: is the port right and the server up?"),
                ),
                std::io::ErrorKind::TimedOut => {
                    ("timeout", format!("timed out connecting to {target}"))
                }
                _ if io.to_string().contains("lookup") || io.to_string().contains("resolve") => (
                    "host_not_found",
                    format!("the host of {target} could not be resolved"),
                ),
                _ => ("other", format!("could not connect to {target}: {io}")),
            };
        }
        source = current.source();
    }
    let text = error.to_string();
    if text.contains("timeout") || text.contains("timed out") {
        return ("timeout", format!("timed out connecting to {target}"));
    }
    ("other", format!("could not connect to {target}: {text}"))
}
