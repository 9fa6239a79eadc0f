use std::net::SocketAddr;

use anyhow::Context as _;
use capy_api::config::{Cli, Command};
use capy_api::{router, ApiSettings, AppState};
use capy_shared::crypto::SecretBox;
use capy_shared::{db, telemetry};
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Migrate(args) => db::migrate(&db::pool(&args.database_url, 2)?).await,
        Command::Bootstrap(args) => {
            let pool = db::pool(&args.database.database_url, 2)?;
            capy_api::bootstrap::run(&pool, &args).await
        }
        Command::Serve(args) => {
            let state = AppState {
                pool: db::pool(&args.database.database_url, args.pool_size)?,
                secrets: SecretBox::from_key_text(&args.secret_key)?,
                settings: ApiSettings {
                    job_max_attempts: args.job_max_attempts,
                    public_url: args
                        .public_url
                        .clone()
                        .unwrap_or_else(|| format!("http://{}", args.listen)),
                    instant_rate_limit_per_minute: args.instant_rate_limit_per_minute,
                    ..ApiSettings::default()
                },
                instant_limiter: Default::default(),
            };
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            tracing::info!(address = %listener.local_addr()?, "capy-api listening");
            // Client addresses feed the instant databases' rate limit.
            let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(capy_shared::telemetry::shutdown_signal())
                .await
                .context("serving HTTP")
        }
    }
}
