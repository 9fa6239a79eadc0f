//! Finished jobs past retention are deleted (with their attempts); live and recent
//! jobs stay.

mod common;

use std::time::{Duration, Instant};

use capy_testkit::{fresh_database, ProcessStack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_past_retention_are_pruned_in_batches() {
    let db = fresh_database().await.unwrap();
    // 2,500 old finished jobs (more than one pruning batch), each with its attempt,
    // and two recent ones.
    sqlx::query(
        "insert into jobs (id, type, state, attempts, max_attempts, claimed_by, claimed_at, completed_at)
         select gen_random_uuid(), 'test.old', s, 1, 3, 'w', now() - interval '2 hours',
                now() - interval '2 hours'
         from unnest(array['completed', 'failed', 'cancelled']) as s, generate_series(1, 834)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into job_attempts (job_id, attempt, worker, started_at, finished_at)
         select id, 1, 'w', claimed_at, completed_at from jobs",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into jobs (id, type, state, max_attempts, completed_at)
         values (gen_random_uuid(), 'test.recent', 'completed', 3, now()),
                (gen_random_uuid(), 'test.waiting', 'pending', 3, null)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // The waiting job's type has no step: keep it pending by holding it far ahead.
    sqlx::query("update jobs set run_at = now() + interval '1 day' where type = 'test.waiting'")
        .execute(&db.pool)
        .await
        .unwrap();

    let env = [("CAPY_JOB_RETENTION_SECONDS", "3600".to_string())];
    let _stack = ProcessStack::start(&db.url, 1, &env).await.unwrap();
    let started = Instant::now();
    loop {
        let old: i64 = sqlx::query_scalar("select count(*) from jobs where type = 'test.old'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if old == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{old} old jobs remain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<String> = sqlx::query_scalar("select type from jobs order by type")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, ["test.recent", "test.waiting"]);
    let attempts: i64 = sqlx::query_scalar("select count(*) from job_attempts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "attempts go with their jobs");
}
