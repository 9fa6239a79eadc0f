//! Restores of backups, into a new project or over the project itself, and the
//! single-use approvals an overwrite needs. One transaction per request: anything
//! refused (4xx) queues nothing.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::model::{job_type, Engine, Job, Project};
use capy_shared::restores::{self, ApprovalAction, Consumed, RestoreSource};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use super::projects::{
    check_extension_name, create_project, fetch_project, lock_visible_project, queue_project_job,
    require_postgresql, validate_name, ProjectSpec,
};
use crate::auth::{Principal, SCOPE_WRITE};
use crate::bodies::{ErrorResponses, JobAndProject};
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Path};
use crate::idempotency::Idempotent;
use crate::AppState;

const PRODUCTION_REFUSED: &str =
    "overwriting a production project is refused: restore into a new project";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApproval {
    /// What the approval authorizes; `project.restore_overwrite` is the only action.
    #[schema(example = "project.restore_overwrite")]
    action: String,
}

/// A single-use approval. The token is shown here only; it works for 10 minutes.
#[derive(Debug, Serialize, ToSchema)]
pub struct Approval {
    pub id: Uuid,
    pub action: String,
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// Asks for an approval of a dangerous action on the project (overwriting it with a
/// restore). Refused for a production project.
#[utoipa::path(post, path = "/v1/projects/{id}/approvals", tag = "restores",
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = CreateApproval,
    responses((status = 201, body = Approval), ErrorResponses))]
pub async fn create_approval(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<CreateApproval>,
) -> ApiResult<(StatusCode, Json<Approval>)> {
    principal.require_scope(SCOPE_WRITE)?;
    // The action is not echoed: it is the caller's text.
    let action = ApprovalAction::parse(&body.action).ok_or_else(|| {
        ApiError::Unprocessable(
            "unknown action: approvals are for project.restore_overwrite only".into(),
        )
    })?;
    let mut tx = state.pool.begin().await?;
    let project = lock_visible_project(&mut tx, &principal, id).await?;
    require_postgresql(&project, "restores")?;
    let organization_id = project
        .organization_id
        .ok_or(ApiError::NotFound("project"))?;
    if project.environment == "production" {
        return Err(ApiError::Forbidden(PRODUCTION_REFUSED));
    }
    if project.state == "deleting" {
        return Err(ApiError::Conflict("the project is being deleted".into()));
    }
    let approval = restores::create_approval(&mut tx, organization_id, id, action).await?;
    let answer = Approval {
        id: approval.id,
        action: approval.action.as_str().into(),
        token: approval.token,
        expires_at: approval.expires_at,
    };
    idempotent
        .commit(&state, tx, StatusCode::CREATED, answer)
        .await
}

/// Where a restore goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// A new project of the organization, made from the backup.
    NewProject,
    /// The project itself, overwritten (needs an approval token).
    Project,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRestore {
    /// A backup of the organization: completed, and not failed verification.
    backup_id: Uuid,
    target_kind: TargetKind,
    /// The new project's name (`new_project` only); `<source name>-restore-<short id>`
    /// when left out.
    #[schema(schema_with = crate::bodies::project_name_or_null)]
    name: Option<String>,
    /// From `POST /v1/projects/{id}/approvals` (`project` only; required there).
    #[schema(max_length = 256)]
    approval_token: Option<String>,
}

impl CreateRestore {
    fn check(&self) -> ApiResult<()> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        match self.target_kind {
            TargetKind::NewProject if self.approval_token.is_some() => {
                Err(ApiError::Unprocessable(
                    "approval_token is for target_kind project only: a new project needs none"
                        .into(),
                ))
            }
            TargetKind::Project if self.name.is_some() => Err(ApiError::Unprocessable(
                "name is for target_kind new_project only: the project keeps its name".into(),
            )),
            TargetKind::Project if self.approval_token.is_none() => Err(ApiError::Unprocessable(
                "overwriting the project needs an approval_token: \
                 POST /v1/projects/{id}/approvals {\"action\": \"project.restore_overwrite\"}"
                    .into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Restores a backup into a new project (its `project.create`, its extensions'
/// `project.extension_enable` and the `project.restore` queued in that order), or
/// over this project with an approval token. Answers the `project.restore` job and
/// the target project.
#[utoipa::path(post, path = "/v1/projects/{id}/restores", tag = "restores",
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = CreateRestore,
    responses((status = 202, body = JobAndProject), ErrorResponses))]
pub async fn create_restore(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<CreateRestore>,
) -> ApiResult<(StatusCode, Json<JobAndProject>)> {
    principal.require_scope(SCOPE_WRITE)?;
    body.check()?;
    state.require_backup_store()?;
    let mut tx = state.pool.begin().await?;
    let project = lock_visible_project(&mut tx, &principal, id).await?;
    require_postgresql(&project, "restores")?;
    let organization_id = project
        .organization_id
        .ok_or(ApiError::NotFound("project"))?;
    let backup = restores::find_backup(&mut tx, organization_id, body.backup_id)
        .await?
        .filter(|b| principal.can_see(Some(b.organization_id), Some(b.project_id)))
        .ok_or(ApiError::NotFound("backup"))?;
    if let Some(reason) = backup.refusal() {
        return Err(ApiError::Conflict(reason));
    }
    let (job, target) = match body.target_kind {
        TargetKind::Project => {
            // `check` made sure there is one.
            let token = body.approval_token.unwrap_or_default();
            overwrite(&mut tx, &state, &project, &backup, &token).await?
        }
        TargetKind::NewProject => {
            if principal.project_id.is_some() {
                return Err(ApiError::Forbidden(
                    "a project-scoped API key cannot create projects, so cannot restore into one",
                ));
            }
            let new = NewTarget {
                organization_id,
                name: body.name,
            };
            into_new_project(&mut tx, &state, &backup, new).await?
        }
    };
    let project = fetch_project(&mut tx, target)
        .await?
        .ok_or(ApiError::NotFound("project"))?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::ACCEPTED,
            JobAndProject { job, project },
        )
        .await
}

fn restore_args(backup: &RestoreSource, mode: TargetKind) -> serde_json::Value {
    let mode = match mode {
        TargetKind::NewProject => "new_project",
        TargetKind::Project => "project",
    };
    json!({ "backup_id": backup.id, "backup_key": backup.backup_key, "mode": mode })
}

/// Queues the `project.restore` over `project` and consumes the approval `token` for
/// it, in the caller's transaction (undone whole when the token does not hold).
async fn overwrite(
    tx: &mut PgConnection,
    state: &AppState,
    project: &Project,
    backup: &RestoreSource,
    token: &str,
) -> ApiResult<(Job, Uuid)> {
    if backup.project_id != project.id {
        return Err(ApiError::Unprocessable(format!(
            "backup {} is another project's: restore it into a new project instead \
             (target_kind new_project)",
            backup.id
        )));
    }
    if project.environment == "production" {
        return Err(ApiError::Forbidden(PRODUCTION_REFUSED));
    }
    if project.state != "ready" {
        return Err(ApiError::Conflict(format!(
            "the project is not ready (state: {}): only a ready project can be overwritten",
            project.state
        )));
    }
    let args = restore_args(backup, TargetKind::Project);
    let job = queue_project_job(tx, state, project.id, job_type::PROJECT_RESTORE, args).await?;
    let action = ApprovalAction::RestoreOverwrite;
    match restores::consume_approval(tx, project.id, action, token, job.id).await? {
        Consumed::Done => Ok((job, project.id)),
        Consumed::Unknown => Err(ApiError::Forbidden(
            "the approval token is not one of this project's restore_overwrite approvals",
        )),
        Consumed::Expired => Err(ApiError::Forbidden(
            "the approval token has expired: ask for a new approval",
        )),
        Consumed::Used(used_by) => Err(ApiError::Conflict(match used_by {
            Some(job) => format!("the approval token was already used: it authorized job {job}"),
            None => "the approval token was already used".into(),
        })),
    }
}

/// The new project a restore makes.
struct NewTarget {
    organization_id: Uuid,
    name: Option<String>,
}

/// Makes a new project from the backup, as `POST /v1/projects` makes one, on the
/// cluster and with the settings of the project the backup was taken of; queues its
/// extensions and the restore behind its `project.create`.
async fn into_new_project(
    tx: &mut PgConnection,
    state: &AppState,
    backup: &RestoreSource,
    new: NewTarget,
) -> ApiResult<(Job, Uuid)> {
    let source = restores::source_project(tx, backup.project_id)
        .await?
        .ok_or(ApiError::NotFound("backup"))?;
    let id = Uuid::now_v7();
    let spec = ProjectSpec {
        id,
        engine: Engine::Postgresql,
        plan: None,
        name: new.name.unwrap_or_else(|| default_name(&source.name, id)),
        region: None,
        cluster_id: Some(source.cluster_id),
        environment: Some(source.environment),
        max_connections: Some(source.max_connections),
        statement_timeout: Some(source.statement_timeout),
        idle_transaction_timeout: Some(source.idle_transaction_timeout),
        storage_limit_bytes: source.storage_limit_bytes,
    };
    create_project(tx, state, new.organization_id, &spec).await?;
    for (name, version) in backup.extensions() {
        // plpgsql is in every database; a name or version not of the catalog's shape
        // (the manifest is the tenant database's account) is not asked for.
        if name == "plpgsql" || check_extension_name(&name).is_err() {
            continue;
        }
        let version = version.filter(|v| valid_version(v));
        let args = json!({ "name": name, "version": version });
        queue_project_job(tx, state, id, job_type::PROJECT_EXTENSION_ENABLE, args).await?;
    }
    let args = restore_args(backup, TargetKind::NewProject);
    let job = queue_project_job(tx, state, id, job_type::PROJECT_RESTORE, args).await?;
    Ok((job, id))
}

/// As `POST /v1/projects/{id}/extensions` takes a version.
fn valid_version(version: &str) -> bool {
    (1..=64).contains(&version.len())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `<source name>-restore-<8 hex of the new id's random part>`, the source name cut so
/// the whole stays within 63 characters (names are ASCII).
fn default_name(source: &str, id: Uuid) -> String {
    let simple = id.simple().to_string();
    let short = &simple[simple.len() - 8..];
    let keep = source.len().min(63 - "-restore-".len() - short.len());
    format!("{}-restore-{short}", &source[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_valid_project_names() {
        let id = Uuid::now_v7();
        for source in ["a", "shop", &"n".repeat(63)] {
            let name = default_name(source, id);
            assert!(validate_name(&name).is_ok(), "{name}");
            assert!(name.contains("-restore-"), "{name}");
        }
    }
}
