//! `project.storage_check`: holds an unclaimed instant database to its storage limit.
//! PostgreSQL has no per-database quota, so the step measures the database and, past
//! the limit, refuses it new connections and ends the open ones (a session could lift
//! a read-only setting itself; it cannot lift this). Back under the limit, or claimed
//! (no limit), connections are allowed again. Running it twice changes nothing.

use capy_shared::ident::quote_ident;
use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::tenant_database::storage_allows;
use super::{connect, execute, require_cluster, require_project, validate_names, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_STORAGE_CHECK)?;
    let cluster = require_cluster(input, job_type::PROJECT_STORAGE_CHECK)?;
    validate_names(project)?;
    let client = connect(cluster).await?;
    let row = client
        .query_opt(
            "select pg_database_size(datname), datallowconn from pg_database where datname = $1",
            &[&project.database_name],
        )
        .await
        .map_err(|e| StepError::from_db("measuring the database", &e))?;
    let Some(row) = row else {
        println!("database {}: gone; nothing to check", project.database_name);
        return Ok(());
    };
    let (size, allowed): (i64, bool) = (row.get(0), row.get(1));
    let database = quote_ident(&project.database_name);
    let over = !storage_allows(size, project.storage_limit_bytes);
    let limit = project
        .storage_limit_bytes
        .map_or_else(|| "none".to_string(), |l| l.to_string());
    println!(
        "database {}: {size} bytes, limit {limit}",
        project.database_name
    );
    if over {
        if allowed {
            execute(
                &client,
                &format!("ALTER DATABASE {database} ALLOW_CONNECTIONS false"),
                "refusing new connections",
            )
            .await?;
        }
        client
            .execute(
                "select pg_terminate_backend(pid) from pg_stat_activity
                 where datname = $1 and pid <> pg_backend_pid()",
                &[&project.database_name],
            )
            .await
            .map_err(|e| StepError::from_db("ending the database's sessions", &e))?;
        println!(
            "database {}: over its storage limit; connections refused",
            project.database_name
        );
    } else if !allowed {
        execute(
            &client,
            &format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"),
            "allowing connections again",
        )
        .await?;
        println!(
            "database {}: within its limit again; connections allowed",
            project.database_name
        );
    }
    Ok(())
}
