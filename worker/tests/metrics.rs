#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! `/metrics` scraped during a burn-down: the queue-depth gauge falls to 0, and the
//! counters match the jobs processed, on the worker and on the API.

mod common;

use std::time::{Duration, Instant};

use capy_testkit::{free_port, fresh_database, ProcessStack};

const JOBS: usize = 20_000;

/// Sums the samples of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let metric = series.split('{').next().unwrap_or("");
            metric == name && labels.iter().all(|l| series.contains(l))
        })
        .map(|(_, value)| value.parse::<f64>().unwrap())
        .sum()
}

async fn scrape(http: &reqwest::Client, url: &str) -> String {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_falls_to_zero_and_counters_match_the_jobs_processed() {
    let db = fresh_database().await.unwrap();
    let port = free_port().unwrap();
    let stack = ProcessStack::start(
        &db.url,
        1,
        &[
            ("CAPY_WORKER_METRICS_ADDR", format!("127.0.0.1:{port}")),
            // Small claims, so the burn-down lasts long enough to be watched.
            ("CAPY_WORKER_CONCURRENCY", "20".to_string()),
        ],
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let worker_url = format!("http://127.0.0.1:{port}/metrics");
    let api_url = format!("{}/metrics", stack.api_url);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(&worker_url).send().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the worker's metrics never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle = scrape(&http, &worker_url).await;
    assert_eq!(sample(&idle, "capy_queue_depth", &[]), 0.0);
    assert_eq!(sample(&idle, "capy_attempts_total", &[]), 0.0);

    common::queue_jobs(&db.pool, "capy.noop", JOBS, 3, |_| None).await;
    let mut depths = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = scrape(&http, &worker_url).await;
        let depth = sample(&text, "capy_queue_depth", &[]);
        depths.push(depth);
        if depth == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "queue depth still {depth}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        depths.iter().any(|d| *d > 0.0),
        "the gauge never showed the queued jobs: {depths:?}"
    );
    assert!(depths.iter().all(|d| *d <= JOBS as f64), "{depths:?}");
    common::wait_until_idle(&db.pool, Duration::from_secs(60)).await;

    let worker = scrape(&http, &worker_url).await;
    let completed = sample(
        &worker,
        "capy_attempts_total",
        &[r#"type="capy.noop""#, r#"state="completed""#],
    );
    assert_eq!(completed, JOBS as f64, "{worker}");
    assert_eq!(sample(&worker, "capy_attempts_total", &[]), JOBS as f64);
    assert_eq!(
        sample(&worker, "capy_claim_latency_seconds_count", &[]),
        JOBS as f64
    );
    assert_eq!(sample(&worker, "capy_steps_in_flight", &[]), 0.0);
    assert_eq!(
        sample(&worker, "capy_oldest_pending_job_age_seconds", &[]),
        0.0
    );

    let api = scrape(&http, &api_url).await;
    assert_eq!(
        sample(
            &api,
            "capy_jobs_finished_recent",
            &[r#"type="capy.noop""#, r#"state="completed""#]
        ),
        JOBS as f64,
        "{api}"
    );
    assert_eq!(sample(&api, "capy_queue_depth", &[]), 0.0);
    let in_db: i64 = sqlx::query_scalar("select count(*) from jobs where state = 'completed'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(in_db, JOBS as i64);
}
