//! `capy jobs …`: list, show, logs (every attempt's output, optionally followed),
//! cancel and retry.

use clap::Subcommand;
use serde_json::{json, Value};

use super::{more_hint, Ctx};
use crate::client::segment;
use crate::output::{self, field, key_values, Table};
use crate::wait;

const JOB_KEYS: &[&str] = &[
    "id",
    "type",
    "state",
    "organization_id",
    "project_id",
    "cluster_id",
    "attempts",
    "max_attempts",
    "claimed_by",
    "created_at",
    "run_at",
    "claimed_at",
    "started_at",
    "completed_at",
    "last_exit_code",
    "retry_classification",
    "error",
    "locked_resource",
    "cancel_requested_at",
    "args",
];

/// The API's job states (`JobState` on the server; a test keeps them equal).
const STATES: [&str; 5] = ["pending", "claimed", "completed", "failed", "cancelled"];

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// The organization's jobs, newest first.
    List {
        /// Only this project's jobs.
        #[arg(long, env = "CAPY_JOBS_PROJECT")]
        project: Option<String>,
        /// Only jobs in this state.
        #[arg(long, env = "CAPY_JOBS_STATE", value_parser = STATES)]
        state: Option<String>,
        /// Only jobs of this type, such as project.create.
        #[arg(long = "type", env = "CAPY_JOBS_TYPE")]
        job_type: Option<String>,
        /// Jobs per page (1–200; the API's default is 50).
        #[arg(long, env = "CAPY_JOBS_LIMIT", value_parser = clap::value_parser!(u16).range(1..=200))]
        limit: Option<u16>,
        /// Follow next_cursor through every page.
        #[arg(long, env = "CAPY_JOBS_ALL")]
        all: bool,
        /// Start after this cursor (next_cursor of a previous page).
        #[arg(long, env = "CAPY_JOBS_CURSOR", conflicts_with = "all")]
        cursor: Option<String>,
    },
    /// One job: state, attempts, times, last exit code and output.
    Show { id: String },
    /// Every attempt of a job: worker, times, exit code, classification, stdout, stderr.
    Logs {
        id: String,
        /// Keep printing attempts as they finish, until the job is completed, failed
        /// or cancelled.
        #[arg(long, short = 'f', env = "CAPY_JOBS_FOLLOW")]
        follow: bool,
    },
    /// Cancels a pending job, or stops a running one.
    Cancel { id: String },
    /// Queues a failed or cancelled job again.
    Retry { id: String },
}

impl JobsCommand {
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            Self::List {
                project,
                state,
                job_type,
                limit,
                all,
                cursor,
            } => {
                let mut query = Vec::new();
                let filters = [
                    ("project_id", project),
                    ("state", state),
                    ("type", job_type),
                    ("limit", limit.map(|n| n.to_string())),
                    ("cursor", cursor),
                ];
                for (key, value) in filters {
                    if let Some(value) = value {
                        query.push((key, value));
                    }
                }
                let list = if all {
                    ctx.client.get_all("/v1/jobs", &query, "jobs").await?
                } else {
                    ctx.client.get("/v1/jobs", &query).await?
                };
                if ctx.json() {
                    return output::json(&list);
                }
                let mut table =
                    Table::new(&["ID", "TYPE", "STATE", "ATTEMPTS", "PROJECT", "CREATED"]);
                for job in list["jobs"].as_array().into_iter().flatten() {
                    table.row(vec![
                        field(job, "id"),
                        field(job, "type"),
                        field(job, "state"),
                        attempts(job),
                        field(job, "project_id"),
                        field(job, "created_at"),
                    ]);
                }
                table.print()?;
                more_hint(&list, "--all");
                Ok(())
            }
            Self::Show { id } => {
                let answer = ctx
                    .client
                    .get(&format!("/v1/jobs/{}", segment(&id)?), &[])
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                let job = &answer["job"];
                output::show(job, JOB_KEYS)?;
                for stream in ["last_stdout", "last_stderr"] {
                    print_stream(stream, job[stream].as_str().unwrap_or_default())?;
                }
                Ok(())
            }
            Self::Logs { id, follow } => logs(ctx, &segment(&id)?, follow).await,
            Self::Cancel { id } => {
                let answer = ctx
                    .client
                    .post(&format!("/v1/jobs/{}/cancel", segment(&id)?), None)
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                print_job_summary(&answer["job"])
            }
            Self::Retry { id } => {
                let answer = ctx
                    .client
                    .post(&format!("/v1/jobs/{}/retry", segment(&id)?), None)
                    .await?;
                if ctx.json() {
                    return output::json(&answer);
                }
                print_job_summary(&answer["job"])
            }
        }
    }
}

/// `n/max`.
fn attempts(job: &Value) -> String {
    format!("{}/{}", field(job, "attempts"), field(job, "max_attempts"))
}

/// A few lines about a job a command queued or changed.
pub fn print_job_summary(job: &Value) -> anyhow::Result<()> {
    let mut pairs = vec![
        ("job".to_string(), field(job, "id")),
        ("type".to_string(), field(job, "type")),
        ("state".to_string(), field(job, "state")),
        ("attempts".to_string(), attempts(job)),
    ];
    if job["error"].is_string() {
        pairs.push(("error".to_string(), field(job, "error")));
    }
    output::out(&key_values(&pairs))
}

fn print_stream(name: &str, text: &str) -> anyhow::Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    output::out(&format!("--- {name}\n{}", text.trim_end_matches('\n')))
}

fn print_attempt(attempt: &Value) -> anyhow::Result<()> {
    output::out(&format!(
        "=== attempt {}: worker {}, started {}, finished {}, exit code {}, {}",
        field(attempt, "attempt"),
        field(attempt, "worker"),
        field(attempt, "started_at"),
        field(attempt, "finished_at"),
        field(attempt, "exit_code"),
        match field(attempt, "classification").as_str() {
            "-" => "succeeded".to_string(),
            other => other.to_string(),
        }
    ))?;
    if attempt["error"].is_string() {
        output::out(&format!(
            "error: {}",
            wait::plain_error(&field(attempt, "error"))
        ))?;
    }
    print_stream("stdout", attempt["stdout"].as_str().unwrap_or_default())?;
    print_stream("stderr", attempt["stderr"].as_str().unwrap_or_default())
}

async fn attempts_of(ctx: &Ctx, id: &str) -> anyhow::Result<Value> {
    ctx.client
        .get_all(&format!("/v1/jobs/{id}/attempts"), &[], "attempts")
        .await
}

async fn logs(ctx: &Ctx, id: &str, follow: bool) -> anyhow::Result<()> {
    if !follow {
        let list = attempts_of(ctx, id).await?;
        if ctx.json() {
            return output::json(&list);
        }
        let attempts = list["attempts"].as_array().cloned().unwrap_or_default();
        if attempts.is_empty() {
            eprintln!("job {id} has no finished attempt yet");
        }
        for attempt in &attempts {
            print_attempt(attempt)?;
        }
        return Ok(());
    }
    let mut job = ctx.client.get(&format!("/v1/jobs/{id}"), &[]).await?["job"].take();
    let mut printed = 0;
    let mut last_state = String::new();
    loop {
        let describe = wait::describe(&job);
        if describe != last_state {
            eprintln!("job {id}: {describe}");
            last_state = describe;
        }
        // Read after the job: once it is finished, its attempts are all recorded.
        let list = attempts_of(ctx, id).await?;
        for attempt in list["attempts"].as_array().into_iter().flatten() {
            let number = attempt["attempt"].as_i64().unwrap_or(0);
            if number > printed {
                if !ctx.json() {
                    print_attempt(attempt)?;
                }
                printed = number;
            }
        }
        if wait::is_finished(&job) {
            if ctx.json() {
                output::json(&json!({ "job": job, "attempts": list["attempts"] }))?;
            }
            return Ok(());
        }
        job = wait::poll(&ctx.client, id).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capy_shared::model::JobState;

    /// The CLI reads job states from the API's JSON (it does not link capy-shared);
    /// this keeps it in step with the server's `JobState`.
    #[test]
    fn states_are_the_servers() {
        let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(STATES.as_slice(), names.as_slice());
        for state in JobState::ALL {
            let job = json!({ "state": state });
            assert_eq!(wait::is_finished(&job), state.is_finished(), "{state}");
            assert_eq!(
                wait::completed(&job),
                state == JobState::Completed,
                "{state}"
            );
        }
    }
}
