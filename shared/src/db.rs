//! The control database: pool and embedded migrations.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// The control-plane schema, embedded from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A pool on the control database. Connections are made lazily, so a process starts
/// (and answers 503) while the database is down.
pub fn pool(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .context("the control database URL is not a valid PostgreSQL URL")?;
    let options = options.application_name("capy");
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// A pool for the queue's hottest statements (claims, heartbeats) on the same database
/// as `pool`, whose sessions plan no sequential scan where an index or a TID scan can
/// answer (`enable_seqscan` off). These run thousands of times per connection as
/// prepared statements, and PostgreSQL keeps a generic plan once it seems as cheap as
/// planning each time: one made while `jobs` was small (a new install, an emptied
/// queue) scans the whole table on every claim as it grows, until the next ANALYZE.
pub fn queue_pool(pool: &PgPool, max_connections: u32) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .options([("enable_seqscan", "off")]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options)
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("applying the control-plane migrations")
}

/// Deletes `Idempotency-Key` records past their day, a batch at a time; answers how
/// many went.
pub async fn prune_idempotency_keys(pool: &PgPool, batch: i64) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "delete from idempotency_keys where ctid in (
             select ctid from idempotency_keys
             where created_at < now() - interval '24 hours'
             limit $1)",
    )
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
