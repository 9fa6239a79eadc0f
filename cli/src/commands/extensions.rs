//! `capy extensions …`: what a project's cluster offers, enabling and disabling.

use clap::Subcommand;
use serde_json::{json, Value};

use super::{job_answer, set, Ctx, WaitFlag};
use crate::client::segment;
use crate::output::{self, field, truncate, Table};

#[derive(Debug, Subcommand)]
pub enum ExtensionsCommand {
    /// The extensions the project's cluster offers, and which are enabled.
    List { project: String },
    /// Enables an extension in the project's database (a project.extension_enable job).
    Enable {
        project: String,
        name: String,
        /// A version the cluster offers; its default version otherwise.
        #[arg(long, env = "CAPY_EXTENSION_VERSION")]
        version: Option<String>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Disables an extension (a project.extension_disable job).
    Disable {
        project: String,
        name: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
}

impl ExtensionsCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::List { project } => {
                let list = ctx
                    .client
                    .get_all(
                        &format!("/v1/projects/{}/extensions", segment(&project)?),
                        &[],
                        "extensions",
                    )
                    .await?;
                if ctx.json() {
                    return output::json(&list);
                }
                let mut table = Table::new(&[
                    "NAME",
                    "ENABLED",
                    "INSTALLED",
                    "DEFAULT",
                    "TRUSTED",
                    "DESCRIPTION",
                ]);
                for e in list["extensions"].as_array().into_iter().flatten() {
                    table.row(vec![
                        field(e, "name"),
                        field(e, "enabled"),
                        field(e, "installed_version"),
                        field(e, "default_version"),
                        field(e, "trusted"),
                        truncate(&field(e, "description"), 60),
                    ]);
                }
                table.print()
            }
            Self::Enable {
                project,
                name,
                version,
                wait,
            } => {
                let mut body = json!({ "name": name });
                set(&mut body, "version", version.map(Value::from));
                let answer = ctx
                    .client
                    .post(
                        &format!("/v1/projects/{}/extensions", segment(&project)?),
                        Some(&body),
                    )
                    .await?;
                job_answer(ctx, answer, wait.wait).await
            }
            Self::Disable {
                project,
                name,
                wait,
            } => {
                let answer = ctx
                    .client
                    .delete(&format!(
                        "/v1/projects/{}/extensions/{}",
                        segment(&project)?,
                        segment(&name)?
                    ))
                    .await?;
                job_answer(ctx, answer, wait.wait).await
            }
        }
    }
}
