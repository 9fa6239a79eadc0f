//! `project.create`: a login role with a password and a connection limit, a database
//! it owns with statement and idle-transaction timeouts, and no CONNECT for PUBLIC, so
//! no other project's role can get in.

use capy_shared::ident::{is_valid_duration, is_valid_identifier, quote_ident, quote_literal};
use capy_shared::step::{StepInput, StepProject};

use super::{connect, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = input
        .project
        .as_ref()
        .ok_or_else(|| StepError::permanent("project.create needs a project"))?;
    let cluster = input
        .cluster
        .as_ref()
        .ok_or_else(|| StepError::permanent("project.create needs a cluster"))?;
    validate(project)?;
    let role = quote_ident(&project.role_name);
    let database = quote_ident(&project.database_name);
    let client = connect(&cluster.admin_url, &format!("cluster '{}'", cluster.name)).await?;
    let exec = |sql: String, what: &'static str| {
        let client = &client;
        async move {
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| StepError::from_db(what, &e))
        }
    };

    // The server stores a SCRAM verifier; the plain password never reaches its logs.
    let verifier = postgres_protocol::password::scram_sha_256(project.password.as_bytes());
    let role_settings = format!(
        "LOGIN PASSWORD {} CONNECTION LIMIT {}",
        quote_literal(&verifier),
        project.max_connections
    );
    let role_exists = exists(
        &client,
        "select 1 from pg_roles where rolname = $1",
        &project.role_name,
    )
    .await?;
    if role_exists {
        exec(
            format!("ALTER ROLE {role} {role_settings}"),
            "altering the role",
        )
        .await?;
        println!("role {}: exists, settings applied", project.role_name);
    } else {
        exec(
            format!("CREATE ROLE {role} {role_settings}"),
            "creating the role",
        )
        .await?;
        println!("role {}: created", project.role_name);
    }

    let database_exists = exists(
        &client,
        "select 1 from pg_database where datname = $1",
        &project.database_name,
    )
    .await?;
    if database_exists {
        println!("database {}: exists", project.database_name);
    } else {
        // CREATE DATABASE cannot run in a transaction block, so it runs alone.
        exec(
            format!("CREATE DATABASE {database} OWNER {role}"),
            "creating the database",
        )
        .await?;
        println!("database {}: created", project.database_name);
    }
    exec(
        format!(
            "ALTER DATABASE {database} OWNER TO {role};
             ALTER DATABASE {database} CONNECTION LIMIT {limit};
             ALTER DATABASE {database} SET statement_timeout = {statement};
             ALTER DATABASE {database} SET idle_in_transaction_session_timeout = {idle};
             REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC;
             GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {role};",
            limit = project.max_connections,
            statement = quote_literal(&project.statement_timeout),
            idle = quote_literal(&project.idle_transaction_timeout),
        ),
        "configuring the database",
    )
    .await?;
    println!(
        "database {}: connection limit {}, statement_timeout {}, idle_in_transaction_session_timeout {}, CONNECT revoked from PUBLIC",
        project.database_name, project.max_connections, project.statement_timeout, project.idle_transaction_timeout
    );
    println!("project {} is ready", project.id);
    Ok(())
}

/// Names and settings are checked again here: the step trusts nothing it is handed.
fn validate(project: &StepProject) -> Result<(), StepError> {
    for name in [&project.role_name, &project.database_name] {
        if !is_valid_identifier(name) {
            return Err(StepError::permanent(format!("invalid identifier {name:?}")));
        }
    }
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

async fn exists(client: &tokio_postgres::Client, sql: &str, name: &str) -> Result<bool, StepError> {
    client
        .query_opt(sql, &[&name])
        .await
        .map(|row| row.is_some())
        .map_err(|e| StepError::from_db("reading the catalogs", &e))
}
