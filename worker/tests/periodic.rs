//! Periodic jobs: one job per slot however many workers look, once after downtime
//! (not once per missed slot), and slots computed in UTC.

// Helpers outside #[test] functions panic on failure too: they are test code.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use capy_shared::periodic::{self, NewPeriodicJob, Schedule};
use capy_testkit::{fresh_database, ProcessStack};
use chrono::{DateTime, TimeZone as _, Utc};
use sqlx::PgPool;

async fn next_run(
    pool: &PgPool,
    minute_of_day: Option<i32>,
    every: Option<i32>,
    previous: Option<DateTime<Utc>>,
    after: DateTime<Utc>,
) -> DateTime<Utc> {
    sqlx::query_scalar("select periodic_next_run($1, $2, $3, $4)")
        .bind(minute_of_day)
        .bind(every)
        .bind(previous)
        .bind(after)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 29, h, m, s).unwrap()
}

#[tokio::test]
async fn the_next_slot_is_the_first_after_now() {
    let db = fresh_database().await.unwrap();
    let pool = &db.pool;
    // Daily at 02:30 UTC: later today, or tomorrow once it has passed (or is now).
    assert_eq!(
        next_run(pool, Some(150), None, None, at(1, 0, 0)).await,
        at(2, 30, 0)
    );
    let tomorrow = Utc.with_ymd_and_hms(2026, 11, 30, 2, 30, 0).unwrap();
    assert_eq!(
        next_run(pool, Some(150), None, None, at(2, 30, 0)).await,
        tomorrow
    );
    // Three days of downtime: the next slot after now, not the first one missed.
    let previous = at(2, 30, 0) - chrono::Duration::days(3);
    assert_eq!(
        next_run(pool, Some(150), None, Some(previous), at(9, 0, 0)).await,
        tomorrow
    );
    // Every 60 s, on the grid of the previous slot.
    assert_eq!(
        next_run(pool, None, Some(60), Some(at(10, 0, 0)), at(10, 5, 30)).await,
        at(10, 6, 0)
    );
    assert_eq!(
        next_run(pool, None, Some(60), Some(at(10, 0, 0)), at(10, 0, 0)).await,
        at(10, 1, 0)
    );
}

fn noop_every(name: &str, seconds: i32) -> NewPeriodicJob {
    NewPeriodicJob {
        name: name.into(),
        job_type: capy_shared::model::job_type::NOOP.into(),
        organization_id: None,
        project_id: None,
        cluster_id: None,
        args: serde_json::json!({}),
        schedule: Schedule::Every { seconds },
        is_active: true,
    }
}

async fn jobs_of(pool: &PgPool, job_type: &str) -> i64 {
    sqlx::query_scalar("select count(*) from jobs where type = $1")
        .bind(job_type)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Many firers racing on one overdue slot (days overdue, as after downtime) queue one
/// job; the slot then lies ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_firers_queue_one_job_for_an_overdue_slot() {
    let db = fresh_database().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let mut daily = noop_every("test:daily", 1);
    daily.schedule = Schedule::Daily { minute_of_day: 0 };
    periodic::upsert(&mut conn, &daily).await.unwrap();
    sqlx::query("update periodic_jobs set next_run_at = now() - interval '3 days'")
        .execute(&db.pool)
        .await
        .unwrap();
    let firers = (0..8).map(|_| {
        let pool = db.pool.clone();
        tokio::spawn(async move { periodic::fire_due(&pool, 3, 10).await.unwrap() })
    });
    let mut queued = 0;
    for firer in firers {
        queued += firer.await.unwrap();
    }
    assert_eq!(queued, 1);
    assert_eq!(jobs_of(&db.pool, "capy.noop").await, 1);
    let row = periodic::get(&mut conn, "test:daily")
        .await
        .unwrap()
        .unwrap();
    assert!(row.next_run_at > Utc::now(), "{row:?}");
    assert!(row.last_job_id.is_some());
    assert_eq!(periodic::fire_due(&db.pool, 3, 10).await.unwrap(), 0);
}

/// Three real workers, a 2-second slot: one job per slot (consecutive jobs a slot
/// apart, never two in one slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_queue_one_job_per_slot() {
    let db = fresh_database().await.unwrap();
    let env = [("CAPY_PERIODIC_INTERVAL_MS", "20".to_string())];
    let _stack = ProcessStack::start(&db.url, 3, &env).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    periodic::upsert(&mut conn, &noop_every("test:every2s", 2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(9)).await;
    let created: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "select created_at from jobs where type = 'capy.noop' order by created_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        (3..=5).contains(&created.len()),
        "9 s of 2-second slots queued {} jobs",
        created.len()
    );
    for pair in created.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap > chrono::Duration::milliseconds(1500),
            "two jobs {gap} apart: a slot fired twice ({created:?})"
        );
    }
}
