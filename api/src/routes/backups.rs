//! Backups: `pg_dump -Fc` archives of a project kept in the backup store, each checked
//! by a test restore (`project.backup_verify`); made on request or daily by the
//! project's schedule, deleted on request or past their retention. The API records
//! and queues; workers dump, verify and delete.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::backups::{self, NewBackup, OwnedBackup, Refusal, Schedule, ScheduledBackup};
use capy_shared::model::{Backup, BackupKind, BackupState, Job, Project};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::projects::{lock_visible_project, require_postgresql, visible_project};
use crate::auth::{Principal, SCOPE_READ, SCOPE_WRITE};
use crate::bodies::ErrorResponses;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::idempotency::Idempotent;
use crate::pagination::{self, Listing, NoFilter, PageParams};
use crate::AppState;

/// The longest label, in characters.
pub const LABEL_MAX_CHARS: usize = 100;
pub const CRON_HOURS: std::ops::RangeInclusive<i64> = 0..=23;
pub const CRON_MINUTES: std::ops::RangeInclusive<i64> = 0..=59;
pub const RETENTION_DAYS: std::ops::RangeInclusive<i64> = 1..=3650;
const DEFAULT_RETENTION_DAYS: i32 = 7;

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackup {
    /// What this backup is for, shown with it: at most 100 characters, no control
    /// characters.
    #[schema(max_length = 100)]
    label: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupAndJob {
    pub backup: Backup,
    pub job: Job,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupBody {
    pub backup: Backup,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupList {
    pub backups: Vec<Backup>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// A label as given: trimmed, empty is none; too long or with control characters, 422.
pub(crate) fn label(value: Option<String>) -> ApiResult<Option<String>> {
    let Some(label) = value
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
    else {
        return Ok(None);
    };
    if label.chars().count() > LABEL_MAX_CHARS || label.chars().any(char::is_control) {
        return Err(ApiError::Unprocessable(format!(
            "label must be at most {LABEL_MAX_CHARS} characters, without control characters"
        )));
    }
    Ok(Some(label))
}

/// Records a backup or export of project `id` and queues its `project.backup` job.
pub(crate) async fn create_kind(
    state: &AppState,
    principal: &Principal,
    id: Uuid,
    kind: BackupKind,
    label: Option<String>,
) -> ApiResult<(sqlx::Transaction<'static, sqlx::Postgres>, Backup, Job)> {
    principal.require_scope(SCOPE_WRITE)?;
    let label = self::label(label)?;
    let mut tx = state.pool.begin().await?;
    let project = lock_visible_project(&mut tx, principal, id).await?;
    require_postgresql(&project, "backups and exports")?;
    state.require_backup_store()?;
    let new = NewBackup {
        project_id: id,
        kind,
        label,
        schedule_name: None,
        retention_days: None,
        max_attempts: state.settings.job_max_attempts,
    };
    let Some((backup, job)) = backups::queue_backup(&mut tx, &new).await? else {
        return Err(not_ready(&project));
    };
    Ok((tx, backup, job))
}

fn not_ready(project: &Project) -> ApiError {
    ApiError::Conflict(format!(
        "the project is not ready (state: {}); only a ready project can be backed up",
        project.state
    ))
}

/// A page of project `id`'s backups or exports, newest first.
pub(crate) async fn list_kind(
    state: &AppState,
    principal: &Principal,
    id: Uuid,
    kind: BackupKind,
    page: &PageParams,
) -> ApiResult<(Vec<Backup>, Option<String>)> {
    principal.require_scope(SCOPE_READ)?;
    let limit = page.limit()?;
    let after = page.after::<Uuid>()?;
    visible_project(state, principal, id).await?;
    let mut conn = state.pool.acquire().await?;
    let rows = backups::list(&mut conn, id, kind, after, limit + 1).await?;
    Ok(pagination::page(rows, limit, |b| b.id))
}

/// Backup (or export) `id`, if the caller may see its project; 404 otherwise.
pub(crate) async fn visible_backup(
    state: &AppState,
    principal: &Principal,
    id: Uuid,
    kind: BackupKind,
) -> ApiResult<OwnedBackup> {
    let mut conn = state.pool.acquire().await?;
    backups::find(&mut conn, id, kind)
        .await?
        .filter(|o| principal.can_see(Some(o.organization_id), Some(o.backup.project_id)))
        .ok_or(ApiError::NotFound(kind.as_str()))
}

/// Backs up the project: a `project.backup` job dumps it into the backup store, then a
/// `project.backup_verify` job restores the archive into a throwaway database and
/// compares its tables and row counts. Needs a configured backup store (409 without).
#[utoipa::path(post, path = "/v1/projects/{id}/backups", tag = "backups",
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = CreateBackup,
    responses((status = 202, body = BackupAndJob), ErrorResponses))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<CreateBackup>,
) -> ApiResult<(StatusCode, Json<BackupAndJob>)> {
    let (tx, backup, job) =
        create_kind(&state, &principal, id, BackupKind::Backup, body.label).await?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::ACCEPTED,
            BackupAndJob { backup, job },
        )
        .await
}

/// The project's backups (not deleted ones), newest first.
#[utoipa::path(get, path = "/v1/projects/{id}/backups", tag = "backups",
    params(("id" = Uuid, Path, description = "Project id"), PageParams),
    responses((status = 200, body = BackupList), ErrorResponses))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    Listing(NoFilter {}, page): Listing<NoFilter>,
) -> ApiResult<Json<BackupList>> {
    let (backups, next_cursor) =
        list_kind(&state, &principal, id, BackupKind::Backup, &page).await?;
    Ok(Json(BackupList {
        backups,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/backups/{id}", tag = "backups",
    params(("id" = Uuid, Path, description = "Backup id")),
    responses((status = 200, body = BackupBody), ErrorResponses))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<BackupBody>> {
    principal.require_scope(SCOPE_READ)?;
    let owned = visible_backup(&state, &principal, id, BackupKind::Backup).await?;
    Ok(Json(BackupBody {
        backup: owned.backup,
    }))
}

/// Deletes the backup: it is marked `deleting` and a `backup.delete` job removes the
/// archive from the store (then it is `deleted`). Asked again, answers the same
/// backup and job. A backup still being made cannot be deleted yet (409).
#[utoipa::path(delete, path = "/v1/backups/{id}", tag = "backups",
    params(("id" = Uuid, Path, description = "Backup id")),
    responses((status = 202, body = BackupAndJob), ErrorResponses))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<BackupAndJob>)> {
    principal.require_scope(SCOPE_WRITE)?;
    visible_backup(&state, &principal, id, BackupKind::Backup).await?;
    let mut tx = state.pool.begin().await?;
    let attempts = state.settings.job_max_attempts;
    let (backup, job) = refused(backups::request_delete(&mut tx, id, attempts).await?, |s| {
        format!("the backup is {s}: it can be deleted once its job has finished")
    })?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(BackupAndJob { backup, job })))
}

/// A change's refusal as the API answers it.
fn refused<T>(result: Result<T, Refusal>, message: impl Fn(&str) -> String) -> ApiResult<T> {
    result.map_err(|refusal| match refusal {
        Refusal::NotFound => ApiError::NotFound("backup"),
        Refusal::State(state) => ApiError::Conflict(message(state)),
    })
}

/// Verifies the backup again: a `project.backup_verify` job restores it into a
/// throwaway database and compares its tables and row counts with what the backup
/// recorded. One already queued or running is answered instead of a second.
#[utoipa::path(post, path = "/v1/backups/{id}/verify", tag = "backups",
    params(("id" = Uuid, Path, description = "Backup id")),
    responses((status = 202, body = BackupAndJob), ErrorResponses))]
pub async fn verify(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<BackupAndJob>)> {
    principal.require_scope(SCOPE_WRITE)?;
    visible_backup(&state, &principal, id, BackupKind::Backup).await?;
    let mut tx = state.pool.begin().await?;
    let attempts = state.settings.job_max_attempts;
    let (backup, job) = refused(backups::request_verify(&mut tx, id, attempts).await?, |s| {
        format!("the backup is {s}: only a completed backup can be verified")
    })?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::ACCEPTED,
            BackupAndJob { backup, job },
        )
        .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSchedule {
    /// The UTC hour of the daily backup.
    #[serde(deserialize_with = "crate::bodies::whole")]
    #[schema(value_type = i32, minimum = 0, maximum = 23)]
    cron_hour: Option<i64>,
    /// The minute of that hour.
    #[serde(deserialize_with = "crate::bodies::whole")]
    #[schema(value_type = i32, minimum = 0, maximum = 59)]
    cron_minute: Option<i64>,
    /// False keeps the schedule without running it.
    #[serde(default = "yes")]
    #[schema(default = true)]
    is_active: bool,
    /// The label of the backups it makes.
    #[schema(max_length = 100)]
    label: Option<String>,
    /// Days each backup is kept once made.
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(value_type = Option<i32>, minimum = 1, maximum = 3650, default = 7)]
    retention_days: Option<i64>,
}

fn yes() -> bool {
    true
}

/// `value` of `field` within `range`, else a 422 naming the field.
fn in_range(
    field: &str,
    value: Option<i64>,
    range: std::ops::RangeInclusive<i64>,
) -> ApiResult<i32> {
    value
        .filter(|v| range.contains(v))
        .and_then(|v| i32::try_from(v).ok())
        .ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "{field} must be a whole number from {} to {}",
                range.start(),
                range.end()
            ))
        })
}

impl PutSchedule {
    fn schedule(self) -> ApiResult<Schedule> {
        let hour = in_range("cron_hour", self.cron_hour, CRON_HOURS)?;
        let minute = in_range("cron_minute", self.cron_minute, CRON_MINUTES)?;
        let retention_days = match self.retention_days {
            None => DEFAULT_RETENTION_DAYS,
            days => in_range("retention_days", days, RETENTION_DAYS)?,
        };
        Ok(Schedule {
            minute_of_day: hour * 60 + minute,
            is_active: self.is_active,
            label: label(self.label)?,
            retention_days,
        })
    }
}

/// Sets the project's daily backup (UTC), replacing the one it had. Its backups are
/// kept `retention_days`; `is_active: false` keeps the schedule without running it.
#[utoipa::path(put, path = "/v1/projects/{id}/scheduled-backups/default", tag = "backups",
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = PutSchedule,
    responses((status = 200, body = ScheduledBackup), ErrorResponses))]
pub async fn put_schedule(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<PutSchedule>,
) -> ApiResult<Json<ScheduledBackup>> {
    principal.require_scope(SCOPE_WRITE)?;
    let schedule = body.schedule()?;
    let mut tx = state.pool.begin().await?;
    // The schedule's row before the project's, in the order a firing worker takes
    // them: the other order can deadlock with it.
    backups::lock_schedule(&mut tx, id).await?;
    let project = lock_visible_project(&mut tx, &principal, id).await?;
    require_postgresql(&project, "scheduled backups")?;
    if project.state == "deleting" || project.organization_id.is_none() {
        return Err(not_ready(&project));
    }
    let scheduled = backups::put_schedule(&mut tx, id, &schedule).await?;
    tx.commit().await?;
    Ok(Json(scheduled))
}

#[utoipa::path(get, path = "/v1/projects/{id}/scheduled-backups/default", tag = "backups",
    params(("id" = Uuid, Path, description = "Project id")),
    responses((status = 200, body = ScheduledBackup), ErrorResponses))]
pub async fn get_schedule(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ScheduledBackup>> {
    principal.require_scope(SCOPE_READ)?;
    visible_project(&state, &principal, id).await?;
    let mut conn = state.pool.acquire().await?;
    backups::get_schedule(&mut conn, id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("scheduled backup"))
}

/// Whether a backup's archive is there to read (completed, not being deleted).
pub(crate) fn is_readable(backup: &Backup) -> bool {
    backup.state == BackupState::Completed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_trimmed_and_bounded() {
        assert_eq!(label(None).unwrap(), None);
        assert_eq!(label(Some("  ".into())).unwrap(), None);
        assert_eq!(label(Some(" nightly ".into())).unwrap().unwrap(), "nightly");
        assert!(label(Some("é".repeat(100))).is_ok());
        assert!(matches!(
            label(Some("é".repeat(101))),
            Err(ApiError::Unprocessable(_))
        ));
        assert!(label(Some("a\u{0}b".into())).is_err());
    }

    #[test]
    fn schedule_fields_are_checked_by_name() {
        let body = |hour, minute, days| PutSchedule {
            cron_hour: Some(hour),
            cron_minute: Some(minute),
            is_active: true,
            label: None,
            retention_days: days,
        };
        let schedule = body(23, 59, None).schedule().unwrap();
        assert_eq!((schedule.minute_of_day, schedule.retention_days), (1439, 7));
        let message = |b: PutSchedule| b.schedule().unwrap_err().to_string();
        assert!(message(body(24, 0, None)).contains("cron_hour"));
        assert!(message(body(-1, 0, None)).contains("cron_hour"));
        assert!(message(body(0, 60, None)).contains("cron_minute"));
        assert!(message(body(0, 0, Some(0))).contains("retention_days"));
        assert!(message(body(0, 0, Some(3651))).contains("retention_days"));
    }
}
