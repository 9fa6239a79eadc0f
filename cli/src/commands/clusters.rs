//! `capy clusters …` (platform admin): list, show, register by URL, check access, and
//! the untrusted extensions tenants may enable.

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::{json, Value};

use super::{set, Ctx};
use crate::client::segment;
use crate::output::{self, field, Table};

const CLUSTER_KEYS: &[&str] = &[
    "id",
    "name",
    "region",
    "admin_url",
    "public_host",
    "direct_port",
    "pooled_host",
    "pooled_port",
    "pooler_auth_user",
    "ssl_mode",
    "max_projects",
    "project_count",
    "last_checked_at",
    "allowed_extensions",
    "created_at",
    "updated_at",
];

const ACCESS_KEYS: &[&str] = &[
    "reachable",
    "server_version",
    "is_superuser",
    "can_create_roles",
    "can_create_databases",
    "latency_ms",
    "ssl_mode",
    "tls",
    "tls_verified",
    "error_kind",
    "error",
    "checked_at",
];

#[derive(Debug, Subcommand)]
pub enum ClustersCommand {
    /// Every registered cluster.
    List,
    /// One cluster (its admin password is never shown).
    Show { id: String },
    /// Registers a PostgreSQL cluster by its admin URL and checks access to it.
    Register {
        /// 1–63 lowercase letters, digits, '-' and '_'.
        #[arg(long, env = "CAPY_CLUSTER_NAME")]
        name: String,
        /// The admin URL, postgresql://user:password@host:port/database. Prefer the
        /// environment variable: argv is visible to others.
        #[arg(long, env = "CAPY_CLUSTER_URL", hide_env_values = true)]
        url: String,
        #[arg(long, env = "CAPY_CLUSTER_REGION")]
        region: String,
        /// The host projects connect to (the URL's host otherwise).
        #[arg(long, env = "CAPY_CLUSTER_PUBLIC_HOST")]
        public_host: Option<String>,
        #[arg(long, env = "CAPY_CLUSTER_DIRECT_PORT")]
        direct_port: Option<u16>,
        /// The port of the cluster's pooler (PgBouncer); the direct port otherwise.
        #[arg(long, env = "CAPY_CLUSTER_POOLED_PORT")]
        pooled_port: Option<u16>,
        /// The pooler's host (the public host otherwise).
        #[arg(long, env = "CAPY_CLUSTER_POOLED_HOST")]
        pooled_host: Option<String>,
        /// The role PgBouncer's auth_query logs in as (e.g. capy_pooler); project jobs
        /// install capy_pooler.lookup for it in every project database.
        #[arg(long, env = "CAPY_CLUSTER_POOLER_AUTH_USER")]
        pooler_auth_user: Option<String>,
        /// The sslmode of tenants' connection strings: disable, allow, prefer, require,
        /// verify-ca or verify-full (capy's own connections follow the URL's sslmode).
        #[arg(long, env = "CAPY_CLUSTER_SSL_MODE")]
        ssl_mode: Option<String>,
        /// The cluster's CA certificate (PEM file): workers verify the server against
        /// it, and tenants can download it.
        #[arg(long, env = "CAPY_CLUSTER_CA_FILE")]
        ca_file: Option<std::path::PathBuf>,
        /// How many projects it may hold.
        #[arg(long, env = "CAPY_CLUSTER_MAX_PROJECTS")]
        max_projects: Option<u32>,
    },
    /// Connects to the cluster and reports reachability, version, admin rights and TLS.
    CheckAccess { id: String },
    /// Prints the cluster's CA certificate (PEM), for clients' sslrootcert.
    CaCert { id: String },
    /// Sets the untrusted extensions tenants of the cluster may enable (installed by
    /// the admin into a schema the tenant cannot write). The names replace the list;
    /// none clears it. Trusted extensions need no entry.
    AllowExtensions {
        id: String,
        /// Extension names, e.g. file_fdw.
        names: Vec<String>,
    },
}

impl ClustersCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::List => {
                let list = ctx.client.get_all("/v1/clusters", &[], "clusters").await?;
                if ctx.json() {
                    return output::json(&list);
                }
                let mut table = Table::new(&[
                    "ID", "NAME", "REGION", "HOST", "PORT", "PROJECTS", "MAX", "CHECKED",
                ]);
                for c in list["clusters"].as_array().into_iter().flatten() {
                    table.row(
                        [
                            "id",
                            "name",
                            "region",
                            "public_host",
                            "direct_port",
                            "project_count",
                            "max_projects",
                            "last_checked_at",
                        ]
                        .map(|k| field(c, k))
                        .to_vec(),
                    );
                }
                table.print()
            }
            Self::Show { id } => {
                let answer = ctx
                    .client
                    .get(&format!("/v1/clusters/{}", segment(&id)?), &[])
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["cluster"], CLUSTER_KEYS)
            }
            Self::Register {
                name,
                url,
                region,
                public_host,
                direct_port,
                pooled_port,
                pooled_host,
                pooler_auth_user,
                ssl_mode,
                ca_file,
                max_projects,
            } => {
                let mut body = json!({ "name": name, "url": url, "region": region });
                if let Some(path) = ca_file {
                    let pem = std::fs::read_to_string(&path).with_context(|| {
                        format!("reading the CA certificate {}", path.display())
                    })?;
                    set(&mut body, "ca_pem", Some(Value::from(pem)));
                }
                set(&mut body, "public_host", public_host.map(Value::from));
                set(&mut body, "direct_port", direct_port.map(Value::from));
                set(&mut body, "pooled_port", pooled_port.map(Value::from));
                set(&mut body, "pooled_host", pooled_host.map(Value::from));
                set(
                    &mut body,
                    "pooler_auth_user",
                    pooler_auth_user.map(Value::from),
                );
                set(&mut body, "ssl_mode", ssl_mode.map(Value::from));
                set(&mut body, "max_projects", max_projects.map(Value::from));
                let answer = ctx.client.post("/v1/clusters", Some(&body)).await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["cluster"], CLUSTER_KEYS)?;
                output::out("access:")?;
                output::show(&answer["access"], ACCESS_KEYS)
            }
            Self::CheckAccess { id } => {
                let answer = ctx
                    .client
                    .post(
                        &format!("/v1/clusters/{}/check-access", segment(&id)?),
                        None,
                    )
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["access"], ACCESS_KEYS)
            }
            Self::CaCert { id } => {
                let pem = ctx
                    .client
                    .get_text(&format!("/v1/clusters/{}/ca.pem", segment(&id)?))
                    .await?;
                output::out(pem.trim_end())
            }
            Self::AllowExtensions { id, names } => {
                let answer = ctx
                    .client
                    .put(
                        &format!("/v1/clusters/{}/allowed-extensions", segment(&id)?),
                        &json!({ "names": names }),
                    )
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                output::show(&answer["cluster"], CLUSTER_KEYS)
            }
        }
    }
}
