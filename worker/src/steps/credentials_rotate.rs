//! `project.rotate_credentials`: makes the project's pending login (a new role: a
//! PostgreSQL role has one password) with the tenant's limits and attributes, a member
//! of the current login (so it uses, and may change, everything the current login
//! owns) with the same grants on the database, and proves it connects. The job's
//! completion makes it the project's login; the old one works until its grace ends.
//!
//! A project keeps at most two logins: a previous login still in its grace is retired
//! first. Everything is read before it is made, so a re-run changes nothing.

use capy_shared::ident::{is_valid_identifier, quote_ident};
use capy_shared::model::job_type;
use capy_shared::step::{StepInput, StepProject};
use tokio_postgres::Client;

use super::credentials_retire::retire_login;
use super::tenant_database::converge_login;
use super::{
    connect, connect_as, execute, require_cluster, require_project, validate_project, StepError,
};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_ROTATE_CREDENTIALS)?;
    let cluster = require_cluster(input, job_type::PROJECT_ROTATE_CREDENTIALS)?;
    validate_project(project)?;
    let login = project.pending_login.as_ref().ok_or_else(|| {
        StepError::permanent("the project has no pending login: nothing to rotate to")
    })?;
    if !is_valid_identifier(&login.role_name) {
        return Err(StepError::permanent(format!(
            "invalid identifier {:?}",
            login.role_name
        )));
    }
    let client = connect(cluster).await?;
    if let Some(previous) = &project.previous_role_name {
        println!("login {previous}: still in its grace; retired first");
        retire_login(&client, cluster, project, previous).await?;
    }
    converge_login(&client, project, &login.role_name, Some(&login.password)).await?;
    grant_current_login(&client, project, &login.role_name).await?;
    let as_new = StepProject {
        role_name: login.role_name.clone(),
        password: login.password.clone(),
        ..project.clone()
    };
    let new_client = connect_as(cluster, &as_new).await?;
    execute(&new_client, "select 1", "a first query as the new login").await?;
    println!("login {}: connects", login.role_name);
    Ok(())
}

/// The new login gets what the current one has: membership (its objects, schema
/// `public`) and the same grants on the database.
async fn grant_current_login(
    client: &Client,
    project: &StepProject,
    new_role: &str,
) -> Result<(), StepError> {
    let (current, new) = (quote_ident(&project.role_name), quote_ident(new_role));
    execute(
        client,
        &format!(
            "GRANT {current} TO {new};
             GRANT CONNECT, TEMPORARY, CREATE ON DATABASE {database} TO {new};",
            database = quote_ident(&project.database_name)
        ),
        "granting the current login's rights to the new one",
    )
    .await?;
    println!(
        "login {new_role}: member of {}, CONNECT, TEMPORARY, CREATE on database {}",
        project.role_name, project.database_name
    );
    Ok(())
}
