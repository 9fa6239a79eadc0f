//! `soak`: measures the peak briefly (jobs queued while the workers run, so the
//! inserts' cost is in it; the burn-down of jobs queued beforehand is printed beside
//! it), then offers `--fraction` of it for
//! `--minutes` with worker processes running: `enqueue_many` batches on a timer, one
//! JSON line per minute (jobs completed per second, backlog, insert → claim), and at
//! the end the tables' dead tuples and sizes then against their start. Finished jobs
//! accumulate, as they do in production: the workers keep their default retention.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use capy_shared::model::job_type;
use capy_testkit::{fresh_database, ProcessStack};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::latency::{claim_latency, v7_floor};
use crate::queue::{run_burn_down, run_queued_while_working, wait_until_done};
use crate::stats::round2;

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Share of the measured peak offered during the soak.
    #[arg(long, default_value_t = 0.8)]
    fraction: f64,
    /// Jobs of each of the two runs that measure the peaks.
    #[arg(long, default_value_t = 100_000)]
    peak_jobs: i64,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker (the burn-down's).
    #[arg(long, default_value_t = 2000)]
    concurrency: usize,
    /// Milliseconds between two `enqueue_many` rounds.
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
}

/// One minute of the soak.
struct Minute {
    completed_per_s: f64,
    offered_per_s: f64,
    /// The minute's bounds (epoch ms): its jobs' ids lie between their UUIDv7 floors.
    from_ms: u64,
    to_ms: u64,
}

/// The two peaks: jobs queued beforehand (the burn-down), and jobs queued while the
/// workers run, whose inserts share the machine with them. The soak offers a fraction
/// of the second: a queue's sustained rate includes its inserts.
struct Peaks {
    burn_down: f64,
    queued_while_working: f64,
}

async fn peaks(args: &SoakArgs) -> anyhow::Result<Peaks> {
    let (workers, slots) = (args.workers, args.concurrency);
    let db = fresh_database().await?;
    let burn_down = run_burn_down(&db, args.peak_jobs, workers, slots, false).await?;
    let db = fresh_database().await?;
    let queued_while_working =
        run_queued_while_working(&db, args.peak_jobs, workers, slots).await?;
    Ok(Peaks {
        burn_down,
        queued_while_working,
    })
}

pub async fn soak(args: &SoakArgs) -> anyhow::Result<()> {
    let peaks = peaks(args).await?;
    let rate = peaks.queued_while_working * args.fraction;
    println!(
        "{}",
        json!({"bench": "soak", "peak_burn_down_jobs_per_s": round2(peaks.burn_down),
               "peak_queued_while_working_jobs_per_s": round2(peaks.queued_while_working),
               "offering_per_s": round2(rate)})
    );
    let db = fresh_database().await?;
    // The workers' own default retention, whatever this shell exports.
    std::env::remove_var("CAPY_JOB_RETENTION_SECONDS");
    let env = [("CAPY_WORKER_CONCURRENCY", args.concurrency.to_string())];
    let _stack = ProcessStack::start(&db.url, args.workers, &env).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = table_stats(&db.pool).await?;
    let inserted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs(args.minutes * 60);
    let producer = tokio::spawn(produce(
        db.pool.clone(),
        rate,
        until,
        Duration::from_millis(args.tick_ms),
        inserted.clone(),
    ));
    let minutes = watch_minutes(&db.pool, start, args.minutes, &inserted).await?;
    producer.await.context("the producer panicked")??;
    // What is left of a backlog is worked off before the tables are looked at.
    let draining = Instant::now();
    wait_until_done(&db.pool, Duration::from_secs(3600)).await?;
    let drain_s = draining.elapsed().as_secs_f64();
    // Every job now claimed: each minute's insert → claim in full (the per-minute lines
    // could only count a job still waiting until then).
    let mut claim_p99 = Vec::new();
    for minute in &minutes {
        let claim =
            claim_latency(&db.pool, v7_floor(minute.from_ms), v7_floor(minute.to_ms)).await?;
        claim_p99.push(claim["p99"].clone());
    }
    let after = table_stats(&db.pool).await?;
    let tables = json!({"start": before, "end": after, "drain_after_last_minute_s": round2(drain_s),
                        "claim_p99_ms_by_minute": claim_p99});
    report(args, &peaks, rate, &minutes, tables, &inserted);
    Ok(())
}

/// Queues `rate` jobs a second until `until`: each tick, what the schedule owes so
/// far, in `enqueue_many` batches of at most 5,000, one transaction each.
async fn produce(
    pool: PgPool,
    rate: f64,
    until: Instant,
    tick: Duration,
    inserted: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < until {
        interval.tick().await;
        let owed = (rate * start.elapsed().as_secs_f64()) as u64;
        let mut missing = owed.saturating_sub(inserted.load(Ordering::Relaxed));
        while missing > 0 {
            let batch = missing.min(5000);
            crate::queue::insert_jobs(&pool, i64::try_from(batch)?, job_type::NOOP).await?;
            inserted.fetch_add(batch, Ordering::Relaxed);
            missing -= batch;
        }
    }
    Ok(())
}

fn unix_ms() -> u64 {
    crate::stats::now_ms() as u64
}

/// Prints a line per minute: jobs completed per second (inserted minus the backlog),
/// jobs offered per second, the backlog, and insert → claim of the minute's jobs.
async fn watch_minutes(
    pool: &PgPool,
    start: Instant,
    minutes: u64,
    inserted: &AtomicU64,
) -> anyhow::Result<Vec<Minute>> {
    let mut out = Vec::new();
    let (mut done_before, mut inserted_before) = (0u64, 0u64);
    let mut from_ms = unix_ms();
    for minute in 1..=minutes {
        tokio::time::sleep_until((start + Duration::from_secs(60 * minute)).into()).await;
        let to_ms = unix_ms();
        let now_inserted = inserted.load(Ordering::Relaxed);
        let backlog = u64::try_from(backlog(pool).await?)?;
        let done = now_inserted.saturating_sub(backlog);
        let seconds = (to_ms - from_ms) as f64 / 1000.0;
        let claim = claim_latency(pool, v7_floor(from_ms), v7_floor(to_ms)).await?;
        let row = Minute {
            completed_per_s: (done - done_before) as f64 / seconds,
            offered_per_s: (now_inserted - inserted_before) as f64 / seconds,
            from_ms,
            to_ms,
        };
        let (dead, index_bytes) = jobs_bloat(pool).await?;
        println!(
            "{}",
            json!({"bench": "soak", "minute": minute, "completed_per_s": round2(row.completed_per_s),
                   "offered_per_s": round2(row.offered_per_s), "backlog": backlog,
                   "insert_to_claim_ms_so_far": claim, "jobs_n_dead_tup": dead,
                   "jobs_indexes_bytes": index_bytes})
        );
        out.push(row);
        (done_before, inserted_before, from_ms) = (done, now_inserted, to_ms);
    }
    Ok(out)
}

/// Dead tuples of `jobs` and the size of its indexes, now.
async fn jobs_bloat(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "select n_dead_tup, pg_indexes_size(relid) from pg_stat_user_tables where relname = 'jobs'",
    )
    .fetch_one(pool)
    .await?)
}

/// Jobs pending or claimed (each counted from its partial index).
async fn backlog(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select (select count(*) from jobs where state = 'pending')
              + (select count(*) from jobs where state = 'claimed')",
    )
    .fetch_one(pool)
    .await?)
}

/// Live and dead tuples, vacuum counts and sizes of `jobs` and `job_attempts`, and
/// the size of each index of `jobs`.
async fn table_stats(pool: &PgPool) -> anyhow::Result<Value> {
    // The statistics reach the views within a second or so of a transaction's end.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tables: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "select relname::text, n_live_tup, n_dead_tup, autovacuum_count,
                pg_relation_size(relid), pg_indexes_size(relid)
         from pg_stat_user_tables where relname in ('jobs', 'job_attempts') order by relname",
    )
    .fetch_all(pool)
    .await?;
    let indexes: Vec<(String, i64)> = sqlx::query_as(
        "select indexrelname::text, pg_relation_size(indexrelid)
         from pg_stat_user_indexes where relname = 'jobs' order by indexrelname",
    )
    .fetch_all(pool)
    .await?;
    let mut out = serde_json::Map::new();
    for (name, live, dead, autovacuums, heap, index) in tables {
        out.insert(
            name,
            json!({"n_live_tup": live, "n_dead_tup": dead, "autovacuum_count": autovacuums,
                   "table_bytes": heap, "indexes_bytes": index}),
        );
    }
    let indexes: serde_json::Map<String, Value> =
        indexes.into_iter().map(|(n, b)| (n, json!(b))).collect();
    out.insert("jobs_index_bytes".into(), Value::Object(indexes));
    Ok(Value::Object(out))
}

fn report(
    args: &SoakArgs,
    peaks: &Peaks,
    rate: f64,
    minutes: &[Minute],
    tables: Value,
    inserted: &AtomicU64,
) {
    let first = minutes.first().map_or(f64::NAN, |m| m.completed_per_s);
    let last = minutes.last().map_or(f64::NAN, |m| m.completed_per_s);
    println!(
        "{}",
        json!({
            "bench": "soak",
            "minutes": args.minutes,
            "workers": args.workers,
            "retention": "the worker's default (CAPY_JOB_RETENTION_SECONDS unset)",
            "peak_burn_down_jobs_per_s": round2(peaks.burn_down),
            "peak_queued_while_working_jobs_per_s": round2(peaks.queued_while_working),
            "fraction": args.fraction,
            "asked_per_s": round2(rate),
            "jobs_inserted": inserted.load(Ordering::Relaxed),
            "completed_per_s_by_minute": minutes.iter().map(|m| round2(m.completed_per_s)).collect::<Vec<_>>(),
            "offered_per_s_by_minute": minutes.iter().map(|m| round2(m.offered_per_s)).collect::<Vec<_>>(),
            "last_vs_first_minute": round2(last / first),
            "declined": last < first * 0.95,
            "end_of_run": tables,
        })
    );
}
