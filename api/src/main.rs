use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use capy_api::config::{Cli, Command, ServeArgs};
use capy_api::job_changes::JobChanges;
use capy_api::{metrics_router, public_router, ApiSettings, AppState, PreviewTtl};
use capy_shared::crypto::SecretBox;
use capy_shared::instant::ClientCaps;
use capy_shared::store::BackupStore;
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
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Unset: no store (backups are refused); set but unusable: no start.
    let backup_store = match &args.store.url {
        None => None,
        Some(_) => Some(BackupStore::open(&args.store).context("opening the backup store")?),
    };
    let pool = db::pool(&args.database.database_url, args.pool_size)?;
    let state = AppState {
        job_changes: JobChanges::listen(
            pool.clone(),
            Duration::from_millis(args.job_wait_fallback_ms),
        ),
        pool,
        secrets: SecretBox::from_key_text(&args.secret_key)?,
        settings: ApiSettings {
            job_max_attempts: args.job_max_attempts,
            public_url: args
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", args.listen)),
            instant_rate_limit_per_minute: args.instant_rate_limit_per_minute,
            instant_max_per_cluster: args.instant_max_per_cluster,
            instant_pool_size: args.instant_pool_size,
            instant_logical_replication: args.instant_logical_replication,
            instant_client_caps: ClientCaps {
                per_key: args.instant_max_per_client,
                per_site: args.instant_max_per_ipv6_48,
            },
            trusted_proxies: args.trusted_proxies.clone(),
            metrics_finished_window: Duration::from_secs(args.metrics_finished_window_seconds),
            preview_ttl: PreviewTtl::new(
                args.preview_default_ttl_hours,
                args.preview_max_ttl_hours,
                args.preview_ttl_hour_seconds,
            )?,
            plans: match &args.plans_file {
                Some(path) => capy_api::plans::Plans::from_file(path)?,
                None => capy_api::plans::Plans::default(),
            },
            ..ApiSettings::default()
        },
        instant_limiter: Default::default(),
        backup_store,
    };
    let metrics = match args.metrics_addr {
        Some(address) => Some((
            bind(address, "capy-api metrics listening").await?,
            metrics_router(state.clone()),
        )),
        None => None,
    };
    let listener = bind(args.listen, "capy-api listening").await?;
    // Client addresses feed the instant databases' rate limit.
    let app = public_router(state, args.metrics_addr.is_some())
        .into_make_service_with_connect_info::<SocketAddr>();
    let public = axum::serve(listener, app)
        .with_graceful_shutdown(telemetry::shutdown_signal())
        .into_future();
    let Some((listener, app)) = metrics else {
        return public.await.context("serving HTTP");
    };
    let metrics = axum::serve(listener, app)
        .with_graceful_shutdown(telemetry::shutdown_signal())
        .into_future();
    tokio::pin!(public, metrics);
    // Should either server fail, the process stops with its error at once; once one
    // has shut down gracefully (a signal), the other finishes its own shutdown.
    tokio::select! {
        result = &mut public => {
            result.context("serving HTTP")?;
            metrics.await.context("serving metrics")
        }
        result = &mut metrics => {
            result.context("serving metrics")?;
            public.await.context("serving HTTP")
        }
    }
}

async fn bind(address: SocketAddr, message: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    tracing::info!(address = %listener.local_addr()?, "{message}");
    Ok(listener)
}
