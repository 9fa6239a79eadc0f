//! `capy previews …`: short-lived copies of a project's database (`clone`: schema and
//! data; `empty`: schema only) with a login of their own, deleted by the workers when
//! their TTL passes: create, list, show, extend, reset, delete, and their connection
//! strings.

use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::jobs::print_job_summary;
use super::projects::Settings;
use super::{set, Ctx, WaitFlag};
use crate::client::segment;
use crate::output::{self, field, Table};
use crate::wait;

const PREVIEW_KEYS: &[&str] = &[
    "id",
    "project_id",
    "name",
    "mode",
    "state",
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
    "source_kind",
    "source_database",
    "last_error",
    "latest_job_id",
    "ttl_expires_at",
    "created_at",
    "updated_at",
];

/// The fields `capy previews connections` prints (the API's `Credentials`).
const CONNECTION_KEYS: &[&str] = &[
    "host",
    "port",
    "username",
    "password",
    "database",
    "ssl_mode",
    "connection_string",
    "pooled_connection_string",
];

/// How a preview is made from its project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The project's schema and data, as of one snapshot.
    Clone,
    /// The project's schema alone.
    Empty,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Clone => "clone",
            Self::Empty => "empty",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PreviewsCommand {
    /// Makes a preview of a project (a project.preview_create job): a database and a
    /// login of its own on the project's cluster, with the project's extensions and,
    /// unless given, its limits. The project's open sessions are not disturbed.
    Create {
        /// The project's id.
        #[arg(long)]
        project: String,
        #[arg(long, value_enum, default_value_t = Mode::Clone)]
        mode: Mode,
        /// 1–63 letters, digits, '-' and '_' (`preview-<id prefix>` when left out).
        #[arg(long)]
        name: Option<String>,
        /// Hours until the workers delete it (the API's default, 24, when left out;
        /// at most the API's maximum, 168).
        #[arg(long)]
        ttl_hours: Option<i64>,
        #[command(flatten)]
        settings: Settings,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// A project's previews, newest first.
    List {
        /// The project's id.
        #[arg(long)]
        project: String,
    },
    /// One preview.
    Show { id: String },
    /// Moves a preview's expiry to --ttl-hours from now.
    Extend {
        id: String,
        #[arg(long)]
        ttl_hours: i64,
    },
    /// Makes a preview again from its project as it is now (a project.preview_reset
    /// job): what was written in the preview is lost.
    Reset {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Deletes a preview: its database and login are dropped by a
    /// project.preview_delete job.
    Delete {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// The credentials of a ready preview (host, port, username, password, database,
    /// ssl_mode, connection strings); needs the credentials:read scope.
    Connections { id: String },
}

/// POST /v1/projects/{id}/preview-databases's body: only what is given, so the API's
/// defaults apply to the rest.
fn create_body(
    mode: Mode,
    name: Option<String>,
    ttl_hours: Option<i64>,
    settings: Settings,
) -> Value {
    let mut body = json!({ "mode": mode.as_str() });
    set(&mut body, "name", name.map(Value::from));
    set(&mut body, "ttl_hours", ttl_hours.map(Value::from));
    settings.apply(&mut body);
    body
}

fn preview_path(id: &str) -> anyhow::Result<String> {
    Ok(format!("/v1/preview-databases/{}", segment(id)?))
}

impl PreviewsCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::Create {
                project,
                mode,
                name,
                ttl_hours,
                settings,
                wait,
            } => {
                let body = create_body(mode, name, ttl_hours, settings);
                let path = format!("/v1/projects/{}/preview-databases", segment(&project)?);
                let answer = ctx.client.post(&path, Some(&body)).await?;
                preview_answer(ctx, answer, wait.wait).await
            }
            Self::List { project } => {
                let path = format!("/v1/projects/{}/preview-databases", segment(&project)?);
                let list = ctx.client.get_all(&path, &[], "preview_databases").await?;
                print_list(ctx, &list)
            }
            Self::Show { id } => {
                let answer = ctx.client.get(&preview_path(&id)?, &[]).await?;
                print_preview(ctx, &answer)
            }
            Self::Extend { id, ttl_hours } => {
                let path = format!("{}/extend", preview_path(&id)?);
                let body = json!({ "ttl_hours": ttl_hours });
                let answer = ctx.client.post(&path, Some(&body)).await?;
                print_preview(ctx, &answer)
            }
            Self::Reset { id, wait } => {
                let path = format!("{}/reset", preview_path(&id)?);
                let answer = ctx.client.post(&path, Some(&json!({}))).await?;
                preview_answer(ctx, answer, wait.wait).await
            }
            Self::Delete { id, wait } => {
                // Once deleted it cannot be read again: the job is the answer.
                let answer = ctx.client.delete(&preview_path(&id)?).await?;
                super::job_answer(ctx, answer, wait.wait).await
            }
            Self::Connections { id } => {
                let path = format!("{}/connections", preview_path(&id)?);
                let answer = ctx.client.get(&path, &[]).await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer, CONNECTION_KEYS)
            }
        }
    }
}

/// `{preview}` answers (show, extend).
fn print_preview(ctx: &Ctx, answer: &Value) -> anyhow::Result<()> {
    if ctx.json() {
        return output::json(answer);
    }
    output::show(&answer["preview"], PREVIEW_KEYS)
}

fn print_list(ctx: &Ctx, list: &Value) -> anyhow::Result<()> {
    if ctx.json() {
        return output::json(list);
    }
    let columns = [
        "id",
        "name",
        "mode",
        "state",
        "database_name",
        "ttl_expires_at",
        "created_at",
    ];
    let mut table = Table::new(&[
        "ID", "NAME", "MODE", "STATE", "DATABASE", "EXPIRES", "CREATED",
    ]);
    for preview in list["preview_databases"].as_array().into_iter().flatten() {
        table.row(columns.map(|k| field(preview, k)).to_vec());
    }
    table.print()
}

/// `{preview, job}` answers (create, reset): printed at once, or after waiting
/// for the job with the preview read again.
async fn preview_answer(ctx: &Ctx, answer: Value, wait: bool) -> anyhow::Result<()> {
    if !wait {
        if ctx.json() {
            return output::json(&answer);
        }
        output::show(&answer["preview"], PREVIEW_KEYS)?;
        print_job_summary(&answer["job"])?;
        eprintln!(
            "follow it with: capy jobs logs {} --follow",
            field(&answer["job"], "id")
        );
        return Ok(());
    }
    let id = field(&answer["preview"], "id");
    let job = wait::wait_for_job(&ctx.client, answer["job"].clone()).await?;
    let preview = ctx
        .client
        .get(&preview_path(&id)?, &[])
        .await
        .map(|mut body| body["preview"].take())
        .unwrap_or_else(|_| answer["preview"].clone());
    if ctx.json() {
        output::json(&json!({ "preview": preview, "job": job }))?;
    } else if wait::completed(&job) {
        output::show(&preview, PREVIEW_KEYS)?;
    }
    super::finished(ctx, &job).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Command;
    use crate::config::Cli;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<PreviewsCommand, clap::Error> {
        let cli = Cli::try_parse_from(["capy", "previews"].iter().chain(args))?;
        match cli.command {
            Command::Previews(command) => Ok(command),
            other => panic!("not a previews command: {other:?}"),
        }
    }

    #[test]
    fn create_clones_by_default_and_sends_only_what_is_given() {
        let Ok(PreviewsCommand::Create {
            project,
            mode,
            name,
            ttl_hours,
            settings,
            wait,
        }) = parse(&["create", "--project", "p1"])
        else {
            panic!("create did not parse");
        };
        assert_eq!(
            (project.as_str(), mode, wait.wait),
            ("p1", Mode::Clone, false)
        );
        assert_eq!(
            create_body(mode, name, ttl_hours, settings),
            json!({"mode": "clone"})
        );

        let Ok(PreviewsCommand::Create {
            mode,
            name,
            ttl_hours,
            settings,
            wait,
            ..
        }) = parse(&[
            "create",
            "--project",
            "p1",
            "--mode",
            "empty",
            "--name",
            "pr-42",
            "--ttl-hours",
            "2",
            "--max-connections",
            "5",
            "--wait",
        ])
        else {
            panic!("create did not parse");
        };
        assert!(wait.wait);
        assert_eq!(
            create_body(mode, name, ttl_hours, settings),
            json!({"mode": "empty", "name": "pr-42", "ttl_hours": 2, "max_connections": 5})
        );
    }

    #[test]
    fn bad_command_lines_are_refused_before_asking_the_api() {
        for args in [
            &["create"][..],
            &["create", "--project", "p1", "--mode", "copy"],
            &["create", "--project", "p1", "--ttl-hours", "a day"],
            &["extend", "v1"],
            &["list"],
            &["connections"],
        ] {
            assert!(parse(args).is_err(), "{args:?} parsed");
        }
        let Ok(PreviewsCommand::Extend { id, ttl_hours }) =
            parse(&["extend", "v1", "--ttl-hours", "48"])
        else {
            panic!("extend did not parse");
        };
        assert_eq!((id.as_str(), ttl_hours), ("v1", 48));
        assert!(matches!(
            parse(&["delete", "v1", "--wait"]),
            Ok(PreviewsCommand::Delete { wait, .. }) if wait.wait
        ));
    }
}
