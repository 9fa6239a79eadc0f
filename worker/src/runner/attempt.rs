//! One attempt of a claimed job: its step run as a child process, and what the step's
//! end means for the job.

use std::sync::Arc;
use std::time::Instant;

use capy_shared::model::{Job, RetryClassification};
use capy_shared::queue::{self, AttemptOutcome, FinishedAttempt};
use capy_shared::{redact, step};
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use super::outcome::failure;
use super::{Outcome, Worker};
use crate::handlers;
use crate::process::{self, StepCommand, StepEnd, StepLimits, StepRun, StopReason};

impl Worker {
    /// One attempt of one claimed job, from its step to its outcome's hand-off.
    pub(super) async fn attempt(self: Arc<Self>, job: Job, finished: mpsc::Sender<Outcome>) {
        let span = tracing::info_span!("attempt", job_id = %job.id, attempt = job.attempts, job_type = %job.job_type);
        async {
            let (stop_tx, stop_rx) = watch::channel(None);
            let entry = self.register(&job, stop_tx);
            tracing::info!("attempt started");
            let started = Instant::now();
            self.metrics.steps_in_flight.inc();
            let outcome = self.execute(&job, stop_rx).await;
            self.metrics.steps_in_flight.dec();
            self.metrics
                .attempt_took(&job.job_type, started.elapsed().as_secs_f64());
            match outcome {
                Ok(outcome) => {
                    let done = FinishedAttempt {
                        job_id: job.id,
                        attempt: job.attempts,
                        outcome,
                        retry_delay: self.settings.retry.delay_after(job.attempts),
                    };
                    // The lease stays renewed until the completer has written it.
                    let outcome = Outcome {
                        finished: done,
                        entry: Some(entry),
                    };
                    let _ = finished.send(outcome).await;
                }
                Err(StopReason::Shutdown) => self.hand_back(&job).await,
                // (A cancelled step's outcome is recorded: `execute` answers it as Ok.)
                Err(StopReason::LeaseLost | StopReason::Cancelled) => {
                    tracing::warn!(
                        "the job was taken from this worker; its outcome is not recorded"
                    );
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Runs the job's step; `Err` when the worker stopped it early.
    async fn execute(
        &self,
        job: &Job,
        stop: watch::Receiver<Option<StopReason>>,
    ) -> Result<AttemptOutcome, StopReason> {
        let (command, limits) = match self.prepare(job).await {
            Ok(prepared) => prepared,
            Err(outcome) => return Ok(outcome),
        };
        let secrets = command.secrets.clone();
        match process::run_step(command, limits, stop).await {
            Ok(run) => outcome_of(run, &limits),
            Err(error) => {
                let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
                let message = redact::redact_all(&format!("{error:#}"), &secrets);
                Ok(failure(RetryClassification::Permanent, message))
            }
        }
    }

    /// The step's command and limits; the attempt's outcome when its step cannot run.
    async fn prepare(&self, job: &Job) -> Result<(StepCommand, StepLimits), AttemptOutcome> {
        let settings = &self.settings;
        let input =
            match handlers::load_input(&self.pool, &self.secrets, &settings.store, job).await {
                Ok(input) => input,
                Err(error) if error.is::<handlers::ProjectGone>() => {
                    tracing::warn!(error = %error, "the step does not run");
                    return Err(failure(RetryClassification::Permanent, error.to_string()));
                }
                Err(error) => {
                    return Err(failure(
                        RetryClassification::Transient,
                        format!("could not prepare the step's input: {error:#}"),
                    ))
                }
            };
        let secrets = input.secrets();
        let stdin = serde_json::to_vec(&input)
            .map_err(|error| failure(RetryClassification::Permanent, error.to_string()))?;
        let limits = StepLimits {
            timeout: settings
                .step_timeouts
                .get(&job.job_type)
                .copied()
                .unwrap_or(settings.step_limits.timeout),
            ..settings.step_limits
        };
        Ok((self.step_command(job, stdin, secrets), limits))
    }

    fn step_command(&self, job: &Job, stdin: Vec<u8>, secrets: Vec<String>) -> StepCommand {
        let (program, args) = match self.settings.step_commands.get(&job.job_type) {
            Some(command) => (
                "/bin/sh".to_string(),
                vec!["-c".to_string(), command.clone()],
            ),
            None => (self.settings.default_step.clone(), Vec::new()),
        };
        let mut env: Vec<(String, String)> = ["PATH", "HOME", "LANG", "TZ", "RUST_LOG"]
            .into_iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        env.push((step::ENV_JOB_ID.into(), job.id.to_string()));
        env.push((step::ENV_JOB_TYPE.into(), job.job_type.clone()));
        env.push((step::ENV_ATTEMPT.into(), job.attempts.to_string()));
        StepCommand {
            program,
            args,
            env,
            stdin,
            secrets,
        }
    }

    async fn hand_back(&self, job: &Job) {
        match queue::release(&self.pool, job.id, job.attempts, &self.settings.worker_id).await {
            Ok(true) => tracing::info!("job handed back for another worker"),
            Ok(false) => tracing::warn!("the job was no longer ours to hand back"),
            Err(error) => {
                tracing::warn!(error = %error, "handing the job back failed; its lease will expire")
            }
        }
    }
}

/// What a step's end means for its attempt; `Err` when the worker stopped it early
/// (shutdown, lease lost), whose outcome is not recorded.
fn outcome_of(run: StepRun, limits: &StepLimits) -> Result<AttemptOutcome, StopReason> {
    let (stdout, stderr) = (run.stdout, run.stderr);
    let last_line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().chars().take(500).collect::<String>());
    let (exit_code, classification, error) = match run.end {
        StepEnd::Exited(0) => (Some(0), None, None),
        StepEnd::Exited(code) => {
            let class = if code == step::EXIT_TEMPFAIL {
                RetryClassification::Transient
            } else {
                RetryClassification::Permanent
            };
            let error = last_line.unwrap_or_else(|| format!("step exited with code {code}"));
            (Some(code), Some(class), Some(error))
        }
        StepEnd::Signaled(signal) => (
            None,
            Some(RetryClassification::Transient),
            Some(format!("step was killed by signal {signal}")),
        ),
        StepEnd::TimedOut => (
            None,
            Some(RetryClassification::Timeout),
            Some(format!(
                "step ran past its time limit of {} s",
                limits.timeout.as_secs_f64()
            )),
        ),
        StepEnd::Stopped(StopReason::Cancelled) => {
            tracing::info!("step stopped: the job was cancelled");
            return Ok(AttemptOutcome {
                cancelled: true,
                exit_code: None,
                classification: None,
                error: Some("cancelled by request".into()),
                stdout,
                stderr,
            });
        }
        StepEnd::Stopped(reason) => return Err(reason),
    };
    tracing::info!(
        exit_code,
        classification = classification.map(|c| c.as_str()),
        "attempt ended"
    );
    Ok(AttemptOutcome {
        cancelled: false,
        exit_code,
        classification,
        error,
        stdout,
        stderr,
    })
}
