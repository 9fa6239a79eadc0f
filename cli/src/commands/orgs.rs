//! `capy orgs …`: create (platform admin) and list.

use clap::Subcommand;
use serde_json::json;

use super::Ctx;
use crate::output::{self, field, Table};

#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// Creates an organization (platform admin).
    Create { name: String },
    /// Every organization (platform admin), or the caller's own.
    List,
}

impl OrgsCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::Create { name } => {
                let answer = ctx
                    .client
                    .post("/v1/organizations", Some(&json!({ "name": name })))
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(
                    &answer["organization"],
                    &["id", "name", "created_at", "updated_at"],
                )
            }
            Self::List => {
                let list = ctx
                    .client
                    .get_all("/v1/organizations", &[], "organizations")
                    .await?;
                if ctx.json() {
                    return output::json(&list);
                }
                let mut table = Table::new(&["ID", "NAME", "CREATED"]);
                for o in list["organizations"].as_array().into_iter().flatten() {
                    table.row(["id", "name", "created_at"].map(|k| field(o, k)).to_vec());
                }
                table.print()
            }
        }
    }
}
