//! `project.backup`: a `pg_dump -Fc` of the project's database streamed into the
//! backup store, with a manifest beside it (tables and their row counts, extensions,
//! server version). The rows are counted in the very snapshot pg_dump dumps (the
//! step's transaction exports it), so the counts describe the archive exactly and a
//! verification can compare them. A retry writes the same keys again.

use capy_shared::model::job_type;
use capy_shared::step::{print_result, StepCluster, StepInput, StepProject};
use capy_shared::store::BackupStore;
use object_store::buffered::BufWriter;
use object_store::PutPayload;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_postgres::IsolationLevel;

use super::archive::{self, open_store, store_error, BackupArgs, Manifest};
use super::pg_tools::{self, Login, PgEnv, Tool};
use super::{connect_database, require_cluster, require_project, validate_names, StepError};

/// Multipart parts of this size: memory use stays bounded whatever the database's size.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// How long the backup waits for a table's lock (the counts', then pg_dump's).
const LOCK_WAIT: &str = "5min";

/// What was uploaded.
struct Upload {
    size: u64,
    sha256: String,
}

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let what = job_type::PROJECT_BACKUP;
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_names(project)?;
    let args = BackupArgs::parse(&input.job.args)?;
    if args.source_project != project.id {
        return Err(StepError::permanent(
            "backup_key names another project's archive",
        ));
    }
    let store = open_store(input)?;
    let mut client =
        connect_database(cluster, &project.database_name, "project's database").await?;
    let server_version_num = pg_tools::server_version_num(&client).await?;
    let pg_dump = pg_tools::locate_pg_dump(&client, server_version_num).await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| StepError::from_db("starting the snapshot", &e))?;
    // A lock the tenant holds does not stall the backup forever: it fails, and says so.
    // The database's own timeouts (the tenant's settings, inherited by this session)
    // must not end the transaction that keeps pg_dump's snapshot alive.
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{LOCK_WAIT}'; SET LOCAL statement_timeout = 0; \
         SET LOCAL idle_in_transaction_session_timeout = 0"
    ))
    .await
    .map_err(|e| StepError::from_db("setting the snapshot's timeouts", &e))?;
    let snapshot: String = tx
        .query_one("select pg_export_snapshot()", &[])
        .await
        .map_err(|e| StepError::from_db("exporting the snapshot", &e))?
        .get(0);
    let manifest = Manifest {
        tables: archive::count_rows(&tx).await?,
        extensions: archive::read_extensions(&tx).await?,
        server_version_num,
    };
    // The transaction stays open while pg_dump runs: it keeps the snapshot alive.
    let upload = dump(cluster, project, &pg_dump, &snapshot, &store, &args).await?;
    // Read only: nothing to commit.
    let _ = tx.rollback().await;
    put_manifest(&store, &args, &manifest).await?;
    println!(
        "backup {}: {} bytes, {} tables, {} rows",
        args.backup_id,
        upload.size,
        manifest.tables.len(),
        manifest.total_rows()
    );
    print_result(&json!({
        "size_bytes": upload.size,
        "sha256": upload.sha256,
        "tables": manifest.tables.len(),
        "rows": manifest.total_rows(),
        "extensions": manifest.extensions,
        "server_version_num": manifest.server_version_num,
    }));
    Ok(())
}

/// Runs pg_dump in `snapshot` and streams its output to the archive's key. The
/// upload completes only after pg_dump exited successfully; otherwise it is aborted
/// and no object appears.
async fn dump(
    cluster: &StepCluster,
    project: &StepProject,
    pg_dump: &std::path::Path,
    snapshot: &str,
    store: &BackupStore,
    args: &BackupArgs,
) -> Result<Upload, StepError> {
    let env = PgEnv::new(cluster, &project.database_name, Login::Admin)?;
    let mut command = env.command(pg_dump);
    command
        .args([
            "--format=custom",
            "--exclude-schema=capy_pooler",
            "--no-password",
        ])
        .arg(format!("--snapshot={snapshot}"))
        .arg(format!("--lock-wait-timeout={LOCK_WAIT}"))
        .stdout(std::process::Stdio::piped());
    let mut child = pg_tools::spawn(&mut command, Tool::PgDump)?;
    let mut writer = BufWriter::with_capacity(
        store.object_store().clone(),
        store.path(&args.key),
        PART_SIZE,
    );
    let copied = match child.stdout.take() {
        Some(stdout) => copy(stdout, &mut writer).await,
        None => Err(StepError::permanent("pg_dump's stdout is missing")),
    };
    if copied.is_err() {
        let _ = child.start_kill();
    }
    let exited = pg_tools::wait(&mut child, Tool::PgDump, true).await;
    let completed = match (copied, exited) {
        (Ok(upload), Ok(())) => writer
            .shutdown()
            .await
            .map(|()| upload)
            .map_err(|e| io_error("completing the archive's upload", e)),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    if completed.is_err() {
        let _ = writer.abort().await;
    }
    completed
}

/// Copies pg_dump's output into the store, hashing and counting as it passes.
async fn copy(
    mut stdout: tokio::process::ChildStdout,
    writer: &mut BufWriter,
) -> Result<Upload, StepError> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = stdout
            .read(&mut buffer)
            .await
            .map_err(|e| io_error("reading pg_dump's output", e))?;
        if read == 0 {
            break;
        }
        let chunk = &buffer[..read];
        hasher.update(chunk);
        size += read as u64;
        writer
            .write_all(chunk)
            .await
            .map_err(|e| io_error("uploading the archive", e))?;
    }
    Ok(Upload {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// An I/O error of the upload or the pipe: worth a retry.
fn io_error(context: &str, error: std::io::Error) -> StepError {
    StepError {
        transient: true,
        message: format!("{context}: {error}"),
    }
}

async fn put_manifest(
    store: &BackupStore,
    args: &BackupArgs,
    manifest: &Manifest,
) -> Result<(), StepError> {
    let body = serde_json::to_vec(manifest)
        .map_err(|e| StepError::permanent(format!("encoding the manifest: {e}")))?;
    store
        .object_store()
        .put(&store.path(&args.manifest_key()), PutPayload::from(body))
        .await
        .map_err(|e| store_error("writing the manifest", e))?;
    Ok(())
}
