//! Restores and the approvals that authorize overwriting a project: their SQL, and
//! what a `project.restore` job's outcome does to its project.
//!
//! A restore into a new project: the new project goes through its usual lifecycle
//! (`provisioning`, then `ready` once its `project.create` completed); its extension
//! enables and the `project.restore` run after the create, behind the project's lock.
//! A failed restore does not undo the project: it stays `ready`, and its `last_error`
//! says `restore failed: <error>` until a later restore completes.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::model::{BackupState, Job, VerificationState};

/// How long an approval may be used after it is made.
pub const APPROVAL_MINUTES: i32 = 10;

/// The start of the error a failed restore leaves on its project.
pub const RESTORE_FAILED: &str = "restore failed: ";

/// The dangerous actions an approval may authorize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalAction {
    /// `POST /v1/projects/{id}/restores` with `target_kind: project`.
    RestoreOverwrite,
}

impl ApprovalAction {
    pub const ALL: [Self; 1] = [Self::RestoreOverwrite];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RestoreOverwrite => "project.restore_overwrite",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == text)
    }
}

/// A new approval: its token is here in plaintext, and nowhere else ever again.
#[derive(Debug, Clone)]
pub struct NewApproval {
    pub id: Uuid,
    pub action: ApprovalAction,
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// What consuming an approval token came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumed {
    /// Marked used, for the job given.
    Done,
    /// No such token, or one of another project or action.
    Unknown,
    Expired,
    /// Already used; for this job.
    Used(Option<Uuid>),
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Records an approval of `action` on the project; only the token's SHA-256 is kept.
pub async fn create_approval(
    conn: &mut PgConnection,
    organization_id: Uuid,
    project_id: Uuid,
    action: ApprovalAction,
) -> sqlx::Result<NewApproval> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let id = Uuid::now_v7();
    let expires_at: DateTime<Utc> = sqlx::query_scalar(
        "insert into approvals (id, organization_id, project_id, action, token_hash, expires_at)
         values ($1, $2, $3, $4, $5, now() + make_interval(mins => $6))
         returning expires_at",
    )
    .bind(id)
    .bind(organization_id)
    .bind(project_id)
    .bind(action.as_str())
    .bind(token_hash(&token))
    .bind(APPROVAL_MINUTES)
    .fetch_one(conn)
    .await?;
    Ok(NewApproval {
        id,
        action,
        token,
        expires_at,
    })
}

/// Marks the approval `token` of `action` on the project used, for `job_id`, in the
/// caller's transaction. One statement decides: of two requests with one token, the
/// second waits for the first's row lock, then finds it used.
pub async fn consume_approval(
    conn: &mut PgConnection,
    project_id: Uuid,
    action: ApprovalAction,
    token: &str,
    job_id: Uuid,
) -> sqlx::Result<Consumed> {
    let hash = token_hash(token);
    let done = sqlx::query(
        "update approvals set used_at = now(), job_id = $4
         where token_hash = $1 and project_id = $2 and action = $3
           and used_at is null and expires_at > now()",
    )
    .bind(&hash)
    .bind(project_id)
    .bind(action.as_str())
    .bind(job_id)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(Consumed::Done);
    }
    // Why not: told apart only for the project's own token of this action; any other
    // token is unknown, whatever it is elsewhere.
    let found: Option<(bool, Option<Uuid>)> = sqlx::query_as(
        "select used_at is not null, job_id from approvals
         where token_hash = $1 and project_id = $2 and action = $3",
    )
    .bind(&hash)
    .bind(project_id)
    .bind(action.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(match found {
        None => Consumed::Unknown,
        Some((true, job)) => Consumed::Used(job),
        Some((false, _)) => Consumed::Expired,
    })
}

/// A backup a restore may read, as the restore needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RestoreSource {
    pub id: Uuid,
    pub organization_id: Uuid,
    /// The project it was taken of (perhaps deleted since).
    pub project_id: Uuid,
    pub backup_key: String,
    pub state: BackupState,
    pub verification_state: VerificationState,
    pub verification_error: Option<String>,
    pub manifest: Option<Value>,
}

impl RestoreSource {
    /// Why it cannot be restored, if it cannot: an archive counts only once its job
    /// completed, and one whose test restore failed is not trusted.
    pub fn refusal(&self) -> Option<String> {
        if self.state != BackupState::Completed {
            return Some(format!(
                "backup {} is {}, not completed: only a completed backup can be restored",
                self.id,
                self.state.as_str()
            ));
        }
        if self.verification_state == VerificationState::Failed {
            return Some(format!(
                "backup {} failed its verification ({}): it cannot be restored",
                self.id,
                self.verification_error
                    .as_deref()
                    .unwrap_or("no reason recorded")
            ));
        }
        None
    }

    /// The extensions its manifest lists, as `(name, version)`.
    pub fn extensions(&self) -> Vec<(String, Option<String>)> {
        let listed = self
            .manifest
            .as_ref()
            .and_then(|m| m.get("extensions"))
            .and_then(Value::as_array);
        listed
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e.get("name")?.as_str()?.to_string();
                let version = e.get("version").and_then(Value::as_str).map(String::from);
                Some((name, version))
            })
            .collect()
    }
}

/// The organization's backup `id`, locked against a concurrent delete (`for share`);
/// `None` when there is none (or it is another organization's).
pub async fn find_backup(
    conn: &mut PgConnection,
    organization_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<RestoreSource>> {
    sqlx::query_as(
        "select id, organization_id, project_id, backup_key, state, verification_state,
                verification_error, manifest
         from backups where id = $1 and organization_id = $2
         for share",
    )
    .bind(id)
    .bind(organization_id)
    .fetch_optional(conn)
    .await
}

/// What a new project made from a backup takes of the project the backup was taken of
/// (which may be deleted since): its name (for the default name), cluster and settings.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SourceProject {
    pub name: String,
    pub cluster_id: Uuid,
    pub environment: String,
    pub max_connections: i32,
    pub statement_timeout: String,
    pub idle_transaction_timeout: String,
    pub storage_limit_bytes: Option<i64>,
}

pub async fn source_project(
    conn: &mut PgConnection,
    project_id: Uuid,
) -> sqlx::Result<Option<SourceProject>> {
    sqlx::query_as(
        "select name, cluster_id, environment, max_connections, statement_timeout,
                idle_transaction_timeout, storage_limit_bytes
         from projects where id = $1",
    )
    .bind(project_id)
    .fetch_optional(conn)
    .await
}

/// Applies a `project.restore` job's state to its project: a completed restore clears
/// the error an earlier one left; a failed or cancelled one is shown in `last_error`.
/// The project's state is its lifecycle's (create, delete), never the restore's.
pub async fn apply(conn: &mut PgConnection, job: &Job) -> sqlx::Result<()> {
    let Some(project_id) = job.project_id else {
        return Ok(());
    };
    sqlx::query(
        "update projects set
             last_error = case $2
                 when 'completed' then
                     case when starts_with(last_error, $4) then null else last_error end
                 when 'cancelled' then $4 || 'the restore was cancelled'
                 else $4 || coalesce($3, 'unknown error') end,
             updated_at = now()
         where id = $1 and state in ('ready', 'error')
           and $2 in ('completed', 'failed', 'cancelled')",
    )
    .bind(project_id)
    .bind(job.state)
    .bind(&job.error)
    .bind(RESTORE_FAILED)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes approvals a day past their expiry: used or not, they authorize nothing more.
pub async fn purge_approvals(conn: &mut PgConnection) -> sqlx::Result<u64> {
    let done = sqlx::query("delete from approvals where expires_at < now() - interval '1 day'")
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_by_name_only() {
        assert_eq!(
            ApprovalAction::parse("project.restore_overwrite"),
            Some(ApprovalAction::RestoreOverwrite)
        );
        assert_eq!(ApprovalAction::parse("project.delete"), None);
        assert_eq!(ApprovalAction::parse(""), None);
    }
}
