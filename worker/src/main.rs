use capy_shared::crypto::SecretBox;
use capy_shared::{db, telemetry};
use std::sync::Arc;

use capy_worker::config::Cli;
use capy_worker::metrics::{self, WorkerMetrics};
use capy_worker::runner::Worker;
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let settings = cli.worker_settings()?;
    // The listener and each finishing attempt share the pool (claims and heartbeats
    // have connections of their own, see `db::queue_pool`).
    let pool_size = u32::try_from(settings.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(3)
        .min(32);
    let pool = db::pool(&cli.database_url, pool_size)?;
    let secrets = SecretBox::from_key_text(&cli.secret_key)?;
    let metrics = Arc::new(WorkerMetrics::new()?);
    if let Some(addr) = cli.metrics_addr {
        let server = metrics::serve(addr, metrics.clone(), pool.clone());
        tokio::spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(error = %format!("{error:#}"), "the metrics endpoint stopped");
            }
        });
    }
    Worker::new(pool, secrets, settings, metrics)
        .run(telemetry::shutdown_signal())
        .await
}
