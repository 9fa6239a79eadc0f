//! Test support. Each test process gets one private PostgreSQL cluster (initdb into a
//! temporary folder, started on a free port, stopped when the process exits), unless
//! `CAPY_TEST_DATABASE_URL` names a superuser URL to use instead. Each test then takes a
//! fresh database on it with [`fresh_database`].

mod cluster;
mod mariadb;
mod pooler;
mod processes;
mod redis;
mod s3;
mod supervisor;
mod tls;

pub use cluster::{cluster, postgres_bin_dir, tls_only_cluster, TestCluster};
pub use mariadb::{mariadb, TestMariaDb};
pub use pooler::{
    pgbouncer_ini, pooler, tls_only_pooler, PoolerConfig, PoolerTls, TestPooler, POOLER_AUTH_USER,
};
pub use processes::{bin_path, free_port, ChildGuard, ProcessStack};
pub use redis::{redis, TestRedis};
pub use s3::{s3, TestS3, MOTO_VERSION};
pub use tls::TestCertificates;

use anyhow::Context as _;
use sqlx::PgPool;

/// A database of its own for one test, with capy's migrations applied.
pub struct TestDatabase {
    pub name: String,
    /// Superuser URL of this database.
    pub url: String,
    pub pool: PgPool,
}

/// Creates a new, migrated database on the test cluster.
pub async fn fresh_database() -> anyhow::Result<TestDatabase> {
    fresh_database_on(cluster()?).await
}

/// Creates a new, migrated database on `cluster`.
pub async fn fresh_database_on(cluster: &TestCluster) -> anyhow::Result<TestDatabase> {
    let name = format!("capy_test_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&cluster.admin_url_for("postgres"))
        .await
        .context("connecting to the test cluster")?;
    sqlx::query(&format!("create database {name}"))
        .execute(&admin)
        .await
        .context("creating a test database")?;
    admin.close().await;
    let url = cluster.admin_url_for(&name);
    let pool = capy_shared::db::pool(&url, 10)?;
    capy_shared::db::migrate(&pool).await?;
    Ok(TestDatabase { name, url, pool })
}

/// A fixed secret key for tests (encryption is exercised, not the key's secrecy).
pub const TEST_SECRET_KEY: &str =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
