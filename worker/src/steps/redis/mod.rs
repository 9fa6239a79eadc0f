//! The built-in steps of Redis projects. A project is an ACL user (`role_name`) whose
//! keys and channels all start with its prefix `p:<project id>:`; see `user.rs` for
//! its rules. Every step converges (re-applies the whole state), so a re-run or a run
//! after a partial one succeeds.

mod project_create;
mod project_delete;
mod project_start;
mod project_stop;
mod user;

use capy_shared::engines::redis::{classify, connect_admin, AdminConnection, RedisFailure};
use capy_shared::ident::is_valid_identifier;
use capy_shared::model::{job_type, redis_prefix};
use capy_shared::step::{StepCluster, StepInput, StepProject};
use redis::aio::MultiplexedConnection;
use redis::RedisError;

use super::{require_cluster, require_project, StepError};

/// Runs the Redis step for the input's job type.
pub async fn run(input: &StepInput) -> Result<(), StepError> {
    match input.job.job_type.as_str() {
        // An update re-applies the rules, so it is a create run again.
        job_type::PROJECT_CREATE | job_type::PROJECT_UPDATE => project_create::run(input).await,
        job_type::PROJECT_DELETE => project_delete::run(input).await,
        job_type::PROJECT_STOP => project_stop::run(input).await,
        job_type::PROJECT_START => project_start::run(input).await,
        other => Err(StepError::permanent(format!(
            "job type '{other}' is not available for Redis projects"
        ))),
    }
}

/// A project's ACL user and key prefix, validated.
struct Tenant<'a> {
    project: &'a StepProject,
    user: &'a str,
    prefix: String,
}

/// The input's project and cluster, which job type `what` cannot do without. The user
/// name must be one capy makes (`capy_…`, a plain identifier) and the prefix plain
/// text: both reach ACL rules and `SCAN MATCH` patterns, where `*?[]\` are wildcards.
fn tenant<'a>(
    input: &'a StepInput,
    what: &str,
) -> Result<(Tenant<'a>, &'a StepCluster), StepError> {
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    let user = project.role_name.as_str();
    if !is_valid_identifier(user) || !user.starts_with("capy_") {
        return Err(StepError::permanent(format!(
            "invalid Redis user name {user:?}"
        )));
    }
    let prefix = redis_prefix(project.id);
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b':' || b == b'-';
    if !prefix.bytes().all(plain) || !prefix.ends_with(':') {
        return Err(StepError::permanent(format!(
            "invalid key prefix {prefix:?}"
        )));
    }
    Ok((
        Tenant {
            project,
            user,
            prefix,
        },
        cluster,
    ))
}

/// The cluster's admin session.
async fn admin(cluster: &StepCluster) -> Result<AdminConnection, StepError> {
    connect_admin(&cluster.admin_url)
        .await
        .map_err(|f| from_failure(&format!("connecting to cluster '{}'", cluster.name), f))
}

fn from_failure(context: &str, failure: RedisFailure) -> StepError {
    StepError {
        transient: failure.transient,
        message: format!("{context}: {}", failure.message),
    }
}

/// A failed command: transient for the network, a loading or busy server.
fn failed(admin: &AdminConnection, context: &str, error: &RedisError) -> StepError {
    from_failure(context, classify(error, &admin.target()))
}

/// Ends every session of `user`: a disabled user's open sessions would go on working.
/// Returns how many were ended; a user that does not exist has none.
async fn end_sessions(admin: &mut AdminConnection, user: &str) -> Result<u64, StepError> {
    let ended: Result<u64, RedisError> = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("USER")
        .arg(user)
        .query_async(&mut admin.connection)
        .await;
    match ended {
        Ok(count) => Ok(count),
        Err(e) if e.to_string().contains("No such user") => Ok(0),
        Err(e) => Err(failed(admin, "ending the user's sessions", &e)),
    }
}

/// Whether ACL user `user` exists.
async fn user_exists(admin: &mut AdminConnection, user: &str) -> Result<bool, StepError> {
    let found: Result<Option<redis::Value>, RedisError> = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(user)
        .query_async(&mut admin.connection)
        .await;
    match found {
        Ok(value) => Ok(!matches!(value, None | Some(redis::Value::Nil))),
        Err(e) => Err(failed(admin, "reading the ACL user", &e)),
    }
}

/// Logs in as the project's user once (`AUTH`, `PING`): its password works.
async fn log_in_as(admin: &AdminConnection, tenant: &Tenant<'_>) -> Result<(), StepError> {
    let context = "logging in as the project's user";
    let mut connection: MultiplexedConnection = capy_shared::engines::redis::connect_as(
        &admin.address,
        tenant.user,
        &tenant.project.password,
    )
    .await
    .map_err(|f| from_failure(context, f))?;
    let _: String = redis::cmd("PING")
        .query_async(&mut connection)
        .await
        .map_err(|e| failed(admin, context, &e))?;
    Ok(())
}
