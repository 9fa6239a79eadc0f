//! `--wait`: follows a job with long polls (`GET /v1/jobs/{id}?wait=30`) until it is
//! completed, failed or cancelled, showing its progress on stderr: a spinner on a
//! terminal, otherwise one plain line per change (`job <id>: claimed (…)`).

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::{self, Client};
use crate::output::{self, field};

/// How long one long poll asks the API to hold the answer.
const LONG_POLL_SECONDS: &str = "30";
/// How many times in a row an unreachable or unavailable API is asked again.
const TRANSIENT_RETRIES: u32 = 30;
/// Lines of the last attempt's stderr shown when a job did not complete.
const STDERR_TAIL_LINES: usize = 20;

pub fn is_finished(job: &Value) -> bool {
    matches!(
        job.get("state").and_then(Value::as_str),
        Some("completed" | "failed" | "cancelled")
    )
}

pub fn completed(job: &Value) -> bool {
    job.get("state").and_then(Value::as_str) == Some("completed")
}

/// `GET /v1/jobs/{id}?wait=30`, asking again while the API is briefly unreachable.
pub async fn poll(client: &Client, id: &str) -> anyhow::Result<Value> {
    let mut failures = 0;
    loop {
        let answer = client
            .get(
                &format!("/v1/jobs/{id}"),
                &[("wait", LONG_POLL_SECONDS.to_string())],
            )
            .await;
        match answer {
            Ok(mut body) => return Ok(body["job"].take()),
            Err(e) if client::is_transient(&e) && failures < TRANSIENT_RETRIES => {
                failures += 1;
                eprintln!("warning: {e:#}; asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits for `job` (as the API answered it) to finish; answers the final job.
pub async fn wait_for_job(client: &Client, job: Value) -> anyhow::Result<Value> {
    let id = field(&job, "id");
    let mut progress = Progress::new(&id);
    progress.update(&job);
    let mut job = job;
    while !is_finished(&job) {
        job = poll(client, &id).await?;
        progress.update(&job);
    }
    progress.finish(&job);
    Ok(job)
}

/// The error for a job that did not complete, after printing on stderr its error and
/// the tail of its last attempt's stderr.
pub async fn failure(client: &Client, job: &Value) -> anyhow::Error {
    let id = field(job, "id");
    let state = field(job, "state");
    let attempts = client
        .get_all(&format!("/v1/jobs/{id}/attempts"), &[], "attempts")
        .await
        .ok();
    let last = attempts
        .as_ref()
        .and_then(|a| a["attempts"].as_array())
        .and_then(|a| a.last());
    let stderr = last
        .and_then(|a| a["stderr"].as_str())
        .or_else(|| job["last_stderr"].as_str())
        .unwrap_or_default();
    if !stderr.trim().is_empty() {
        let header = match last {
            Some(a) => format!(
                "stderr of attempt {} (exit code {}, {}):",
                field(a, "attempt"),
                field(a, "exit_code"),
                field(a, "classification")
            ),
            None => "stderr of the last attempt:".to_string(),
        };
        eprintln!("{header}");
        for line in output::tail(stderr, STDERR_TAIL_LINES).lines() {
            eprintln!("  {line}");
        }
    }
    let error = job
        .get("error")
        .and_then(Value::as_str)
        .map(plain_error)
        .filter(|e| !e.is_empty())
        .unwrap_or("no error was recorded");
    anyhow::anyhow!(
        "job {id} ({}) {state} after {} attempt(s): {error} (see `capy jobs logs {id}`)",
        field(job, "type"),
        field(job, "attempts")
    )
}

/// An error as recorded, without the `error: ` a step may have started it with.
pub fn plain_error(error: &str) -> &str {
    error.strip_prefix("error: ").unwrap_or(error).trim()
}

/// What a job is doing, in a few words.
pub fn describe(job: &Value) -> String {
    let state = field(job, "state");
    let attempts = job["attempts"].as_i64().unwrap_or(0);
    let max = field(job, "max_attempts");
    match state.as_str() {
        "claimed" => format!(
            "{state} (attempt {attempts} of {max}, {})",
            field(job, "claimed_by")
        ),
        "pending" if attempts > 0 => format!(
            "{state} (attempt {attempts} of {max} failed: {}; retrying)",
            field(job, "retry_classification")
        ),
        _ => state,
    }
}

enum Progress {
    Spinner {
        bar: ProgressBar,
        id: String,
    },
    Lines {
        id: String,
        last: Option<(String, i64)>,
    },
}

impl Progress {
    fn new(id: &str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            Self::Spinner {
                bar,
                id: id.to_string(),
            }
        } else {
            Self::Lines {
                id: id.to_string(),
                last: None,
            }
        }
    }

    fn update(&mut self, job: &Value) {
        match self {
            Self::Spinner { bar, id } => bar.set_message(format!("job {id}: {}", describe(job))),
            Self::Lines { id, last } => {
                let key = (field(job, "state"), job["attempts"].as_i64().unwrap_or(0));
                if last.as_ref() != Some(&key) {
                    eprintln!("job {id}: {}", describe(job));
                    *last = Some(key);
                }
            }
        }
    }

    fn finish(self, job: &Value) {
        if let Self::Spinner { bar, id } = self {
            let elapsed = bar.elapsed();
            bar.finish_and_clear();
            eprintln!(
                "job {id}: {} after {:.1}s",
                describe(job),
                elapsed.as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_are_described() {
        let job =
            json!({"state": "claimed", "attempts": 2, "max_attempts": 5, "claimed_by": "w-1"});
        assert_eq!(describe(&job), "claimed (attempt 2 of 5, w-1)");
        let job = json!({"state": "pending", "attempts": 1, "max_attempts": 5,
                         "retry_classification": "transient"});
        assert_eq!(
            describe(&job),
            "pending (attempt 1 of 5 failed: transient; retrying)"
        );
        assert_eq!(
            describe(&json!({"state": "pending", "attempts": 0})),
            "pending"
        );
        assert!(is_finished(&json!({"state": "cancelled"})));
        assert!(!is_finished(&json!({"state": "claimed"})));
    }
}
