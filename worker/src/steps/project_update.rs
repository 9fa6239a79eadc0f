//! `project.update`: re-applies the project's recorded settings (connection limits of
//! its role and database, the database's statement and idle-transaction timeouts) with
//! ALTER, and allows connections (a claimed instant database past its old storage
//! limit was refusing them). Running it again changes nothing.

use capy_shared::ident::{quote_ident, quote_literal};
use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::{
    connect, execute, exists, require_cluster, require_project, validate_project, StepError,
    DATABASE_EXISTS, ROLE_EXISTS,
};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_UPDATE)?;
    let cluster = require_cluster(input, job_type::PROJECT_UPDATE)?;
    validate_project(project)?;
    let role = quote_ident(&project.role_name);
    let database = quote_ident(&project.database_name);
    let client = connect(&cluster.admin_url, &format!("cluster '{}'", cluster.name)).await?;

    // Settings are applied to what project.create made; nothing is created here.
    if !exists(&client, ROLE_EXISTS, &project.role_name).await? {
        return Err(StepError::permanent(format!(
            "role {} does not exist on cluster '{}': the project is not provisioned",
            project.role_name, cluster.name
        )));
    }
    if !exists(&client, DATABASE_EXISTS, &project.database_name).await? {
        return Err(StepError::permanent(format!(
            "database {} does not exist on cluster '{}': the project is not provisioned",
            project.database_name, cluster.name
        )));
    }

    execute(
        &client,
        &format!(
            "ALTER ROLE {role} CONNECTION LIMIT {limit};
             ALTER DATABASE {database} ALLOW_CONNECTIONS true;
             ALTER DATABASE {database} CONNECTION LIMIT {limit};
             ALTER DATABASE {database} SET statement_timeout = {statement};
             ALTER DATABASE {database} SET idle_in_transaction_session_timeout = {idle};",
            limit = project.max_connections,
            statement = quote_literal(&project.statement_timeout),
            idle = quote_literal(&project.idle_transaction_timeout),
        ),
        "applying the settings",
    )
    .await?;
    println!(
        "role {}: connection limit {}",
        project.role_name, project.max_connections
    );
    println!(
        "database {}: connection limit {}, statement_timeout {}, idle_in_transaction_session_timeout {}",
        project.database_name,
        project.max_connections,
        project.statement_timeout,
        project.idle_transaction_timeout
    );
    println!("project {}: settings applied", project.id);
    Ok(())
}
