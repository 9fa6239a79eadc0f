//! What a job's step reads: its project and cluster, with their secrets opened. (What
//! a job's outcome does to its project is `capy_shared::effects`.)

use anyhow::Context as _;
use capy_shared::crypto::SecretBox;
use capy_shared::model::{job_type, Engine, Job};
use capy_shared::queue::{PROJECT_GONE_ERROR, PROJECT_IS_LIVE};
use capy_shared::step::{StepCluster, StepInput, StepLogin, StepProject};
use capy_shared::store::StoreConfig;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct ProjectRow {
    id: Uuid,
    cluster_id: Uuid,
    database_name: String,
    role_name: String,
    password_encrypted: Vec<u8>,
    max_connections: i32,
    statement_timeout: String,
    idle_transaction_timeout: String,
    storage_limit_bytes: Option<i64>,
    logical_replication: bool,
    previous_role_name: Option<String>,
    pending_role_name: Option<String>,
    pending_password_encrypted: Option<Vec<u8>>,
    state: String,
}

#[derive(sqlx::FromRow)]
struct ClusterRow {
    id: Uuid,
    name: String,
    admin_url_encrypted: Vec<u8>,
    allowed_extensions: Vec<String>,
    ca_pem: Option<String>,
    pooler_auth_user: Option<String>,
    engine: Engine,
}

/// Builds the JSON a step reads on stdin.
pub async fn load_input(
    pool: &PgPool,
    secrets: &SecretBox,
    store: &StoreConfig,
    job: &Job,
) -> anyhow::Result<StepInput> {
    let project: Option<ProjectRow> = match job.project_id {
        Some(id) => sqlx::query_as(&format!(
            "select id, cluster_id, database_name, role_name, password_encrypted, max_connections,
                    statement_timeout, idle_transaction_timeout, storage_limit_bytes,
                    logical_replication, previous_role_name, pending_role_name,
                    pending_password_encrypted, state
             from projects where id = $1 and ($2 or {PROJECT_IS_LIVE})"
        ))
        .bind(id)
        .bind(job_type::runs_for_deleted_project(&job.job_type))
        .fetch_optional(pool)
        .await
        .context("loading the job's project")?,
        None => None,
    };
    // A deleted project stays deleted: once it is being deleted, only its delete runs.
    if job.project_id.is_some() && project.is_none() {
        return Err(ProjectGone(job.job_type.clone()).into());
    }
    let preview = load_preview(pool, secrets, job).await?;
    let cluster_id = job.cluster_id.or(project.as_ref().map(|p| p.cluster_id));
    let cluster: Option<ClusterRow> = match cluster_id {
        Some(id) => sqlx::query_as(
            "select id, name, admin_url_encrypted, allowed_extensions, pooler_auth_user, ca_pem, engine
             from clusters where id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await
        .context("loading the job's cluster")?,
        None => None,
    };
    let project = project
        .map(|p| -> anyhow::Result<StepProject> {
            let pending_login = match (p.pending_role_name, p.pending_password_encrypted) {
                (Some(role_name), Some(sealed)) => Some(StepLogin {
                    role_name,
                    password: secrets
                        .open(&sealed)
                        .context("opening the pending login's password")?,
                }),
                _ => None,
            };
            Ok(StepProject {
                id: p.id,
                stopped: p.state == "stopped",
                password: secrets
                    .open(&p.password_encrypted)
                    .context("opening the project's password")?,
                database_name: p.database_name,
                role_name: p.role_name,
                max_connections: p.max_connections,
                statement_timeout: p.statement_timeout,
                idle_transaction_timeout: p.idle_transaction_timeout,
                storage_limit_bytes: p.storage_limit_bytes,
                replication: p.logical_replication,
                previous_role_name: p.previous_role_name,
                pending_login,
            })
        })
        .transpose()?;
    let cluster = cluster
        .map(|c| -> anyhow::Result<StepCluster> {
            Ok(StepCluster {
                admin_url: secrets
                    .open(&c.admin_url_encrypted)
                    .context("opening the cluster's admin URL")?,
                id: c.id,
                name: c.name,
                allowed_extensions: c.allowed_extensions,
                ca_pem: c.ca_pem,
                pooler_auth_user: c.pooler_auth_user,
                engine: c.engine,
            })
        })
        .transpose()?;
    Ok(StepInput {
        job: job.clone(),
        project,
        cluster,
        store: needs_store(&job.job_type).then(|| store.clone()),
        preview,
    })
}

#[derive(sqlx::FromRow)]
struct PreviewRow {
    id: Uuid,
    database_name: String,
    role_name: String,
    password_encrypted: Vec<u8>,
    max_connections: i32,
    statement_timeout: String,
    idle_transaction_timeout: String,
    storage_limit_bytes: Option<i64>,
}

/// The preview a preview's job acts on, as a login and a database of its own. Once it
/// is being deleted, only its delete runs.
async fn load_preview(
    pool: &PgPool,
    secrets: &SecretBox,
    job: &Job,
) -> anyhow::Result<Option<StepProject>> {
    let Some(id) = job.preview_database_id else {
        return Ok(None);
    };
    let row: Option<PreviewRow> = sqlx::query_as(
        "select id, database_name, role_name, password_encrypted, max_connections,
                statement_timeout, idle_transaction_timeout, storage_limit_bytes
         from preview_databases
         where id = $1 and deleted_at is null and ($2 or state not in ('deleting', 'deleted'))",
    )
    .bind(id)
    .bind(job.job_type == job_type::PREVIEW_DELETE)
    .fetch_optional(pool)
    .await
    .context("loading the job's preview database")?;
    let Some(row) = row else {
        return Err(ProjectGone(job.job_type.clone()).into());
    };
    Ok(Some(StepProject {
        id: row.id,
        password: secrets
            .open(&row.password_encrypted)
            .context("opening the preview's password")?,
        database_name: row.database_name,
        role_name: row.role_name,
        max_connections: row.max_connections,
        statement_timeout: row.statement_timeout,
        idle_transaction_timeout: row.idle_transaction_timeout,
        storage_limit_bytes: row.storage_limit_bytes,
        replication: false,
        previous_role_name: None,
        pending_login: None,
        stopped: false,
    }))
}

/// Whether steps of `job_type` read or write the backup store (only they get its
/// credentials).
fn needs_store(job_type: &str) -> bool {
    matches!(
        job_type,
        job_type::PROJECT_BACKUP
            | job_type::PROJECT_BACKUP_VERIFY
            | job_type::PROJECT_RESTORE
            | job_type::BACKUP_DELETE
    )
}

/// A job of a project that is deleted or being deleted (other than its delete): its
/// step must not run, whatever queued it.
#[derive(Debug)]
pub struct ProjectGone(pub String);

impl std::fmt::Display for ProjectGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PROJECT_GONE_ERROR}: this {} job does not run", self.0)
    }
}

impl std::error::Error for ProjectGone {}
