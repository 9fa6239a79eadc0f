//! The subcommands, one module per resource.

mod backups;
mod clusters;
mod exports;
mod extensions;
mod jobs;
mod keys;
mod orgs;
mod previews;
mod projects;
mod restores;

use clap::Subcommand;
use serde_json::Value;

use crate::client::Client;
use crate::config::KeyKind;
use crate::output::{self, OutputFormat};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Projects: databases on a cluster.
    #[command(subcommand)]
    Projects(projects::ProjectsCommand),
    /// Preview databases: short-lived copies of a project's database (clone or empty)
    /// with a login of their own, deleted when their TTL passes.
    #[command(subcommand)]
    Previews(previews::PreviewsCommand),
    /// A project's PostgreSQL extensions.
    #[command(subcommand)]
    Extensions(extensions::ExtensionsCommand),
    /// A project's backups (verified by a test restore) and its daily schedule.
    #[command(subcommand)]
    Backups(backups::BackupsCommand),
    /// Exports: a project's database as an archive to download.
    #[command(subcommand)]
    Exports(exports::ExportsCommand),
    /// Restores of backups: into a new project, or over the project with an approval.
    #[command(subcommand)]
    Restores(restores::RestoresCommand),
    /// Single-use approvals of dangerous actions (overwriting a project with a restore).
    #[command(subcommand)]
    Approvals(restores::ApprovalsCommand),
    /// Jobs: the work queued for workers, and what each attempt printed.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Target PostgreSQL clusters (platform admin).
    #[command(subcommand)]
    Clusters(clusters::ClustersCommand),
    /// API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Organizations.
    #[command(subcommand)]
    Orgs(orgs::OrgsCommand),
    /// The calling key: organization, project, scopes.
    Me,
}

/// What every command runs with.
pub struct Ctx {
    pub client: Client,
    pub output: OutputFormat,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }
}

impl Command {
    /// Clusters and creating organizations need a platform admin key.
    pub fn key_kind(&self) -> KeyKind {
        match self {
            Self::Clusters(_) | Self::Orgs(orgs::OrgsCommand::Create { .. }) => KeyKind::Admin,
            _ => KeyKind::Organization,
        }
    }

    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::Projects(command) => command.run(ctx).await,
            Self::Previews(command) => command.run(ctx).await,
            Self::Extensions(command) => command.run(ctx).await,
            Self::Backups(command) => command.run(ctx).await,
            Self::Exports(command) => command.run(ctx).await,
            Self::Restores(command) => command.run(ctx).await,
            Self::Approvals(command) => command.run(ctx).await,
            Self::Jobs(command) => command.run(ctx).await,
            Self::Clusters(command) => command.run(ctx).await,
            Self::Keys(command) => command.run(ctx).await,
            Self::Orgs(command) => command.run(ctx).await,
            Self::Me => me(ctx).await,
        }
    }
}

async fn me(ctx: &Ctx) -> anyhow::Result<()> {
    let me = ctx.client.get("/v1/me", &[]).await?;
    if ctx.json() {
        return output::json(&me);
    }
    output::show(
        &me,
        &["key_id", "organization_id", "project_id", "scopes", "admin"],
    )?;
    output::out(&output::key_values(&[(
        "api".to_string(),
        ctx.client.base_url().to_string(),
    )]))
}

/// Sets `key` of a JSON body when the value is given.
pub fn set(body: &mut Value, key: &str, value: Option<Value>) {
    if let (Some(value), Some(object)) = (value, body.as_object_mut()) {
        object.insert(key.to_string(), value);
    }
}

/// Prints the stderr hint that a list has more pages.
pub fn more_hint(page: &Value, flag: &str) {
    if let Some(cursor) = page.get("next_cursor").and_then(Value::as_str) {
        eprintln!("(more: {flag}, or --cursor {cursor})");
    }
}

/// `--wait` on commands that queue a job.
#[derive(Debug, clap::Args)]
pub struct WaitFlag {
    /// Wait until the job has completed (exit 0), or failed or was cancelled (exit 1).
    #[arg(long, env = "CAPY_WAIT")]
    pub wait: bool,
}

/// `{job}` answers (delete, retry-provisioning, extensions): printed at once, or after
/// waiting for the job.
pub async fn job_answer(ctx: &Ctx, answer: Value, wait: bool) -> anyhow::Result<()> {
    if !wait {
        if ctx.json() {
            return output::json(&answer);
        }
        return jobs::print_job_summary(&answer["job"]);
    }
    let job = crate::wait::wait_for_job(&ctx.client, answer["job"].clone()).await?;
    if ctx.json() {
        output::json(&serde_json::json!({ "job": job }))?;
    } else if crate::wait::completed(&job) {
        jobs::print_job_summary(&job)?;
    }
    finished(ctx, &job).await
}

/// Ok for a completed job; otherwise prints why it did not complete and answers the
/// error that makes the command exit 1.
pub async fn finished(ctx: &Ctx, job: &Value) -> anyhow::Result<()> {
    if crate::wait::completed(job) {
        Ok(())
    } else {
        Err(crate::wait::failure(&ctx.client, job).await)
    }
}
