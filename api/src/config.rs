//! Command line and environment of `capy-api`. Every flag is also an environment
//! variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use capy_shared::telemetry::LogFormat;

use crate::rate_limit::Cidr;

#[derive(Debug, clap::Parser)]
#[command(name = "capy-api", version, about = "capy's REST API")]
pub struct Cli {
    #[arg(long, env = "CAPY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve the REST API until SIGTERM or Ctrl-C.
    Serve(ServeArgs),
    /// Apply the control-plane migrations and exit.
    Migrate(DatabaseArgs),
    /// Create (or reuse) an admin key, an organization with a key and a cluster, and
    /// write them to an env file.
    Bootstrap(BootstrapArgs),
}

#[derive(Debug, clap::Args)]
pub struct DatabaseArgs {
    /// The control database.
    #[arg(long, env = "CAPY_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Key sealing project passwords and cluster URLs: 32 bytes as 64 hex characters.
    #[arg(long, env = "CAPY_SECRET_KEY", hide_env_values = true)]
    pub secret_key: String,
    #[arg(long, env = "CAPY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Attempts each new job gets.
    #[arg(long, env = "CAPY_JOB_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub job_max_attempts: i32,
    /// Connections to the control database.
    #[arg(long, env = "CAPY_DATABASE_POOL_SIZE", default_value_t = 16)]
    pub pool_size: u32,
    /// The API's URL as clients reach it (for `claim_url`); `http://LISTEN` if unset.
    #[arg(long, env = "CAPY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// How often a request waiting on a job (`?wait=N`) looks again when the job's change
    /// was not announced (announcements lost while the API reconnects), in ms.
    #[arg(long, env = "CAPY_JOB_WAIT_FALLBACK_MS", default_value_t = crate::job_changes::FALLBACK_LOOK.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub job_wait_fallback_ms: u64,
    /// Instant databases (`POST /v1/databases`) one client address may create per
    /// minute.
    #[arg(long, env = "CAPY_INSTANT_RATE_LIMIT_PER_MINUTE", default_value_t = 30, value_parser = clap::value_parser!(i64).range(1..))]
    pub instant_rate_limit_per_minute: i64,
    /// Pool entries and unclaimed instant databases one cluster may hold; past it,
    /// `POST /v1/databases` answers 503 with Retry-After. Give the workers the same.
    #[arg(long, env = "CAPY_INSTANT_MAX_PER_CLUSTER", default_value_t = capy_shared::instant::DEFAULT_MAX_PER_CLUSTER, value_parser = clap::value_parser!(i64).range(0..))]
    pub instant_max_per_cluster: i64,
    /// The warm pool's size per cluster, as the workers keep it: a request that takes
    /// an entry refills the pool up to it at once (0: the workers' top-up alone does).
    #[arg(long, env = "CAPY_INSTANT_POOL_SIZE", default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=1000))]
    pub instant_pool_size: i64,
    /// Lets anonymous instant databases ask for `logicalReplication`. Off by default:
    /// PostgreSQL lets any role with REPLICATION create replication slots (which hold
    /// WAL for the whole cluster) and drop any slot, other tenants' and standbys' too.
    #[arg(
        long,
        env = "CAPY_INSTANT_LOGICAL_REPLICATION",
        default_value_t = false
    )]
    pub instant_logical_replication: bool,
    /// Live unclaimed instant databases one client (an IPv4 address, an IPv6 /64) may
    /// hold; past it, `POST /v1/databases` answers 429 until one is claimed or expires.
    #[arg(long, env = "CAPY_INSTANT_MAX_PER_CLIENT", default_value_t = capy_shared::instant::DEFAULT_MAX_PER_CLIENT, value_parser = clap::value_parser!(i64).range(0..))]
    pub instant_max_per_client: i64,
    /// The same for all the /64s of one IPv6 /48 together.
    #[arg(long, env = "CAPY_INSTANT_MAX_PER_IPV6_48", default_value_t = capy_shared::instant::DEFAULT_MAX_PER_IPV6_48, value_parser = clap::value_parser!(i64).range(0..))]
    pub instant_max_per_ipv6_48: i64,
    /// Proxies (addresses or CIDR blocks, comma-separated) whose `X-Forwarded-For` is
    /// believed: the client is its right-most address that is not one of them. Without
    /// any, the peer's address is the client's.
    #[arg(long, env = "CAPY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<Cidr>,
    /// Serve `/metrics` (and `/healthz`) on this address only, e.g. `0.0.0.0:9090`,
    /// keeping it off the public port; unset, `/metrics` is on the public port.
    #[arg(long, env = "CAPY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// `capy_jobs_finished_recent` counts the jobs that finished (completed, failed,
    /// cancelled) in this many last seconds.
    #[arg(long, env = "CAPY_METRICS_FINISHED_WINDOW_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub metrics_finished_window_seconds: u64,
    /// Where backups and exports are kept (downloads are signed from it).
    #[command(flatten)]
    pub store: capy_shared::store::StoreConfig,
    /// The TTL (hours) of a preview database whose request gives none.
    #[arg(long, env = "CAPY_PREVIEW_DEFAULT_TTL_HOURS", default_value_t = 24, value_parser = clap::value_parser!(i64).range(1..=87_600))]
    pub preview_default_ttl_hours: i64,
    /// The longest TTL (hours) a preview database may be given, made or extended.
    #[arg(long, env = "CAPY_PREVIEW_MAX_TTL_HOURS", default_value_t = 168, value_parser = clap::value_parser!(i64).range(1..=87_600))]
    pub preview_max_ttl_hours: i64,
    /// How long one TTL hour of a preview database lasts, in seconds (3600; tests
    /// shorten it).
    #[arg(long, env = "CAPY_PREVIEW_TTL_HOUR_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub preview_ttl_hour_seconds: u64,
    /// A JSON list of plans (`id`, `engine`, `description`, `max_connections`,
    /// `storage_limit_bytes`, `statement_timeout`, `idle_transaction_timeout`) that
    /// replaces capy's own catalogue; each engine's first plan is its default.
    #[arg(long, env = "CAPY_PLANS_FILE")]
    pub plans_file: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[arg(long, env = "CAPY_SECRET_KEY", hide_env_values = true)]
    pub secret_key: String,
    /// Where to write CAPY_API_URL, CAPY_ADMIN_KEY and CAPY_API_KEY; keys already in it
    /// are reused while they are live.
    #[arg(long, env = "CAPY_ENV_FILE")]
    pub env_file: PathBuf,
    /// The API's URL, written to the env file.
    #[arg(long, env = "CAPY_API_URL")]
    pub api_url: String,
    #[arg(long, env = "CAPY_BOOTSTRAP_ORGANIZATION", default_value = "default")]
    pub organization: String,
    /// Name of the first target cluster.
    #[arg(long, env = "CAPY_BOOTSTRAP_CLUSTER", default_value = "local")]
    pub cluster_name: String,
    #[arg(long, env = "CAPY_BOOTSTRAP_CLUSTER_REGION", default_value = "local")]
    pub cluster_region: String,
    /// The target cluster's superuser URL.
    #[arg(long, env = "CAPY_BOOTSTRAP_CLUSTER_URL", hide_env_values = true)]
    pub cluster_url: String,
    /// sslmode clients use for this cluster.
    #[arg(
        long,
        env = "CAPY_BOOTSTRAP_CLUSTER_SSL_MODE",
        default_value = "prefer"
    )]
    pub cluster_ssl_mode: String,
    /// The target cluster's CA certificate (PEM file); with it, capy verifies the
    /// server's certificate (sslmode verify-full unless the URL names another mode).
    #[arg(long, env = "CAPY_BOOTSTRAP_CLUSTER_CA_FILE")]
    pub cluster_ca_file: Option<PathBuf>,
    /// Port of the cluster's pooler (PgBouncer); the cluster URL's port when unset.
    #[arg(long, env = "CAPY_BOOTSTRAP_CLUSTER_POOLED_PORT", value_parser = clap::value_parser!(i32).range(1..=65535))]
    pub cluster_pooled_port: Option<i32>,
    /// Host of the cluster's pooler; the cluster URL's host when unset.
    #[arg(long, env = "CAPY_BOOTSTRAP_CLUSTER_POOLED_HOST")]
    pub cluster_pooled_host: Option<String>,
    /// The role the pooler's auth_query logs in as (e.g. `capy_pooler`); unset: no
    /// pooler.
    #[arg(long, env = "CAPY_BOOTSTRAP_CLUSTER_POOLER_AUTH_USER")]
    pub cluster_pooler_auth_user: Option<String>,
}
