//! Preview databases: their rows, the jobs that make, reset and delete them, their
//! expiry, and what those jobs' outcomes do to them. All of their SQL lives here.
//!
//! A preview's jobs carry its id (`jobs.preview_database_id`) and its parent as their
//! project, and are serialised with the parent's own jobs (`project:<parent>`): a clone
//! never overlaps the parent's delete or an overwrite restore, and the deletes a
//! project's delete queues first run before it.

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::model::{
    job_type, Job, PreviewDatabase, PreviewMode, PreviewState, JOB_COLUMNS, PREVIEW_SELECT,
};
use crate::queue::{self, NewJob};

/// A preview to make; the limits left out are the parent's.
#[derive(Debug, Clone)]
pub struct NewPreview {
    pub id: Uuid,
    pub project_id: Uuid,
    pub name: String,
    pub mode: PreviewMode,
    /// The preview login's password, sealed (`SecretBox::seal`).
    pub password_encrypted: Vec<u8>,
    pub max_connections: Option<i32>,
    pub statement_timeout: Option<String>,
    pub idle_transaction_timeout: Option<String>,
    pub storage_limit_bytes: Option<i64>,
    /// Deleted this many seconds after it is made.
    pub ttl_seconds: i64,
    pub max_attempts: i32,
}

/// Why a preview job was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The parent is not ready (its state), or belongs to no organization.
    ParentNotReady(String),
    /// The parent has a live preview of this name.
    NameTaken,
    /// The preview is not in a state that allows it (its state).
    Preview(PreviewState),
}

/// A preview with the organization that owns it (for visibility checks).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OwnedPreview {
    pub organization_id: Uuid,
    pub cluster_id: Uuid,
    #[sqlx(flatten)]
    pub preview: PreviewDatabase,
}

/// The parent columns a preview needs.
#[derive(sqlx::FromRow)]
struct Parent {
    organization_id: Option<Uuid>,
    cluster_id: Uuid,
    state: String,
    database_name: String,
    max_connections: i32,
    statement_timeout: String,
    idle_transaction_timeout: String,
    storage_limit_bytes: Option<i64>,
}

/// Records preview `new` of its project and queues its `project.preview_create` job,
/// in the caller's transaction. The parent's row is share-locked: its delete waits for
/// us (and then deletes the preview first), or we see it being deleted.
pub async fn queue_create(
    conn: &mut PgConnection,
    new: &NewPreview,
) -> sqlx::Result<Result<(PreviewDatabase, Job), Refusal>> {
    let parent: Option<Parent> = sqlx::query_as(
        "select organization_id, cluster_id, state, database_name, max_connections,
                statement_timeout, idle_transaction_timeout, storage_limit_bytes
         from projects where id = $1 and deleted_at is null for share",
    )
    .bind(new.project_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(parent) = parent else {
        return Ok(Err(Refusal::ParentNotReady("deleted".into())));
    };
    let organization_id = match parent.organization_id {
        Some(id) if parent.state == "ready" => id,
        _ => return Ok(Err(Refusal::ParentNotReady(parent.state))),
    };
    if name_taken(conn, new.project_id, &new.name).await? {
        return Ok(Err(Refusal::NameTaken));
    }
    insert(conn, new, &parent, organization_id).await?;
    let job = queue_job(conn, new.id, job_type::PREVIEW_CREATE, new.max_attempts).await?;
    let preview = fetch(conn, new.id).await?;
    Ok(Ok((preview, job)))
}

async fn name_taken(conn: &mut PgConnection, project_id: Uuid, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "select exists (select 1 from preview_databases
                        where project_id = $1 and name = $2 and deleted_at is null)",
    )
    .bind(project_id)
    .bind(name)
    .fetch_one(conn)
    .await
}

async fn insert(
    conn: &mut PgConnection,
    new: &NewPreview,
    parent: &Parent,
    organization_id: Uuid,
) -> sqlx::Result<()> {
    // Database and role names come from the id, never from user input.
    let database_name = database_name(new.id);
    sqlx::query(
        "insert into preview_databases (id, organization_id, project_id, cluster_id, name, mode,
             database_name, role_name, password_encrypted, max_connections, statement_timeout,
             idle_transaction_timeout, storage_limit_bytes, source_database, ttl_expires_at)
         values ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, $12, $13,
                 now() + make_interval(secs => $14))",
    )
    .bind(new.id)
    .bind(organization_id)
    .bind(new.project_id)
    .bind(parent.cluster_id)
    .bind(&new.name)
    .bind(new.mode)
    .bind(&database_name)
    .bind(&new.password_encrypted)
    .bind(new.max_connections.unwrap_or(parent.max_connections))
    .bind(
        new.statement_timeout
            .as_deref()
            .unwrap_or(&parent.statement_timeout),
    )
    .bind(
        new.idle_transaction_timeout
            .as_deref()
            .unwrap_or(&parent.idle_transaction_timeout),
    )
    .bind(new.storage_limit_bytes.or(parent.storage_limit_bytes))
    .bind(&parent.database_name)
    .bind(new.ttl_seconds as f64)
    .execute(conn)
    .await?;
    Ok(())
}

/// The database (and login) name of preview `id`: made from the id, never from user
/// input. The worker's steps drop nothing a preview's job names but this.
pub fn database_name(id: Uuid) -> String {
    format!("capy_pv_{}", id.simple())
}

/// Queues a job of preview `id` behind its parent's other jobs and records it as the
/// preview's latest. Its args hold the preview's mode (`{"mode": "clone"|"empty"}`),
/// which its create and reset copy by.
async fn queue_job(
    conn: &mut PgConnection,
    id: Uuid,
    job_type: &str,
    max_attempts: i32,
) -> sqlx::Result<Job> {
    let (organization_id, project_id, cluster_id, mode): (Uuid, Uuid, Uuid, PreviewMode) =
        sqlx::query_as(
            "select organization_id, project_id, cluster_id, mode
             from preview_databases where id = $1",
        )
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    let job = queue::enqueue(
        &mut *conn,
        &NewJob {
            job_type: job_type.into(),
            organization_id: Some(organization_id),
            project_id: Some(project_id),
            preview_database_id: Some(id),
            cluster_id: Some(cluster_id),
            locked_resource: Some(format!("project:{project_id}")),
            max_attempts,
            args: json!({"mode": mode}),
            run_at: None,
        },
    )
    .await?;
    sqlx::query(
        "update preview_databases set latest_job_id = $2, updated_at = now() where id = $1",
    )
    .bind(id)
    .bind(job.id)
    .execute(conn)
    .await?;
    Ok(job)
}

async fn fetch(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<PreviewDatabase> {
    sqlx::query_as(&format!("{PREVIEW_SELECT} where v.id = $1"))
        .bind(id)
        .fetch_one(conn)
        .await
}

/// The columns of [`OwnedPreview`]: `PREVIEW_SELECT`'s and the owner's.
fn owned_select() -> String {
    PREVIEW_SELECT.replacen("select ", "select v.organization_id, v.cluster_id, ", 1)
}

/// Preview `id` unless deleted.
pub async fn find(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<OwnedPreview>> {
    sqlx::query_as(&format!(
        "{} where v.id = $1 and v.deleted_at is null",
        owned_select()
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Preview `id` unless deleted, locked until the caller's transaction ends.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<OwnedPreview>> {
    sqlx::query_as(&format!(
        "{} where v.id = $1 and v.deleted_at is null for update of v",
        owned_select()
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// A page of project `project_id`'s previews (not deleted), newest first, after the
/// preview `after` (a cursor) if given.
pub async fn list(
    conn: &mut PgConnection,
    project_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<PreviewDatabase>> {
    sqlx::query_as(&format!(
        "{PREVIEW_SELECT}
         where v.project_id = $1 and v.deleted_at is null
           and ($2::uuid is null or (v.created_at, v.id) <
                (select created_at, id from preview_databases where id = $2))
         order by v.created_at desc, v.id desc
         limit $3"
    ))
    .bind(project_id)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The preview login's sealed password.
pub async fn password_encrypted(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Vec<u8>> {
    sqlx::query_scalar("select password_encrypted from preview_databases where id = $1")
        .bind(id)
        .fetch_one(conn)
        .await
}

/// Sets a live preview's expiry to `ttl_seconds` from now.
pub async fn extend(
    conn: &mut PgConnection,
    id: Uuid,
    ttl_seconds: i64,
) -> sqlx::Result<Result<PreviewDatabase, Refusal>> {
    let Some(owned) = lock(conn, id).await? else {
        return Ok(Err(Refusal::Preview(PreviewState::Deleted)));
    };
    if !owned.preview.state.is_live() {
        return Ok(Err(Refusal::Preview(owned.preview.state)));
    }
    sqlx::query(
        "update preview_databases
         set ttl_expires_at = now() + make_interval(secs => $2), updated_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(ttl_seconds as f64)
    .execute(&mut *conn)
    .await?;
    Ok(Ok(fetch(conn, id).await?))
}

/// Queues a `project.preview_reset` of a ready (or failed) preview whose parent is
/// ready: it is made again from the parent, and is `provisioning` meanwhile.
pub async fn queue_reset(
    conn: &mut PgConnection,
    id: Uuid,
    max_attempts: i32,
) -> sqlx::Result<Result<(PreviewDatabase, Job), Refusal>> {
    // The parent's row first, then the preview's: the order a project's delete takes
    // them in, so the two never deadlock.
    let parent_state: Option<String> = sqlx::query_scalar(
        "select p.state from projects p join preview_databases v on v.project_id = p.id
         where v.id = $1 and p.deleted_at is null for share of p",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(owned) = lock(conn, id).await? else {
        return Ok(Err(Refusal::Preview(PreviewState::Deleted)));
    };
    let state = owned.preview.state;
    if !matches!(state, PreviewState::Ready | PreviewState::Error) {
        return Ok(Err(Refusal::Preview(state)));
    }
    if parent_state.as_deref() != Some("ready") {
        let state = parent_state.unwrap_or_else(|| "deleted".into());
        return Ok(Err(Refusal::ParentNotReady(state)));
    }
    sqlx::query(
        "update preview_databases set state = 'provisioning', last_error = null, updated_at = now()
         where id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    let job = queue_job(conn, id, job_type::PREVIEW_RESET, max_attempts).await?;
    Ok(Ok((fetch(conn, id).await?, job)))
}

/// Marks preview `id` `deleting` and queues its `project.preview_delete`. Asked again
/// while that delete is in flight, answers it. `None`: no such live preview.
pub async fn request_delete(
    conn: &mut PgConnection,
    id: Uuid,
    max_attempts: i32,
) -> sqlx::Result<Option<(PreviewDatabase, Job)>> {
    let Some(owned) = lock(conn, id).await? else {
        return Ok(None);
    };
    let project_id = owned.preview.project_id;
    if let Some(job) = delete_in_flight(conn, id, project_id).await? {
        return Ok(Some((owned.preview, job)));
    }
    let job = mark_deleting(conn, id, max_attempts).await?;
    Ok(Some((fetch(conn, id).await?, job)))
}

/// The preview's delete job in flight, if any: among its parent's live jobs (the
/// partial index of live jobs by resource finds them, however long the history).
async fn delete_in_flight(
    conn: &mut PgConnection,
    id: Uuid,
    project_id: Uuid,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs
         where locked_resource = $3 and state in ('pending', 'claimed')
           and preview_database_id = $1 and type = $2
         order by seq desc limit 1"
    ))
    .bind(id)
    .bind(job_type::PREVIEW_DELETE)
    .bind(format!("project:{project_id}"))
    .fetch_optional(conn)
    .await
}

/// The one transition to `deleting`: every way a preview goes (a request, its
/// parent's delete, its expiry) passes here, under the preview's row lock.
async fn mark_deleting(conn: &mut PgConnection, id: Uuid, max_attempts: i32) -> sqlx::Result<Job> {
    sqlx::query(
        "update preview_databases set state = 'deleting', last_error = null, updated_at = now()
         where id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    queue_job(conn, id, job_type::PREVIEW_DELETE, max_attempts).await
}

/// Queues the deletes of project `project_id`'s previews, in the transaction that
/// deletes the project and before its `project.delete` (the same resource runs them
/// first). A preview whose delete is queued or running keeps that one; one whose delete
/// failed gets another (else its database would outlive its project). Answers how many
/// it queued.
pub async fn delete_all_of_project(
    conn: &mut PgConnection,
    project_id: Uuid,
    max_attempts: i32,
) -> sqlx::Result<usize> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "select id from preview_databases
         where project_id = $1 and deleted_at is null
         order by created_at for update",
    )
    .bind(project_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut queued = 0;
    for id in &ids {
        if delete_in_flight(conn, *id, project_id).await?.is_none() {
            mark_deleting(conn, *id, max_attempts).await?;
            queued += 1;
        }
    }
    Ok(queued)
}

/// Marks up to `limit` previews past their TTL `deleting` and queues their deletes.
/// Rows another sweep holds are skipped: each expired preview is deleted once, however
/// many workers sweep. Answers how many.
pub async fn expire(conn: &mut PgConnection, max_attempts: i32, limit: i64) -> sqlx::Result<usize> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "select id from preview_databases
         where state in ('provisioning', 'ready', 'error') and ttl_expires_at <= now()
         order by ttl_expires_at limit $1 for update skip locked",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    for id in &ids {
        mark_deleting(conn, *id, max_attempts).await?;
    }
    Ok(ids.len())
}

/// Applies a preview job's current state to its preview.
pub async fn apply(conn: &mut PgConnection, job: &Job) -> sqlx::Result<()> {
    let Some(id) = job.preview_database_id else {
        return Ok(());
    };
    let sql = match job.job_type.as_str() {
        // completed → ready; failed or cancelled → error; pending or claimed (a retry is
        // on its way) → provisioning, with the last error still shown. A preview being
        // deleted is left alone.
        job_type::PREVIEW_CREATE | job_type::PREVIEW_RESET => {
            "update preview_databases set
                 state = case $2 when 'completed' then 'ready'
                                 when 'failed' then 'error'
                                 when 'cancelled' then 'error'
                                 else 'provisioning' end,
                 last_error = case $2 when 'completed' then null
                                      when 'cancelled' then 'provisioning was cancelled'
                                      else $3 end,
                 updated_at = now()
             where id = $1 and state in ('provisioning', 'ready', 'error')"
        }
        // completed → deleted; failed or cancelled → still deleting, with the reason
        // (DELETE again, or a retry of the job, finishes it).
        job_type::PREVIEW_DELETE => {
            "update preview_databases set
                 state = case $2 when 'completed' then 'deleted' else 'deleting' end,
                 deleted_at = case $2 when 'completed' then now() end,
                 last_error = case $2 when 'completed' then null
                                      when 'failed' then 'deletion failed: ' || $3
                                      when 'cancelled' then 'deletion was cancelled'
                                      else last_error end,
                 updated_at = now()
             where id = $1 and state = 'deleting'"
        }
        _ => return Ok(()),
    };
    sqlx::query(sql)
        .bind(id)
        .bind(job.state)
        .bind(&job.error)
        .execute(conn)
        .await?;
    Ok(())
}
