//! `project.backup_verify`: restores a backup into a throwaway database, as the
//! project's own login, and compares every table's row count with the manifest. A
//! mismatch, or an archive pg_restore reads but cannot restore, fails permanently
//! with the reason as the last line of stderr; anything else (a connection, the
//! store) is retried. The throwaway database is dropped whatever happened; a retry
//! drops a leftover one first.

use capy_shared::ident::{is_valid_identifier, quote_ident};
use capy_shared::model::job_type;
use capy_shared::step::{print_result, StepCluster, StepInput, StepProject};
use capy_shared::store::BackupStore;
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

use super::archive::{
    self, fetch_manifest, open_store, parse_manifest, BackupArgs, Manifest, TableRows,
};
use super::{
    connect, connect_database, execute, require_cluster, require_project, validate_names, StepError,
};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let what = job_type::PROJECT_BACKUP_VERIFY;
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_names(project)?;
    let args = BackupArgs::parse(&input.job.args)?;
    if args.source_project != project.id {
        return Err(StepError::permanent(
            "backup_key names another project's archive",
        ));
    }
    let scratch = scratch_name(args.backup_id)?;
    let store = open_store(input).map_err(retry)?;
    let manifest = parse_manifest(&fetch_manifest(&store, &args).await.map_err(retry)?)?;
    let admin = connect(cluster).await.map_err(retry)?;
    let scratch_project = StepProject {
        database_name: scratch.clone(),
        ..project.clone()
    };
    let outcome = match create_scratch(&admin, &scratch, &project.role_name).await {
        Ok(()) => verify(&admin, cluster, &scratch_project, &store, &args, &manifest).await,
        Err(e) => Err(retry(e)),
    };
    // On every path: a creation that failed half way may have left the database.
    let dropped = drop_scratch(&admin, &scratch).await;
    let (tables, rows) = outcome?;
    dropped.map_err(retry)?;
    println!(
        "backup {}: verified, {tables} tables and {rows} rows restored as in the manifest",
        args.backup_id
    );
    print_result(&json!({"verified": true, "tables": tables, "rows": rows}));
    Ok(())
}

/// Only a real mismatch fails a verification for good (the backup is then known
/// bad); a connection, the store, a tool that would not start or a lock that was not
/// granted says nothing about the backup, and is retried.
fn retry(error: StepError) -> StepError {
    StepError {
        transient: true,
        ..error
    }
}

/// `capy_verify_<the backup's id in hex>`: the whole id, since two UUIDv7s of one
/// millisecond share their first digits, and verifications sharing a name would
/// drop each other's database.
fn scratch_name(backup_id: Uuid) -> Result<String, StepError> {
    let name = format!("capy_verify_{}", backup_id.simple());
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
/// counts; answers the tables and rows checked. Only a mismatch, or pg_restore
/// failing on an archive it could read, is permanent.
async fn verify(
    admin: &Client,
    cluster: &StepCluster,
    project: &StepProject,
    store: &BackupStore,
    args: &BackupArgs,
    manifest: &Manifest,
) -> Result<(usize, i64), StepError> {
    let mut inside = connect_database(cluster, &project.database_name, "verification database")
        .await
        .map_err(retry)?;
    // The counts wait at most a minute for a lock, and are never cut short.
    archive::lift_tenant_timeouts(&inside)
        .await
        .map_err(retry)?;
    let archive = archive::read_toc(admin, cluster, project, store, args)
        .await
        .map_err(retry)?;
    archive::ensure_extensions(admin, &mut inside, cluster, project, &manifest.extensions)
        .await
        .map_err(retry)?;
    archive
        .restore_as_tenant(&inside, cluster, project, store, args, false)
        .await?;
    shut_out_tenant(admin, &project.database_name, &project.role_name)
        .await
        .map_err(retry)?;
    let restored = archive::count_rows(&inside).await.map_err(retry)?;
    compare(&manifest.tables, &restored)?;
    Ok((manifest.tables.len(), manifest.total_rows()))
}

/// The tenant owns the scratch database (it restores as itself), so it could connect
/// and lock a restored table under the counts: once restored, its CONNECT is revoked
/// and its sessions there ended. (As the owner it could grant itself CONNECT again
/// from elsewhere: the counts' lock timeout bounds what that gains it.)
async fn shut_out_tenant(admin: &Client, scratch: &str, role: &str) -> Result<(), StepError> {
    execute(
        admin,
        &format!(
            "REVOKE CONNECT ON DATABASE {} FROM {}",
            quote_ident(scratch),
            quote_ident(role)
        ),
        "closing the verification database to the project's login",
    )
    .await?;
    admin
        .execute(
            "select pg_terminate_backend(pid) from pg_stat_activity
             where datname = $1 and usename = $2 and pid <> pg_backend_pid()",
            &[&scratch, &role],
        )
        .await
        .map_err(|e| StepError::from_db("ending the project's sessions in it", &e))?;
    Ok(())
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
    fn scratch_names_hold_the_whole_id() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let name = scratch_name(a).expect("a valid name");
        assert_eq!(name, format!("capy_verify_{}", a.simple()));
        assert_ne!(name, scratch_name(b).expect("a valid name"));
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
