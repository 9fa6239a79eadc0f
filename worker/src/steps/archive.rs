//! What the backup steps share: their args, the backup store, the manifest, the row
//! counts, and pg_restore fed from the store (its TOC list, filtered).

use std::collections::BTreeSet;

use capy_shared::step::{StepCluster, StepInput, StepProject};
use capy_shared::store::{manifest_key, BackupStore, StoreError};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::pg_tools::{self, Login, PgEnv, PrivateFile, Tool};
use super::{extensions, StepError};

/// The args of every backup job: `{"backup_id", "backup_key"}`.
pub struct BackupArgs {
    pub backup_id: Uuid,
    pub key: String,
    /// The project whose archive it is, read from the key.
    pub source_project: Uuid,
}

impl BackupArgs {
    /// The args, with the key checked to be `projects/<uuid>/backups/<backup_id>.dump`:
    /// a step reads and writes nothing else in the store.
    pub fn parse(args: &serde_json::Value) -> Result<Self, StepError> {
        let backup_id = args
            .get("backup_id")
            .and_then(serde_json::Value::as_str)
            .and_then(|id| Uuid::parse_str(id).ok())
            .ok_or_else(|| StepError::permanent("the job's args hold no valid backup_id"))?;
        let key = args
            .get("backup_key")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| StepError::permanent("the job's args hold no backup_key"))?;
        let source_project = key
            .strip_prefix("projects/")
            .and_then(|rest| rest.strip_suffix(&format!("/backups/{backup_id}.dump")))
            .and_then(|project| Uuid::parse_str(project).ok())
            .filter(|project| capy_shared::store::archive_key(*project, backup_id) == key)
            .ok_or_else(|| {
                StepError::permanent(format!(
                    "backup_key {key:?} is not a key of backup {backup_id}"
                ))
            })?;
        Ok(Self {
            backup_id,
            key: key.to_string(),
            source_project,
        })
    }

    pub fn manifest_key(&self) -> String {
        manifest_key(&self.key)
    }
}

/// The backup store the worker handed the step.
pub fn open_store(input: &StepInput) -> Result<BackupStore, StepError> {
    let config = input
        .store
        .as_ref()
        .ok_or_else(|| StepError::permanent("the step was given no backup store"))?;
    BackupStore::open(config).map_err(|e| match e {
        StoreError::ObjectStore(e) => store_error("opening the backup store", e),
        other => StepError::permanent(other.to_string()),
    })
}

/// A store error: what no retry changes (a missing object, a bad path, a refused
/// request) is permanent, anything else (the network, the service) transient.
pub fn store_error(context: &str, error: object_store::Error) -> StepError {
    use object_store::Error as E;
    let transient = !matches!(
        error,
        E::NotFound { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }
    );
    StepError {
        transient,
        message: format!("{context}: {error}"),
    }
}

/// One table and its row count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRows {
    pub schema: String,
    pub name: String,
    pub rows: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    pub name: String,
    pub version: String,
}

/// What the store keeps beside an archive.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub tables: Vec<TableRows>,
    pub extensions: Vec<Extension>,
    pub server_version_num: i32,
}

impl Manifest {
    pub fn total_rows(&self) -> i64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

/// Reads the manifest of the archive at `args.key`.
pub async fn read_manifest(store: &BackupStore, args: &BackupArgs) -> Result<Manifest, StepError> {
    parse_manifest(&fetch_manifest(store, args).await?)
}

/// The manifest's bytes, as the store keeps them.
pub async fn fetch_manifest(store: &BackupStore, args: &BackupArgs) -> Result<Vec<u8>, StepError> {
    let path = store.path(&args.manifest_key());
    let what = "reading the backup's manifest";
    let bytes = store
        .object_store()
        .get(&path)
        .await
        .map_err(|e| store_error(what, e))?
        .bytes()
        .await
        .map_err(|e| store_error(what, e))?;
    Ok(bytes.to_vec())
}

/// A manifest that does not parse is the backup's fault: no retry mends it.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, StepError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StepError::permanent(format!("the backup's manifest is not valid: {e}")))
}

/// The tables whose rows a dump holds: ordinary tables outside the system schemas and
/// capy's own, not an extension's, not another session's temporary ones.
const TABLES: &str =
    "select n.nspname::text, c.relname::text, format('%I.%I', n.nspname, c.relname)
     from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.relkind = 'r' and c.relpersistence <> 't'
       and n.nspname not in ('pg_catalog', 'information_schema', 'capy_pooler')
       and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp%'
       and not exists (select 1 from pg_depend d
                       where d.classid = 'pg_class'::regclass and d.objid = c.oid
                         and d.deptype = 'e')
     order by 1, 2";

/// Counts the rows of every table, in `client`'s snapshot.
pub async fn count_rows(client: &impl GenericClient) -> Result<Vec<TableRows>, StepError> {
    let what = "counting rows";
    let tables = client
        .query(TABLES, &[])
        .await
        .map_err(|e| StepError::from_db(what, &e))?;
    let mut counted = Vec::with_capacity(tables.len());
    for table in tables {
        let qualified: String = table.get(2);
        let rows: i64 = client
            .query_one(&format!("select count(*) from only {qualified}"), &[])
            .await
            .map_err(|e| StepError::from_db(what, &e))?
            .get(0);
        counted.push(TableRows {
            schema: table.get(0),
            name: table.get(1),
            rows,
        });
    }
    Ok(counted)
}

/// How many tables a dump holds the rows of (as [`count_rows`] lists them), without
/// counting the rows.
pub async fn count_tables(client: &impl GenericClient) -> Result<usize, StepError> {
    client
        .query(TABLES, &[])
        .await
        .map(|tables| tables.len())
        .map_err(|e| StepError::from_db("listing the tables", &e))
}

/// The installed extensions but plpgsql, in the order they were made (what one
/// requires comes first).
pub async fn read_extensions(client: &impl GenericClient) -> Result<Vec<Extension>, StepError> {
    let rows = client
        .query(
            "select extname::text, extversion from pg_extension
             where extname <> 'plpgsql' order by oid",
            &[],
        )
        .await
        .map_err(|e| StepError::from_db("reading the extensions", &e))?;
    Ok(rows
        .iter()
        .map(|row| Extension {
            name: row.get(0),
            version: row.get(1),
        })
        .collect())
}

/// Installs the manifest's extensions in the database `inside` (an admin session) is
/// in, as [`extensions::ensure`] decides (trusted ones as the tenant).
pub async fn ensure_extensions(
    admin: &tokio_postgres::Client,
    inside: &mut tokio_postgres::Client,
    cluster: &StepCluster,
    project: &StepProject,
    wanted: &[Extension],
) -> Result<(), StepError> {
    for extension in wanted {
        extensions::ensure(
            admin,
            inside,
            cluster,
            project,
            &extension.name,
            Some(&extension.version),
        )
        .await?;
    }
    Ok(())
}

/// An archive pg_restore could read: its table of contents, read from the store.
pub struct ReadableArchive {
    tool: std::path::PathBuf,
    toc: String,
}

/// Streams the archive's TOC through `pg_restore --list`: an archive that is missing
/// or that pg_restore cannot read fails here, before anything is changed. `admin` is
/// any admin session of the cluster (it tells the server's version).
pub async fn read_toc(
    admin: &tokio_postgres::Client,
    cluster: &StepCluster,
    project: &StepProject,
    store: &BackupStore,
    args: &BackupArgs,
) -> Result<ReadableArchive, StepError> {
    let version = pg_tools::server_version_num(admin).await?;
    let tool = pg_tools::locate(Tool::PgRestore, version)?;
    let env = PgEnv::new(cluster, &project.database_name, Login::Project(project))?;
    let mut command = env.command(&tool);
    command.arg("--list");
    let toc = run_fed(command, store, args, false).await?;
    Ok(ReadableArchive {
        tool,
        toc: String::from_utf8_lossy(&toc).into_owned(),
    })
}

impl ReadableArchive {
    /// Restores the archive into `project.database_name` as the project's own login:
    /// never as the admin, so nothing the archive runs (a function in a CHECK or an
    /// index) has more than the tenant's rights. Entries of what the database already
    /// has (extensions, existing schemas such as `public`) and of capy's schema are
    /// left out. `transient` says whether pg_restore's own failure is worth a retry;
    /// any other failure (the store, a pipe) is.
    pub async fn restore_as_tenant(
        &self,
        admin_inside: &tokio_postgres::Client,
        cluster: &StepCluster,
        project: &StepProject,
        store: &BackupStore,
        args: &BackupArgs,
        transient: bool,
    ) -> Result<(), StepError> {
        let existing = existing_schemas(admin_inside).await?;
        let list = PrivateFile::write(
            "toc.list",
            &filter_toc(&self.toc, &existing),
            "pg_restore's list",
        )?;
        let env = PgEnv::new(cluster, &project.database_name, Login::Project(project))?;
        let mut command = env.command(&self.tool);
        command
            .args([
                "--no-owner",
                "--no-privileges",
                "--no-publications",
                "--no-subscriptions",
                "--single-transaction",
                "--exit-on-error",
                "--no-password",
            ])
            .arg(format!("--dbname={}", project.database_name))
            .arg("--use-list")
            .arg(&list.0);
        run_fed(command, store, args, transient).await?;
        println!(
            "database {}: archive restored as {}",
            project.database_name, project.role_name
        );
        Ok(())
    }
}

/// Lifts, in an admin session in a tenant's database, the timeouts the database's
/// own settings give it (`ALTER DATABASE … SET`, 60 s by default): a long restore or
/// count must not be cut short. A lock the tenant holds still cannot stall it
/// forever: it waits a minute for one, then fails.
pub async fn lift_tenant_timeouts(client: &tokio_postgres::Client) -> Result<(), StepError> {
    client
        .batch_execute(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             SET lock_timeout = '60s'",
        )
        .await
        .map_err(|e| StepError::from_db("setting the session's timeouts", &e))
}

/// The schemas the database has before the restore: their entries are left out.
async fn existing_schemas(client: &tokio_postgres::Client) -> Result<BTreeSet<String>, StepError> {
    let rows = client
        .query("select nspname::text from pg_namespace", &[])
        .await
        .map_err(|e| StepError::from_db("reading the schemas", &e))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Runs pg_restore `command` with the archive streamed from the store into its stdin;
/// answers its stdout. pg_restore may stop reading early (`--list` reads the TOC
/// alone, a failed restore stops): its exit status then says what happened.
async fn run_fed(
    mut command: tokio::process::Command,
    store: &BackupStore,
    args: &BackupArgs,
    transient: bool,
) -> Result<Vec<u8>, StepError> {
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    // A pg_restore that would not start (no process left, say) may start next time.
    let mut child = pg_tools::spawn(&mut command, Tool::PgRestore).map_err(|e| StepError {
        transient: true,
        ..e
    })?;
    let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(StepError::permanent("pg_restore's pipes are missing"));
    };
    let read = async {
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut out)
            .await
            .map(|_| out)
    };
    let (fed, out) = tokio::join!(feed(stdin, store, args), read);
    let waited = pg_tools::wait(&mut child, Tool::PgRestore, transient).await;
    fed?;
    waited?;
    out.map_err(|e| StepError {
        transient: true,
        message: format!("reading pg_restore's output: {e}"),
    })
}

/// Streams the archive into `stdin`, chunk by chunk, then closes it. A closed pipe
/// ends the feed quietly.
async fn feed(
    mut stdin: tokio::process::ChildStdin,
    store: &BackupStore,
    args: &BackupArgs,
) -> Result<(), StepError> {
    let what = "reading the backup's archive";
    let mut stream = store
        .object_store()
        .get(&store.path(&args.key))
        .await
        .map_err(|e| store_error(what, e))?
        .into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| store_error(what, e))?;
        if let Err(e) = stdin.write_all(&chunk).await {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(StepError {
                transient: true,
                message: format!("writing the archive to pg_restore: {e}"),
            });
        }
    }
    let _ = stdin.shutdown().await;
    Ok(())
}

/// pg_restore's `--list` output with the entries a restore must skip commented out,
/// in the archive's own order (an archive written to a pipe has no data offsets, so
/// pg_restore can only read its entries in order).
pub fn filter_toc(toc: &str, existing_schemas: &BTreeSet<String>) -> String {
    toc.lines()
        .map(|line| {
            if skipped(line, existing_schemas) {
                format!(";{line}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect()
}

/// Whether a TOC line (`<id>; <catalog oid> <oid> <DESC WORDS> <schema|-> <name> <owner>`)
/// is an extension, its comment, a schema the database has or its comment, or
/// anything in capy's schema.
fn skipped(line: &str, existing_schemas: &BTreeSet<String>) -> bool {
    let Some((_, rest)) = line.split_once("; ") else {
        return false;
    };
    if line.starts_with(';') {
        return false;
    }
    let words: Vec<&str> = rest.split_whitespace().skip(2).collect();
    let desc_len = words
        .iter()
        .take_while(|w| w.bytes().all(|b| b.is_ascii_uppercase()))
        .count();
    let desc = words[..desc_len].join(" ");
    let schema = words.get(desc_len).copied().unwrap_or_default();
    let name = words.get(desc_len + 1).copied().unwrap_or_default();
    let commented =
        (desc == "COMMENT").then(|| words.get(desc_len + 2).copied().unwrap_or_default());
    match (desc.as_str(), commented) {
        ("EXTENSION", _) => true,
        ("SCHEMA", _) => existing_schemas.contains(name),
        ("COMMENT", Some(object)) if schema == "-" && name == "EXTENSION" => !object.is_empty(),
        ("COMMENT", Some(object)) if schema == "-" && name == "SCHEMA" => {
            existing_schemas.contains(object)
        }
        _ => schema == "capy_pooler",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_toc_filter_keeps_order_and_skips_what_exists() {
        let toc = "; Archive created at 2024-01-01\n\
                   ;\n\
                   5; 2615 2200 SCHEMA - public pg_database_owner\n\
                   3370; 0 0 COMMENT - SCHEMA public pg_database_owner\n\
                   6; 2615 16390 SCHEMA - app capy_x\n\
                   2; 3079 16385 EXTENSION - pgcrypto \n\
                   3371; 0 0 COMMENT - EXTENSION pgcrypto \n\
                   215; 1259 16423 TABLE public orders capy_x\n\
                   216; 1255 16424 FUNCTION capy_pooler lookup(text) postgres\n\
                   3358; 0 16423 TABLE DATA public orders capy_x\n";
        let existing: BTreeSet<String> = ["public".to_string()].into();
        let filtered = filter_toc(toc, &existing);
        let kept: Vec<&str> = filtered.lines().filter(|l| !l.starts_with(';')).collect();
        assert_eq!(
            kept,
            vec![
                "6; 2615 16390 SCHEMA - app capy_x",
                "215; 1259 16423 TABLE public orders capy_x",
                "3358; 0 16423 TABLE DATA public orders capy_x",
            ]
        );
        assert_eq!(filtered.lines().count(), toc.lines().count());
    }

    #[test]
    fn backup_keys_are_checked() {
        let project = Uuid::new_v4();
        let backup = Uuid::new_v4();
        let key = capy_shared::store::archive_key(project, backup);
        let args = serde_json::json!({"backup_id": backup, "backup_key": key});
        let parsed = BackupArgs::parse(&args).expect("parses");
        assert_eq!(parsed.source_project, project);
        for key in [
            format!("projects/{project}/backups/{}.dump", Uuid::new_v4()),
            format!("projects/../backups/{backup}.dump"),
            format!("other/{project}/backups/{backup}.dump"),
        ] {
            let args = serde_json::json!({"backup_id": backup, "backup_key": key});
            assert!(BackupArgs::parse(&args).is_err(), "{key}");
        }
    }
}
