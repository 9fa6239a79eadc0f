//! The queue's benchmarks: burn-down (jobs/s) and burn-down with a large history of
//! finished jobs. Workers run as real processes.

use std::time::{Duration, Instant};

use capy_shared::model::job_type;
use capy_testkit::{fresh_database, ProcessStack, TestDatabase};
use serde_json::json;
use sqlx::PgPool;

use crate::stats::{median, round2};

/// Job type of `--spawn` runs: a trivial child process per job.
const SPAWN_TYPE: &str = "bench.spawn";

/// Slots per worker for in-process no-ops: as many as a worker claims in one statement.
pub const NOOP_SLOTS: usize = 5000;

#[derive(Debug, clap::Args)]
pub struct BurnDownArgs {
    #[arg(long, default_value_t = 100_000)]
    jobs: i64,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Jobs run a trivial child process (`true`) instead of the in-process no-op.
    #[arg(long)]
    spawn: bool,
    /// Slots per worker (default: 5000 for no-ops, a worker's claim batch; 8 with --spawn).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    #[arg(long, default_value_t = 100_000)]
    jobs: i64,
    /// Completed jobs in the table before the burn-down.
    #[arg(long, default_value_t = 1_000_000)]
    history: i64,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

pub async fn burn_down(args: &BurnDownArgs) -> anyhow::Result<()> {
    let concurrency = args
        .concurrency
        .unwrap_or(if args.spawn { 8 } else { NOOP_SLOTS });
    let mut rates = Vec::new();
    for _ in 0..args.repeat {
        let db = fresh_database().await?;
        rates.push(run_burn_down(&db, args.jobs, args.workers, concurrency, args.spawn).await?);
    }
    println!(
        "{}",
        json!({
            "bench": if args.spawn { "burn_down_spawn" } else { "burn_down" },
            "jobs": args.jobs,
            "workers": args.workers,
            "concurrency": concurrency,
            "jobs_per_s": round2(median(&mut rates.clone())),
            "runs_jobs_per_s": rates.iter().map(|r| round2(*r)).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

pub async fn history(args: &HistoryArgs) -> anyhow::Result<()> {
    let (mut empty, mut full) = (Vec::new(), Vec::new());
    for _ in 0..args.repeat {
        // Baseline and history runs alternate, so drift on a noisy machine hits both.
        let db = fresh_database().await?;
        empty.push(run_burn_down(&db, args.jobs, args.workers, NOOP_SLOTS, false).await?);
        let db = fresh_database().await?;
        add_history(&db.pool, args.history).await?;
        full.push(run_burn_down(&db, args.jobs, args.workers, NOOP_SLOTS, false).await?);
    }
    let (empty_p50, full_p50) = (median(&mut empty.clone()), median(&mut full.clone()));
    println!(
        "{}",
        json!({
            "bench": "history",
            "jobs": args.jobs,
            "history_rows": args.history,
            "workers": args.workers,
            "baseline_jobs_per_s": round2(empty_p50),
            "with_history_jobs_per_s": round2(full_p50),
            "slowdown_percent": round2((1.0 - full_p50 / empty_p50) * 100.0),
            "runs_baseline": empty.iter().map(|r| round2(*r)).collect::<Vec<_>>(),
            "runs_with_history": full.iter().map(|r| round2(*r)).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

/// Starts the workers, queues `jobs` in one transaction once they idle, and answers
/// jobs per second from that commit until the last job completed.
pub(crate) async fn run_burn_down(
    db: &TestDatabase,
    jobs: i64,
    workers: usize,
    concurrency: usize,
    spawn: bool,
) -> anyhow::Result<f64> {
    let mut env = vec![("CAPY_WORKER_CONCURRENCY", concurrency.to_string())];
    if spawn {
        env.push(("CAPY_STEP_COMMANDS", format!("{SPAWN_TYPE}=true")));
    }
    let _stack = ProcessStack::start(&db.url, workers, &env).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kind = if spawn { SPAWN_TYPE } else { job_type::NOOP };
    insert_jobs(&db.pool, jobs, kind).await?;
    let started = Instant::now();
    wait_until_done(&db.pool, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    let completed: i64 = sqlx::query_scalar(
        "select count(*) from jobs where state = 'completed' and claimed_by is distinct from 'history'",
    )
        .fetch_one(&db.pool)
        .await?;
    anyhow::ensure!(completed == jobs, "{completed} of {jobs} jobs completed");
    Ok(jobs as f64 / elapsed.as_secs_f64())
}

/// Starts the workers and, once they idle, queues `jobs` while they work, in
/// `enqueue_many` batches of at most 5,000 (one transaction each) back to back;
/// answers jobs per second from the first batch until the last job completed: the
/// rate the queue sustains when it pays for its inserts too, as it does in production.
pub(crate) async fn run_queued_while_working(
    db: &TestDatabase,
    jobs: i64,
    workers: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let env = [("CAPY_WORKER_CONCURRENCY", concurrency.to_string())];
    let _stack = ProcessStack::start(&db.url, workers, &env).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut left = jobs;
    while left > 0 {
        let batch = left.min(5000);
        insert_jobs(&db.pool, batch, job_type::NOOP).await?;
        left -= batch;
    }
    wait_until_done(&db.pool, Duration::from_secs(600)).await?;
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

/// Time-ordered ids, as the API makes them (their index grows at one end).
fn new_ids(count: i64) -> Vec<uuid::Uuid> {
    (0..count).map(|_| uuid::Uuid::now_v7()).collect()
}

pub(crate) async fn insert_jobs(pool: &PgPool, count: i64, kind: &str) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let jobs = crate::insert::noop_jobs(kind, usize::try_from(count)?);
    capy_shared::queue::enqueue_many(&mut tx, &jobs).await?;
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn wait_until_done(pool: &PgPool, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        // Two probes, each answered from its partial index: one `state in (…)` probe
        // may be planned as a scan of the whole table, which with a long history
        // would cost the workers CPU at every poll.
        let busy: bool = sqlx::query_scalar(
            "select exists (select 1 from jobs where state = 'pending')
                 or exists (select 1 from jobs where state = 'claimed')",
        )
        .fetch_one(pool)
        .await?;
        if !busy {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "jobs still running after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `rows` completed jobs, as months of use would leave them (a completed attempt lives
/// in its job's row, so `job_attempts` gets nothing).
async fn add_history(pool: &PgPool, rows: i64) -> anyhow::Result<()> {
    sqlx::query(
        "insert into jobs (id, type, state, attempts, max_attempts, claimed_by, claimed_at,
                           started_at, completed_at, last_exit_code, last_stdout, last_stderr)
         select id, 'capy.noop', 'completed', 1, 3, 'history',
                now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour',
                0, '', ''
         from unnest($1::uuid[]) as id",
    )
    .bind(new_ids(rows))
    .execute(pool)
    .await?;
    sqlx::query("vacuum analyze jobs").execute(pool).await?;
    Ok(())
}
