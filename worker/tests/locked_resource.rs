//! `locked_resource`: one job of a resource at a time, in submission order.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use capy_testkit::{fresh_database, ProcessStack};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One attempt: job, start, end.
type Run = (Uuid, DateTime<Utc>, DateTime<Utc>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resources_jobs_never_overlap_and_run_in_submission_order() {
    let db = fresh_database().await.unwrap();
    // Each step holds a lock folder named after its resource while it runs: a second
    // step of the same resource running at the same time finds it taken and fails.
    let locks = std::env::temp_dir().join(format!("capy-locks-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&locks).unwrap();
    let step = format!(
        "r=$(grep -o '\"locked_resource\":\"[^\"]*\"' | cut -d'\"' -f4); \
         mkdir '{dir}/'\"$r\" || {{ echo \"$r: another step holds it\" >&2; exit 3; }}; \
         sleep 0.01; rmdir '{dir}/'\"$r\"",
        dir = locks.display()
    );
    let env = [
        ("CAPY_STEP_COMMANDS", format!("test.short={step}")),
        ("CAPY_WORKER_CONCURRENCY", "4".to_string()),
    ];
    let _stack = ProcessStack::start(&db.url, 6, &env).await.unwrap();
    let ids = common::queue_jobs(&db.pool, "test.short", 200, 3, |i| {
        Some(format!("resource:{}", i % 10))
    })
    .await;
    common::wait_until_idle(&db.pool, Duration::from_secs(180)).await;

    let attempts: Vec<(Uuid, String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "select a.job_id, j.locked_resource, a.started_at, a.finished_at
         from job_attempt_history a join jobs j on j.id = a.job_id
         where j.state = 'completed'
         order by j.locked_resource, a.started_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let failed: Vec<(Option<String>,)> =
        sqlx::query_as("select error from jobs where state <> 'completed'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        failed.is_empty(),
        "two steps of one resource ran at once: {failed:?}"
    );
    assert_eq!(attempts.len(), 200, "every job completed in one attempt");

    let submitted: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(n, id)| (*id, n)).collect();
    let mut by_resource: HashMap<String, Vec<Run>> = HashMap::new();
    for (job, resource, started, finished) in attempts {
        by_resource
            .entry(resource)
            .or_default()
            .push((job, started, finished));
    }
    assert_eq!(by_resource.len(), 10);
    for (resource, runs) in &by_resource {
        for pair in runs.windows(2) {
            let ((before, _, before_end), (after, after_start, _)) = (pair[0], pair[1]);
            assert!(
                after_start >= before_end,
                "{resource}: {after} started at {after_start} before {before} finished at {before_end}"
            );
            assert!(
                submitted[&after] > submitted[&before],
                "{resource}: {after} ran before {before}, submitted earlier"
            );
        }
    }
    // Resources ran side by side: the whole took far less than 200 jobs in a row would.
    let concurrent: i64 = sqlx::query_scalar(
        "select count(*) from job_attempt_history a join job_attempt_history b
           on a.job_id < b.job_id and b.started_at < a.finished_at and a.started_at < b.finished_at",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        concurrent > 0,
        "a busy resource must not hold up the others"
    );
}
