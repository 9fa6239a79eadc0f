//! `capy restores create` (a backup into a new project, or over the project with an
//! approval) and `capy approvals create`.

use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::{set, Ctx, WaitFlag};
use crate::client::segment;
use crate::config::usage_error;
use crate::output;

/// The only action an approval authorizes today.
const RESTORE_OVERWRITE: &str = "project.restore_overwrite";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// A new project of the organization, made from the backup.
    NewProject,
    /// The project itself, overwritten (needs --approval or --approve).
    Project,
}

#[derive(Debug, Subcommand)]
pub enum RestoresCommand {
    /// Restores a backup of the project: into a new project (its create, extensions and
    /// restore are queued in order), or over the project itself with an approval.
    Create {
        project: String,
        /// The backup's id.
        #[arg(long, env = "CAPY_RESTORE_BACKUP")]
        backup: String,
        #[arg(long, value_enum, env = "CAPY_RESTORE_INTO")]
        into: Target,
        /// The new project's name (--into new-project); `<name>-restore-<id>` otherwise.
        #[arg(long, env = "CAPY_RESTORE_NAME")]
        name: Option<String>,
        /// An approval token from `capy approvals create` (--into project).
        #[arg(
            long,
            env = "CAPY_RESTORE_APPROVAL",
            hide_env_values = true,
            conflicts_with = "approve"
        )]
        approval: Option<String>,
        /// Asks for an approval first, then uses it (--into project).
        #[arg(long)]
        approve: bool,
        #[command(flatten)]
        wait: WaitFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Asks for a single-use approval (10 minutes) to overwrite the project with a
    /// restore; the token is shown once. Refused for production projects.
    Create { project: String },
}

async fn approve(ctx: &Ctx, project: &str) -> anyhow::Result<Value> {
    let body = json!({ "action": RESTORE_OVERWRITE });
    ctx.client
        .post(
            &format!("/v1/projects/{}/approvals", segment(project)?),
            Some(&body),
        )
        .await
}

impl ApprovalsCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let Self::Create { project } = self;
        let approval = approve(ctx, &project).await?;
        if ctx.json() {
            return output::json(&approval);
        }
        output::show(&approval, &["id", "action", "token", "expires_at"])?;
        eprintln!(
            "use it once, within 10 minutes: capy restores create {project} --backup <id> \
             --into project --approval <token>"
        );
        Ok(())
    }
}

impl RestoresCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let Self::Create {
            project,
            backup,
            into,
            name,
            approval,
            approve: ask,
            wait,
        } = self;
        let mut body = json!({ "backup_id": backup });
        match into {
            Target::NewProject => {
                if approval.is_some() || ask {
                    return Err(usage_error(
                        "--approval and --approve are for --into project: a new project needs none",
                    ));
                }
                set(&mut body, "target_kind", Some("new_project".into()));
                set(&mut body, "name", name.map(Value::from));
            }
            Target::Project => {
                if name.is_some() {
                    return Err(usage_error("--name is for --into new-project"));
                }
                let token = match (approval, ask) {
                    (Some(token), _) => token,
                    (None, true) => approve(ctx, &project)
                        .await?
                        .get("token")
                        .and_then(Value::as_str)
                        .map(String::from)
                        .ok_or_else(|| anyhow::anyhow!("the approval answer has no token"))?,
                    (None, false) => {
                        return Err(usage_error(
                            "--into project overwrites the project: pass --approval TOKEN \
                             (capy approvals create) or --approve",
                        ))
                    }
                };
                set(&mut body, "target_kind", Some("project".into()));
                set(&mut body, "approval_token", Some(token.into()));
            }
        }
        let answer = ctx
            .client
            .post(
                &format!("/v1/projects/{}/restores", segment(&project)?),
                Some(&body),
            )
            .await?;
        super::projects::create_answer(ctx, answer, wait.wait).await
    }
}
