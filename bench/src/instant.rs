//! `instant`: POST /v1/databases → a usable connection (connect + `select 1`), with a
//! warm pool and with an empty one, beside a raw `CREATE DATABASE` (then connect +
//! `select 1`) on the same cluster.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use capy_testkit::{cluster, ProcessStack};
use serde_json::{json, Value};

use crate::provision::control_plane;
use crate::stats::{median_ms, ms};

async fn connect_and_select(url: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting")?;
    tokio::spawn(connection);
    client.simple_query("select 1").await.context("select 1")?;
    Ok(())
}

fn p99_ms(samples: &mut [Duration]) -> f64 {
    crate::stats::percentile_ms(samples, 99)
}

/// Times `runs` creations against a stack whose workers keep `pool` databases ready:
/// POST → select 1, and the POST's answer alone.
async fn measure(runs: usize, pool: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (db, _) = control_plane(None).await?;
    let env = [
        ("CAPY_INSTANT_POOL_SIZE", pool.to_string()),
        ("CAPY_LEASE_SECONDS", "4".to_string()),
        ("CAPY_INSTANT_RATE_LIMIT_PER_MINUTE", "1000000".to_string()),
        // Every run's database stays unclaimed: no bound may cut the runs short.
        ("CAPY_INSTANT_MAX_PER_CLUSTER", "1000000".to_string()),
        ("CAPY_INSTANT_MAX_PER_CLIENT", "1000000".to_string()),
    ];
    let stack = ProcessStack::start(&db.url, 2, &env).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ready: i64 = sqlx::query_scalar(
            "select count(*) from projects where instant_status = 'pool' and state = 'ready'",
        )
        .fetch_one(&db.pool)
        .await?;
        if ready >= pool as i64 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the pool did not fill");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let http = reqwest::Client::new();
    let mut samples = Vec::new();
    let mut answers = Vec::new();
    // Two warm-up runs are not counted.
    for run in 0..runs + 2 {
        let started = Instant::now();
        let created: Value = http
            .post(format!("{}/v1/databases", stack.api_url))
            .json(&json!({"ref": "capy-bench"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let answered = started.elapsed();
        let url = created["connection_string"]
            .as_str()
            .context("no connection_string")?;
        connect_and_select(url).await?;
        if run >= 2 {
            samples.push(started.elapsed());
            answers.push(answered);
        }
        if pool > 0 {
            // Let the replacement of what was taken catch up, so each run finds a
            // ready database (as a pool sized for its traffic would).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((samples, answers))
}

pub async fn instant(runs: usize) -> anyhow::Result<()> {
    let report = |pool: &str, (mut samples, mut answers): (Vec<Duration>, Vec<Duration>)| {
        let p50 = median_ms(&mut samples);
        println!(
            "{}",
            json!({
                "bench": "instant",
                "pool": pool,
                "runs": samples.len(),
                "post_to_select_1_ms_p50": p50,
                "post_to_select_1_ms_p99": p99_ms(&mut samples),
                "post_to_select_1_ms_max": ms(samples[samples.len() - 1]),
                "post_answer_ms_p50": median_ms(&mut answers),
                "post_answer_ms_p99": p99_ms(&mut answers),
            })
        );
    };
    report("warm", measure(runs, runs.min(20)).await?);
    report("empty", measure(runs, 0).await?);

    let cluster = cluster()?;
    let (admin, connection) =
        tokio_postgres::connect(&cluster.admin_url_for("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let mut raw = Vec::new();
    for run in 0..runs + 2 {
        let name = format!("bench_raw_{}", uuid::Uuid::new_v4().simple());
        let started = Instant::now();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        connect_and_select(&cluster.admin_url_for(&name)).await?;
        if run >= 2 {
            raw.push(started.elapsed());
        }
    }
    // The floor: connect + select 1 to a database that exists and was connected to.
    let existing = cluster.admin_url_for("postgres");
    let mut floor = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        connect_and_select(&existing).await?;
        floor.push(started.elapsed());
    }
    println!(
        "{}",
        json!({
            "bench": "instant",
            "baseline": "connect + select 1 to an existing database",
            "runs": runs,
            "ms_p50": median_ms(&mut floor),
            "ms_p99": p99_ms(&mut floor),
        })
    );
    println!(
        "{}",
        json!({
            "bench": "instant",
            "baseline": "raw CREATE DATABASE, then connect + select 1",
            "runs": runs,
            "ms_p50": median_ms(&mut raw),
            "ms_p99": p99_ms(&mut raw),
        })
    );
    Ok(())
}
