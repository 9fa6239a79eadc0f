//! `project.delete`: stops new connections to the project's database, drops it with
//! FORCE (which ends the open ones), then drops its logins (its own, the previous one a
//! rotation left in its grace, and a pending one a failed rotation made) and the NOLOGIN
//! role that owned the database (a project made by an older capy has none). Whatever is
//! already gone is skipped, so a re-run or a run after a partial one succeeds.

use capy_shared::ident::{is_valid_identifier, quote_ident};
use capy_shared::model::job_type;
use capy_shared::step::{StepCluster, StepInput, StepProject};
use tokio_postgres::Client;

use super::credentials_retire::{drop_owned_elsewhere, end_sessions};
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
    let client = connect(cluster).await?;
    remove(&client, cluster, project).await?;
    println!("project {} is deleted", project.id);
    Ok(())
}

/// Removes `project`'s database and roles, as described above; `client` is the
/// cluster admin's session. A preview's delete removes a preview's with it. Privileges
/// other tenants granted the roles (to pin them) are revoked first.
pub async fn remove(
    client: &Client,
    cluster: &StepCluster,
    project: &StepProject,
) -> Result<(), StepError> {
    let logins = existing_logins(client, project).await?;
    for login in &logins {
        // No new session as the login, in any database.
        execute(
            client,
            &format!("ALTER ROLE {} NOLOGIN", quote_ident(login)),
            "disabling the role's logins",
        )
        .await?;
        println!("role {login}: logins disabled");
    }
    drop_database(client, project, &logins).await?;
    for login in project_logins(project)? {
        drop_owned_elsewhere(client, cluster, &login, &project.database_name).await?;
        drop_login(client, &login, logins.contains(&login)).await?;
    }
    let owner = owner_role_name(&project.database_name)?;
    drop_owned_elsewhere(client, cluster, &owner, &project.database_name).await?;
    drop_owner_role(client, &owner).await
}

/// The project's logins: its own, the previous one and the pending one, validated.
pub(super) fn project_logins(project: &StepProject) -> Result<Vec<String>, StepError> {
    let mut logins = vec![project.role_name.clone()];
    logins.extend(project.previous_role_name.clone());
    logins.extend(project.pending_login.as_ref().map(|l| l.role_name.clone()));
    if let Some(bad) = logins.iter().find(|name| !is_valid_identifier(name)) {
        return Err(StepError::permanent(format!("invalid identifier {bad:?}")));
    }
    Ok(logins)
}

pub(super) async fn existing_logins(
    client: &Client,
    project: &StepProject,
) -> Result<Vec<String>, StepError> {
    let mut existing = Vec::new();
    for login in project_logins(project)? {
        if exists(client, ROLE_EXISTS, &login).await? {
            existing.push(login);
        }
    }
    Ok(existing)
}

async fn drop_database(
    client: &Client,
    project: &StepProject,
    logins: &[String],
) -> Result<(), StepError> {
    if !exists(client, DATABASE_EXISTS, &project.database_name).await? {
        println!("database {}: already gone", project.database_name);
        return Ok(());
    }
    let database = quote_ident(&project.database_name);
    let mut stop = format!(
        "ALTER DATABASE {database} ALLOW_CONNECTIONS false;
         REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC;"
    );
    for login in logins {
        stop.push_str(&format!(
            "REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM {};",
            quote_ident(login)
        ));
    }
    execute(client, &stop, "stopping new connections to the database").await?;
    println!(
        "database {}: new connections stopped",
        project.database_name
    );
    // DROP DATABASE cannot run in a transaction block, so it runs alone. FORCE
    // terminates the sessions still connected to it.
    execute(
        client,
        &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
        "dropping the database",
    )
    .await?;
    println!("database {}: dropped", project.database_name);
    Ok(())
}

/// Ends the login's sessions in other databases, then drops it.
async fn drop_login(client: &Client, login: &str, existed: bool) -> Result<(), StepError> {
    if existed {
        end_sessions(client, login).await?;
    }
    execute(
        client,
        &format!("DROP ROLE IF EXISTS {}", quote_ident(login)),
        "dropping the role",
    )
    .await?;
    if existed {
        println!("role {login}: dropped");
    } else {
        println!("role {login}: already gone");
    }
    Ok(())
}

/// The database's owner role owns nothing once the database is gone.
async fn drop_owner_role(client: &Client, owner: &str) -> Result<(), StepError> {
    if exists(client, ROLE_EXISTS, owner).await? {
        execute(
            client,
            &format!("DROP ROLE IF EXISTS {}", quote_ident(owner)),
            "dropping the owner role",
        )
        .await?;
        println!("owner role {owner}: dropped");
    } else {
        println!("owner role {owner}: already gone");
    }
    Ok(())
}
