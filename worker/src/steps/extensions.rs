//! `project.extension_enable` / `project.extension_disable`: `CREATE EXTENSION IF NOT
//! EXISTS` / `DROP EXTENSION IF EXISTS` inside the project's database, as the cluster's
//! admin, only for extensions the cluster offers (`pg_available_extensions`). The job's
//! args are `{"name": "<extension>", "version": "<optional>"}`.

use capy_shared::ident::{quote_ident, quote_literal};
use capy_shared::model::job_type;
use capy_shared::step::{StepCluster, StepInput, StepProject};
use serde_json::Value;

use super::{
    connect, connect_database, execute, exists, require_cluster, require_project, validate_names,
    StepError, DATABASE_EXISTS,
};

const INSTALLED_VERSION: &str = "select extversion from pg_extension where extname = $1";

pub async fn enable(input: &StepInput) -> Result<(), StepError> {
    let what = job_type::PROJECT_EXTENSION_ENABLE;
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_names(project)?;
    let (name, version) = parse_args(&input.job.args, what)?;

    // What the cluster offers, read from the admin's own database.
    let admin = connect(&cluster.admin_url, &format!("cluster '{}'", cluster.name)).await?;
    if !exists(
        &admin,
        "select 1 from pg_available_extensions where name = $1",
        &name,
    )
    .await?
    {
        return Err(StepError::permanent(format!(
            "extension {name:?} is not available on cluster '{}' (it is not in pg_available_extensions)",
            cluster.name
        )));
    }
    if let Some(version) = &version {
        let versions: Vec<String> = admin
            .query(
                "select version from pg_available_extension_versions where name = $1 order by version",
                &[&name],
            )
            .await
            .map_err(|e| StepError::from_db("reading the catalogs", &e))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !versions.contains(version) {
            return Err(StepError::permanent(format!(
                "version {version:?} of extension {name:?} is not available on cluster '{}' (available: {})",
                cluster.name,
                versions.join(", ")
            )));
        }
    }
    require_database(&admin, project, cluster).await?;
    drop(admin);

    let client = connect_project_database(project, cluster).await?;
    let before = installed_version(&client, &name).await?;
    let quoted = quote_ident(&name);
    let mut create = format!("CREATE EXTENSION IF NOT EXISTS {quoted}");
    if let Some(version) = &version {
        create.push_str(&format!(" VERSION {}", quote_literal(version)));
    }
    execute(&client, &create, "creating the extension").await?;
    match &before {
        None => println!("extension {name}: created"),
        Some(current) => println!("extension {name}: already installed at version {current}"),
    }
    if let Some(version) = &version {
        let current = installed_version(&client, &name).await?;
        if current.as_ref() != Some(version) {
            execute(
                &client,
                &format!(
                    "ALTER EXTENSION {quoted} UPDATE TO {}",
                    quote_literal(version)
                ),
                "updating the extension",
            )
            .await?;
            println!(
                "extension {name}: updated from version {} to {version}",
                current.as_deref().unwrap_or("?")
            );
        }
    }
    let installed = installed_version(&client, &name).await?.ok_or_else(|| {
        StepError::permanent(format!(
            "extension {name:?} is not in pg_extension after CREATE EXTENSION"
        ))
    })?;
    println!(
        "extension {name}: version {installed} installed in database {}",
        project.database_name
    );
    Ok(())
}

pub async fn disable(input: &StepInput) -> Result<(), StepError> {
    let what = job_type::PROJECT_EXTENSION_DISABLE;
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_names(project)?;
    let (name, _) = parse_args(&input.job.args, what)?;

    let admin = connect(&cluster.admin_url, &format!("cluster '{}'", cluster.name)).await?;
    require_database(&admin, project, cluster).await?;
    drop(admin);

    let client = connect_project_database(project, cluster).await?;
    let before = installed_version(&client, &name).await?;
    // No CASCADE: when objects depend on the extension, PostgreSQL's refusal (SQLSTATE
    // 2BP01) is the permanent failure the caller sees.
    execute(
        &client,
        &format!("DROP EXTENSION IF EXISTS {}", quote_ident(&name)),
        "dropping the extension",
    )
    .await?;
    match before {
        Some(version) => println!(
            "extension {name}: version {version} dropped from database {}",
            project.database_name
        ),
        None => println!(
            "extension {name}: not installed in database {}",
            project.database_name
        ),
    }
    Ok(())
}

/// `name` (required) and `version` (optional) from the job's args, validated.
fn parse_args(args: &Value, what: &str) -> Result<(String, Option<String>), StepError> {
    let name = match args.get("name") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => {
            return Err(StepError::permanent(format!(
                "{what}: args.name is not a string"
            )))
        }
        None => {
            return Err(StepError::permanent(format!(
                "{what} needs args.name, the extension"
            )))
        }
    };
    if !is_valid_extension_name(&name) {
        return Err(StepError::permanent(format!(
            "invalid extension name {name:?}: 1 to 63 characters of a-z, 0-9, '_' and '-'"
        )));
    }
    let version = match args.get("version") {
        None | Some(Value::Null) => None,
        Some(Value::String(version)) if is_valid_version(version) => Some(version.clone()),
        Some(other) => {
            return Err(StepError::permanent(format!(
                "invalid extension version {other}: 1 to 63 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
            )))
        }
    };
    Ok((name, version))
}

/// Extension names are wider than capy's identifiers (`uuid-ossp`), and always quoted.
fn is_valid_extension_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

fn is_valid_version(version: &str) -> bool {
    (1..=63).contains(&version.len())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn require_database(
    admin: &tokio_postgres::Client,
    project: &StepProject,
    cluster: &StepCluster,
) -> Result<(), StepError> {
    if exists(admin, DATABASE_EXISTS, &project.database_name).await? {
        Ok(())
    } else {
        Err(StepError::permanent(format!(
            "database {} does not exist on cluster '{}': the project is not provisioned",
            project.database_name, cluster.name
        )))
    }
}

async fn connect_project_database(
    project: &StepProject,
    cluster: &StepCluster,
) -> Result<tokio_postgres::Client, StepError> {
    connect_database(
        &cluster.admin_url,
        &project.database_name,
        &format!(
            "database {} of cluster '{}'",
            project.database_name, cluster.name
        ),
    )
    .await
}

async fn installed_version(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<Option<String>, StepError> {
    client
        .query_opt(INSTALLED_VERSION, &[&name])
        .await
        .map(|row| row.map(|row| row.get(0)))
        .map_err(|e| StepError::from_db("reading pg_extension", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions() {
        assert!(is_valid_extension_name("uuid-ossp"));
        assert!(is_valid_extension_name("pg_trgm"));
        assert!(!is_valid_extension_name(""));
        assert!(!is_valid_extension_name("Pgcrypto"));
        assert!(!is_valid_extension_name("x\"; drop"));
        assert!(!is_valid_extension_name(&"a".repeat(64)));
        assert!(is_valid_version("1.3"));
        assert!(is_valid_version("3.4.0-beta1"));
        assert!(!is_valid_version("1.3'"));
        assert!(!is_valid_version(""));
    }

    #[test]
    fn args() {
        let what = "project.extension_enable";
        let (name, version) = parse_args(
            &serde_json::json!({"name": "pgcrypto", "version": null}),
            what,
        )
        .unwrap();
        assert_eq!((name.as_str(), version), ("pgcrypto", None));
        let (_, version) = parse_args(
            &serde_json::json!({"name": "pgcrypto", "version": "1.3"}),
            what,
        )
        .unwrap();
        assert_eq!(version.as_deref(), Some("1.3"));
        assert!(parse_args(&serde_json::json!({}), what).is_err());
        assert!(parse_args(&serde_json::json!({"name": 3}), what).is_err());
        assert!(parse_args(&serde_json::json!({"name": "a", "version": 1}), what).is_err());
    }
}
