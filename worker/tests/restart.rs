//! The control database goes away for 30 s mid-run: the API answers 503, workers back
//! off and reconnect, and afterwards every job finishes. (Its own test binary: it
//! stops the process's private cluster.)

mod common;

use std::time::Duration;

use capy_api::admin::{self, KeyGrant};
use capy_testkit::{cluster, fresh_database, ProcessStack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_database_outage_loses_no_job() {
    let db = fresh_database().await.unwrap();
    let env = [
        ("CAPY_STEP_COMMANDS", "test.short=sleep 0.05".to_string()),
        ("CAPY_LEASE_SECONDS", "10".to_string()),
    ];
    let mut stack = ProcessStack::start(&db.url, 2, &env).await.unwrap();
    let grant = KeyGrant {
        name: "admin".into(),
        is_admin: true,
        ..KeyGrant::default()
    };
    let (_, key) = admin::create_api_key(&db.pool, &grant).await.unwrap();
    let ids = common::queue_jobs(&db.pool, "test.short", 400, 5, |_| None).await;
    let http = reqwest::Client::new();

    // Let part of the work happen, then take the database away.
    loop {
        let done: i64 = sqlx::query_scalar("select count(*) from jobs where state = 'completed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if done >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster().unwrap().stop().unwrap();
    let outage = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = http
        .get(format!("{}/readyz", stack.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let job = http
        .get(format!("{}/v1/jobs/{}", stack.api_url, ids[0]))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(job.status(), 503);
    let body: serde_json::Value = job.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("unavailable"));
    tokio::time::sleep_until(outage + Duration::from_secs(30)).await;
    cluster().unwrap().start_again().unwrap();

    common::wait_until_idle(&db.pool, Duration::from_secs(120)).await;
    assert_eq!(
        common::job_states(&db.pool).await,
        vec![("completed".to_string(), 400)]
    );
    assert_eq!(common::overlapping_attempts(&db.pool).await, 0);
    assert!(
        stack.api.0.try_wait().unwrap().is_none(),
        "the API died in the outage"
    );
    for worker in &mut stack.workers {
        assert!(
            worker.0.try_wait().unwrap().is_none(),
            "a worker died in the outage"
        );
    }
    let ready = http
        .get(format!("{}/readyz", stack.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}
