//! `metrics`: the API's `/metrics` scrape time over HTTP, on an empty jobs table and
//! with a long history of finished jobs (1,000,000 by default, spread over the 7 days
//! the workers keep them), measured in the same run; beside it, the count of the whole
//! table that the scrape used to run, for scale.

use std::time::{Duration, Instant};

use capy_testkit::{fresh_database, ProcessStack};
use serde_json::json;
use sqlx::PgPool;

use crate::stats::{median_ms, ms, round2};

#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// Finished jobs inserted before the second round of scrapes.
    #[arg(long, default_value_t = 1_000_000)]
    history: i64,
    /// Scrapes per round; the median is reported.
    #[arg(long, default_value_t = 20)]
    scrapes: usize,
    /// The history's finished jobs are spread over this many last seconds (the
    /// workers' default retention is 7 days).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    spread_seconds: u64,
}

pub async fn metrics(args: &MetricsArgs) -> anyhow::Result<()> {
    let db = fresh_database().await?;
    let stack = ProcessStack::start(&db.url, 0, &[]).await?;
    let http = reqwest::Client::new();
    let url = format!("{}/metrics", stack.api_url);
    let mut empty = scrapes(&http, &url, args.scrapes).await?;
    let inserting = Instant::now();
    add_finished(&db.pool, args.history, args.spread_seconds).await?;
    let insert_time = inserting.elapsed();
    let mut full = scrapes(&http, &url, args.scrapes).await?;
    let mut whole_count = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        capy_shared::queue::counts_by_type_and_state(&db.pool).await?;
        whole_count.push(started.elapsed());
    }
    let (empty_p50, full_p50) = (median_ms(&mut empty), median_ms(&mut full));
    println!(
        "{}",
        json!({
            "bench": "metrics",
            "history_rows": args.history,
            "history_spread_seconds": args.spread_seconds,
            "insert_ms": ms(insert_time),
            "scrapes": args.scrapes,
            "empty_scrape_ms": empty_p50,
            "with_history_scrape_ms": full_p50,
            "ratio": round2(full_p50 / empty_p50),
            "whole_table_count_ms": median_ms(&mut whole_count),
        })
    );
    Ok(())
}

/// Times `count` scrapes (after two not counted).
async fn scrapes(http: &reqwest::Client, url: &str, count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for run in 0..count + 2 {
        let started = Instant::now();
        let response = http.get(url).send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "/metrics: {}",
            response.status()
        );
        response.text().await?;
        if run >= 2 {
            samples.push(started.elapsed());
        }
    }
    Ok(samples)
}

/// `rows` completed jobs finished over the last `spread_seconds`, in one statement;
/// then the statistics autovacuum would gather.
async fn add_finished(pool: &PgPool, rows: i64, spread_seconds: u64) -> anyhow::Result<()> {
    sqlx::query(
        "insert into jobs (id, type, state, attempts, max_attempts, claimed_by, claimed_at,
                           started_at, completed_at, last_exit_code, last_stdout, last_stderr)
         select gen_random_uuid(), 'capy.noop', 'completed', 1, 3, 'history', t, t, t, 0, '', ''
         from (select now() - make_interval(secs => $2 * g / $1) as t
               from generate_series(1, $1) g) s",
    )
    .bind(rows)
    .bind(spread_seconds as f64)
    .execute(pool)
    .await?;
    sqlx::query("vacuum analyze jobs").execute(pool).await?;
    Ok(())
}
