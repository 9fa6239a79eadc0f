//! `insert`: how fast jobs go into the queue. One job per transaction (what an API
//! request does, the baseline), one job per statement in a single transaction, and
//! `queue::enqueue_many` in batches (one statement of unnested arrays per batch), each
//! into a fresh database, same run. No workers: only the inserts are timed.

use std::time::Instant;

use capy_shared::queue::{self, NewJob};
use capy_testkit::fresh_database;
use serde_json::json;

use crate::stats::round2;

#[derive(Debug, clap::Args)]
pub struct InsertArgs {
    /// Jobs inserted by each bulk way.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Jobs inserted one per transaction and one per statement (slower: fewer).
    #[arg(long, default_value_t = 5_000)]
    single_jobs: usize,
    /// Jobs per `enqueue_many` call.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
}

/// `count` no-op jobs of type `kind`, as the API would queue them (no resource).
pub fn noop_jobs(kind: &str, count: usize) -> Vec<NewJob> {
    (0..count)
        .map(|_| NewJob {
            job_type: kind.to_string(),
            organization_id: None,
            project_id: None,
            preview_database_id: None,
            cluster_id: None,
            locked_resource: None,
            max_attempts: 3,
            args: json!({}),
            run_at: None,
        })
        .collect()
}

pub async fn insert(args: &InsertArgs) -> anyhow::Result<()> {
    let kind = capy_shared::model::job_type::NOOP;
    let per_transaction = {
        let db = fresh_database().await?;
        let started = Instant::now();
        for job in noop_jobs(kind, args.single_jobs) {
            let mut tx = db.pool.begin().await?;
            queue::enqueue(&mut tx, &job).await?;
            tx.commit().await?;
        }
        args.single_jobs as f64 / started.elapsed().as_secs_f64()
    };
    let one_transaction = {
        let db = fresh_database().await?;
        let started = Instant::now();
        let mut tx = db.pool.begin().await?;
        for job in noop_jobs(kind, args.single_jobs) {
            queue::enqueue(&mut tx, &job).await?;
        }
        tx.commit().await?;
        args.single_jobs as f64 / started.elapsed().as_secs_f64()
    };
    let bulk = {
        let db = fresh_database().await?;
        let jobs = noop_jobs(kind, args.jobs);
        let started = Instant::now();
        for batch in jobs.chunks(args.batch.max(1)) {
            let mut tx = db.pool.begin().await?;
            queue::enqueue_many(&mut tx, batch).await?;
            tx.commit().await?;
        }
        args.jobs as f64 / started.elapsed().as_secs_f64()
    };
    println!(
        "{}",
        json!({
            "bench": "insert",
            "one_per_transaction_jobs_per_s": round2(per_transaction),
            "one_per_statement_one_transaction_jobs_per_s": round2(one_transaction),
            "enqueue_many_jobs_per_s": round2(bulk),
            "enqueue_many_batch": args.batch,
            "enqueue_many_vs_one_per_transaction": round2(bulk / per_transaction),
            "jobs_bulk": args.jobs,
            "jobs_single": args.single_jobs,
        })
    );
    Ok(())
}
