//! A step's limits and stops: time limit, output bomb, leftover children, cancel, and
//! the worker's graceful drain on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use capy_api::admin::{self, KeyGrant};
use capy_testkit::{fresh_database, ProcessStack};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A `sleep` argument no other process on the machine has: tests find their steps'
/// processes by it.
fn marker() -> String {
    format!(
        "{}.{}",
        rand::random::<u16>() as u32 + 1000,
        rand::random::<u16>()
    )
}

fn worker_pid(stack: &ProcessStack, n: usize) -> Pid {
    Pid::from_raw(stack.workers[n].id() as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_step_times_out_and_is_retried_then_failed() {
    let sleep = marker();
    let db = fresh_database().await.unwrap();
    let env = [
        (
            "CAPY_STEP_COMMANDS",
            format!("test.hang=echo starting; exec sleep {sleep}"),
        ),
        ("CAPY_STEP_TIMEOUTS", "test.hang=1".to_string()),
        ("CAPY_RETRY_BASE_DELAY_MS", "10".to_string()),
    ];
    let _stack = ProcessStack::start(&db.url, 1, &env).await.unwrap();
    let ids = common::queue_jobs(&db.pool, "test.hang", 1, 2, |_| None).await;
    common::wait_for_state(&db.pool, ids[0], "failed", Duration::from_secs(30)).await;
    let (class, error, stdout): (String, String, String) =
        sqlx::query_as("select retry_classification, error, last_stdout from jobs where id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(class, "timeout");
    assert!(error.contains("time limit"), "{error}");
    assert_eq!(stdout, "starting\n");
    let classes: Vec<String> =
        sqlx::query_scalar("select classification from job_attempt_history order by attempt")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(classes, ["timeout", "timeout"]);
    assert!(
        !common::process_alive(&format!("sleep {sleep}")),
        "the timed-out step's process survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_bomb_is_cut_and_leftover_children_are_killed() {
    let sleep = marker();
    let db = fresh_database().await.unwrap();
    let bomb = format!(
        "sleep {sleep} & head -c 1000000000 /dev/zero | tr '\\0' x; echo; echo the end >&2"
    );
    let env = [
        ("CAPY_STEP_COMMANDS", format!("test.bomb={bomb}")),
        ("CAPY_STEP_OUTPUT_LIMIT_BYTES", "10000".to_string()),
    ];
    let stack = ProcessStack::start(&db.url, 1, &env).await.unwrap();
    let ids = common::queue_jobs(&db.pool, "test.bomb", 1, 1, |_| None).await;
    common::wait_for_state(&db.pool, ids[0], "completed", Duration::from_secs(120)).await;
    let (stdout, stderr): (String, String) =
        sqlx::query_as("select last_stdout, last_stderr from jobs where id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(stdout.len() < 11_000, "stdout kept {} bytes", stdout.len());
    assert!(
        stdout.starts_with("xxxxx") && stdout.contains("bytes cut"),
        "{}",
        &stdout[..200]
    );
    assert_eq!(stderr, "the end\n");
    let stored: i32 = sqlx::query_scalar(
        "select octet_length(stdout) from job_attempt_history where job_id = $1",
    )
    .bind(ids[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(stored < 11_000);
    assert!(
        !common::process_alive(&format!("sleep {sleep}")),
        "the step's background child was left running"
    );
    // The worker's memory stayed small while a gigabyte went through it.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", stack.workers[0].id())).unwrap();
    let high_water_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    assert!(
        high_water_kb < 200 * 1024,
        "worker peaked at {high_water_kb} kB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_its_step_within_a_second() {
    let sleep = marker();
    let db = fresh_database().await.unwrap();
    let env = [(
        "CAPY_STEP_COMMANDS",
        format!("test.long=exec sleep {sleep}"),
    )];
    let stack = ProcessStack::start(&db.url, 1, &env).await.unwrap();
    let grant = KeyGrant {
        name: "admin".into(),
        is_admin: true,
        ..KeyGrant::default()
    };
    let (_, key) = admin::create_api_key(&db.pool, &grant).await.unwrap();
    let http = reqwest::Client::new();

    let ids = common::queue_jobs(&db.pool, "test.long", 2, 3, |_| None).await;
    // Both jobs run (4 slots); cancel the first.
    common::wait_for_state(&db.pool, ids[0], "claimed", Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::process_alive(&format!("sleep {sleep}")) {
        assert!(Instant::now() < deadline, "the step never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelled_at = Instant::now();
    let response = http
        .post(format!("{}/v1/jobs/{}/cancel", stack.api_url, ids[0]))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        202,
        "a running job is cancelled once its step stops"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["job"]["state"], "claimed");
    assert!(body["job"]["cancel_requested_at"].is_string());

    // The other job's step keeps running; the cancelled one's is gone within a second.
    let count_steps = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&format!("sleep\0{sleep}")))
                    .unwrap_or(false)
            })
            .count()
    };
    while count_steps() > 1 {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(1),
            "the cancelled step still runs after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = common::wait_for_state(&db.pool, ids[0], "cancelled", Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(1),
        "cancelled only after {took:?}"
    );
    let attempt_error: String =
        sqlx::query_scalar("select error from job_attempt_history where job_id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(attempt_error.contains("cancelled"));

    // Cancelling again is a conflict; a pending job cancels at once; retry re-queues.
    let again = http
        .post(format!("{}/v1/jobs/{}/cancel", stack.api_url, ids[0]))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let retried = http
        .post(format!("{}/v1/jobs/{}/retry", stack.api_url, ids[0]))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    common::wait_for_state(&db.pool, ids[0], "claimed", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_steps_finish_then_hands_back_the_rest() {
    let sleep = marker();
    let db = fresh_database().await.unwrap();
    let env = [
        (
            "CAPY_STEP_COMMANDS",
            format!("test.quick=sleep 1; echo finished,test.slow=exec sleep {sleep}"),
        ),
        ("CAPY_SHUTDOWN_GRACE_SECONDS", "3".to_string()),
    ];
    let mut stack = ProcessStack::start(&db.url, 1, &env).await.unwrap();
    let quick = common::queue_jobs(&db.pool, "test.quick", 1, 3, |_| None).await[0];
    let slow = common::queue_jobs(&db.pool, "test.slow", 1, 3, |_| None).await[0];
    common::wait_for_state(&db.pool, quick, "claimed", Duration::from_secs(10)).await;
    common::wait_for_state(&db.pool, slow, "claimed", Duration::from_secs(10)).await;

    kill(worker_pid(&stack, 0), Signal::SIGTERM).unwrap();
    // No new claims once the worker has heard SIGTERM. The signal arrives on its own
    // time: a job queued in the same instant may be claimed before it is heard (a
    // loaded machine showed it), so the late job comes a moment after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = common::queue_jobs(&db.pool, "test.quick", 1, 3, |_| None).await[0];
    let status = tokio::task::spawn_blocking(move || {
        let status = stack.workers[0].0.wait().unwrap();
        (status, stack)
    })
    .await
    .unwrap()
    .0;
    assert!(
        status.success(),
        "the worker must exit 0 after draining: {status}"
    );

    let row = |id| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, i32, Option<String>)>(
                "select state, attempts, last_stdout from jobs where id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        row(quick).await,
        ("completed".into(), 1, Some("finished\n".into()))
    );
    // The slow step was stopped after the grace period and its job handed back
    // without spending an attempt.
    assert_eq!(row(slow).await, ("pending".into(), 0, None));
    assert_eq!(row(late).await, ("pending".into(), 0, None));
    let attempts: i64 =
        sqlx::query_scalar("select count(*) from job_attempt_history where job_id = $1")
            .bind(slow)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 0);
    assert!(!common::process_alive(&format!("sleep {sleep}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_steps_die_with_it() {
    let sleep = marker();
    let db = fresh_database().await.unwrap();
    let env = [(
        "CAPY_STEP_COMMANDS",
        format!("test.long=exec sleep {sleep}"),
    )];
    let mut stack = ProcessStack::start(&db.url, 1, &env).await.unwrap();
    common::queue_jobs(&db.pool, "test.long", 1, 3, |_| None).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::process_alive(&format!("sleep {sleep}")) {
        assert!(Instant::now() < deadline, "the step never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.workers[0].0.kill().unwrap();
    stack.workers[0].0.wait().unwrap();
    let killed = Instant::now();
    while common::process_alive(&format!("sleep {sleep}")) {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the step outlived its worker"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
