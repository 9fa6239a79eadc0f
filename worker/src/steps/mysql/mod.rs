//! The built-in steps of MySQL (and MariaDB) projects. A project is a user
//! `'<role_name>'@'%'` with ALL PRIVILEGES on its own database `<database_name>` only.
//! Each step converges from whatever state a previous or partial run left, so it may
//! run twice. DDL cannot take placeholders: names are validated, then quoted.

mod create;
mod delete;
mod start;
mod stop;

use capy_shared::engines::mysql::{self as engine, error_number};
use capy_shared::ident::is_valid_identifier;
use capy_shared::model::job_type;
use capy_shared::step::{StepCluster, StepInput, StepProject};
use sqlx::{Executor as _, MySqlConnection};

use super::{require_cluster, require_project, StepError};

/// MySQL's longest user name (MariaDB takes 80; capy's names fit both).
const MAX_USER_NAME: usize = 32;
/// MySQL's longest database name.
const MAX_DATABASE_NAME: usize = 64;

/// Runs the mysql step for the input's job type.
pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let job = input.job.job_type.as_str();
    match job {
        job_type::PROJECT_CREATE => create::create(input).await,
        job_type::PROJECT_UPDATE => create::update(input).await,
        job_type::PROJECT_DELETE => delete::run(input).await,
        job_type::PROJECT_STOP => stop::run(input).await,
        job_type::PROJECT_START => start::run(input).await,
        other => Err(StepError::permanent(format!(
            "job type '{other}' is not available for MySQL projects"
        ))),
    }
}

/// The project and cluster of a `job` step, the project's names checked.
fn target<'a>(
    input: &'a StepInput,
    job: &str,
) -> Result<(&'a StepProject, &'a StepCluster), StepError> {
    let project = require_project(input, job)?;
    let cluster = require_cluster(input, job)?;
    validate_names(project)?;
    Ok((project, cluster))
}

/// The step trusts no name it is handed: both must be capy's own identifiers, the user
/// within MySQL's limit.
fn validate_names(project: &StepProject) -> Result<(), StepError> {
    let checks = [
        (&project.role_name, MAX_USER_NAME),
        (&project.database_name, MAX_DATABASE_NAME),
    ];
    for (name, longest) in checks {
        if !is_valid_identifier(name) || name.len() > longest {
            return Err(StepError::permanent(format!(
                "invalid MySQL name {name:?} (lowercase letters, digits and _, at most {longest} characters)"
            )));
        }
    }
    Ok(())
}

/// `` `name` ``, with embedded backticks doubled.
fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// `'text'`: `\` doubled and `'` doubled, so the text stays one literal whether or not
/// the server's sql_mode has NO_BACKSLASH_ESCAPES. NUL cannot be sent and is dropped.
fn quote_string(text: &str) -> String {
    let escaped = text
        .replace('\0', "")
        .replace('\\', "\\\\")
        .replace('\'', "''");
    format!("'{escaped}'")
}

/// The account `'user'@'%'`.
fn account(user: &str) -> String {
    format!("{}@'%'", quote_string(user))
}

/// A database name as a GRANT pattern: `_` and `%` are wildcards there, so they are
/// escaped (else `capy_x` would grant `capyAx` too, which the user could create).
fn grant_pattern(database: &str) -> String {
    quote_ident(&database.replace('_', "\\_").replace('%', "\\%"))
}

/// Connects as the cluster's admin (the URL is never printed). A statement waiting on
/// a tenant's metadata lock (a DROP DATABASE a missed session blocks) gives up after
/// [`LOCK_WAIT_SECONDS`] with error 1205, which is retried, instead of hanging.
async fn connect(cluster: &StepCluster) -> Result<MySqlConnection, StepError> {
    let mut connection = engine::connect_admin(&cluster.admin_url)
        .await
        .map_err(|e| StepError {
            transient: e.is_transient(),
            message: format!("connecting to cluster '{}': {}", cluster.name, e.message),
        })?;
    let limit = format!("SET SESSION lock_wait_timeout = {LOCK_WAIT_SECONDS}");
    execute(&mut connection, &limit, "limiting the session's lock waits").await?;
    Ok(connection)
}

/// How long a step's statement may wait for a lock.
const LOCK_WAIT_SECONDS: u32 = 30;

/// Runs one statement; `context` says what it does (it must not hold a secret).
async fn execute(
    connection: &mut MySqlConnection,
    sql: &str,
    context: &str,
) -> Result<(), StepError> {
    connection
        .execute(sql)
        .await
        .map(|_| ())
        .map_err(|e| from_sqlx(context, &e))
}

/// MySQL error numbers worth retrying: lock wait timeout, deadlock, too many
/// connections, server shutting down, connection killed.
const TRANSIENT_ERRORS: [u16; 5] = [1205, 1213, 1040, 1053, 1927];

/// A sqlx error as a step error: connection and I/O failures, lock waits and deadlocks
/// are transient; other server errors permanent. The server's messages name users and
/// databases, never passwords.
fn from_sqlx(context: &str, error: &sqlx::Error) -> StepError {
    let transient = match error {
        sqlx::Error::Database(_) => {
            error_number(error).is_some_and(|n| TRANSIENT_ERRORS.contains(&n))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    };
    let detail = match (error.as_database_error(), error_number(error)) {
        (Some(db), Some(number)) => format!("{} (error {number})", db.message()),
        _ => error.to_string(),
    };
    StepError {
        transient,
        message: format!("{context}: {detail}"),
    }
}

/// Whether the user exists (`mysql.user` holds one row per account).
async fn user_exists(connection: &mut MySqlConnection, user: &str) -> Result<bool, StepError> {
    let count: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = '%'")
            .bind(user)
            .fetch_one(connection)
            .await
            .map_err(|e| from_sqlx("looking the user up", &e))?;
    Ok(count > 0)
}

/// Locks (a stop) or unlocks (a start) the project's existing user; a missing user is
/// a permanent failure, since neither step may create one.
async fn set_account_lock(
    connection: &mut MySqlConnection,
    project: &StepProject,
    cluster: &StepCluster,
    locked: bool,
) -> Result<(), StepError> {
    let user = &project.role_name;
    if !user_exists(connection, user).await? {
        return Err(StepError::permanent(format!(
            "the project's user {user} does not exist on cluster '{}'",
            cluster.name
        )));
    }
    let (clause, doing, done) = match locked {
        true => ("LOCK", "locking the user", "locked"),
        false => ("UNLOCK", "unlocking the user", "unlocked"),
    };
    execute(
        connection,
        &format!("ALTER USER {} ACCOUNT {clause}", account(user)),
        doing,
    )
    .await?;
    println!("user {user}: {done}");
    Ok(())
}

/// Ends every session of `user`. Run after its account is locked, so none comes back;
/// a session that ends on its own meanwhile is no failure.
async fn kill_sessions(connection: &mut MySqlConnection, user: &str) -> Result<(), StepError> {
    // ID is BIGINT on MariaDB and BIGINT UNSIGNED on MySQL: one type for both.
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST WHERE USER = ?",
    )
    .bind(user)
    .fetch_all(&mut *connection)
    .await
    .map_err(|e| from_sqlx("listing the user's sessions", &e))?;
    for id in &ids {
        match connection
            .execute(format!("KILL CONNECTION {id}").as_str())
            .await
        {
            Ok(_) => {}
            // ER_NO_SUCH_THREAD: it ended between the listing and the kill.
            Err(e) if error_number(&e) == Some(1094) => {}
            Err(e) => return Err(from_sqlx("ending one of the user's sessions", &e)),
        }
    }
    println!("user {user}: {} session(s) ended", ids.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_names_stay_one_token() {
        assert_eq!(quote_string(r"a'b\c"), r"'a''b\\c'");
        assert_eq!(quote_ident("a`b"), "`a``b`");
        assert_eq!(account("capy_1"), "'capy_1'@'%'");
        assert_eq!(grant_pattern("capy_a1"), r"`capy\_a1`");
    }
}
