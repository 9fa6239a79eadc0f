//! `capy exports …`: export a project's database as a `pg_dump -Fc` archive, list and
//! show exports, and download one (a short-lived signed URL).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{json, Value};

use super::backups::{made_answer, print_list, BACKUP_KEYS};
use super::{set, Ctx, WaitFlag};
use crate::client::segment;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum ExportsCommand {
    /// Exports a project's database (a project.backup job); downloadable for 7 days
    /// once completed.
    Create {
        /// The project's id.
        project: String,
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// A project's exports, newest first.
    List { project: String },
    /// One export.
    Show { id: String },
    /// Prints a URL that downloads the export for 5 minutes, or with --file fetches it
    /// into a file (needs the credentials:read scope).
    Download {
        id: String,
        /// Write the archive to this file instead of printing the URL. (Not `--output`:
        /// that is every command's output format.)
        #[arg(long, short = 'f', value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

impl ExportsCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::Create {
                project,
                label,
                wait,
            } => {
                let mut body = json!({});
                set(&mut body, "label", label.map(Value::from));
                let path = format!("/v1/projects/{}/exports", segment(&project)?);
                let answer = ctx.client.post(&path, Some(&body)).await?;
                made_answer(ctx, answer, "export", wait.wait).await
            }
            Self::List { project } => {
                let path = format!("/v1/projects/{}/exports", segment(&project)?);
                let list = ctx.client.get_all(&path, &[], "exports").await?;
                print_list(ctx, &list, "exports")
            }
            Self::Show { id } => {
                let answer = ctx
                    .client
                    .get(&format!("/v1/exports/{}", segment(&id)?), &[])
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["export"], BACKUP_KEYS)
            }
            Self::Download { id, file } => {
                let path = format!("/v1/exports/{}/download", segment(&id)?);
                let answer = ctx.client.get(&path, &[]).await?;
                let Some(file) = file else {
                    if ctx.json() {
                        return output::json(&answer);
                    }
                    return output::out(&output::field(&answer, "url"));
                };
                let url = output::field(&answer, "url");
                let bytes = ctx.client.download(&url, &file).await?;
                if ctx.json() {
                    return output::json(&json!({ "file": file, "bytes": bytes }));
                }
                eprintln!("wrote {bytes} bytes to {}", file.display());
                Ok(())
            }
        }
    }
}
