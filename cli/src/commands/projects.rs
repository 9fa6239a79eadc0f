//! `capy projects …`: create, list, show, update, delete, retry provisioning, the
//! connection strings and credentials, and their rotation.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::jobs::print_job_summary;
use super::{set, Ctx, WaitFlag};
use crate::client::segment;
use crate::config::usage_error;
use crate::output::{self, field, Table};
use crate::wait;

const PROJECT_KEYS: &[&str] = &[
    "id",
    "name",
    "state",
    "region",
    "environment",
    "cluster_id",
    "database_name",
    "role_name",
    "public_host",
    "direct_port",
    "pooled_host",
    "pooled_port",
    "ssl_mode",
    "max_connections",
    "statement_timeout",
    "idle_transaction_timeout",
    "storage_limit_bytes",
    "last_error",
    "latest_job_id",
    "created_at",
    "updated_at",
];

#[derive(Debug, Subcommand)]
pub enum ProjectsCommand {
    /// Creates a project (a database and its role); answers with its job at once,
    /// or with --wait once the job has finished.
    Create {
        /// 1–63 letters, digits, '-' and '_'.
        name: String,
        /// Place it on a cluster of this region.
        #[arg(long, env = "CAPY_PROJECT_REGION")]
        region: Option<String>,
        /// Place it on this cluster.
        #[arg(long, env = "CAPY_PROJECT_CLUSTER_ID")]
        cluster_id: Option<String>,
        /// A label such as development or production.
        #[arg(long, env = "CAPY_PROJECT_ENVIRONMENT")]
        environment: Option<String>,
        /// postgresql (default), mysql or redis.
        #[arg(long, env = "CAPY_PROJECT_ENGINE")]
        engine: Option<String>,
        /// A plan of `GET /v1/plans`: the defaults of the settings left out.
        #[arg(long, env = "CAPY_PROJECT_PLAN")]
        plan: Option<String>,
        /// The storage limit in GiB.
        #[arg(
            long,
            env = "CAPY_PROJECT_STORAGE_GB",
            conflicts_with = "storage_limit_bytes"
        )]
        storage_gb: Option<i64>,
        #[command(flatten)]
        settings: Settings,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// The organization's projects.
    List,
    /// One project.
    Show { id: String },
    /// Renames a project or changes its settings (applied by a project.update job).
    Update {
        id: String,
        /// The new name.
        #[arg(long, env = "CAPY_PROJECT_NAME")]
        name: Option<String>,
        #[command(flatten)]
        settings: Settings,
        /// Removes the storage limit.
        #[arg(
            long,
            env = "CAPY_PROJECT_NO_STORAGE_LIMIT",
            conflicts_with = "storage_limit_bytes"
        )]
        no_storage_limit: bool,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Deletes a project: its database and role are dropped by a project.delete job.
    Delete {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Stops a ready project: a project.stop job refuses its logins and ends their
    /// sessions; its data stays.
    Stop {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Starts a stopped project again (a project.start job).
    Start {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Queues provisioning again for a project in `error` (or answers the job in flight).
    RetryProvisioning {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// The connection strings (with the password) of a ready project.
    Connections { id: String },
    /// The credentials of a ready project as fields (host, port, username, password,
    /// database, ssl_mode, connection strings), and the previous login during a grace.
    Credentials { id: String },
    /// Rotates a project's credentials: a project.rotate_credentials job makes a new
    /// login with a new password; the old one works for --grace-hours, then is dropped.
    RotateCredentials {
        id: String,
        /// Hours the old login keeps working (0–720).
        #[arg(long, env = "CAPY_GRACE_HOURS", default_value_t = 24)]
        grace_hours: i64,
        #[command(flatten)]
        wait: WaitFlag,
    },
}

/// The fields `capy projects credentials` prints.
const CREDENTIAL_KEYS: &[&str] = &[
    "engine",
    "host",
    "port",
    "username",
    "password",
    "database",
    "ssl_mode",
    "key_prefix",
    "connection_string",
    "pooled_connection_string",
    "previous_username",
    "previous_expires_at",
];

/// The settings a project is created or updated with.
#[derive(Debug, Args)]
pub struct Settings {
    /// The role's connection limit (1–1000).
    #[arg(long, env = "CAPY_PROJECT_MAX_CONNECTIONS")]
    max_connections: Option<i32>,
    /// A PostgreSQL duration such as 30s; 0 is no limit.
    #[arg(long, env = "CAPY_PROJECT_STATEMENT_TIMEOUT")]
    statement_timeout: Option<String>,
    /// A PostgreSQL duration such as 60s; 0 is no limit.
    #[arg(long, env = "CAPY_PROJECT_IDLE_TRANSACTION_TIMEOUT")]
    idle_transaction_timeout: Option<String>,
    /// The storage limit in bytes.
    #[arg(long, env = "CAPY_PROJECT_STORAGE_LIMIT_BYTES")]
    storage_limit_bytes: Option<i64>,
}

impl Settings {
    pub(super) fn apply(self, body: &mut Value) {
        set(
            body,
            "max_connections",
            self.max_connections.map(Value::from),
        );
        set(
            body,
            "statement_timeout",
            self.statement_timeout.map(Value::from),
        );
        set(
            body,
            "idle_transaction_timeout",
            self.idle_transaction_timeout.map(Value::from),
        );
        set(
            body,
            "storage_limit_bytes",
            self.storage_limit_bytes.map(Value::from),
        );
    }
}

impl ProjectsCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::Create {
                name,
                region,
                cluster_id,
                environment,
                engine,
                plan,
                storage_gb,
                settings,
                wait,
            } => {
                let mut body = json!({ "name": name });
                set(&mut body, "engine", engine.map(Value::from));
                set(&mut body, "plan", plan.map(Value::from));
                set(&mut body, "storage_gb", storage_gb.map(Value::from));
                set(&mut body, "region", region.map(Value::from));
                set(&mut body, "cluster_id", cluster_id.map(Value::from));
                set(&mut body, "environment", environment.map(Value::from));
                settings.apply(&mut body);
                let answer = ctx.client.post("/v1/projects", Some(&body)).await?;
                create_answer(ctx, answer, wait.wait).await
            }
            Self::List => {
                let list = ctx.client.get_all("/v1/projects", &[], "projects").await?;
                if ctx.json() {
                    return output::json(&list);
                }
                let mut table = Table::new(&[
                    "ID",
                    "NAME",
                    "ENGINE",
                    "STATE",
                    "REGION",
                    "ENVIRONMENT",
                    "MAX CONN",
                    "CREATED",
                ]);
                for p in list["projects"].as_array().into_iter().flatten() {
                    table.row(
                        [
                            "id",
                            "name",
                            "engine",
                            "state",
                            "region",
                            "environment",
                            "max_connections",
                            "created_at",
                        ]
                        .map(|k| field(p, k))
                        .to_vec(),
                    );
                }
                table.print()
            }
            Self::Show { id } => {
                let answer = ctx
                    .client
                    .get(&format!("/v1/projects/{}", segment(&id)?), &[])
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["project"], PROJECT_KEYS)
            }
            Self::Update {
                id,
                name,
                settings,
                no_storage_limit,
                wait,
            } => {
                let mut body = json!({});
                set(&mut body, "name", name.map(Value::from));
                settings.apply(&mut body);
                if no_storage_limit {
                    set(&mut body, "storage_limit_bytes", Some(Value::Null));
                }
                if body.as_object().is_some_and(|b| b.is_empty()) {
                    return Err(usage_error(
                        "nothing to change: pass --name, --max-connections, --statement-timeout, \
                         --idle-transaction-timeout, --storage-limit-bytes or --no-storage-limit",
                    ));
                }
                let answer = ctx
                    .client
                    .patch(&format!("/v1/projects/{}", segment(&id)?), &body)
                    .await?;
                update_answer(ctx, &id, answer, wait.wait).await
            }
            Self::Delete { id, wait } => {
                let answer = ctx
                    .client
                    .delete(&format!("/v1/projects/{}", segment(&id)?))
                    .await?;
                super::job_answer(ctx, answer, wait.wait).await
            }
            Self::Stop { id, wait } => power(ctx, &id, "stop", wait.wait).await,
            Self::Start { id, wait } => power(ctx, &id, "start", wait.wait).await,
            Self::RetryProvisioning { id, wait } => {
                let answer = ctx
                    .client
                    .post(
                        &format!("/v1/projects/{}/retry-provisioning", segment(&id)?),
                        None,
                    )
                    .await?;
                super::job_answer(ctx, answer, wait.wait).await
            }
            Self::Connections { id } => {
                let answer = ctx
                    .client
                    .get(&format!("/v1/projects/{}/connections", segment(&id)?), &[])
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer, &["direct_url", "pooled_url", "username"])
            }
            Self::Credentials { id } => {
                let answer = ctx
                    .client
                    .get(&format!("/v1/projects/{}/credentials", segment(&id)?), &[])
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer, CREDENTIAL_KEYS)
            }
            Self::RotateCredentials {
                id,
                grace_hours,
                wait,
            } => {
                let body = json!({ "grace_hours": grace_hours });
                let answer = ctx
                    .client
                    .post(
                        &format!("/v1/projects/{}/credentials/rotate", segment(&id)?),
                        Some(&body),
                    )
                    .await?;
                super::job_answer(ctx, answer, wait.wait).await
            }
        }
    }
}

/// `{job, project}` from POST /v1/projects (and restores): printed at once, or after waiting for the
/// job, with the project read again.
pub(super) async fn create_answer(ctx: &Ctx, answer: Value, wait: bool) -> anyhow::Result<()> {
    if !wait {
        if ctx.json() {
            return output::json(&answer);
        }
        output::show(&answer["project"], PROJECT_KEYS)?;
        print_job_summary(&answer["job"])?;
        eprintln!(
            "follow it with: capy jobs logs {} --follow",
            field(&answer["job"], "id")
        );
        return Ok(());
    }
    let id = field(&answer["project"], "id");
    let job = wait::wait_for_job(&ctx.client, answer["job"].clone()).await?;
    let project = ctx
        .client
        .get(&format!("/v1/projects/{}", segment(&id)?), &[])
        .await
        .map(|mut body| body["project"].take())
        .unwrap_or_else(|_| answer["project"].clone());
    if ctx.json() {
        output::json(&json!({ "job": job, "project": project }))?;
    } else if wait::completed(&job) {
        output::show(&project, PROJECT_KEYS)?;
    }
    super::finished(ctx, &job).await
}

/// `{project, job?}` from PATCH: waits for the job when there is one and --wait.
async fn update_answer(ctx: &Ctx, id: &str, answer: Value, wait: bool) -> anyhow::Result<()> {
    let job = answer.get("job").filter(|j| j.is_object()).cloned();
    let (Some(job), true) = (job, wait) else {
        if ctx.json() {
            return output::json(&answer);
        }
        output::show(&answer["project"], PROJECT_KEYS)?;
        if let Some(job) = answer.get("job").filter(|j| j.is_object()) {
            print_job_summary(job)?;
        }
        return Ok(());
    };
    let job = wait::wait_for_job(&ctx.client, job).await?;
    let project = ctx
        .client
        .get(&format!("/v1/projects/{}", segment(id)?), &[])
        .await
        .map(|mut body| body["project"].take())
        .unwrap_or_else(|_| answer["project"].clone());
    if ctx.json() {
        output::json(&json!({ "project": project, "job": job }))?;
    } else if wait::completed(&job) {
        output::show(&project, PROJECT_KEYS)?;
    }
    super::finished(ctx, &job).await
}

/// `capy projects stop|start`: POSTs the action and answers its job.
async fn power(ctx: &Ctx, id: &str, action: &str, wait: bool) -> anyhow::Result<()> {
    let answer = ctx
        .client
        .post(&format!("/v1/projects/{}/{action}", segment(id)?), None)
        .await?;
    super::job_answer(ctx, answer, wait).await
}
