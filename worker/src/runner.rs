//! The worker loop: claim up to the free slots in one statement, run each attempt's
//! step, keep leases alive, rescue jobs of lost workers, and drain on shutdown.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capy_shared::crypto::SecretBox;
use capy_shared::model::{Job, RetryClassification};
use capy_shared::queue::{self, AttemptOutcome, RetryPolicy};
use capy_shared::{redact, step};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::handlers;
use crate::process::{self, StepCommand, StepEnd, StepLimits, StopReason};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub worker_id: String,
    pub concurrency: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
    pub step_limits: StepLimits,
    pub shutdown_grace: Duration,
    /// The built-in steps' executable, for job types without a command of their own.
    pub default_step: String,
    /// Commands replacing the built-in step, by job type (run through `sh -c`).
    pub step_commands: HashMap<String, String>,
}

pub struct Worker {
    pool: PgPool,
    secrets: SecretBox,
    settings: WorkerSettings,
    /// Stop switches of the running attempts, by job id.
    running: Mutex<HashMap<Uuid, watch::Sender<Option<StopReason>>>>,
}

impl Worker {
    pub fn new(pool: PgPool, secrets: SecretBox, settings: WorkerSettings) -> Arc<Self> {
        Arc::new(Self {
            pool,
            secrets,
            settings,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Works until `shutdown` resolves, then drains: no new claims; running steps get
    /// the grace period, then are stopped and their jobs handed back.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let settings = &self.settings;
        tracing::info!(
            worker = settings.worker_id,
            concurrency = settings.concurrency,
            "worker started"
        );
        let wake = Arc::new(Notify::new());
        let background = [
            tokio::spawn(listen(self.pool.clone(), wake.clone())),
            tokio::spawn(self.clone().heartbeats()),
        ];
        let mut attempts = JoinSet::new();
        let mut last_rescue = Instant::now() - settings.lease;
        let mut failures = 0u32;
        tokio::pin!(shutdown);
        loop {
            while attempts.try_join_next().is_some() {}
            if last_rescue.elapsed() >= settings.lease / 4 {
                last_rescue = Instant::now();
                if let Err(error) = self.rescue().await {
                    tracing::warn!(error = %error, "rescuing expired leases failed");
                }
            }
            let free = settings.concurrency.saturating_sub(attempts.len());
            let mut idle_wait = settings.poll_interval;
            if free > 0 {
                match queue::claim(&self.pool, &settings.worker_id, free as i64, settings.lease)
                    .await
                {
                    Ok(jobs) => {
                        failures = 0;
                        let full = jobs.len() == free;
                        for job in jobs {
                            attempts.spawn(self.clone().attempt(job));
                        }
                        if full {
                            // More may be waiting: claim again as soon as a slot frees.
                            idle_wait = Duration::ZERO;
                        }
                    }
                    Err(error) => {
                        failures += 1;
                        idle_wait = backoff(failures);
                        tracing::warn!(error = %error, retry_in_ms = idle_wait.as_millis() as u64, "claiming jobs failed");
                    }
                }
            }
            let slots_full = attempts.len() >= settings.concurrency;
            tokio::select! {
                () = &mut shutdown => break,
                () = wake.notified(), if !slots_full => {}
                () = tokio::time::sleep(idle_wait), if !slots_full || idle_wait.is_zero() => {}
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
            }
        }

        tracing::info!(
            running = attempts.len(),
            grace_s = settings.shutdown_grace.as_secs(),
            "draining"
        );
        let drained = tokio::time::timeout(settings.shutdown_grace, async {
            while attempts.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.stop_all(StopReason::Shutdown);
            while attempts.join_next().await.is_some() {}
        }
        for task in background {
            task.abort();
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    fn stop_all(&self, reason: StopReason) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for stop in running.values() {
            let _ = stop.send(Some(reason));
        }
    }

    /// One attempt of one claimed job, start to recorded outcome.
    async fn attempt(self: Arc<Self>, job: Job) {
        let span = tracing::info_span!("attempt", job_id = %job.id, attempt = job.attempts, job_type = %job.job_type);
        async {
            let (stop_tx, stop_rx) = watch::channel(None);
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(job.id, stop_tx);
            tracing::info!("attempt started");
            let outcome = self.execute(&job, stop_rx).await;
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&job.id);
            match outcome {
                Ok(outcome) => self.record(&job, outcome).await,
                Err(StopReason::Shutdown) => self.hand_back(&job).await,
                Err(StopReason::LeaseLost) => {
                    tracing::warn!("the job was taken from this worker (lease lost or cancelled); its outcome is not recorded");
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
        let input = match handlers::load_input(&self.pool, &self.secrets, job).await {
            Ok(input) => input,
            Err(error) => {
                return Ok(failure(
                    RetryClassification::Transient,
                    format!("could not prepare the step's input: {error:#}"),
                ))
            }
        };
        let secrets = input.secrets();
        let stdin = match serde_json::to_vec(&input) {
            Ok(bytes) => bytes,
            Err(error) => return Ok(failure(RetryClassification::Permanent, error.to_string())),
        };
        let run = process::run_step(
            self.step_command(job, stdin),
            self.settings.step_limits,
            stop,
        )
        .await;
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let run = match run {
            Ok(run) => run,
            Err(error) => {
                let message = redact::redact_all(&format!("{error:#}"), &secrets);
                return Ok(failure(RetryClassification::Permanent, message));
            }
        };
        let stdout = redact::redact_all(&run.stdout, &secrets);
        let stderr = redact::redact_all(&run.stderr, &secrets);
        let last_line = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| {
                let line = l.trim();
                line.chars().take(500).collect::<String>()
            });
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
                    self.settings.step_limits.timeout.as_secs()
                )),
            ),
            StepEnd::Stopped(reason) => return Err(reason),
        };
        tracing::info!(
            exit_code,
            classification = classification.map(|c| c.as_str()),
            "attempt ended"
        );
        Ok(AttemptOutcome {
            exit_code,
            classification,
            error,
            stdout,
            stderr,
        })
    }

    fn step_command(&self, job: &Job, stdin: Vec<u8>) -> StepCommand {
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
        }
    }

    /// Records the outcome, retrying while the control database is unreachable.
    async fn record(&self, job: &Job, outcome: AttemptOutcome) {
        let delay = self.settings.retry.delay_after(job.attempts);
        let mut failures = 0;
        loop {
            match self.try_record(job, &outcome, delay).await {
                Ok(Some(job)) => {
                    tracing::info!(state = job.state, "outcome recorded");
                    return;
                }
                Ok(None) => {
                    tracing::warn!(
                        "the job is no longer ours (lease lost or cancelled); outcome dropped"
                    );
                    return;
                }
                Err(error) => {
                    failures += 1;
                    if failures > 40 {
                        tracing::error!(error = %error, "giving up recording the outcome; the lease will expire and the job be retried");
                        return;
                    }
                    tracing::warn!(error = %error, "recording the outcome failed; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    async fn try_record(
        &self,
        job: &Job,
        outcome: &AttemptOutcome,
        delay: Duration,
    ) -> sqlx::Result<Option<Job>> {
        let mut tx = self.pool.begin().await?;
        let finished = queue::finish(
            &mut tx,
            job.id,
            job.attempts,
            &self.settings.worker_id,
            outcome,
            delay,
        )
        .await?;
        if let Some(finished) = &finished {
            handlers::apply_effects(&mut tx, finished).await?;
        }
        tx.commit().await?;
        Ok(finished)
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

    /// Renews the leases of running attempts; stops the steps of jobs no longer ours.
    async fn heartbeats(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.settings.lease / 3);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let ids: Vec<Uuid> = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .copied()
                .collect();
            if ids.is_empty() {
                continue;
            }
            match queue::heartbeat(
                &self.pool,
                &self.settings.worker_id,
                &ids,
                self.settings.lease,
            )
            .await
            {
                Ok(held) => {
                    let held: HashSet<Uuid> = held.into_iter().collect();
                    let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                    for id in ids.iter().filter(|id| !held.contains(id)) {
                        if let Some(stop) = running.get(id) {
                            let _ = stop.send(Some(StopReason::LeaseLost));
                        }
                    }
                }
                Err(error) => tracing::warn!(error = %error, "heartbeat failed"),
            }
        }
    }

    async fn rescue(&self) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        let rescued = queue::rescue_expired(&mut tx, &self.settings.retry, 100).await?;
        for job in &rescued {
            tracing::warn!(job_id = %job.id, attempt = job.attempts, state = job.state, "rescued a job whose worker was lost");
            handlers::apply_effects(&mut tx, job).await?;
        }
        tx.commit().await
    }
}

fn failure(class: RetryClassification, error: String) -> AttemptOutcome {
    AttemptOutcome {
        exit_code: None,
        classification: Some(class),
        error: Some(error),
        stdout: String::new(),
        stderr: String::new(),
    }
}

/// 100 ms doubling per failure, capped at 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}

/// Wakes the loop on each NOTIFY; reconnects when the connection drops.
async fn listen(pool: PgPool, wake: Arc<Notify>) {
    let mut failures = 0;
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(queue::NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listener.await {
            Ok(mut listener) => {
                failures = 0;
                // Notifications sent while we were away are lost: look now.
                wake.notify_one();
                while listener.recv().await.is_ok() {
                    wake.notify_one();
                }
            }
            Err(error) => {
                failures += 1;
                tracing::debug!(error = %error, "LISTEN unavailable; polling meanwhile");
            }
        }
        tokio::time::sleep(backoff(failures)).await;
    }
}
