//! `latency`: insert → claim under a steady offered load. Jobs go in one per
//! transaction, as API requests queue them, at `--rate` for `--duration`; worker
//! processes claim them. The baseline, same run and same rate: a trivial one-row
//! insert + commit, the floor of what queueing anything costs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use capy_shared::model::job_type;
use capy_shared::queue;
use capy_testkit::{fresh_database, ProcessStack};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::offer::offer;
use crate::queue::wait_until_done;
use crate::stats::{now_ms, round2};

#[derive(Debug, clap::Args)]
pub struct LatencyArgs {
    /// Jobs offered per second, one per transaction.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds the rate is offered for.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Seconds of the baseline (trivial insert + commit at the same rate).
    #[arg(long, default_value_t = 10)]
    baseline_duration: u64,
    /// Tasks (each with its connection) that insert; the schedule's start lag shows
    /// when they cannot keep up.
    #[arg(long, default_value_t = 16)]
    tasks: usize,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

pub async fn latency(args: &LatencyArgs) -> anyhow::Result<()> {
    let db = fresh_database().await?;
    let pool = capy_shared::db::pool(&db.url, u32::try_from(args.tasks)?)?;
    sqlx::query(
        "create table bench_floor (id bigint generated always as identity primary key,
                                   created_at timestamptz not null default now())",
    )
    .execute(&pool)
    .await?;
    let env = [("CAPY_WORKER_CONCURRENCY", args.concurrency.to_string())];
    let _stack = ProcessStack::start(&db.url, args.workers, &env).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let floor = baseline(args, &pool, false).await?;
    let floor_notify = baseline(args, &pool, true).await?;
    let commits_before = xact_commits(&db.pool).await?;
    let (job_pool, commits) = (pool.clone(), Commits::default());
    let job_commits = commits.clone();
    let jobs = offer(
        args.rate,
        Duration::from_secs(args.duration),
        args.tasks,
        move || enqueue_one(job_pool.clone(), job_commits.clone()),
    )
    .await
    .context("offering the jobs")?;
    wait_until_done(&db.pool, Duration::from_secs(120)).await?;
    let claim = claim_latency(&db.pool, Uuid::nil(), Uuid::max()).await?;
    let after_commit = commit_to_claim(&db.pool, &commits).await?;
    // Backends report their counts within a second or so of going idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let transactions = xact_commits(&db.pool).await? - commits_before;
    let p99 = |v: &Value| v["p99"].as_f64().unwrap_or(f64::NAN);
    let ratio = p99(&claim) / p99(&floor["round_trip_ms"]);
    println!(
        "{}",
        json!({
            "bench": "latency",
            "rate_asked_per_s": args.rate,
            "duration_s": args.duration,
            "workers": args.workers,
            "insert_tasks": args.tasks,
            "insert_to_claim_ms": claim,
            "commit_returned_to_claim_ms": after_commit,
            "enqueue_transactions": jobs.figures(),
            "baseline_insert_commit": floor,
            "baseline_insert_notify_commit": floor_notify,
            "control_db_commits_per_job": round2(transactions as f64 / jobs.round_trips.len() as f64),
            "claim_p99_vs_baseline_round_trip_p99": round2(ratio),
        })
    );
    Ok(())
}

/// Each job's id and when (epoch ms) its transaction's commit returned.
type Commits = Arc<Mutex<Vec<(Uuid, f64)>>>;

/// One job queued in a transaction of its own, as an API request queues it.
async fn enqueue_one(pool: PgPool, commits: Commits) -> anyhow::Result<()> {
    let jobs = crate::insert::noop_jobs(job_type::NOOP, 1);
    let mut tx = pool.begin().await?;
    let mut ids = Vec::with_capacity(1);
    for job in &jobs {
        ids.push(queue::enqueue(&mut tx, job).await?.id);
    }
    tx.commit().await?;
    let at = now_ms();
    let mut commits = commits.lock().unwrap_or_else(|e| e.into_inner());
    commits.extend(ids.into_iter().map(|id| (id, at)));
    Ok(())
}

/// Transactions committed in this database so far (all sessions: the inserts, the
/// workers' claims, outcome batches and polls).
async fn xact_commits(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select xact_commit from pg_stat_database where datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

/// `claimed_at` minus when the client saw the commit return: the wake and the claim,
/// without the enqueue's own transaction (`created_at` is when that began).
async fn commit_to_claim(pool: &PgPool, commits: &Commits) -> anyhow::Result<Value> {
    let claimed: Vec<(Uuid, f64)> = sqlx::query_as(
        "select id, (extract(epoch from claimed_at) * 1000)::float8 from jobs
         where claimed_at is not null",
    )
    .fetch_all(pool)
    .await?;
    let claimed: HashMap<Uuid, f64> = claimed.into_iter().collect();
    let commits = commits.lock().unwrap_or_else(|e| e.into_inner());
    let mut gaps: Vec<f64> = commits
        .iter()
        .filter_map(|(id, at)| Some(claimed.get(id)? - at))
        .collect();
    Ok(crate::stats::quantiles(&mut gaps))
}

/// A baseline at the jobs' rate: one row into a two-column table per transaction
/// (with `notify`, also a NOTIFY on a channel no worker listens to, as `enqueue`
/// sends one to wake them).
async fn baseline(args: &LatencyArgs, pool: &PgPool, notify: bool) -> anyhow::Result<Value> {
    let pool = pool.clone();
    let offered = offer(
        args.rate,
        Duration::from_secs(args.baseline_duration),
        args.tasks,
        move || trivial_insert(pool.clone(), notify),
    )
    .await
    .context("offering the baseline inserts")?;
    Ok(offered.figures())
}

/// One row into a two-column table in a transaction of its own.
async fn trivial_insert(pool: PgPool, notify: bool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("insert into bench_floor default values")
        .execute(&mut *tx)
        .await?;
    if notify {
        sqlx::query("select pg_notify('capy_bench_floor', '')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Insert → claim (`claimed_at - created_at`; a job not yet claimed counts until
/// now) of the no-op jobs whose ids lie in `[low, high)` (not the sweeps the workers
/// queue themselves): count, p50, p95, p99 and max in
/// milliseconds.
pub async fn claim_latency(pool: &PgPool, low: Uuid, high: Uuid) -> anyhow::Result<Value> {
    let (count, quantiles): (i64, Option<Vec<f64>>) = sqlx::query_as(
        "select count(*),
                percentile_disc(array[0.5, 0.95, 0.99, 1.0]) within group (
                    order by (extract(epoch from coalesce(claimed_at, clock_timestamp())
                                                 - created_at) * 1000)::float8)
         from jobs where id >= $1 and id < $2 and type = $3",
    )
    .bind(low)
    .bind(high)
    .bind(job_type::NOOP)
    .fetch_one(pool)
    .await
    .context("reading insert → claim latencies")?;
    let q = quantiles.unwrap_or_default();
    let at = |i: usize| q.get(i).map(|v| round2(*v));
    Ok(json!({"jobs": count, "p50": at(0), "p95": at(1), "p99": at(2), "max": at(3)}))
}

/// The smallest UUIDv7 of millisecond `unix_ms`: ids made from then on sort at or
/// after it.
pub fn v7_floor(unix_ms: u64) -> Uuid {
    Uuid::from_u128(u128::from(unix_ms) << 80)
}
