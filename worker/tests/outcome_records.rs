#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Recording outcomes (`queue::Outcomes`): every attempt stays readable for operators
//! although a completed attempt is no longer written to `job_attempts` (its job's row
//! describes it); outcomes are matched against the claimed jobs, never the history,
//! however stale the statistics; and the planner is left as it was found for the rest
//! of the transaction.

use std::time::Duration;

use capy_shared::db;
use capy_shared::model::{Job, JobState, RetryClassification};
use capy_shared::queue::{self, AttemptOutcome, FinishedAttempt};
use capy_testkit::fresh_database;
use sqlx::PgPool;

mod common;

const WORKER: &str = "worker-history-test";
const LEASE: Duration = Duration::from_secs(60);

async fn queue_job(pool: &PgPool) -> Job {
    let mut tx = pool.begin().await.unwrap();
    let job = queue::enqueue(&mut tx, &common::job("test.history"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    job
}

async fn claim_it(pool: &PgPool, job: &Job) -> Job {
    let claimed = queue::claim(pool, WORKER, 10, LEASE, None).await.unwrap();
    claimed.into_iter().find(|j| j.id == job.id).unwrap()
}

/// Records `job`'s current attempt: `class` None is a success.
async fn finish_it(pool: &PgPool, job: &Job, class: Option<RetryClassification>) -> Job {
    let jobs = record(pool, job, class).await;
    jobs.into_iter().next().unwrap()
}

/// Records `job`'s current attempt in an [`queue::Outcomes`] transaction; answers the
/// jobs it updated (none when the attempt was no longer the worker's).
async fn record(pool: &PgPool, job: &Job, class: Option<RetryClassification>) -> Vec<Job> {
    let finished = FinishedAttempt {
        job_id: job.id,
        attempt: job.attempts,
        outcome: AttemptOutcome {
            cancelled: false,
            exit_code: Some(if class.is_some() { 75 } else { 0 }),
            classification: class,
            error: class.map(|_| "the cluster is restarting".to_string()),
            stdout: format!("stdout of attempt {}", job.attempts),
            stderr: format!("stderr of attempt {}", job.attempts),
        },
        retry_delay: Duration::ZERO,
    };
    let mut outcomes = queue::Outcomes::begin(pool).await.unwrap();
    let jobs = outcomes.finish(WORKER, &[finished]).await.unwrap();
    let mut tx = outcomes.planner_back().await.unwrap();
    // The planner is itself again for whatever the transaction does next.
    let settings: Vec<String> = sqlx::query_scalar(
        "select setting from pg_settings
         where name in ('enable_nestloop', 'enable_mergejoin', 'enable_seqscan')",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(settings, ["on"; 3], "planner left switched off");
    tx.commit().await.unwrap();
    jobs
}

type Row = (
    i32,
    String,
    Option<i32>,
    Option<String>,
    String,
    String,
    bool,
);

async fn history(pool: &PgPool, job: &Job) -> Vec<Row> {
    sqlx::query_as(
        "select attempt, worker, exit_code, classification, stdout, stderr,
                finished_at >= started_at
         from job_attempt_history where job_id = $1 order by attempt",
    )
    .bind(job.id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn recorded_rows(pool: &PgPool, job: &Job) -> i64 {
    sqlx::query_scalar("select count(*) from job_attempts where job_id = $1")
        .bind(job.id)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn row(attempt: i32, code: i32, class: Option<&str>) -> Row {
    (
        attempt,
        WORKER.to_string(),
        Some(code),
        class.map(str::to_string),
        format!("stdout of attempt {attempt}"),
        format!("stderr of attempt {attempt}"),
        true,
    )
}

#[tokio::test]
async fn a_completed_attempt_is_read_from_its_job_and_failed_ones_from_their_records() {
    let db = fresh_database().await.unwrap();

    // Completed at once: nothing written to job_attempts, the attempt still listed.
    let job = queue_job(&db.pool).await;
    let claimed = claim_it(&db.pool, &job).await;
    let done = finish_it(&db.pool, &claimed, None).await;
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(recorded_rows(&db.pool, &job).await, 0);
    assert_eq!(history(&db.pool, &job).await, [row(1, 0, None)]);

    // Failed, retried, then completed: the failure is recorded, the success is the job's.
    let job = queue_job(&db.pool).await;
    let first = claim_it(&db.pool, &job).await;
    let retried = finish_it(&db.pool, &first, Some(RetryClassification::Transient)).await;
    assert_eq!(retried.state, JobState::Pending);
    let second = claim_it(&db.pool, &job).await;
    assert_eq!(second.attempts, 2);
    finish_it(&db.pool, &second, None).await;
    assert_eq!(recorded_rows(&db.pool, &job).await, 1);
    assert_eq!(
        history(&db.pool, &job).await,
        [row(1, 75, Some("transient")), row(2, 0, None)]
    );

    // Failed for good: the record is the only row, not listed twice.
    let job = queue_job(&db.pool).await;
    let claimed = claim_it(&db.pool, &job).await;
    let failed = finish_it(&db.pool, &claimed, Some(RetryClassification::Permanent)).await;
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(
        history(&db.pool, &job).await,
        [row(1, 75, Some("permanent"))]
    );
}

/// `jobs` finished jobs of the past, inserted at once.
async fn finished_history(pool: &PgPool, jobs: i32) {
    sqlx::query(
        "insert into jobs (id, type, state, attempts, max_attempts, completed_at)
         select gen_random_uuid(), 'test.history', 'completed', 1, 1, now()
         from generate_series(1, $1)",
    )
    .bind(jobs)
    .execute(pool)
    .await
    .unwrap();
}

/// Scans of the jobs table, of the claimed jobs' index and of the primary key, as this
/// session counts them (counts not yet flushed to the statistics: compare two readings
/// taken in one transaction, during which nothing is flushed).
async fn scans(tx: &mut sqlx::PgConnection) -> [i64; 3] {
    let counts: (i64, i64, i64) = sqlx::query_as(
        "select pg_stat_get_xact_numscans('jobs'::regclass),
                pg_stat_get_xact_numscans('jobs_claimed_lease'::regclass),
                pg_stat_get_xact_numscans('jobs_pkey'::regclass)",
    )
    .fetch_one(tx)
    .await
    .unwrap();
    [counts.0, counts.1, counts.2]
}

#[tokio::test]
async fn outcomes_are_matched_against_the_claimed_jobs_never_the_history() {
    let db = fresh_database().await.unwrap();
    // A history of finished jobs, and statistics that have seen nothing claimed.
    finished_history(&db.pool, 20_000).await;
    let mut jobs = Vec::new();
    for _ in 0..300 {
        jobs.push(queue_job(&db.pool).await);
    }
    sqlx::query("analyze jobs").execute(&db.pool).await.unwrap();
    let claimed = queue::claim(&db.pool, WORKER, 300, LEASE, None)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 300);
    // One session, whose statistics the assertions read.
    let session = db::pool(&db.url, 1).unwrap();

    for batch in [&claimed[..1], &claimed[1..]] {
        let finished: Vec<FinishedAttempt> = batch.iter().map(FinishedAttempt::succeeded).collect();
        // What the session counted so far is reported before it answers, so the
        // transaction below starts from nothing (`pg_stat_get_xact_*` also shows a
        // session's counts of earlier transactions until they are reported).
        sqlx::query("select pg_stat_force_next_flush()")
            .execute(&session)
            .await
            .unwrap();
        let mut outcomes = queue::Outcomes::begin(&session).await.unwrap();
        let recorded = outcomes.finish(WORKER, &finished).await.unwrap();
        assert_eq!(recorded.len(), batch.len());
        let mut tx = outcomes.planner_back().await.unwrap();
        // `finish` is the only statement in the transaction that read a table. Each of
        // the batch's ids looked up once in the primary key
        // (PostgreSQL 15 counts a scan per id); no scan of the table (its history), no
        // walk of the claimed jobs' index (an entry for every claim since the last
        // vacuum).
        let made = scans(&mut tx).await;
        assert_eq!(made, [0, 0, batch.len() as i64], "batch of {}", batch.len());
        tx.commit().await.unwrap();
    }
}

/// A claim first run while the queue was nearly empty (a new install) does not scan the
/// whole table once it has grown: PostgreSQL caches a prepared statement's generic
/// plan after a few runs, and on the workers' queue connections that plan stays a TID
/// scan of the rows just locked.
#[tokio::test]
async fn a_claim_planned_on_a_small_queue_does_not_scan_it_whole_once_grown() {
    let db = fresh_database().await.unwrap();
    let queue_pool = db::queue_pool(&db.pool, 1);
    let mut conn = queue_pool.acquire().await.unwrap();
    // Runs on a handful of jobs: PostgreSQL settles on a generic plan.
    for _ in 0..8 {
        let job = queue_job(&db.pool).await;
        let claimed = queue::claim(&mut *conn, WORKER, 10, LEASE, None)
            .await
            .unwrap();
        assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), [job.id]);
    }
    // The history grows past anything worth scanning.
    finished_history(&db.pool, 20_000).await;
    let job = queue_job(&db.pool).await;
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    let before = scans(&mut tx).await;
    let claimed = queue::claim(&mut *tx, WORKER, 10, LEASE, None)
        .await
        .unwrap();
    let after = scans(&mut tx).await;
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), [job.id]);
    assert_eq!(after[0] - before[0], 0, "the claim scanned the job table");
    tx.commit().await.unwrap();
}

/// An outcome whose job's lease is being renewed at that moment (the worker's
/// heartbeat runs on a connection of its own) waits for the renewal and is recorded.
/// Found by its row's address, read before the renewal moved the row, it had been
/// dropped as if the lease were lost: the job ran again elsewhere.
#[tokio::test]
async fn an_outcome_racing_its_own_heartbeat_is_recorded() {
    let db = fresh_database().await.unwrap();
    let job = queue_job(&db.pool).await;
    let claimed = claim_it(&db.pool, &job).await;
    // A heartbeat in flight: the lease renewed, not yet committed.
    let mut beat = db.pool.begin().await.unwrap();
    let held = queue::heartbeat(&mut *beat, WORKER, &[job.id], &[claimed.attempts], LEASE)
        .await
        .unwrap();
    assert_eq!(held, [(job.id, false)]);
    let pool = db.pool.clone();
    let finishing = tokio::spawn(async move { record(&pool, &claimed, None).await });
    // The outcome has read the row and waits for the heartbeat's lock (the test's
    // database is its own: no other session waits there).
    let waiting = || async {
        sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from pg_stat_activity
                            where wait_event_type = 'Lock' and datname = current_database())",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let started = std::time::Instant::now();
    while !waiting().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the outcome never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    beat.commit().await.unwrap();
    let recorded = finishing.await.unwrap();
    assert_eq!(
        recorded.iter().map(|j| (j.id, j.state)).collect::<Vec<_>>(),
        [(job.id, JobState::Completed)],
        "the outcome was dropped though the job was still the worker's"
    );
}
