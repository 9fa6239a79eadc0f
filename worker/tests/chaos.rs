#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Workers killed with SIGKILL, and one frozen with SIGSTOP past its lease, mid
//! burn-down of jobs that each run a real child process: every job still completes,
//! exactly one attempt of each succeeds, and no two steps of a resource (three jobs
//! each, in order) ever run at once.
//!
//! Overlap is seen by the steps themselves, as in the `locked_resource` test: each step
//! holds an exclusive `flock` on a file named after its resource while it runs (the
//! lock dies with its process), and a step that finds the file locked fails at once with
//! exit code 3. The times capy records are not used for this: rescue writes
//! them itself. The frozen worker is thawed while the jobs taken from it run on other
//! workers, so its late outcomes meet jobs that are no longer its own: written over
//! them, they would end a job whose step still runs and start the resource's next job
//! beside it.

mod common;

use std::time::Duration;

use capy_testkit::{fresh_database, ProcessStack};
use rand::Rng as _;
use uuid::Uuid;

const JOBS: usize = 300;
/// Jobs per resource, run one after another.
const PER_RESOURCE: usize = 3;
const LEASE_SECONDS: u64 = 2;

/// The step: take the job's lock without waiting (`flock -n`) and hold it while the
/// step runs (`-F`: flock becomes the command, so the lock lives exactly as long as
/// this process; the worker's parent-death signal ends it with a killed worker).
fn step(locks: &std::path::Path) -> String {
    format!(
        "r=$(grep -o '\"locked_resource\":\"[^\"]*\"' | cut -d'\"' -f4); \
         exec flock -n -F -E 3 '{dir}/'\"$r\" sleep 0.5",
        dir = locks.display()
    )
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Waits until a job rescued from the frozen worker (`worker-<n>`, as the test support
/// names them) is claimed by another one.
async fn thaw_when_its_jobs_run_elsewhere(pool: &sqlx::PgPool, frozen: &str) {
    let own = frozen;
    let started = std::time::Instant::now();
    loop {
        let taken: bool = sqlx::query_scalar(
            "select exists (select 1 from job_attempt_history a join jobs j on j.id = a.job_id
                            where a.worker = $1 and a.classification = 'worker_lost'
                              and j.state = 'claimed' and j.claimed_by <> $1)",
        )
        .bind(own)
        .fetch_one(pool)
        .await
        .unwrap();
        if taken {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(LEASE_SECONDS * 10),
            "no job of the frozen worker was taken over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_frozen_workers_lose_no_job_and_no_step_runs_twice_at_once() {
    let db = fresh_database().await.unwrap();
    let locks = std::env::temp_dir().join(format!("capy-chaos-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&locks).unwrap();
    let env = [
        ("CAPY_STEP_COMMANDS", format!("test.hold={}", step(&locks))),
        ("CAPY_LEASE_SECONDS", LEASE_SECONDS.to_string()),
        ("CAPY_RETRY_BASE_DELAY_MS", "10".to_string()),
        ("CAPY_WORKER_CONCURRENCY", "8".to_string()),
    ];
    let mut stack = ProcessStack::start(&db.url, 6, &env).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The resource names the step's lock file; its jobs run one after another.
    common::queue_jobs(&db.pool, "test.hold", JOBS, 10, |i| {
        Some(format!("chaos-{}", i % (JOBS / PER_RESOURCE)))
    })
    .await;

    // Freeze one worker past its lease: its jobs are rescued and run elsewhere, and
    // when it wakes its own outcomes must be fenced off.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = stack.workers[5].id();
    let frozen_id = "worker-6";
    signal(frozen, "STOP");
    // Kill three others at random moments while jobs remain.
    for victim in stack.workers.iter_mut().take(3) {
        let pause = rand::thread_rng().gen_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        victim.0.kill().unwrap();
        victim.0.wait().unwrap();
    }
    thaw_when_its_jobs_run_elsewhere(&db.pool, frozen_id).await;
    signal(frozen, "CONT");
    common::wait_until_idle(&db.pool, Duration::from_secs(240)).await;

    let clashes: Vec<(Uuid, i32, String)> = sqlx::query_as(
        "select job_id, attempt, stderr from job_attempt_history where exit_code = 3 order by job_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        clashes.is_empty(),
        "{} steps found another step of their resource running: {:?}",
        clashes.len(),
        clashes.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(
        common::job_states(&db.pool).await,
        vec![("completed".to_string(), JOBS as i64)]
    );
    // Exactly one successful attempt recorded per job: a frozen or rescued worker's
    // late outcome is not written over the job's.
    let successes: (i64, i64) = sqlx::query_as(
        "select count(distinct job_id), count(*) from job_attempt_history where classification is null",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(successes, (JOBS as i64, JOBS as i64));
    let lost: Vec<(String, i64)> = sqlx::query_as(
        "select worker, count(*) from job_attempt_history where classification = 'worker_lost'
         group by worker",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        !lost.is_empty(),
        "workers were killed and frozen mid-run, yet no attempt was lost"
    );
    assert!(
        lost.len() <= 4,
        "only the three killed and the frozen worker lose jobs: {lost:?}"
    );
    eprintln!("attempts lost per worker: {lost:?}");
    std::fs::remove_dir_all(&locks).unwrap();
}
