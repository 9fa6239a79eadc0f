//! `capy keys …`: create (the plaintext is shown once), list, revoke.

use clap::Subcommand;
use serde_json::{json, Value};

use super::{set, Ctx};
use crate::client::segment;
use crate::output::{self, field, key_values, Table};

const KEY_KEYS: &[&str] = &[
    "id",
    "name",
    "key_prefix",
    "organization_id",
    "project_id",
    "admin",
    "scopes",
    "expires_at",
    "revoked_at",
    "created_at",
];

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Creates a key; its plaintext is printed once, now.
    Create {
        name: String,
        /// Narrow the key to one project.
        #[arg(long, env = "CAPY_KEY_PROJECT")]
        project: Option<String>,
        /// read, write or credentials:read; repeat for several (the creator's otherwise).
        #[arg(long = "scope", env = "CAPY_KEY_SCOPES", value_delimiter = ',',
              value_parser = ["read", "write", "credentials:read"])]
        scopes: Vec<String>,
        /// When the key stops working, RFC 3339 (2030-01-01T00:00:00Z).
        #[arg(long, env = "CAPY_KEY_EXPIRES_AT")]
        expires_at: Option<String>,
        /// The organization (platform admin keys only).
        #[arg(long, env = "CAPY_KEY_ORGANIZATION")]
        organization: Option<String>,
    },
    /// The organization's keys (never their secrets).
    List,
    /// Revokes a key.
    Revoke { id: String },
}

impl KeysCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::Create {
                name,
                project,
                scopes,
                expires_at,
                organization,
            } => {
                let mut body = json!({ "name": name });
                set(&mut body, "project_id", project.map(Value::from));
                set(&mut body, "organization_id", organization.map(Value::from));
                set(&mut body, "expires_at", expires_at.map(Value::from));
                if !scopes.is_empty() {
                    set(&mut body, "scopes", Some(Value::from(scopes)));
                }
                let answer = ctx.client.post("/v1/api_keys", Some(&body)).await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["api_key"], KEY_KEYS)?;
                output::out(&key_values(&[("key".to_string(), field(&answer, "key"))]))?;
                eprintln!("store the key now: it is not shown again");
                Ok(())
            }
            Self::List => {
                let list = ctx.client.get_all("/v1/api_keys", &[], "api_keys").await?;
                if ctx.json() {
                    return output::json(&list);
                }
                let mut table = Table::new(&[
                    "ID", "NAME", "PREFIX", "PROJECT", "SCOPES", "ADMIN", "EXPIRES", "REVOKED",
                ]);
                for k in list["api_keys"].as_array().into_iter().flatten() {
                    table.row(
                        [
                            "id",
                            "name",
                            "key_prefix",
                            "project_id",
                            "scopes",
                            "admin",
                            "expires_at",
                            "revoked_at",
                        ]
                        .map(|f| field(k, f))
                        .to_vec(),
                    );
                }
                table.print()
            }
            Self::Revoke { id } => {
                let answer = ctx
                    .client
                    .delete(&format!("/v1/api_keys/{}", segment(&id)?))
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["api_key"], KEY_KEYS)
            }
        }
    }
}
