//! `project.preview_create` and `project.preview_reset`: the preview's database made
//! (again) from its parent's. A retry or a reset starts over: the preview's database
//! is dropped, converge makes it anew with the preview's own login (CONNECT for that
//! login alone, so neither login reaches the other's database), the parent's
//! extensions are installed, and `pg_dump` of the parent streams straight into
//! `pg_restore` run as the preview's login.
//!
//! Why a dump and not `CREATE DATABASE … TEMPLATE`: that refuses while anyone is
//! connected to the parent. pg_dump reads one snapshot and takes ACCESS SHARE locks
//! only, so the parent's sessions and open transactions go on untouched (their
//! uncommitted rows are not in the copy). Why pg_restore as the preview's login: what
//! the parent's tenant put in its database (a function in a CHECK or an index) runs
//! while rows are restored, and must run with the tenant's rights alone.

use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::time::Instant;

use capy_shared::ident::quote_ident;
use capy_shared::model::PreviewMode;
use capy_shared::step::{print_result, StepCluster, StepInput, StepProject};
use serde_json::json;
use tokio_postgres::{Client, IsolationLevel, Transaction};

use super::archive;
use super::extensions::LOCKED_SCHEMA;
use super::pg_tools::{self, Login, PgEnv, Tool};
use super::tenant_database::{converge, Provision};
use super::{
    connect, connect_as, connect_database, execute, exists, require_cluster, require_preview,
    require_project, validate_names, validate_project, StepError, DATABASE_EXISTS,
};

/// How long pg_dump waits for a lock on one of the parent's tables (a migration the
/// tenant holds open) before the attempt fails and is retried later: a preview is
/// asked for interactively, so it is not kept waiting for long.
const LOCK_WAIT: &str = "1min";

/// The first PostgreSQL with pg_dump's `--extension`.
const MIN_SERVER_VERSION: i32 = 140_000;

/// What the parent's snapshot says the copy needs.
struct Source {
    extensions: Vec<archive::Extension>,
    /// Whether the parent has capy's locked extension schema (the admin's own).
    locked_schema: bool,
}

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let what = input.job.job_type.as_str();
    let parent = require_project(input, what)?;
    let preview = require_preview(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_names(parent)?;
    validate_project(preview)?;
    let mode = parse_mode(&input.job.args)?;
    let admin = connect(cluster).await?;
    let tools = Tools::locate(&admin).await?;
    drop_database(&admin, preview).await?;
    converge(&admin, cluster, preview, Provision::Create).await?;
    let copied = make_copy(&admin, cluster, parent, preview, &tools, mode).await?;
    check_login(cluster, preview).await?;
    let size_bytes = database_size(&admin, preview).await?;
    println!(
        "preview {}: made from database {} ({} mode) in {:.2} s ({} tables, {size_bytes} bytes)",
        preview.id,
        parent.database_name,
        mode.as_str(),
        copied.seconds,
        copied.tables
    );
    print_result(&json!({
        "mode": mode,
        "tables": copied.tables,
        "size_bytes": size_bytes,
        "copy_seconds": copied.seconds,
    }));
    Ok(())
}

/// What the copy made.
struct Copied {
    /// How long pg_dump | pg_restore took.
    seconds: f64,
    tables: usize,
}

/// Installs the parent's extensions in the preview's database (converge made it),
/// then copies the parent into it, both as of one snapshot of the parent.
async fn make_copy(
    admin: &Client,
    cluster: &StepCluster,
    parent: &StepProject,
    preview: &StepProject,
    tools: &Tools,
    mode: PreviewMode,
) -> Result<Copied, StepError> {
    let mut parent_session =
        connect_database(cluster, &parent.database_name, "parent's database").await?;
    let snapshot = parent_snapshot(&mut parent_session).await?;
    let source = read_source(&snapshot.tx).await?;
    let mut inside =
        connect_database(cluster, &preview.database_name, "preview's database").await?;
    archive::lift_tenant_timeouts(&inside).await?;
    archive::ensure_extensions(admin, &mut inside, cluster, preview, &source.extensions).await?;
    let started = Instant::now();
    copy(cluster, parent, preview, tools, &snapshot.id, mode, &source).await?;
    let seconds = started.elapsed().as_secs_f64();
    // Read only: nothing to commit; the snapshot is no longer needed.
    let _ = snapshot.tx.rollback().await;
    Ok(Copied {
        seconds,
        tables: archive::count_tables(&inside).await?,
    })
}

fn parse_mode(args: &serde_json::Value) -> Result<PreviewMode, StepError> {
    args.get("mode")
        .and_then(|mode| serde_json::from_value(mode.clone()).ok())
        .ok_or_else(|| {
            StepError::permanent(format!(
                "args.mode must be \"clone\" or \"empty\", not {:?}",
                args.get("mode")
            ))
        })
}

/// Drops the preview's database, if any: a reset or a retry starts from nothing.
/// FORCE ends the sessions in it (the preview's own).
async fn drop_database(admin: &Client, preview: &StepProject) -> Result<(), StepError> {
    let name = &preview.database_name;
    if !exists(admin, DATABASE_EXISTS, name).await? {
        println!("database {name}: none yet");
        return Ok(());
    }
    execute(
        admin,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name)),
        "dropping the preview's database",
    )
    .await?;
    println!("database {name}: dropped, to be made anew");
    Ok(())
}

/// A read-only transaction in the parent's database whose snapshot pg_dump shares.
struct Snapshot<'a> {
    tx: Transaction<'a>,
    id: String,
}

async fn parent_snapshot(client: &mut Client) -> Result<Snapshot<'_>, StepError> {
    let what = "taking the parent's snapshot";
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| StepError::from_db(what, &e))?;
    // The parent's own timeouts (its tenant's settings, inherited by this session)
    // must not end the transaction that keeps pg_dump's snapshot alive.
    tx.batch_execute(
        "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0",
    )
    .await
    .map_err(|e| StepError::from_db(what, &e))?;
    let id: String = tx
        .query_one("select pg_export_snapshot()", &[])
        .await
        .map_err(|e| StepError::from_db(what, &e))?
        .get(0);
    Ok(Snapshot { tx, id })
}

/// The parent's extensions and whether its locked schema exists, as of the snapshot.
async fn read_source(tx: &Transaction<'_>) -> Result<Source, StepError> {
    let extensions = archive::read_extensions(tx).await?;
    let locked_schema = tx
        .query_opt(
            "select 1 from pg_namespace n join pg_roles r on r.oid = n.nspowner
             where n.nspname = $1 and r.rolname = session_user",
            &[&LOCKED_SCHEMA],
        )
        .await
        .map_err(|e| StepError::from_db("reading the parent's schemas", &e))?
        .is_some();
    Ok(Source {
        extensions,
        locked_schema,
    })
}

/// pg_dump and pg_restore for the cluster's version.
struct Tools {
    pg_dump: std::path::PathBuf,
    pg_restore: std::path::PathBuf,
}

impl Tools {
    /// The programs for the cluster `admin` is a session of; pg_dump's `--extension`
    /// (see [`dump_args`]) needs PostgreSQL 14.
    async fn locate(admin: &Client) -> Result<Self, StepError> {
        let version = pg_tools::server_version_num(admin).await?;
        if version < MIN_SERVER_VERSION {
            return Err(StepError::permanent(format!(
                "preview databases need PostgreSQL 14 or later (the cluster's server_version_num is {version})"
            )));
        }
        Ok(Self {
            pg_dump: pg_tools::locate_pg_dump(admin, version).await?,
            pg_restore: pg_tools::locate(Tool::PgRestore, version)?,
        })
    }
}

/// pg_dump's arguments. The preview has the parent's extensions already (installed by
/// capy's rules, some by the admin into the locked schema), and the restore runs as
/// the tenant, which could not run an extension's entries again: `COMMENT ON
/// EXTENSION` needs its owner, the locked schema's `CREATE SCHEMA` finds it there.
/// `--extension=plpgsql` keeps every extension's entries out (plpgsql, built in, is
/// never dumped), and the locked schema holds nothing of the tenant's (only the
/// admin creates in it), so it is left out whole. Schema `public` is dumped without
/// a `CREATE` (pg_dump never creates it), so the preview's own takes its content.
fn dump_args(snapshot: &str, mode: PreviewMode, source: &Source) -> Vec<String> {
    let mut args: Vec<String> = [
        "--format=custom",
        "--no-password",
        "--extension=plpgsql",
        "--exclude-schema=capy_pooler",
    ]
    .map(String::from)
    .into();
    args.push(format!("--snapshot={snapshot}"));
    args.push(format!("--lock-wait-timeout={LOCK_WAIT}"));
    if source.locked_schema {
        args.push(format!("--exclude-schema={LOCKED_SCHEMA}"));
    }
    if mode == PreviewMode::Empty {
        args.push("--schema-only".into());
    }
    args
}

/// Streams pg_dump of the parent (as the admin, in the snapshot) into pg_restore of
/// the preview (as the preview's login), in one transaction: a failed restore leaves
/// the preview's database as converge made it.
async fn copy(
    cluster: &StepCluster,
    parent: &StepProject,
    preview: &StepProject,
    tools: &Tools,
    snapshot: &str,
    mode: PreviewMode,
    source: &Source,
) -> Result<(), StepError> {
    // The environments hold the CA file the programs read: they outlive them.
    let dump_env = PgEnv::new(cluster, &parent.database_name, Login::Admin)?;
    let restore_env = PgEnv::new(cluster, &preview.database_name, Login::Project(preview))?;
    let mut dump = dump_env.command(&tools.pg_dump);
    dump.args(dump_args(snapshot, mode, source));
    let mut restore = restore_env.command(&tools.pg_restore);
    restore
        .args(archive::TENANT_RESTORE_ARGS)
        .arg(format!("--dbname={}", preview.database_name));
    let (dumped, restored) = run_piped(dump, restore).await?;
    copy_outcome(dumped, restored)?;
    println!(
        "database {}: the {} of {} restored as {}",
        preview.database_name,
        match mode {
            PreviewMode::Clone => "schema and data",
            PreviewMode::Empty => "schema",
        },
        parent.database_name,
        preview.role_name
    );
    Ok(())
}

/// Runs `dump` with its stdout piped straight into `restore`'s stdin (the bytes do not
/// pass through this process); answers how each ended.
async fn run_piped(
    mut dump: tokio::process::Command,
    mut restore: tokio::process::Command,
) -> Result<(ExitStatus, ExitStatus), StepError> {
    dump.stdout(std::process::Stdio::piped());
    let mut dumper = pg_tools::spawn(&mut dump, Tool::PgDump)?;
    let pipe: std::process::Stdio = match dumper.stdout.take().map(TryInto::try_into) {
        Some(Ok(pipe)) => pipe,
        _ => {
            let _ = dumper.kill().await;
            return Err(StepError::permanent("pg_dump's stdout is missing"));
        }
    };
    let mut restorer = match pg_tools::spawn(restore.stdin(pipe), Tool::PgRestore) {
        Ok(child) => child,
        Err(e) => {
            let _ = dumper.kill().await;
            return Err(e);
        }
    };
    let restored = restorer.wait().await;
    if !restored.as_ref().is_ok_and(ExitStatus::success) {
        // pg_restore gave up: pg_dump has no reader left.
        let _ = dumper.start_kill();
    }
    let dumped = dumper.wait().await;
    match (dumped, restored) {
        (Ok(dumped), Ok(restored)) => Ok((dumped, restored)),
        (Err(e), _) | (_, Err(e)) => Err(StepError {
            transient: true,
            message: format!("waiting for pg_dump or pg_restore: {e}"),
        }),
    }
}

/// Which program's failure counts. pg_dump exiting on its own with an error (a lock
/// it waited too long for, a lost connection) cuts the stream, so pg_restore fails
/// too: that is worth a retry. pg_dump stopped by a signal (killed once pg_restore
/// failed, or by the broken pipe) was not the cause: pg_restore's failure stands, and
/// what it could not restore will not restore next time either.
fn copy_outcome(dumped: ExitStatus, restored: ExitStatus) -> Result<(), StepError> {
    if dumped.code().is_some_and(|code| code != 0) {
        return Err(StepError {
            transient: true,
            message: format!("pg_dump failed ({dumped}); its messages are above"),
        });
    }
    if !restored.success() {
        return Err(StepError::permanent(format!(
            "pg_restore failed ({restored}); its messages are above"
        )));
    }
    if !dumped.success() {
        // Killed while pg_restore succeeded: never trust a copy of a cut stream.
        let signal = dumped.signal().unwrap_or_default();
        return Err(StepError {
            transient: true,
            message: format!("pg_dump was stopped by signal {signal}"),
        });
    }
    Ok(())
}

/// The preview's login gets in: the copy is usable as handed out.
async fn check_login(cluster: &StepCluster, preview: &StepProject) -> Result<(), StepError> {
    connect_as(cluster, preview)
        .await?
        .query_one("select 1", &[])
        .await
        .map_err(|e| StepError::from_db("querying the preview as its login", &e))?;
    println!(
        "database {}: {} logs in",
        preview.database_name, preview.role_name
    );
    Ok(())
}

async fn database_size(admin: &Client, preview: &StepProject) -> Result<i64, StepError> {
    admin
        .query_one(
            "select pg_database_size($1::text)",
            &[&preview.database_name],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|e| StepError::from_db("measuring the preview's database", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw wait status: an exit code, or a signal.
    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn signalled(signal: i32) -> ExitStatus {
        ExitStatus::from_raw(signal)
    }

    #[test]
    fn the_failure_that_counts_decides_the_retry() {
        assert!(copy_outcome(exited(0), exited(0)).is_ok());
        // pg_dump's own error (a lock timeout) broke the restore: retry.
        assert!(copy_outcome(exited(1), exited(1)).unwrap_err().transient);
        // pg_restore refused the content; pg_dump was killed after it.
        let refused = copy_outcome(signalled(9), exited(1)).unwrap_err();
        assert!(!refused.transient);
        assert!(refused.message.contains("pg_restore"));
        assert!(
            !copy_outcome(signalled(13), exited(1))
                .unwrap_err()
                .transient
        );
        assert!(!copy_outcome(exited(0), exited(1)).unwrap_err().transient);
        assert!(copy_outcome(signalled(9), exited(0)).unwrap_err().transient);
    }

    #[test]
    fn the_mode_comes_from_the_args() {
        assert_eq!(
            parse_mode(&json!({"mode": "clone"})).unwrap(),
            PreviewMode::Clone
        );
        assert_eq!(
            parse_mode(&json!({"mode": "empty"})).unwrap(),
            PreviewMode::Empty
        );
        assert!(parse_mode(&json!({})).is_err());
        assert!(parse_mode(&json!({"mode": "full"})).is_err());
    }
}
