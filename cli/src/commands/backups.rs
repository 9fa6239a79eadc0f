//! `capy backups …`: back up a project (each backup is verified by a test restore),
//! list, show, delete and verify backups, and the project's daily schedule.

use clap::Subcommand;
use serde_json::{json, Value};

use super::jobs::print_job_summary;
use super::{set, Ctx, WaitFlag};
use crate::client::segment;
use crate::output::{self, field, Table};
use crate::wait;

pub const BACKUP_KEYS: &[&str] = &[
    "id",
    "project_id",
    "kind",
    "state",
    "label",
    "database_name",
    "size_bytes",
    "sha256",
    "verification_state",
    "verification_error",
    "verified_at",
    "schedule_name",
    "retention_days",
    "expires_at",
    "job_id",
    "error",
    "created_at",
    "completed_at",
];

const SCHEDULE_KEYS: &[&str] = &[
    "project_id",
    "name",
    "cron_hour",
    "cron_minute",
    "is_active",
    "label",
    "retention_days",
    "next_run_at",
    "last_run_at",
    "last_job_id",
];

#[derive(Debug, Subcommand)]
pub enum BackupsCommand {
    /// Backs up a project (a project.backup job dumps it into the backup store, then a
    /// project.backup_verify job checks it by a test restore).
    Create {
        /// The project's id.
        project: String,
        /// What this backup is for (at most 100 characters).
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// A project's backups, newest first.
    List { project: String },
    /// One backup.
    Show { id: String },
    /// Deletes a backup (a backup.delete job removes its archive).
    Delete {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Verifies a backup again by a test restore.
    Verify {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Sets a project's daily backup (UTC), replacing the one it had.
    Schedule {
        project: String,
        /// The UTC hour (0–23).
        #[arg(long)]
        hour: i64,
        /// The minute (0–59).
        #[arg(long, default_value_t = 0)]
        minute: i64,
        /// Days each backup is kept (1–3650; 7 when left out).
        #[arg(long)]
        retention_days: Option<i64>,
        #[arg(long)]
        label: Option<String>,
        /// Keep the schedule without running it.
        #[arg(long)]
        inactive: bool,
    },
    /// A project's daily backup schedule.
    ShowSchedule { project: String },
}

impl BackupsCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::Create {
                project,
                label,
                wait,
            } => {
                let mut body = json!({});
                set(&mut body, "label", label.map(Value::from));
                let path = format!("/v1/projects/{}/backups", segment(&project)?);
                let answer = ctx.client.post(&path, Some(&body)).await?;
                made_answer(ctx, answer, "backup", wait.wait).await
            }
            Self::List { project } => {
                let path = format!("/v1/projects/{}/backups", segment(&project)?);
                let list = ctx.client.get_all(&path, &[], "backups").await?;
                print_list(ctx, &list, "backups")
            }
            Self::Show { id } => {
                let path = format!("/v1/backups/{}", segment(&id)?);
                let answer = ctx.client.get(&path, &[]).await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["backup"], BACKUP_KEYS)
            }
            Self::Delete { id, wait } => {
                let path = format!("/v1/backups/{}", segment(&id)?);
                let answer = ctx.client.delete(&path).await?;
                made_answer(ctx, answer, "backup", wait.wait).await
            }
            Self::Verify { id, wait } => {
                let path = format!("/v1/backups/{}/verify", segment(&id)?);
                let answer = ctx.client.post(&path, None).await?;
                made_answer(ctx, answer, "backup", wait.wait).await
            }
            Self::Schedule {
                project,
                hour,
                minute,
                retention_days,
                label,
                inactive,
            } => {
                let mut body =
                    json!({ "cron_hour": hour, "cron_minute": minute, "is_active": !inactive });
                set(&mut body, "retention_days", retention_days.map(Value::from));
                set(&mut body, "label", label.map(Value::from));
                let path = schedule_path(&project)?;
                let answer = ctx.client.put(&path, &body).await?;
                print_schedule(ctx, &answer)
            }
            Self::ShowSchedule { project } => {
                let answer = ctx.client.get(&schedule_path(&project)?, &[]).await?;
                print_schedule(ctx, &answer)
            }
        }
    }
}

fn schedule_path(project: &str) -> anyhow::Result<String> {
    Ok(format!(
        "/v1/projects/{}/scheduled-backups/default",
        segment(project)?
    ))
}

fn print_schedule(ctx: &Ctx, answer: &Value) -> anyhow::Result<()> {
    if ctx.json() {
        return output::json(answer);
    }
    output::show(answer, SCHEDULE_KEYS)
}

/// Prints a list of backups or exports (`field`) as a table.
pub fn print_list(ctx: &Ctx, list: &Value, field_name: &str) -> anyhow::Result<()> {
    if ctx.json() {
        return output::json(list);
    }
    let mut table = Table::new(&[
        "ID", "STATE", "VERIFIED", "SIZE", "LABEL", "CREATED", "EXPIRES",
    ]);
    for b in list[field_name].as_array().into_iter().flatten() {
        table.row(
            [
                "id",
                "state",
                "verification_state",
                "size_bytes",
                "label",
                "created_at",
                "expires_at",
            ]
            .map(|k| field(b, k))
            .to_vec(),
        );
    }
    table.print()
}

/// `{<what>, job}` answers: printed at once, or after waiting for the job with the
/// backup (or export) read again.
pub async fn made_answer(ctx: &Ctx, answer: Value, what: &str, wait: bool) -> anyhow::Result<()> {
    if !wait {
        if ctx.json() {
            return output::json(&answer);
        }
        output::show(&answer[what], BACKUP_KEYS)?;
        return print_job_summary(&answer["job"]);
    }
    let id = field(&answer[what], "id");
    let job = wait::wait_for_job(&ctx.client, answer["job"].clone()).await?;
    let path = format!("/v1/{what}s/{}", segment(&id)?);
    let made = ctx
        .client
        .get(&path, &[])
        .await
        .map(|mut body| body[what].take())
        .unwrap_or_else(|_| answer[what].clone());
    if ctx.json() {
        output::json(&json!({ what: made, "job": job }))?;
    } else if wait::completed(&job) {
        output::show(&made, BACKUP_KEYS)?;
    }
    super::finished(ctx, &job).await
}
