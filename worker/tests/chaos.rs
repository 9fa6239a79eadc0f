//! Workers killed with SIGKILL mid burn-down: every job still completes exactly once.

mod common;

use std::time::Duration;

use capy_shared::model::job_type;
use capy_testkit::{fresh_database, ProcessStack};
use rand::Rng as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_no_job_and_no_job_runs_twice_at_once() {
    const JOBS: usize = 20_000;
    let db = fresh_database().await.unwrap();
    let env = [
        ("CAPY_LEASE_SECONDS", "2".to_string()),
        ("CAPY_RETRY_BASE_DELAY_MS", "10".to_string()),
        // Small batches keep every worker busy long enough to be killed holding jobs.
        ("CAPY_WORKER_CONCURRENCY", "50".to_string()),
    ];
    let mut stack = ProcessStack::start(&db.url, 8, &env).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::queue_jobs(&db.pool, job_type::NOOP, JOBS, 10, |_| None).await;

    // Kill three workers at random moments while jobs remain.
    let mut killed = 0;
    while killed < 3 {
        let pause = rand::thread_rng().gen_range(20..200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let victim = &mut stack.workers[killed];
        victim.0.kill().unwrap();
        victim.0.wait().unwrap();
        killed += 1;
    }
    let pending_at_last_kill: i64 =
        sqlx::query_scalar("select count(*) from jobs where state <> 'completed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    common::wait_until_idle(&db.pool, Duration::from_secs(120)).await;

    assert_eq!(
        common::job_states(&db.pool).await,
        vec![("completed".to_string(), JOBS as i64)]
    );

    // Exactly one successful attempt per job.
    let successes: Vec<(i64, i64)> = sqlx::query_as(
        "select count(distinct job_id), count(*) from job_attempts where classification is null",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(successes, vec![(JOBS as i64, JOBS as i64)]);
    assert_eq!(common::overlapping_attempts(&db.pool).await, 0);

    let lost: i64 = sqlx::query_scalar(
        "select count(*) from job_attempts where classification = 'worker_lost'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        pending_at_last_kill == 0 || lost > 0,
        "workers were killed mid-run, yet no attempt was recorded as worker_lost"
    );
    eprintln!("jobs left at the last kill: {pending_at_last_kill}; attempts lost with killed workers: {lost}");
    let lost_workers: i64 = sqlx::query_scalar(
        "select count(distinct worker) from job_attempts where classification = 'worker_lost'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        lost_workers <= 3,
        "only the three killed workers can lose jobs"
    );
}
