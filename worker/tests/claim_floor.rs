#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! The claim floor (`queue::ClaimKey`): a claim from the floor does not step over the
//! dead index entries every earlier claim left at the front of the pending jobs' index,
//! and a job queued below the floor is claimed once the floor is taken again.

use std::time::Duration;

use capy_shared::db;
use capy_shared::queue::{self, NewJob};
use capy_testkit::fresh_database;
use chrono::Utc;
use sqlx::PgPool;

mod common;

const WORKER: &str = "worker-floor-test";
const LEASE: Duration = Duration::from_secs(60);

/// A job due at `run_at` (now when `None`).
fn new_job(run_at: Option<chrono::DateTime<Utc>>) -> NewJob {
    NewJob {
        run_at,
        ..common::job("test.floor")
    }
}

/// Blocks of the pending jobs' index one claim of one job read, and what it claimed.
async fn claim_reading(pool: &PgPool, floor: Option<queue::ClaimKey>) -> (i64, Vec<uuid::Uuid>) {
    let mut tx = pool.begin().await.unwrap();
    let before = index_blocks_read(&mut tx).await;
    let claimed = queue::claim(&mut *tx, WORKER, 1, LEASE, floor)
        .await
        .unwrap();
    let blocks = index_blocks_read(&mut tx).await - before;
    tx.commit().await.unwrap();
    (blocks, claimed.into_iter().map(|job| job.id).collect())
}

/// Blocks of the pending jobs' index this session read and has not reported yet (two
/// readings in one transaction differ by what happened between them).
async fn index_blocks_read(tx: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("select pg_stat_get_xact_blocks_fetched('jobs_claimable'::regclass)")
        .fetch_one(tx)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_claim_from_the_floor_skips_the_entries_earlier_claims_left() {
    let db = fresh_database().await.unwrap();
    // Vacuum would clear the dead entries this test is about.
    sqlx::query("alter table jobs set (autovacuum_enabled = false)")
        .execute(&db.pool)
        .await
        .unwrap();
    let queue_pool = db::queue_pool(&db.pool, 1);
    // 20,000 jobs claimed: each leaves a dead entry at the front of the index (due a
    // minute ago, so they lie below any floor taken now).
    let earlier = Utc::now() - chrono::Duration::minutes(1);
    common::enqueue(&db.pool, &vec![new_job(Some(earlier)); 20_000]).await;
    for _ in 0..4 {
        let claimed = queue::claim(&queue_pool, WORKER, 5000, LEASE, None)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 5000);
    }
    let first = common::enqueue(&db.pool, &[new_job(None)]).await;
    let second = common::enqueue(&db.pool, &[new_job(None)]).await;

    // From the front: every page of dead entries is read.
    let (from_front, claimed) = claim_reading(&queue_pool, None).await;
    assert_eq!(claimed, first);
    assert!(
        from_front > 40,
        "the claim from the front read {from_front} index blocks"
    );
    // From the floor: the pending job's own page, past the descent.
    let floor = queue::claim_floor(&queue_pool).await.unwrap();
    let (from_floor, claimed) = claim_reading(&queue_pool, Some(floor)).await;
    assert_eq!(claimed, second);
    assert!(
        from_floor <= 4,
        "the claim from the floor read {from_floor} index blocks"
    );
}

#[tokio::test]
async fn a_job_queued_below_the_floor_is_claimed_once_the_floor_is_taken_again() {
    let db = fresh_database().await.unwrap();
    let queue_pool = db::queue_pool(&db.pool, 1);
    // Nothing pending: the floor is a moment before now.
    let floor = queue::claim_floor(&queue_pool).await.unwrap();
    assert!(floor.run_at < Utc::now());
    // A job whose key lies below it (as one queued by a transaction that began well
    // before the floor was taken would).
    let past = Utc::now() - chrono::Duration::hours(1);
    let below = common::enqueue(&db.pool, &[new_job(Some(past))]).await;
    let above = common::enqueue(&db.pool, &[new_job(None)]).await;
    let (_, claimed) = claim_reading(&queue_pool, Some(floor)).await;
    assert_eq!(
        claimed, above,
        "the floor's claim sees the job above it only"
    );
    let (_, claimed) = claim_reading(&queue_pool, Some(floor)).await;
    assert!(
        claimed.is_empty(),
        "the job below the floor waits for the next floor"
    );
    // The next floor is the pending job's own key.
    let floor = queue::claim_floor(&queue_pool).await.unwrap();
    assert!(floor.run_at <= past);
    let (_, claimed) = claim_reading(&queue_pool, Some(floor)).await;
    assert_eq!(claimed, below);
}

#[tokio::test]
async fn a_job_queued_by_a_transaction_open_for_a_second_is_above_the_floor() {
    let db = fresh_database().await.unwrap();
    let queue_pool = db::queue_pool(&db.pool, 1);
    // Its jobs are due when it began (`now()`), as a bulk enqueue's are.
    let mut tx = db.pool.begin().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let floor = queue::claim_floor(&queue_pool).await.unwrap();
    let ids = queue::enqueue_many(&mut tx, &[new_job(None)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (_, claimed) = claim_reading(&queue_pool, Some(floor)).await;
    assert_eq!(claimed, ids, "the job waited for the next floor");
}
