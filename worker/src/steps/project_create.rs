//! `project.create`: a login role with a password and a connection limit, a database
//! it owns with statement and idle-transaction timeouts, and no CONNECT for PUBLIC, so
//! no other project's role can get in.

use capy_shared::ident::{quote_ident, quote_literal};
use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::{
    connect, execute, exists, require_cluster, require_project, validate_project, StepError,
    DATABASE_EXISTS, ROLE_EXISTS,
};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_CREATE)?;
    let cluster = require_cluster(input, job_type::PROJECT_CREATE)?;
    validate_project(project)?;
    let role = quote_ident(&project.role_name);
    let database = quote_ident(&project.database_name);
    let client = connect(&cluster.admin_url, &format!("cluster '{}'", cluster.name)).await?;

    // The server stores a SCRAM verifier; the plain password never reaches its logs.
    let verifier = postgres_protocol::password::scram_sha_256(project.password.as_bytes());
    // Logical replication (instant databases that ask for it) needs REPLICATION.
    let replication = if project.replication {
        "REPLICATION"
    } else {
        "NOREPLICATION"
    };
    let role_settings = format!(
        "LOGIN {replication} PASSWORD {} CONNECTION LIMIT {}",
        quote_literal(&verifier),
        project.max_connections
    );
    if exists(&client, ROLE_EXISTS, &project.role_name).await? {
        execute(
            &client,
            &format!("ALTER ROLE {role} {role_settings}"),
            "altering the role",
        )
        .await?;
        println!("role {}: exists, settings applied", project.role_name);
    } else {
        execute(
            &client,
            &format!("CREATE ROLE {role} {role_settings}"),
            "creating the role",
        )
        .await?;
        println!("role {}: created", project.role_name);
    }

    if exists(&client, DATABASE_EXISTS, &project.database_name).await? {
        println!("database {}: exists", project.database_name);
    } else {
        // CREATE DATABASE cannot run in a transaction block, so it runs alone.
        execute(
            &client,
            &format!("CREATE DATABASE {database} OWNER {role}"),
            "creating the database",
        )
        .await?;
        println!("database {}: created", project.database_name);
    }
    execute(
        &client,
        &format!(
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
    // One connection as the project's own role proves the credentials work, and
    // makes the server build the database's relation cache file now, so the client's
    // first connection does not pay for it (about 10 ms on a new database).
    match super::connect_as(&cluster.admin_url, project).await {
        Ok(client) => match client.simple_query("select 1").await {
            Ok(_) => println!("role {}: connects", project.role_name),
            Err(e) => println!("warning: the role's first query failed: {e}"),
        },
        Err(e) => println!("warning: connecting as the role failed: {}", e.message),
    }
    println!("project {} is ready", project.id);
    Ok(())
}
