//! `project.backup_verify`: restores a backup into a throwaway database, as the
//! project's own login, and compares every table's row count with the manifest. A
//! mismatch, or an archive pg_restore cannot restore, fails permanently with the
//! reason as the last line of stderr. The throwaway database is dropped whatever
//! happened; a retry drops a leftover one first.

use capy_shared::ident::{is_valid_identifier, quote_ident};
use capy_shared::model::job_type;
use capy_shared::step::{print_result, StepCluster, StepInput, StepProject};
use capy_shared::store::BackupStore;
use serde_json::json;
use tokio_postgres::Client;

use super::archive::{self, open_store, read_manifest, BackupArgs, Manifest, TableRows};
use super::{
    connect, connect_database, execute, require_cluster, require_project, validate_names, StepError,
};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let what = job_type::PROJECT_BACKUP_VERIFY;
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_names(project)?;
    let args = BackupArgs::parse(&input.job.args)?;
    let store = open_store(input)?;
    let manifest = read_manifest(&store, &args).await?;
    let scratch = scratch_name(&args)?;
    let admin = connect(cluster).await?;
    create_scratch(&admin, &scratch, &project.role_name).await?;
    let scratch_project = StepProject {
        database_name: scratch.clone(),
        ..project.clone()
    };
    let outcome = verify(&admin, cluster, &scratch_project, &store, &args, &manifest).await;
    let dropped = drop_scratch(&admin, &scratch).await;
    let (tables, rows) = outcome?;
    dropped?;
    println!(
        "backup {}: verified, {tables} tables and {rows} rows restored as in the manifest",
        args.backup_id
    );
    print_result(&json!({"verified": true, "tables": tables, "rows": rows}));
    Ok(())
}

/// `capy_verify_<first 16 hex digits of the backup's id>`.
fn scratch_name(args: &BackupArgs) -> Result<String, StepError> {
    let hex = args.backup_id.simple().to_string();
    let name = format!("capy_verify_{}", &hex[..16]);
    if is_valid_identifier(&name) {
        Ok(name)
    } else {
        Err(StepError::permanent(format!(
            "invalid database name {name:?}"
        )))
    }
}

/// A fresh database owned by the project's login (so it restores as itself, and its
/// trusted extensions install as in its own database), closed to everyone else.
async fn create_scratch(admin: &Client, scratch: &str, role: &str) -> Result<(), StepError> {
    let database = quote_ident(scratch);
    execute(
        admin,
        &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
        "dropping a leftover verification database",
    )
    .await?;
    execute(
        admin,
        &format!(
            "CREATE DATABASE {database} OWNER {} TEMPLATE template0",
            quote_ident(role)
        ),
        "creating the verification database",
    )
    .await?;
    execute(
        admin,
        &format!("REVOKE ALL ON DATABASE {database} FROM PUBLIC"),
        "closing the verification database",
    )
    .await?;
    println!("database {scratch}: created for the verification, owned by {role}");
    Ok(())
}

async fn drop_scratch(admin: &Client, scratch: &str) -> Result<(), StepError> {
    execute(
        admin,
        &format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(scratch)
        ),
        "dropping the verification database",
    )
    .await?;
    println!("database {scratch}: dropped");
    Ok(())
}

/// Restores into the scratch database (`project.database_name`) and compares the
/// counts; answers the tables and rows checked.
async fn verify(
    admin: &Client,
    cluster: &StepCluster,
    project: &StepProject,
    store: &BackupStore,
    args: &BackupArgs,
    manifest: &Manifest,
) -> Result<(usize, i64), StepError> {
    let mut inside =
        connect_database(cluster, &project.database_name, "verification database").await?;
    archive::ensure_extensions(admin, &mut inside, cluster, project, &manifest.extensions).await?;
    archive::restore_as_tenant(&inside, cluster, project, store, args, false).await?;
    let restored = archive::count_rows(&inside).await?;
    compare(&manifest.tables, &restored)?;
    Ok((manifest.tables.len(), manifest.total_rows()))
}

/// Every table of the manifest restored with its row count, and no other table.
fn compare(expected: &[TableRows], restored: &[TableRows]) -> Result<(), StepError> {
    for table in expected {
        let found = restored
            .iter()
            .find(|r| r.schema == table.schema && r.name == table.name);
        let reason = match found {
            None => format!("{} rows in the backup, the table is missing", table.rows),
            Some(found) if found.rows != table.rows => {
                format!("{} rows in the backup, {} restored", table.rows, found.rows)
            }
            Some(_) => continue,
        };
        return Err(StepError::permanent(format!(
            "table {}.{}: {reason}",
            table.schema, table.name
        )));
    }
    if let Some(extra) = restored.iter().find(|r| {
        !expected
            .iter()
            .any(|t| t.schema == r.schema && t.name == r.name)
    }) {
        return Err(StepError::permanent(format!(
            "table {}.{}: restored, but not in the backup's manifest",
            extra.schema, extra.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, rows: i64) -> TableRows {
        TableRows {
            schema: "public".into(),
            name: name.into(),
            rows,
        }
    }

    #[test]
    fn a_mismatch_names_the_table() {
        let expected = [table("orders", 100)];
        assert!(compare(&expected, &[table("orders", 100)]).is_ok());
        let error = compare(&expected, &[table("orders", 99)]).unwrap_err();
        assert_eq!(
            error.message,
            "table public.orders: 100 rows in the backup, 99 restored"
        );
        assert!(!error.transient);
        assert!(compare(&expected, &[]).is_err());
        assert!(compare(&expected, &[table("orders", 100), table("x", 0)]).is_err());
    }
}
