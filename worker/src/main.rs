use capy_shared::crypto::SecretBox;
use capy_shared::{db, telemetry};
use capy_worker::config::Cli;
use capy_worker::runner::Worker;
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let settings = cli.worker_settings()?;
    // Claims, heartbeats, the listener and each finishing attempt share the pool.
    let pool_size = u32::try_from(settings.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(3)
        .min(32);
    let pool = db::pool(&cli.database_url, pool_size)?;
    let secrets = SecretBox::from_key_text(&cli.secret_key)?;
    Worker::new(pool, secrets, settings)
        .run(telemetry::shutdown_signal())
        .await
}
