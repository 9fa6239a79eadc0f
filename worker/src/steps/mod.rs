//! capy's built-in steps, run by the `capy-step` binary. They talk to a target cluster
//! as its admin with tokio-postgres and are idempotent: each reads the catalogs first
//! and does only what is missing, so a retried attempt is safe.

mod archive;
mod backup;
mod backup_delete;
mod backup_verify;
mod credentials_retire;
mod credentials_rotate;
mod extensions;
mod mysql;
mod pg_tools;
mod pooler_lookup;
mod preview_clone;
mod preview_delete;
mod project_create;
mod project_delete;
mod project_start;
mod project_stop;
mod project_update;
mod redis;
mod restore;
mod storage_check;
mod tenant_database;

use std::time::Duration;

use capy_shared::ident::{is_valid_duration, is_valid_identifier};
use capy_shared::model::{job_type, Engine};
use capy_shared::step::{StepCluster, StepInput, StepProject};
use capy_shared::tls::{ClusterTarget, ConnectFailure};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

/// A step's failure: whether a retry may succeed, and what to tell the operator.
#[derive(Debug)]
pub struct StepError {
    pub transient: bool,
    pub message: String,
}

impl StepError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            transient: false,
            message: message.into(),
        }
    }

    /// A database error, classified by SQLSTATE: connection errors (08), insufficient
    /// resources (53), operator intervention (57), serialization and deadlock failures
    /// and objects in use are transient; an error without SQLSTATE is a failed
    /// connection, transient too.
    pub fn from_db(context: &str, error: &tokio_postgres::Error) -> Self {
        let transient = match error.code() {
            None => true,
            Some(code) => {
                let code = code.code();
                code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57")
                    || code == SqlState::T_R_SERIALIZATION_FAILURE.code()
                    || code == SqlState::T_R_DEADLOCK_DETECTED.code()
                    || code == SqlState::OBJECT_IN_USE.code()
                    // Two attempts racing to create the same object: the next sees it.
                    || code == SqlState::DUPLICATE_OBJECT.code()
                    || code == SqlState::DUPLICATE_DATABASE.code()
            }
        };
        let detail = match error.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => error.to_string(),
        };
        Self {
            transient,
            message: format!("{context}: {detail}"),
        }
    }
}

/// Runs the built-in step for the input's job type.
pub async fn run(input: &StepInput) -> Result<(), StepError> {
    match input.cluster.as_ref().map(|c| c.engine) {
        Some(Engine::Mysql) => return mysql::run(input).await,
        Some(Engine::Redis) => return redis::run(input).await,
        Some(Engine::Postgresql) | None => {}
    }
    match input.job.job_type.as_str() {
        job_type::PROJECT_CREATE => project_create::run(input).await,
        job_type::PROJECT_UPDATE => project_update::run(input).await,
        job_type::PROJECT_DELETE => project_delete::run(input).await,
        job_type::PROJECT_STOP => project_stop::run(input).await,
        job_type::PROJECT_START => project_start::run(input).await,
        job_type::PROJECT_EXTENSION_ENABLE => extensions::enable(input).await,
        job_type::PROJECT_EXTENSION_DISABLE => extensions::disable(input).await,
        job_type::PROJECT_STORAGE_CHECK => storage_check::run(input).await,
        job_type::PROJECT_ROTATE_CREDENTIALS => credentials_rotate::run(input).await,
        job_type::PROJECT_RETIRE_CREDENTIALS => credentials_retire::run(input).await,
        job_type::PROJECT_BACKUP => backup::run(input).await,
        job_type::PROJECT_BACKUP_VERIFY => backup_verify::run(input).await,
        job_type::BACKUP_DELETE => backup_delete::run(input).await,
        job_type::PROJECT_RESTORE => restore::run(input).await,
        job_type::PREVIEW_CREATE | job_type::PREVIEW_RESET => preview_clone::run(input).await,
        job_type::PREVIEW_DELETE => preview_delete::run(input).await,
        other => Err(StepError::permanent(format!(
            "capy-step has no built-in step for job type '{other}'"
        ))),
    }
}

/// The input's project, which job type `what` cannot do without.
pub fn require_project<'a>(input: &'a StepInput, what: &str) -> Result<&'a StepProject, StepError> {
    input
        .project
        .as_ref()
        .ok_or_else(|| StepError::permanent(format!("{what} needs a project")))
}

/// The input's preview database (a login and a database of its own), which job type
/// `what` cannot do without. Its names must be the ones capy makes from its id: a
/// preview's step drops what they name, so they never name anything else (its
/// parent's database above all).
pub fn require_preview<'a>(input: &'a StepInput, what: &str) -> Result<&'a StepProject, StepError> {
    let preview = input
        .preview
        .as_ref()
        .ok_or_else(|| StepError::permanent(format!("{what} needs a preview database")))?;
    let expected = capy_shared::previews::database_name(preview.id);
    if preview.database_name != expected || preview.role_name != expected {
        return Err(StepError::permanent(format!(
            "the preview's database and login must be named {expected}"
        )));
    }
    Ok(preview)
}

/// The input's cluster, which job type `what` cannot do without.
pub fn require_cluster<'a>(input: &'a StepInput, what: &str) -> Result<&'a StepCluster, StepError> {
    input
        .cluster
        .as_ref()
        .ok_or_else(|| StepError::permanent(format!("{what} needs a cluster")))
}

/// The project's role and database names are checked again here: the step trusts
/// nothing it is handed.
pub fn validate_names(project: &StepProject) -> Result<(), StepError> {
    for name in [&project.role_name, &project.database_name] {
        if !is_valid_identifier(name) {
            return Err(StepError::permanent(format!("invalid identifier {name:?}")));
        }
    }
    Ok(())
}

/// The names, and the settings that reach SQL text.
pub fn validate_project(project: &StepProject) -> Result<(), StepError> {
    validate_names(project)?;
    for value in [
        &project.statement_timeout,
        &project.idle_transaction_timeout,
    ] {
        if !is_valid_duration(value) {
            return Err(StepError::permanent(format!("invalid duration {value:?}")));
        }
    }
    if !(1..=10_000).contains(&project.max_connections) {
        return Err(StepError::permanent("max_connections out of range"));
    }
    Ok(())
}

/// Connects to a cluster as its admin, over TLS as its URL's `sslmode` and CA ask.
/// The URL is never printed.
pub async fn connect(cluster: &StepCluster) -> Result<tokio_postgres::Client, StepError> {
    let what = format!("cluster '{}'", cluster.name);
    let target = target(cluster, &what)?;
    let mut config = target.config.clone();
    harden_admin_session(&mut config);
    let client = connect_config(&target, config, &what).await?;
    require_own_role(&client, &what).await?;
    Ok(client)
}

/// Connects as the cluster's admin to its database `dbname` (the admin URL with its
/// database replaced). The URL is never printed.
pub async fn connect_database(
    cluster: &StepCluster,
    dbname: &str,
    what: &str,
) -> Result<tokio_postgres::Client, StepError> {
    let target = target(cluster, what)?;
    let mut config = target.config.clone();
    config.dbname(dbname);
    harden_admin_session(&mut config);
    let client = connect_config(&target, config, what).await?;
    require_own_role(&client, what).await?;
    Ok(client)
}

/// Refuses an admin session that does not act as the role it logged in as: a `role`
/// setting of the database (`ALTER DATABASE … SET role`) or of the login role would
/// make every statement run as someone else. Ownership checks then compare with
/// `session_user`.
async fn require_own_role(client: &tokio_postgres::Client, what: &str) -> Result<(), StepError> {
    let row = client
        .query_typed_one(
            "select current_user = session_user, current_user::text, session_user::text",
            &[],
        )
        .await
        .map_err(|e| {
            StepError::from_db(&format!("reading the session's role on the {what}"), &e)
        })?;
    let (same, current, session): (bool, String, String) = (row.get(0), row.get(1), row.get(2));
    if same {
        return Ok(());
    }
    Err(StepError::permanent(format!(
        "the admin session on the {what} runs as role {current:?}, not as {session:?} it logged in as \
         (a role setting of the database or login role): remove that setting"
    )))
}

/// The search_path of every admin session: the system catalog, then the session's own
/// temporary schema last, so no object a tenant creates in its database (a function,
/// operator or table in a schema it writes) shadows a name the admin uses.
pub const ADMIN_SEARCH_PATH: &str = "pg_catalog,pg_temp";

/// Sets [`ADMIN_SEARCH_PATH`] from the connection's start, after any options the admin
/// URL carries (the last `-c` of a setting wins).
fn harden_admin_session(config: &mut tokio_postgres::Config) {
    let mut options = config.get_options().unwrap_or_default().to_string();
    if !options.is_empty() {
        options.push(' ');
    }
    options.push_str("-c search_path=");
    options.push_str(ADMIN_SEARCH_PATH);
    // quote_literal assumes standard strings, whatever the database's own default.
    options.push_str(" -c standard_conforming_strings=on");
    config.options(&options);
}

/// Connects to the project's database as its own role, at the cluster's address.
pub async fn connect_as(
    cluster: &StepCluster,
    project: &StepProject,
) -> Result<tokio_postgres::Client, StepError> {
    let what = "project's database as its role";
    let target = target(cluster, what)?;
    let mut config = target.config.clone();
    config
        .user(&project.role_name)
        .password(project.password.as_bytes())
        .dbname(&project.database_name);
    connect_config(&target, config, what).await
}

fn target(cluster: &StepCluster, what: &str) -> Result<ClusterTarget, StepError> {
    ClusterTarget::new(&cluster.admin_url, cluster.ca_pem.as_deref())
        .map_err(|e| StepError::permanent(format!("the {what}'s admin URL or CA: {e}")))
}

async fn connect_config(
    target: &ClusterTarget,
    mut config: tokio_postgres::Config,
    what: &str,
) -> Result<tokio_postgres::Client, StepError> {
    config
        .connect_timeout(Duration::from_secs(10))
        .application_name("capy-step");
    match target.connect(&config).await {
        Ok((client, _)) => Ok(client),
        Err(ConnectFailure::Config(e)) => Err(StepError::permanent(format!("the {what}: {e}"))),
        // A certificate that does not verify, or a server without TLS, stays so until
        // an operator acts; a handshake cut short may not.
        Err(ConnectFailure::Postgres {
            tls: Some((kind, message)),
            ..
        }) => {
            let message = format!("could not connect to the {what}: {message} ({kind})");
            Err(StepError {
                transient: kind == "tls_handshake",
                message,
            })
        }
        Err(ConnectFailure::Postgres { error, tls: None }) => Err(StepError::from_db(
            &format!("could not connect to the {what}"),
            &error,
        )),
    }
}

/// Runs `sql` (one or more statements, no parameters); `what` names it in errors.
pub async fn execute(
    client: &tokio_postgres::Client,
    sql: &str,
    what: &str,
) -> Result<(), StepError> {
    client
        .batch_execute(sql)
        .await
        .map_err(|e| StepError::from_db(what, &e))
}

/// Whether the catalog query `sql`, with `name` as `$1`, answers a row.
pub async fn exists(
    client: &tokio_postgres::Client,
    sql: &str,
    name: &str,
) -> Result<bool, StepError> {
    client
        // Typed: one round trip, where a prepared statement takes two.
        .query_typed_opt(sql, &[(&name, Type::TEXT)])
        .await
        .map(|row| row.is_some())
        .map_err(|e| StepError::from_db("reading the catalogs", &e))
}

pub const ROLE_EXISTS: &str = "select 1 from pg_roles where rolname = $1";
pub const DATABASE_EXISTS: &str = "select 1 from pg_database where datname = $1";
