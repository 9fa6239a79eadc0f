#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! A burst at the bound of instant databases writes no ERROR line: a 503 that carries
//! Retry-After is an expected refusal, logged at INFO by the real `capy-api` process.

mod common;

use std::time::{Duration, Instant};

use capy_testkit::{bin_path, free_port, ChildGuard, TEST_SECRET_KEY};
use common::TestApp;
use serde_json::{json, Value};

/// A real `capy-api` logging to a file in `format`, with no room for instant
/// databases, so every request for one is refused at the bound (and logged at INFO).
async fn start_api(database_url: &str, format: &str) -> (ChildGuard, u16, std::path::PathBuf) {
    let port = free_port().unwrap();
    let log_path = std::env::temp_dir().join(format!("capy-refusal-logs-{port}.{format}"));
    let log = std::fs::File::create(&log_path).unwrap();
    let api = ChildGuard(
        std::process::Command::new(bin_path("capy-api").unwrap())
            .arg("serve")
            .env("RUST_LOG", "info")
            .env("CAPY_LOG_FORMAT", format)
            .env_remove("NO_COLOR")
            .env("CAPY_DATABASE_URL", database_url)
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
    (api, port, log_path)
}

/// Text logs written to a file (as the local stack's are) are plain text: colour codes
/// are for terminals only.
#[tokio::test]
async fn text_logs_in_a_file_carry_no_colour_codes() {
    let app = TestApp::new().await;
    let (mut api, port, log_path) = start_api(&app.db.url, "text").await;
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/databases"))
        .json(&json!({"ref": "colour"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    api.0.kill().unwrap();
    api.0.wait().unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap();
    std::fs::remove_file(&log_path).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("INFO") && l.contains("503")),
        "the refusal is logged as text: {text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
}

#[tokio::test]
async fn refusals_at_the_bound_are_logged_below_error() {
    let app = TestApp::new().await;
    let (mut api, port, log_path) = start_api(&app.db.url, "json").await;
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
