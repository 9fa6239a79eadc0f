//! `engines`: POST /v1/projects → job completed for each engine (PostgreSQL, MySQL,
//! Redis) on one stack, beside what the engine's step does run by hand from this
//! process against the same servers (a fresh admin connection, the statements, one
//! login as the new user), same run.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use capy_api::admin::{self, ClusterSpec};
use capy_shared::crypto::{self, SecretBox};
use capy_shared::model::Engine;
use capy_testkit::{mariadb, redis, ProcessStack, TEST_SECRET_KEY};
use serde_json::json;
use sqlx::{Connection as _, Executor as _};

use crate::provision::{control_plane, post_to_completed, psql_runs};
use crate::stats::{median_ms, round2};

pub async fn engines(runs: usize) -> anyhow::Result<()> {
    let (db, key) = control_plane(None).await?;
    let secrets = SecretBox::from_key_text(TEST_SECRET_KEY)?;
    let (mysql, redis) = (mariadb()?, redis()?);
    for (engine, name, url, host, port) in [
        (
            Engine::Mysql,
            "local-mysql",
            mysql.admin_url(),
            mysql.host().to_string(),
            mysql.port(),
        ),
        (
            Engine::Redis,
            "local-redis",
            redis.admin_url(),
            redis.host().to_string(),
            redis.port(),
        ),
    ] {
        let spec = ClusterSpec {
            engine,
            name: name.into(),
            region: "local".into(),
            admin_url: url,
            public_host: host,
            direct_port: i32::from(port),
            pooled_port: i32::from(port),
            pooled_host: None,
            pooler_auth_user: None,
            ssl_mode: "disable".into(),
            max_projects: None,
            ca_pem: None,
        };
        admin::upsert_cluster(&db.pool, &secrets, &spec).await?;
    }
    let stack = ProcessStack::start(&db.url, 2, &[]).await?;
    let http = reqwest::Client::new();
    let mut lines = Vec::new();
    for engine in Engine::ALL {
        let mut capy = Vec::new();
        for run in 0..runs + 2 {
            let body =
                json!({ "name": format!("bench-{}-{run}", engine.as_str()), "engine": engine });
            let took = post_to_completed(&http, &stack, &key, body).await?;
            if run >= 2 {
                capy.push(took);
            }
        }
        let mut by_hand = match engine {
            Engine::Postgresql => psql_runs(runs).await?,
            Engine::Mysql => timed(runs, || mysql_by_hand(mysql.admin_url(), mysql.port())).await?,
            Engine::Redis => timed(runs, || redis_by_hand(redis.admin_url(), redis.port())).await?,
        };
        let (capy_p50, hand_p50) = (median_ms(&mut capy), median_ms(&mut by_hand));
        lines.push(json!({
            "bench": "engines",
            "engine": engine,
            "runs": runs,
            "workers": 2,
            "post_to_completed_ms_p50": capy_p50,
            "by_hand_ms_p50": hand_p50,
            "ratio": round2(capy_p50 / hand_p50),
        }));
    }
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// `runs` timings of `work` after two warm-ups.
async fn timed<F, Fut>(runs: usize, work: F) -> anyhow::Result<Vec<Duration>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut samples = Vec::new();
    for run in 0..runs + 2 {
        let started = Instant::now();
        work().await?;
        if run >= 2 {
            samples.push(started.elapsed());
        }
    }
    Ok(samples)
}

/// What `project.create` does on MySQL: the database, the user (locked, then its
/// password, limit and unlock), the grant, then one login as the user.
async fn mysql_by_hand(admin_url: String, port: u16) -> anyhow::Result<()> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (database, user, password) = (
        format!("capy_{id}"),
        format!("capy_{}", &id[5..]),
        crypto::generate_password(),
    );
    let mut admin = sqlx::MySqlConnection::connect(&admin_url).await?;
    for statement in [
        format!("CREATE DATABASE IF NOT EXISTS `{database}`"),
        format!("CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{password}' ACCOUNT LOCK"),
        format!("ALTER USER '{user}'@'%' IDENTIFIED BY '{password}' WITH MAX_USER_CONNECTIONS 20 ACCOUNT UNLOCK"),
        format!("GRANT ALL PRIVILEGES ON `{}`.* TO '{user}'@'%'", database.replace('_', "\\_")),
    ] {
        admin.execute(statement.as_str()).await.context("mysql by hand")?;
    }
    admin.close().await?;
    let url = format!("mysql://{user}:{password}@127.0.0.1:{port}/{database}");
    let mut tenant = sqlx::MySqlConnection::connect(&url).await?;
    tenant.execute("select 1").await?;
    Ok(())
}

/// What `project.create` does on Redis: one `ACL SETUSER`, then one login as the user.
async fn redis_by_hand(admin_url: String, port: u16) -> anyhow::Result<()> {
    let id = uuid::Uuid::new_v4();
    let (user, password) = (format!("capy_{}", id.simple()), crypto::generate_password());
    let mut admin = ::redis::Client::open(admin_url)?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg(&[
            "reset",
            "on",
            &format!(">{password}"),
            &format!("~p:{id}:*"),
            &format!("&p:{id}:*"),
            "+@all",
            "-@dangerous",
        ])
        .query_async(&mut admin)
        .await?;
    let url = format!("redis://{user}:{password}@127.0.0.1:{port}");
    let mut tenant = ::redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let _: String = ::redis::cmd("PING").query_async(&mut tenant).await?;
    Ok(())
}
