#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! A burst at the bound of instant databases writes no ERROR line: a 503 that carries
//! Retry-After is an expected refusal, logged at INFO by the real `capy-api` process.

mod common;

use std::time::{Duration, Instant};

use capy_testkit::{bin_path, free_port, ChildGuard, TEST_SECRET_KEY};
use common::TestApp;
use serde_json::{json, Value};

#[tokio::test]
async fn refusals_at_the_bound_are_logged_below_error() {
    let app = TestApp::new().await;
    let port = free_port().unwrap();
    let log_path = std::env::temp_dir().join(format!("capy-refusal-logs-{port}.jsonl"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut api = ChildGuard(
        std::process::Command::new(bin_path("capy-api").unwrap())
            .arg("serve")
            .env("RUST_LOG", "info")
            .env("CAPY_LOG_FORMAT", "json")
            .env("CAPY_DATABASE_URL", &app.db.url)
            .env("CAPY_SECRET_KEY", TEST_SECRET_KEY)
            .env("CAPY_LISTEN", format!("127.0.0.1:{port}"))
            // No room at all: every request is refused at the bound.
            .env("CAPY_INSTANT_MAX_PER_CLUSTER", "0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "capy-api did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = reqwest::Client::new();
    const REFUSALS: usize = 20;
    for n in 0..REFUSALS {
        let response = http
            .post(format!("http://127.0.0.1:{port}/v1/databases"))
            .json(&json!({"ref": format!("logs-{n}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
    }
    api.0.kill().unwrap();
    api.0.wait().unwrap();

    let text = std::fs::read_to_string(&log_path).unwrap();
    std::fs::remove_file(&log_path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let errors: Vec<&Value> = lines.iter().filter(|l| l["level"] == "ERROR").collect();
    assert!(
        errors.is_empty(),
        "expected refusals logged as errors: {errors:?}"
    );
    // They are logged all the same, at INFO with their status.
    let refusals = lines
        .iter()
        .filter(|l| l["level"] == "INFO" && l["fields"]["status"] == 503)
        .count();
    assert_eq!(refusals, REFUSALS, "{text}");
}
