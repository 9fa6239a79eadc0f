//! Queue tests' set-up: a fresh control database, jobs queued straight into it, and
//! workers as real processes.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use capy_shared::queue::{self, NewJob};
use sqlx::PgPool;
use uuid::Uuid;

/// A job of `job_type` of no project, due now, with 3 attempts and no resource.
pub fn job(job_type: &str) -> NewJob {
    NewJob {
        job_type: job_type.to_string(),
        organization_id: None,
        project_id: None,
        preview_database_id: None,
        cluster_id: None,
        locked_resource: None,
        max_attempts: 3,
        args: serde_json::json!({}),
        run_at: None,
    }
}

/// Queues `jobs` in one transaction; answers their ids in order.
pub async fn enqueue(pool: &PgPool, jobs: &[NewJob]) -> Vec<Uuid> {
    let mut tx = pool.begin().await.unwrap();
    let ids = queue::enqueue_many(&mut tx, jobs).await.unwrap();
    tx.commit().await.unwrap();
    ids
}

/// Queues `count` jobs of `job_type`; job `i` gets `resource(i)` as its locked
/// resource. Answers their ids in submission order.
pub async fn queue_jobs(
    pool: &PgPool,
    job_type: &str,
    count: usize,
    max_attempts: i32,
    resource: impl Fn(usize) -> Option<String>,
) -> Vec<Uuid> {
    let jobs: Vec<NewJob> = (0..count)
        .map(|i| NewJob {
            locked_resource: resource(i),
            max_attempts,
            ..job(job_type)
        })
        .collect();
    enqueue(pool, &jobs).await
}

/// Waits until no job is pending or claimed.
pub async fn wait_until_idle(pool: &PgPool, limit: Duration) {
    let started = Instant::now();
    loop {
        let busy: i64 =
            sqlx::query_scalar("select count(*) from jobs where state in ('pending', 'claimed')")
                .fetch_one(pool)
                .await
                .unwrap_or(1);
        if busy == 0 {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{busy} jobs still pending or claimed after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until job `id` is in `state`; answers how long that took.
pub async fn wait_for_state(pool: &PgPool, id: Uuid, state: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let now: Option<String> = sqlx::query_scalar("select state from jobs where id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .unwrap_or(None);
        if now.as_deref() == Some(state) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "job {id} is {now:?}, not {state}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many jobs are in each state.
pub async fn job_states(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as("select state, count(*) from jobs group by state order by state")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Attempts of one job whose run times overlap another attempt of the same job.
pub async fn overlapping_attempts(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from job_attempt_history a join job_attempt_history b
           on a.job_id = b.job_id and a.attempt < b.attempt
         where b.started_at < a.finished_at",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Whether a process whose command line contains `marker` is alive.
pub fn process_alive(marker: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|cmdline| {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                cmdline.contains(marker)
            })
            .unwrap_or(false)
    })
}
