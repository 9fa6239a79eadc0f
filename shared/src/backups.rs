//! Backups and exports: their rows, the jobs that make, verify and delete them, and
//! what those jobs' outcomes do to them. All of their SQL lives here.
//!
//! (Interface agreed for issue 12; the bodies are filled by the backups work.)

use sqlx::PgConnection;
use uuid::Uuid;

use crate::model::{Backup, BackupKind, Job};

/// A backup or export to make.
#[derive(Debug, Clone)]
pub struct NewBackup {
    pub project_id: Uuid,
    pub kind: BackupKind,
    pub label: Option<String>,
    /// The schedule that asks for it (`default`), if any.
    pub schedule_name: Option<String>,
    /// Kept this long after it completes (scheduled backups).
    pub retention_days: Option<i32>,
    pub max_attempts: i32,
}

/// Records a backup row and queues its `project.backup` job (serialised with the
/// project's other jobs), in the caller's transaction. `None` when the project is not
/// ready (deleted, being deleted, still provisioning).
pub async fn queue_backup(
    _conn: &mut PgConnection,
    _new: &NewBackup,
) -> sqlx::Result<Option<(Backup, Job)>> {
    Ok(None)
}

/// Marks up to `limit` backups past their `expires_at` for deletion and queues their
/// `backup.delete` jobs; answers how many. Safe to run from many workers at once.
pub async fn expire(_conn: &mut PgConnection, _limit: i64) -> sqlx::Result<u64> {
    Ok(0)
}

/// Applies a backup job's state (`project.backup`, `project.backup_verify`,
/// `backup.delete`) to its backup row.
pub async fn apply(_conn: &mut PgConnection, _job: &Job) -> sqlx::Result<()> {
    Ok(())
}
