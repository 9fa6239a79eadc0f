//! `project.delete`: stops new connections to the project's database, drops it with
//! FORCE (which ends the open ones), then drops its role and the NOLOGIN role that owned
//! the database (a project made by an older capy has none). Whatever is already gone is
//! skipped, so a re-run or a run after a partial one succeeds.

use capy_shared::ident::quote_ident;
use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::tenant_database::owner_role_name;
use super::{
    connect, execute, exists, require_cluster, require_project, validate_names, StepError,
    DATABASE_EXISTS, ROLE_EXISTS,
};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_DELETE)?;
    let cluster = require_cluster(input, job_type::PROJECT_DELETE)?;
    // Only the names: a project whose settings are off can still be deleted.
    validate_names(project)?;
    let role = quote_ident(&project.role_name);
    let database = quote_ident(&project.database_name);
    let client = connect(cluster).await?;

    let role_exists = exists(&client, ROLE_EXISTS, &project.role_name).await?;
    if role_exists {
        // No new session as the role, in any database.
        execute(
            &client,
            &format!("ALTER ROLE {role} NOLOGIN"),
            "disabling the role's logins",
        )
        .await?;
        println!("role {}: logins disabled", project.role_name);
    }

    if exists(&client, DATABASE_EXISTS, &project.database_name).await? {
        let mut stop = format!(
            "ALTER DATABASE {database} ALLOW_CONNECTIONS false;
             REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC;"
        );
        if role_exists {
            stop.push_str(&format!(
                "REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM {role};"
            ));
        }
        execute(&client, &stop, "stopping new connections to the database").await?;
        println!(
            "database {}: new connections stopped",
            project.database_name
        );
        // DROP DATABASE cannot run in a transaction block, so it runs alone. FORCE
        // terminates the sessions still connected to it.
        execute(
            &client,
            &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
            "dropping the database",
        )
        .await?;
        println!("database {}: dropped", project.database_name);
    } else {
        println!("database {}: already gone", project.database_name);
    }

    if role_exists {
        // Sessions of the role in other databases end too, before the role goes.
        let ended: i64 = client
            .query_one(
                "select count(*) filter (where pg_terminate_backend(pid))
                 from pg_stat_activity where usename = $1 and pid <> pg_backend_pid()",
                &[&project.role_name],
            )
            .await
            .map_err(|e| StepError::from_db("ending the role's sessions", &e))?
            .get(0);
        if ended > 0 {
            println!("role {}: {ended} other session(s) ended", project.role_name);
        }
    }
    execute(
        &client,
        &format!("DROP ROLE IF EXISTS {role}"),
        "dropping the role",
    )
    .await?;
    if role_exists {
        println!("role {}: dropped", project.role_name);
    } else {
        println!("role {}: already gone", project.role_name);
    }
    drop_owner_role(&client, &project.role_name).await?;
    println!("project {} is deleted", project.id);
    Ok(())
}

/// The database's owner role owns nothing once the database is gone.
async fn drop_owner_role(
    client: &tokio_postgres::Client,
    role_name: &str,
) -> Result<(), StepError> {
    let owner = owner_role_name(role_name)?;
    if exists(client, ROLE_EXISTS, &owner).await? {
        execute(
            client,
            &format!("DROP ROLE IF EXISTS {}", quote_ident(&owner)),
            "dropping the owner role",
        )
        .await?;
        println!("owner role {owner}: dropped");
    } else {
        println!("owner role {owner}: already gone");
    }
    Ok(())
}
