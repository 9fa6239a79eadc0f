//! The control plane's records as the API shows them (CapyDB's field names).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where a job is in its life. A failed attempt that may be retried goes back to
/// `Pending` with a later `run_at`. Stored as text (`jobs.state`) and shown in JSON by
/// its snake_case name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Claimed,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        Self::Pending,
        Self::Claimed,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The state named `name` (its snake_case name, as in JSON and SQL).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether a job in this state is done: it runs no more unless retried.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Claimed => "claimed",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The database engine a cluster runs, and so the engine of the projects placed on it.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Engine {
    #[default]
    Postgresql,
    /// MySQL or MariaDB.
    Mysql,
    Redis,
}

impl Engine {
    pub const ALL: [Engine; 3] = [Engine::Postgresql, Engine::Mysql, Engine::Redis];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgresql => "postgresql",
            Self::Mysql => "mysql",
            Self::Redis => "redis",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == value)
    }

    /// The URL schemes an admin URL of this engine may have.
    pub fn url_schemes(self) -> &'static [&'static str] {
        match self {
            Self::Postgresql => &["postgres", "postgresql"],
            Self::Mysql => &["mysql", "mariadb"],
            Self::Redis => &["redis", "rediss"],
        }
    }

    /// The login (role, user) name of project `id`, made from the id alone. MySQL
    /// allows user names of at most 32 characters: `capy_` and the id's last 27 hex
    /// digits (its random part and the end of its timestamp).
    pub fn login_name(self, id: Uuid) -> String {
        let hex = id.simple().to_string();
        match self {
            Self::Mysql => format!("capy_{}", &hex[5..]),
            Self::Postgresql | Self::Redis => format!("capy_{hex}"),
        }
    }

    /// Whether projects of this engine have PostgreSQL extensions, previews, backups,
    /// restores and a pooler.
    pub fn is_postgresql(self) -> bool {
        self == Self::Postgresql
    }
}

/// The key and channel prefix of Redis project `id`: its ACL user reaches only keys
/// and channels that start with it.
pub fn redis_prefix(id: Uuid) -> String {
    format!("p:{id}:")
}

/// Why an attempt failed, which decides whether the job is retried. Stored as text
/// (`jobs.retry_classification`, `job_attempts.classification`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum RetryClassification {
    /// Retried with backoff (exit 75, a step killed by a signal, a lost connection).
    Transient,
    /// Not retried (any other non-zero exit).
    Permanent,
    /// The step ran past its time limit; retried.
    Timeout,
    /// The worker vanished and its lease expired; retried.
    WorkerLost,
}

impl RetryClassification {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::Timeout => "timeout",
            Self::WorkerLost => "worker_lost",
        }
    }

    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::Permanent)
    }
}

/// The job types capy knows, with CapyDB's names.
pub mod job_type {
    pub const PROJECT_CREATE: &str = "project.create";
    pub const PROJECT_UPDATE: &str = "project.update";
    pub const PROJECT_DELETE: &str = "project.delete";
    pub const PROJECT_EXTENSION_ENABLE: &str = "project.extension_enable";
    pub const PROJECT_EXTENSION_DISABLE: &str = "project.extension_disable";
    /// Holds an unclaimed instant database to its storage limit.
    pub const PROJECT_STORAGE_CHECK: &str = "project.storage_check";
    /// Makes the project's pending login (a new role with a new password) and, on
    /// completion, makes it the project's login; the old one becomes the previous.
    pub const PROJECT_ROTATE_CREDENTIALS: &str = "project.rotate_credentials";
    /// Drops a login a rotation replaced (`args.role`), once its grace has ended.
    pub const PROJECT_RETIRE_CREDENTIALS: &str = "project.retire_credentials";
    /// Dumps the project's database (`pg_dump -Fc`) into the backup store; a backup
    /// or an export (`args.backup_id`; the kind is the backup row's).
    pub const PROJECT_BACKUP: &str = "project.backup";
    /// Restores a backup into a throwaway database and checks its tables and row
    /// counts against what the backup recorded (`args.backup_id`).
    pub const PROJECT_BACKUP_VERIFY: &str = "project.backup_verify";
    /// Deletes an archive from the store (`args.backup_id`, `args.backup_key`): a
    /// deleted backup, one past retention, an expired export.
    pub const BACKUP_DELETE: &str = "backup.delete";
    /// Restores a backup (`args.backup_id`) into the project: a new project made from
    /// it, or the project itself overwritten (`args.mode`).
    pub const PROJECT_RESTORE: &str = "project.restore";
    /// Marks backups past retention and expired exports for deletion (inside the
    /// worker, queued by a periodic job).
    pub const BACKUP_EXPIRE: &str = "capy.backup_expire";
    /// Makes a preview database: its login and database, the parent's extensions, and
    /// (mode `clone`) the parent's schema and data, or (mode `empty`) its schema.
    pub const PREVIEW_CREATE: &str = "project.preview_create";
    /// Makes a preview's database again from its parent, as `PREVIEW_CREATE` does.
    pub const PREVIEW_RESET: &str = "project.preview_reset";
    /// Drops a preview's database and logins.
    pub const PREVIEW_DELETE: &str = "project.preview_delete";
    /// Marks previews past their TTL for deletion and queues their deletes (inside the
    /// worker, queued by a periodic job).
    pub const PREVIEW_EXPIRE: &str = "capy.preview_expire";
    /// Refuses the project's logins and ends its sessions; its data stays.
    pub const PROJECT_STOP: &str = "project.stop";
    /// Lets a stopped project's logins in again.
    pub const PROJECT_START: &str = "project.start";
    /// Does nothing, inside the worker (no step process): measures the queue itself.
    pub const NOOP: &str = "capy.noop";

    /// Whether a job of `job_type` still runs (and may be retried) once its project is
    /// being deleted: the project's delete, and the deletes of its previews that the
    /// project's delete queued first.
    pub fn runs_for_deleted_project(job_type: &str) -> bool {
        job_type == PROJECT_DELETE || job_type == PREVIEW_DELETE
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Job {
    pub id: Uuid,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub job_type: String,
    pub state: JobState,
    pub organization_id: Option<Uuid>,
    pub project_id: Option<Uuid>,
    pub cluster_id: Option<Uuid>,
    pub preview_database_id: Option<Uuid>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub claimed_by: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub last_exit_code: Option<i32>,
    pub last_stdout: Option<String>,
    pub last_stderr: Option<String>,
    pub locked_resource: Option<String>,
    pub retry_classification: Option<RetryClassification>,
    /// What the job needs beyond its project and cluster, e.g.
    /// `{"name": "pgcrypto", "version": "1.3"}` for extension jobs.
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// When a cancel was asked of this job while it ran (it ends `cancelled`).
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns of [`Job`], for queries that return jobs.
pub const JOB_COLUMNS: &str = "id, type, state, organization_id, project_id, cluster_id, \
    preview_database_id, attempts, max_attempts, run_at, claimed_at, claimed_by, started_at, \
    completed_at, error, last_exit_code, last_stdout, last_stderr, locked_resource, \
    retry_classification, args, cancel_requested_at, created_at, updated_at";

/// One attempt at a job: who ran it, when, and what its step printed and returned.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct JobAttempt {
    pub attempt: i32,
    pub worker: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub classification: Option<RetryClassification>,
    pub error: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

/// A project (logical database) as CapyDB shows it. Hosts, ports and SSL mode come
/// from its cluster; the password is never part of it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Project {
    pub id: Uuid,
    /// `None` only for an instant database nobody has claimed yet.
    pub organization_id: Option<Uuid>,
    pub cluster_id: Uuid,
    pub name: String,
    pub slug: String,
    pub region: String,
    pub environment: String,
    pub plan: String,
    pub engine: Engine,
    pub state: String,
    pub database_name: String,
    pub role_name: String,
    pub public_host: String,
    pub direct_port: i32,
    /// Where the cluster's pooler (PgBouncer) listens: `pooled_host:pooled_port`.
    pub pooled_host: String,
    pub pooled_port: i32,
    pub ssl_mode: String,
    pub max_connections: i32,
    pub statement_timeout: String,
    pub idle_transaction_timeout: String,
    pub storage_limit_bytes: Option<i64>,
    pub last_error: Option<String>,
    pub latest_job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Select list and join for [`Project`]: `FROM projects p JOIN clusters c`.
pub const PROJECT_SELECT: &str = "select p.id, p.organization_id, p.cluster_id, p.name, p.slug, \
    p.region, p.environment, p.plan, p.engine, p.state, p.database_name, p.role_name, c.public_host, \
    c.direct_port, coalesce(c.pooled_host, c.public_host) as pooled_host, c.pooled_port, c.ssl_mode, p.max_connections, p.statement_timeout, \
    p.idle_transaction_timeout, p.storage_limit_bytes, p.last_error, p.latest_job_id, \
    p.created_at, p.updated_at from projects p join clusters c on c.id = p.cluster_id";

/// What a backup row holds: a verified backup or a downloadable export.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum BackupKind {
    Backup,
    Export,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backup => "backup",
            Self::Export => "export",
        }
    }
}

/// Where a backup is in its life: `pending` until its job completes (an upload cut
/// short stays pending, then `failed`, and never counts).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum BackupState {
    Pending,
    Completed,
    Failed,
    Deleting,
    Deleted,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
        }
    }
}

/// Whether a backup's test restore matched what it recorded.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum VerificationState {
    Pending,
    Verified,
    Failed,
    /// Exports are not verified.
    Skipped,
}

impl VerificationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Verified => "verified",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// A backup or export as the API shows it (CapyDB's fields, and a few more).
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Backup {
    pub id: Uuid,
    pub project_id: Uuid,
    pub kind: BackupKind,
    /// The archive's key in the backup store.
    pub backup_key: String,
    pub label: Option<String>,
    pub database_name: String,
    pub state: BackupState,
    pub size_bytes: Option<i64>,
    /// SHA-256 of the archive, hex.
    pub sha256: Option<String>,
    pub verification_state: VerificationState,
    pub verification_error: Option<String>,
    pub verified_at: Option<DateTime<Utc>>,
    /// The schedule that made it (`default`), if any.
    pub schedule_name: Option<String>,
    pub retention_days: Option<i32>,
    /// When it is deleted: exports after 7 days, scheduled backups after their
    /// retention.
    pub expires_at: Option<DateTime<Utc>>,
    /// The job that made it.
    pub job_id: Option<Uuid>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// A comma-separated column list with each column prefixed by `alias.`, for queries
/// that join or update from another relation.
pub fn prefixed_columns(columns: &str, alias: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns of [`Backup`] (table `backups`).
pub const BACKUP_COLUMNS: &str = "id, project_id, kind, backup_key, label, database_name, state, \
    size_bytes, sha256, verification_state, verification_error, verified_at, schedule_name, \
    retention_days, expires_at, job_id, error, created_at, completed_at";

/// How a preview database is made from its parent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum PreviewMode {
    /// The parent's schema and data, as of one snapshot.
    Clone,
    /// The parent's schema alone.
    Empty,
}

impl PreviewMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clone => "clone",
            Self::Empty => "empty",
        }
    }
}

/// Where a preview database is in its life (a project's states).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum PreviewState {
    /// Its create (or a reset) is queued or running.
    Provisioning,
    Ready,
    /// Its create or reset failed: `last_error` says why; reset or delete it.
    Error,
    Deleting,
    Deleted,
}

impl PreviewState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Ready => "ready",
            Self::Error => "error",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
        }
    }

    /// Neither deleted nor being deleted.
    pub fn is_live(self) -> bool {
        !matches!(self, Self::Deleting | Self::Deleted)
    }
}

/// A preview database as the API shows it (CapyDB's fields, and `pooled_host`). Hosts,
/// ports and SSL mode come from its cluster (the parent's); the password is never part
/// of it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PreviewDatabase {
    pub id: Uuid,
    pub project_id: Uuid,
    pub name: String,
    pub mode: PreviewMode,
    pub state: PreviewState,
    pub database_name: String,
    pub role_name: String,
    pub public_host: String,
    pub direct_port: i32,
    pub pooled_host: String,
    pub pooled_port: i32,
    pub ssl_mode: String,
    pub max_connections: i32,
    pub statement_timeout: String,
    pub idle_transaction_timeout: String,
    pub storage_limit_bytes: Option<i64>,
    /// What it is copied from: `project` (the parent project's database).
    pub source_kind: String,
    pub source_database: String,
    pub last_error: Option<String>,
    pub latest_job_id: Option<Uuid>,
    /// When workers delete it.
    pub ttl_expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Select list and join for [`PreviewDatabase`]: `FROM preview_databases v JOIN clusters c`.
pub const PREVIEW_SELECT: &str = "select v.id, v.project_id, v.name, v.mode, v.state, \
    v.database_name, v.role_name, c.public_host, c.direct_port, \
    coalesce(c.pooled_host, c.public_host) as pooled_host, c.pooled_port, c.ssl_mode, \
    v.max_connections, v.statement_timeout, v.idle_transaction_timeout, v.storage_limit_bytes, \
    v.source_kind, v.source_database, v.last_error, v.latest_job_id, v.ttl_expires_at, \
    v.created_at, v.updated_at from preview_databases v join clusters c on c.id = v.cluster_id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_states_have_one_name_in_json_and_sql() {
        for state in JobState::ALL {
            let json = serde_json::to_value(state).expect("serializes");
            assert_eq!(json, state.as_str());
            assert_eq!(JobState::parse(state.as_str()), Some(state));
        }
        assert_eq!(JobState::parse("retry"), None);
        assert_eq!(JobState::parse("Completed"), None);
    }
}
