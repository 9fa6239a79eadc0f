//! `project.create` and `project.update`: converge the project's database and user.
//! The user is created locked, then one `ALTER USER` sets its password, its connection
//! limit and its lock state (locked while the project is stopped), so a re-run or an
//! update converges all three. It gets [`PRIVILEGES`] on its own database only: no
//! global privilege, no GRANT OPTION, no EVENT.

use capy_shared::engines::mysql as engine;
use capy_shared::model::job_type;
use capy_shared::step::{StepCluster, StepInput, StepProject};
use sqlx::{Connection as _, MySqlConnection};

use super::{account, connect, execute, grant_pattern, quote_ident, quote_string, StepError};

/// What the user may do in its own database: ALL PRIVILEGES but EVENT. A scheduled
/// event runs as its definer even once the account is locked (a stopped project's
/// events would go on), and event threads count against no connection limit.
const PRIVILEGES: &str = "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER, \
    CREATE TEMPORARY TABLES, LOCK TABLES, CREATE VIEW, SHOW VIEW, CREATE ROUTINE, \
    ALTER ROUTINE, EXECUTE, TRIGGER, REFERENCES";

/// MySQL's error for a user past its MAX_USER_CONNECTIONS: it did log in.
const ER_TOO_MANY_USER_CONNECTIONS: u16 = 1226;

pub async fn create(input: &StepInput) -> Result<(), StepError> {
    let (project, cluster) = super::target(input, job_type::PROJECT_CREATE)?;
    converge(project, cluster).await?;
    if project.stopped {
        println!(
            "user {}: left locked (the project is stopped)",
            project.role_name
        );
    } else {
        check_login(project, cluster).await?;
    }
    println!("project {} is ready", project.id);
    Ok(())
}

pub async fn update(input: &StepInput) -> Result<(), StepError> {
    let (project, cluster) = super::target(input, job_type::PROJECT_UPDATE)?;
    converge(project, cluster).await?;
    println!("project {} is updated", project.id);
    Ok(())
}

async fn converge(project: &StepProject, cluster: &StepCluster) -> Result<(), StepError> {
    let limit = u32::try_from(project.max_connections).map_err(|_| {
        StepError::permanent(format!(
            "max_connections must not be negative, not {}",
            project.max_connections
        ))
    })?;
    let mut connection = connect(cluster).await?;
    let database = &project.database_name;
    let user = &project.role_name;
    execute(
        &mut connection,
        &format!(
            "CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4",
            quote_ident(database)
        ),
        "creating the database",
    )
    .await?;
    println!("database {database}: present");
    converge_user(&mut connection, project, limit).await?;
    execute(
        &mut connection,
        &format!(
            "GRANT {PRIVILEGES} ON {}.* TO {}",
            grant_pattern(database),
            account(user)
        ),
        "granting the user its database",
    )
    .await?;
    println!("user {user}: privileges on {database} (no EVENT), and nothing else");
    let _ = connection.close().await;
    Ok(())
}

/// Creates the user locked if it is missing, then sets its password, limit and lock.
async fn converge_user(
    connection: &mut MySqlConnection,
    project: &StepProject,
    limit: u32,
) -> Result<(), StepError> {
    let user = account(&project.role_name);
    let password = quote_string(&project.password);
    execute(
        connection,
        &format!("CREATE USER IF NOT EXISTS {user} IDENTIFIED BY {password} ACCOUNT LOCK"),
        "creating the user",
    )
    .await?;
    let lock = if project.stopped {
        "ACCOUNT LOCK"
    } else {
        "ACCOUNT UNLOCK"
    };
    execute(
        connection,
        &format!(
            "ALTER USER {user} IDENTIFIED BY {password} WITH MAX_USER_CONNECTIONS {limit} {lock}"
        ),
        "setting the user's password, connection limit and lock",
    )
    .await?;
    println!(
        "user {}: password set, at most {limit} connections, {}",
        project.role_name,
        if project.stopped {
            "locked"
        } else {
            "unlocked"
        }
    );
    Ok(())
}

/// Logs in once as the project's user, to its database, as its clients will.
async fn check_login(project: &StepProject, cluster: &StepCluster) -> Result<(), StepError> {
    let options = engine::admin_options(&cluster.admin_url)
        .map_err(|e| StepError::permanent(e.message))?
        .username(&project.role_name)
        .password(&project.password)
        .database(&project.database_name);
    match engine::connect(&options).await {
        Ok(connection) => {
            let _ = connection.close().await;
        }
        // Its clients hold every connection it may have: it did log in.
        Err(e) if e.number == Some(ER_TOO_MANY_USER_CONNECTIONS) => {}
        Err(e) if e.kind == "authentication_failed" || e.kind == "database_not_found" => {
            return Err(StepError::permanent(format!(
                "the user {} cannot log in to its database: {}",
                project.role_name, e.message
            )));
        }
        Err(e) => {
            return Err(StepError {
                transient: true,
                message: format!(
                    "logging in as the user {}: {}",
                    project.role_name, e.message
                ),
            });
        }
    }
    println!(
        "user {}: logged in to {}",
        project.role_name, project.database_name
    );
    Ok(())
}
