#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! The API's `/metrics`: its reads of the jobs table go through partial indexes, never
//! a scan of the history, and it can be served on a listener of its own, off the public
//! port.

mod common;

use std::time::{Duration, Instant};

use capy_api::job_metrics::JOBS_BY_TYPE_AND_STATE;
use capy_testkit::{free_port, fresh_database, ProcessStack};
use common::TestApp;

/// `count` jobs of `job_type` in `state`, finished `age` ago when finished.
async fn insert_jobs(app: &TestApp, count: i64, job_type: &str, state: &str, age: &str) {
    sqlx::query(
        "insert into jobs (id, type, state, max_attempts, attempts, run_at, completed_at,
                           lease_expires_at)
         select gen_random_uuid(), $2, $3, 3, 1, now() - interval '8 days',
                case when $3 in ('completed', 'failed', 'cancelled')
                     then now() - $4::interval * (g::float8 / $1) end,
                case when $3 = 'claimed' then now() + interval '1 hour' end
         from generate_series(1, $1) g",
    )
    .bind(count)
    .bind(job_type)
    .bind(state)
    .bind(age)
    .execute(&app.db.pool)
    .await
    .unwrap();
}

/// Sums the samples of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            series.split('{').next() == Some(name) && labels.iter().all(|l| series.contains(l))
        })
        .map(|(_, value)| value.parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn a_scrape_reads_live_jobs_and_a_recent_window_through_indexes_only() {
    let app = TestApp::new().await;
    // A long history (spread over 7 days), a recent tail, and a few live jobs.
    insert_jobs(&app, 200_000, "project.create", "completed", "7 days").await;
    insert_jobs(&app, 500, "project.update", "failed", "2 minutes").await;
    insert_jobs(&app, 7, "project.create", "pending", "0").await;
    insert_jobs(&app, 3, "project.delete", "claimed", "0").await;
    sqlx::query("analyze jobs")
        .execute(&app.db.pool)
        .await
        .unwrap();

    let plan: serde_json::Value =
        sqlx::query_scalar(&format!("explain (format json) {JOBS_BY_TYPE_AND_STATE}"))
            .bind(300.0_f64)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let plan = plan.to_string();
    assert!(
        !plan.contains(r#""Node Type":"Seq Scan""#),
        "the scrape scans the jobs table: {plan}"
    );
    for index in ["jobs_claimable", "jobs_claimed_lease", "jobs_finished"] {
        assert!(plan.contains(index), "{index} is not used: {plan}");
    }

    let response = capy_api::router(app.state.clone());
    let request = axum::http::Request::get("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(response, request).await.unwrap();
    assert_eq!(response.status(), 200);
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    // `capy_jobs` keeps its meaning: live jobs only, so no dashboard reads a window's
    // count as a total.
    let jobs = |labels: &[&str]| sample(&text, "capy_jobs", labels);
    assert_eq!(jobs(&[r#"state="pending""#]), 7.0, "{text}");
    assert_eq!(jobs(&[r#"state="claimed""#]), 3.0, "{text}");
    assert_eq!(jobs(&[]), 10.0, "finished jobs under capy_jobs: {text}");
    let finished = |labels: &[&str]| sample(&text, "capy_jobs_finished_recent", labels);
    assert_eq!(
        finished(&[r#"type="project.update""#, r#"state="failed""#]),
        500.0
    );
    assert_eq!(finished(&[r#"state="pending""#]), 0.0, "{text}");
    assert_eq!(
        sample(&text, "capy_jobs_finished_window_seconds", &[]),
        300.0
    );
    // Of the 200,000 completed over 7 days, the last 5 minutes' (about 99).
    let recent = finished(&[r#"type="project.create""#, r#"state="completed""#]);
    assert!((90.0..=110.0).contains(&recent), "{recent}: {text}");
    assert_eq!(sample(&text, "capy_queue_depth", &[]), 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_kept_off_the_public_port() {
    let db = fresh_database().await.unwrap();
    let port = free_port().unwrap();
    let env = [("CAPY_METRICS_ADDR", format!("127.0.0.1:{port}"))];
    let stack = ProcessStack::start(&db.url, 0, &env).await.unwrap();
    let http = reqwest::Client::new();
    let metrics_url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let scraped = loop {
        if let Ok(response) = http.get(format!("{metrics_url}/metrics")).send().await {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "the metrics listener never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(scraped.status(), 200);
    let text = scraped.text().await.unwrap();
    assert!(text.contains("capy_queue_depth 0"), "{text}");
    let health = http.get(format!("{metrics_url}/healthz")).send().await;
    assert_eq!(health.unwrap().status(), 200);
    // Nothing else is served there.
    let other = http
        .get(format!("{metrics_url}/v1/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);

    let public = http
        .get(format!("{}/metrics", stack.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404, "/metrics is still on the public port");
    let health = http.get(format!("{}/healthz", stack.api_url)).send().await;
    assert_eq!(
        health.unwrap().status(),
        200,
        "the public port serves the rest"
    );
}
