#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! A cancel asked while an attempt runs wins over that attempt's retryable failure: the
//! job ends `cancelled`, never back to `pending`, and the attempt keeps its real
//! classification. Driven through the queue's own functions on a real database.

use std::time::Duration;

use capy_shared::model::{Job, JobState, RetryClassification};
use capy_shared::queue::{self, AttemptOutcome, FinishedAttempt, NewJob, Transition};
use capy_testkit::fresh_database;
use sqlx::PgPool;
use uuid::Uuid;

const WORKER: &str = "worker-cancel-test";
const LEASE: Duration = Duration::from_secs(60);

/// Queues one job with attempts to spare and claims it as `WORKER`.
async fn claimed_job(pool: &PgPool) -> Job {
    let mut tx = pool.begin().await.unwrap();
    let job = queue::enqueue(
        &mut tx,
        &NewJob {
            job_type: "test.cancel".into(),
            organization_id: None,
            project_id: None,
            preview_database_id: None,
            cluster_id: None,
            locked_resource: Some(format!("test:{}", Uuid::now_v7())),
            max_attempts: 5,
            args: serde_json::json!({}),
            run_at: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let claimed = queue::claim(pool, WORKER, 10, LEASE, None).await.unwrap();
    let claimed = claimed.into_iter().find(|j| j.id == job.id).unwrap();
    assert_eq!(claimed.state, JobState::Claimed);
    claimed
}

async fn ask_cancel(pool: &PgPool, job: &Job) {
    let mut tx = pool.begin().await.unwrap();
    let outcome = queue::cancel(&mut tx, job.id).await.unwrap();
    tx.commit().await.unwrap();
    match outcome {
        Transition::Done(job) => {
            assert_eq!(job.state, JobState::Claimed, "a running job stays claimed");
            assert!(job.cancel_requested_at.is_some());
        }
        other => panic!("cancel refused: {other:?}"),
    }
}

/// Records attempt 1 of `job` as failed with `class`; answers the job as recorded.
async fn fail_attempt(pool: &PgPool, job: &Job, class: RetryClassification) -> Job {
    let finished = FinishedAttempt {
        job_id: job.id,
        attempt: job.attempts,
        outcome: AttemptOutcome {
            cancelled: false,
            exit_code: Some(75),
            classification: Some(class),
            error: Some("could not connect: the cluster is restarting".into()),
            stdout: "step output".into(),
            stderr: String::new(),
        },
        retry_delay: Duration::from_millis(10),
    };
    let mut outcomes = queue::Outcomes::begin(pool).await.unwrap();
    let jobs = outcomes.finish(WORKER, &[finished]).await.unwrap();
    outcomes.commit().await.unwrap();
    assert_eq!(jobs.len(), 1, "the outcome was recorded");
    jobs.into_iter().next().unwrap()
}

async fn attempt_classification(pool: &PgPool, job_id: Uuid) -> Vec<(i32, Option<String>)> {
    sqlx::query_as("select attempt, classification from job_attempt_history where job_id = $1")
        .bind(job_id)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_cancel_asked_during_an_attempt_wins_over_its_transient_failure_or_timeout() {
    let db = fresh_database().await.unwrap();
    for class in [RetryClassification::Transient, RetryClassification::Timeout] {
        let job = claimed_job(&db.pool).await;
        ask_cancel(&db.pool, &job).await;
        let recorded = fail_attempt(&db.pool, &job, class).await;
        assert_eq!(
            recorded.state,
            JobState::Cancelled,
            "a cancel asked while the attempt ran was lost to its {} failure: {recorded:?}",
            class.as_str()
        );
        assert!(recorded.completed_at.is_some(), "{recorded:?}");
        assert_eq!(recorded.retry_classification, Some(class));
        let error = recorded.error.clone().unwrap_or_default();
        assert!(
            error.contains("cancelled by request") && error.contains("restarting"),
            "{error}"
        );
        assert_eq!(
            attempt_classification(&db.pool, job.id).await,
            vec![(1, Some(class.as_str().to_string()))],
            "the attempt is recorded with its real classification"
        );
        // Nothing claims it again, however long we wait past its retry delay.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let again = queue::claim(&db.pool, WORKER, 10, LEASE, None)
            .await
            .unwrap();
        assert!(again.iter().all(|j| j.id != job.id), "{again:?}");
    }
}

#[tokio::test]
async fn without_a_cancel_a_transient_failure_is_retried() {
    let db = fresh_database().await.unwrap();
    let job = claimed_job(&db.pool).await;
    let recorded = fail_attempt(&db.pool, &job, RetryClassification::Transient).await;
    assert_eq!(recorded.state, JobState::Pending, "{recorded:?}");
    assert!(recorded.completed_at.is_none());
    assert_eq!(
        recorded.error.as_deref(),
        Some("could not connect: the cluster is restarting")
    );
}

#[tokio::test]
async fn a_cancelled_job_whose_last_attempt_failed_for_good_still_ends_failed() {
    // A permanent failure is the attempt's real result and ends the job either way;
    // the cancel does not hide it.
    let db = fresh_database().await.unwrap();
    let job = claimed_job(&db.pool).await;
    ask_cancel(&db.pool, &job).await;
    let recorded = fail_attempt(&db.pool, &job, RetryClassification::Permanent).await;
    assert_eq!(recorded.state, JobState::Failed, "{recorded:?}");
}
