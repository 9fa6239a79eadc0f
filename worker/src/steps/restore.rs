//! `project.restore`: replaces the target project's database content with a backup's
//! (`mode` `project`: the project the backup came from; `new_project`: a project
//! made for it, from any project's backup). The archive's TOC is read and the
//! manifest's extensions installed first; then the target's logins lose their
//! sessions, everything they own in the database goes (DROP OWNED), converge puts the
//! grants back, the extensions are installed again, and pg_restore runs as the
//! target's own login: what the archive holds ends up owned by the target's role, and
//! nothing in it runs with more than the tenant's rights. A retry starts over from
//! the drop.

use capy_shared::ident::{is_valid_identifier, quote_ident};
use capy_shared::model::job_type;
use capy_shared::step::{print_result, StepCluster, StepInput, StepProject};
use capy_shared::store::BackupStore;
use serde_json::json;
use tokio_postgres::Client;

use super::archive::{self, open_store, read_manifest, BackupArgs, Manifest};
use super::tenant_database::{converge, Provision};
use super::{
    connect, connect_database, execute, exists, require_cluster, require_project, validate_project,
    StepError, ROLE_EXISTS,
};

/// Where the backup goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Over an existing project's database.
    Project,
    /// Into a project made for the restore (made here if its create has not run).
    NewProject,
}

impl Mode {
    fn parse(args: &serde_json::Value) -> Result<Self, StepError> {
        match args.get("mode").and_then(serde_json::Value::as_str) {
            Some("project") => Ok(Self::Project),
            Some("new_project") => Ok(Self::NewProject),
            other => Err(StepError::permanent(format!(
                "args.mode must be \"project\" or \"new_project\", not {other:?}"
            ))),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Project => "project",
            Self::NewProject => "new_project",
        }
    }
}

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let what = job_type::PROJECT_RESTORE;
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_project(project)?;
    let args = BackupArgs::parse(&input.job.args)?;
    let mode = Mode::parse(&input.job.args)?;
    // A new project legitimately reads another project's archive; an overwrite only
    // ever restores the project's own.
    if mode == Mode::Project && args.source_project != project.id {
        return Err(StepError::permanent(
            "backup_key names another project's archive: mode project restores the project's own backups",
        ));
    }
    let store = open_store(input)?;
    let manifest = read_manifest(&store, &args).await?;
    let admin = connect(cluster).await?;
    let provision = match mode {
        Mode::Project => Provision::Update,
        Mode::NewProject => Provision::Create,
    };
    converge(&admin, cluster, project, provision).await?;
    replace(&admin, cluster, project, &store, &args, &manifest).await?;
    println!(
        "backup {} restored into project {} ({} tables, {} rows in the backup)",
        args.backup_id,
        project.id,
        manifest.tables.len(),
        manifest.total_rows()
    );
    print_result(&json!({
        "restored": true,
        "mode": mode.as_str(),
        "tables": manifest.tables.len(),
        "rows": manifest.total_rows(),
    }));
    Ok(())
}

/// Empties the project's database and restores the archive into it. Nothing is
/// dropped before the archive proved readable (its TOC streamed through pg_restore)
/// and its extensions installable: a missing or unreadable archive fails the job
/// with the database untouched. A failure after the drop leaves it emptied; the
/// retry starts over from the drop (the archive stays in the store).
async fn replace(
    admin: &Client,
    cluster: &StepCluster,
    project: &StepProject,
    store: &BackupStore,
    args: &BackupArgs,
    manifest: &Manifest,
) -> Result<(), StepError> {
    let archive = archive::read_toc(admin, cluster, project, store, args).await?;
    let mut inside =
        connect_database(cluster, &project.database_name, "project's database").await?;
    // The database's own timeouts (the tenant's settings) must not cut the drop short.
    archive::lift_tenant_timeouts(&inside).await?;
    archive::ensure_extensions(admin, &mut inside, cluster, project, &manifest.extensions).await?;
    empty_database(admin, &inside, project).await?;
    // DROP OWNED revoked the logins' grants on the database too, and took the
    // extensions the tenant owned.
    converge(admin, cluster, project, Provision::Update).await?;
    archive::ensure_extensions(admin, &mut inside, cluster, project, &manifest.extensions).await?;
    archive
        .restore_as_tenant(&inside, cluster, project, store, args, true)
        .await
}

/// The project's logins (current and previous) that exist.
async fn logins(admin: &Client, project: &StepProject) -> Result<Vec<String>, StepError> {
    let mut logins = Vec::new();
    let candidates = std::iter::once(&project.role_name).chain(&project.previous_role_name);
    for role in candidates {
        if !is_valid_identifier(role) {
            return Err(StepError::permanent(format!("invalid role name {role:?}")));
        }
        if exists(admin, ROLE_EXISTS, role).await? {
            logins.push(role.clone());
        }
    }
    Ok(logins)
}

/// Ends the logins' sessions in the database and drops what they own there (schema
/// `public` included, made again for the current login), so the restore starts from
/// an empty database.
async fn empty_database(
    admin: &Client,
    inside: &Client,
    project: &StepProject,
) -> Result<(), StepError> {
    let logins = logins(admin, project).await?;
    end_sessions(admin, &project.database_name, &logins).await?;
    let quoted: Vec<String> = logins.iter().map(|l| quote_ident(l)).collect();
    execute(
        inside,
        &format!(
            "DROP OWNED BY {} CASCADE; CREATE SCHEMA IF NOT EXISTS public AUTHORIZATION {}",
            quoted.join(", "),
            quote_ident(&project.role_name)
        ),
        "emptying the database",
    )
    .await?;
    println!(
        "database {}: emptied of what {} owned",
        project.database_name,
        logins.join(", ")
    );
    Ok(())
}

/// Ends the sessions of `logins` in `database`: no one writes while it is replaced.
async fn end_sessions(admin: &Client, database: &str, logins: &[String]) -> Result<(), StepError> {
    let ended: i64 = admin
        .query_one(
            "select count(*) filter (where pg_terminate_backend(pid))
             from pg_stat_activity
             where usename = any($1) and datname = $2 and pid <> pg_backend_pid()",
            &[&logins, &database],
        )
        .await
        .map_err(|e| StepError::from_db("ending the logins' sessions", &e))?
        .get(0);
    println!("database {database}: {ended} session(s) ended");
    Ok(())
}
