//! The worker loop: claim up to the free slots in one statement, run each attempt's
//! step, record outcomes in batches, keep leases alive, rescue jobs of lost workers,
//! prune old jobs, and drain on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder, Retryable as _};
use capy_shared::crypto::SecretBox;
use capy_shared::model::{job_type, Job, RetryClassification};
use capy_shared::queue::{self, AttemptOutcome, FinishedAttempt, RetryPolicy};
use capy_shared::{effects, instant, periodic, redact, step};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::handlers;
use crate::metrics::WorkerMetrics;
use crate::process::{self, StepCommand, StepEnd, StepLimits, StopReason};
use crate::sweeps;

/// Outcomes recorded in one statement, at most.
const FINISH_BATCH: usize = 2000;
/// Jobs claimed in one statement, at most.
const CLAIM_BATCH: usize = 2000;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub worker_id: String,
    pub concurrency: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
    pub step_limits: StepLimits,
    /// Time limits by job type, replacing `step_limits.timeout`.
    pub step_timeouts: HashMap<String, Duration>,
    pub shutdown_grace: Duration,
    /// The built-in steps' executable, for job types without a command of their own.
    pub default_step: String,
    /// Commands replacing the built-in step, by job type (run through `sh -c`).
    pub step_commands: HashMap<String, String>,
    /// Finished jobs older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
    /// Ready, unassigned instant databases to keep per cluster (0: no pool).
    pub instant_pool_size: i64,
    /// Pool entries and unclaimed instant databases one cluster may hold.
    pub instant_max_per_cluster: i64,
    /// How often an unclaimed instant database's size is checked against its limit.
    pub instant_storage_check: Duration,
    /// The backup store, for the steps that need it (`StepInput.store`).
    pub store: capy_shared::store::StoreConfig,
    /// How often the worker looks for due periodic jobs.
    pub periodic_interval: Duration,
    /// Attempts each job queued by a periodic job gets.
    pub periodic_max_attempts: i32,
    /// How often expired preview databases are looked for.
    pub preview_sweep_interval: Duration,
}

pub struct Worker {
    pool: PgPool,
    secrets: SecretBox,
    settings: WorkerSettings,
    metrics: Arc<WorkerMetrics>,
    /// The running attempts, by job id.
    running: Mutex<HashMap<Uuid, Running>>,
}

/// A running attempt: its number (leases and fencing are per attempt) and the switch
/// that stops its step.
struct Running {
    attempt: i32,
    stop: watch::Sender<Option<StopReason>>,
}

/// Removes an attempt from the running map once its outcome is recorded (or it ends
/// otherwise, panics included): its lease is renewed until then, and not after.
struct RunningEntry {
    worker: Arc<Worker>,
    job_id: Uuid,
    attempt: i32,
}

/// An attempt's outcome on its way to the completer, with the entry that keeps its
/// lease renewed until it is written.
struct Outcome {
    finished: FinishedAttempt,
    entry: Option<RunningEntry>,
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        let mut running = self.worker.running();
        if running
            .get(&self.job_id)
            .is_some_and(|r| r.attempt == self.attempt)
        {
            running.remove(&self.job_id);
        }
    }
}

impl Worker {
    pub fn new(
        pool: PgPool,
        secrets: SecretBox,
        settings: WorkerSettings,
        metrics: Arc<WorkerMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool,
            secrets,
            settings,
            metrics,
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
        let (finished_tx, finished_rx) = mpsc::channel(4 * FINISH_BATCH);
        let completer = tokio::spawn(self.clone().complete(finished_rx));
        let background = [
            tokio::spawn(self.clone().listen(wake.clone())),
            tokio::spawn(self.clone().heartbeats()),
            tokio::spawn(self.clone().maintenance()),
            tokio::spawn(self.clone().periodic()),
        ];
        let mut attempts = JoinSet::new();
        let mut claim_backoff = Backoff::default();
        tokio::pin!(shutdown);
        loop {
            while attempts.try_join_next().is_some() {}
            // A shutdown that came while a step finished or a wake-up was handled stops
            // claims now, not after one more batch.
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = std::future::ready(()) => {}
            }
            let free = settings
                .concurrency
                .saturating_sub(attempts.len())
                .min(CLAIM_BATCH);
            let mut idle_wait = settings.poll_interval;
            if free > 0 {
                match queue::claim(&self.pool, &settings.worker_id, free as i64, settings.lease)
                    .await
                {
                    Ok(jobs) => {
                        claim_backoff.succeeded();
                        self.metrics.claimed(&jobs);
                        if jobs.len() == free {
                            // More may be waiting: claim again as soon as a slot frees.
                            idle_wait = Duration::ZERO;
                        }
                        for job in jobs {
                            if sweeps::is_sweep(&job.job_type) {
                                attempts.spawn(self.clone().sweep(job, finished_tx.clone()));
                            } else if job.job_type == job_type::NOOP {
                                let done = succeeded(&job);
                                let outcome = Outcome {
                                    finished: done,
                                    entry: None,
                                };
                                if finished_tx.send(outcome).await.is_err() {
                                    break;
                                }
                            } else {
                                attempts.spawn(self.clone().attempt(job, finished_tx.clone()));
                            }
                        }
                    }
                    Err(error) => {
                        idle_wait = claim_backoff.failed();
                        tracing::warn!(error = %error, retry_in_ms = idle_wait.as_millis() as u64, "claiming jobs failed");
                    }
                }
            }
            let slots_full = attempts.len() >= settings.concurrency;
            tokio::select! {
                // Shutdown first: a wake-up that arrived with it must not claim more.
                biased;
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
            tracing::warn!(
                "grace period over: stopping the remaining steps and handing their jobs back"
            );
            self.stop_all(StopReason::Shutdown);
            while attempts.join_next().await.is_some() {}
        }
        drop(finished_tx);
        let _ = completer.await;
        for task in background {
            task.abort();
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    fn stop_all(&self, reason: StopReason) {
        for running in self.running().values() {
            let _ = running.stop.send(Some(reason));
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a running attempt. An older attempt of the same job still running
    /// here (this worker rescued its own job after an outage, then claimed it again)
    /// is no longer ours: it is stopped.
    fn register(
        self: &Arc<Self>,
        job: &Job,
        stop: watch::Sender<Option<StopReason>>,
    ) -> RunningEntry {
        let entry = Running {
            attempt: job.attempts,
            stop,
        };
        if let Some(older) = self.running().insert(job.id, entry) {
            let _ = older.stop.send(Some(StopReason::LeaseLost));
        }
        RunningEntry {
            worker: self.clone(),
            job_id: job.id,
            attempt: job.attempts,
        }
    }

    /// One attempt of one claimed job, from its step to its outcome's hand-off.
    async fn attempt(self: Arc<Self>, job: Job, finished: mpsc::Sender<Outcome>) {
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
                    let delay = self.settings.retry.delay_after(job.attempts);
                    let done = FinishedAttempt {
                        job_id: job.id,
                        attempt: job.attempts,
                        outcome,
                        retry_delay: delay,
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
        let input = match handlers::load_input(&self.pool, &self.secrets, &self.settings.store, job)
            .await
        {
            Ok(input) => input,
            Err(error) if error.is::<handlers::ProjectGone>() => {
                tracing::warn!(error = %error, "the step does not run");
                return Ok(failure(RetryClassification::Permanent, error.to_string()));
            }
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
        let limits = StepLimits {
            timeout: self
                .settings
                .step_timeouts
                .get(&job.job_type)
                .copied()
                .unwrap_or(self.settings.step_limits.timeout),
            ..self.settings.step_limits
        };
        let command = self.step_command(job, stdin, secrets.clone());
        let run = match process::run_step(command, limits, stop).await {
            Ok(run) => run,
            Err(error) => {
                let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
                let message = redact::redact_all(&format!("{error:#}"), &secrets);
                return Ok(failure(RetryClassification::Permanent, message));
            }
        };
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

    /// Records outcomes in batches, retrying while the control database is
    /// unreachable; returns when every sender is gone and all is written.
    async fn complete(self: Arc<Self>, mut outcomes: mpsc::Receiver<Outcome>) {
        let mut received = Vec::with_capacity(FINISH_BATCH);
        while outcomes.recv_many(&mut received, FINISH_BATCH).await > 0 {
            // The entries go (and their leases stop being renewed) once this is written.
            let (batch, _entries): (Vec<FinishedAttempt>, Vec<Option<RunningEntry>>) =
                received.drain(..).map(|o| (o.finished, o.entry)).unzip();
            let recorded = (|| self.record(&batch))
                .retry(control_database_backoff().with_max_times(RECORD_RETRIES))
                .sleep(tokio::time::sleep)
                .notify(|error, wait| {
                    tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "recording outcomes failed; retrying");
                })
                .await;
            match recorded {
                Ok(recorded) if recorded < batch.len() => tracing::warn!(
                    dropped = batch.len() - recorded,
                    "outcomes of jobs no longer ours (lease lost or cancelled) were not recorded"
                ),
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(error = %error, "giving up recording outcomes; their leases will expire and the jobs be retried");
                }
            }
        }
    }

    async fn record(&self, batch: &[FinishedAttempt]) -> sqlx::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let jobs = queue::finish(&mut tx, &self.settings.worker_id, batch).await?;
        for job in &jobs {
            effects::apply(&mut tx, job).await?;
            tracing::info!(job_id = %job.id, attempt = job.attempts, state = %job.state, "outcome recorded");
        }
        tx.commit().await?;
        for job in &jobs {
            self.metrics.recorded(job);
        }
        Ok(jobs.len())
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

    /// Renews the leases of running attempts; stops the steps of jobs no longer ours
    /// or cancelled. A worker that cannot renew for two thirds of a lease stops its
    /// steps itself, before any other worker may rescue their jobs.
    async fn heartbeats(self: Arc<Self>) {
        let lease = self.settings.lease;
        let mut interval = tokio::time::interval(lease / 3);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed = Instant::now();
        loop {
            interval.tick().await;
            if renewed.elapsed() > lease * 2 / 3 {
                tracing::warn!("leases could not be renewed for two thirds of a lease: stopping this worker's steps");
                self.stop_all(StopReason::LeaseLost);
            }
            let (ids, attempts): (Vec<Uuid>, Vec<i32>) = self
                .running()
                .iter()
                .map(|(id, r)| (*id, r.attempt))
                .unzip();
            if ids.is_empty() {
                renewed = Instant::now();
                continue;
            }
            let beat =
                queue::heartbeat(&self.pool, &self.settings.worker_id, &ids, &attempts, lease);
            match tokio::time::timeout(lease / 3, beat).await {
                Ok(Ok(held)) => {
                    renewed = Instant::now();
                    let held: HashMap<Uuid, bool> = held.into_iter().collect();
                    for (id, attempt) in ids.iter().zip(&attempts) {
                        match held.get(id) {
                            None => self.stop(*id, Some(*attempt), StopReason::LeaseLost),
                            Some(true) => self.stop(*id, Some(*attempt), StopReason::Cancelled),
                            Some(false) => {}
                        }
                    }
                }
                Ok(Err(error)) => tracing::warn!(error = %error, "heartbeat failed"),
                Err(_) => tracing::warn!("heartbeat timed out"),
            }
        }
    }

    /// Stops the running attempt of `job_id` (only attempt `attempt`, when given).
    fn stop(&self, job_id: Uuid, attempt: Option<i32>, reason: StopReason) {
        if let Some(running) = self.running().get(&job_id) {
            if attempt.is_none_or(|a| a == running.attempt) {
                let _ = running.stop.send(Some(reason));
            }
        }
    }

    /// Rescues expired leases (every quarter lease) and prunes old jobs (every minute).
    async fn maintenance(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.settings.lease / 4);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune: Option<Instant> = None;
        loop {
            interval.tick().await;
            if let Err(error) = self.rescue().await {
                tracing::warn!(error = %error, "rescuing expired leases failed");
            }
            self.tend_instant_databases().await;
            if last_prune.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                last_prune = Some(Instant::now());
                if let Some(retention) = self.settings.retention {
                    self.prune(retention).await;
                }
                if let Err(error) = capy_shared::db::prune_idempotency_keys(&self.pool, 1000).await
                {
                    tracing::warn!(error = %error, "pruning idempotency keys failed");
                }
            }
        }
    }

    /// Queues the due slots of periodic jobs (scheduled backups, capy's own sweeps),
    /// once per slot whatever the number of workers.
    async fn periodic(self: Arc<Self>) {
        let schedules = sweeps::schedules(self.settings.preview_sweep_interval);
        let mut interval = tokio::time::interval(self.settings.periodic_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut registered = false;
        loop {
            interval.tick().await;
            // Registered once the control database answers (it may be down at start).
            if !registered {
                registered = self.register_sweeps(&schedules).await;
            }
            match periodic::fire_due(&self.pool, self.settings.periodic_max_attempts, 100).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "queued the jobs of periodic slots"),
                Err(error) => tracing::warn!(error = %error, "firing periodic jobs failed"),
            }
        }
    }

    /// Registers capy's sweeps; false if the control database did not answer.
    async fn register_sweeps(&self, schedules: &[periodic::NewPeriodicJob]) -> bool {
        for schedule in schedules {
            if let Err(error) = periodic::ensure(&self.pool, schedule).await {
                tracing::warn!(error = %error, name = %schedule.name, "could not register a sweep yet");
                return false;
            }
        }
        true
    }

    /// A sweep ([`sweeps`]), done by the worker itself in SQL (no step process).
    async fn sweep(self: Arc<Self>, job: Job, finished: mpsc::Sender<Outcome>) {
        let result = sweeps::run(
            &self.pool,
            &job.job_type,
            self.settings.periodic_max_attempts,
        )
        .await;
        let mut done = succeeded(&job);
        match result {
            Ok(stdout) => done.outcome.stdout = stdout,
            Err(error) => {
                done.outcome = failure(RetryClassification::Transient, error.to_string());
                done.retry_delay = self.settings.retry.delay_after(job.attempts);
            }
        }
        let _ = finished
            .send(Outcome {
                finished: done,
                entry: None,
            })
            .await;
    }

    /// Deletes expired instant databases and keeps the warm pool full.
    async fn tend_instant_databases(&self) {
        let limits = instant::InstantLimits {
            max_per_cluster: self.settings.instant_max_per_cluster,
            ..instant::InstantLimits::default()
        };
        match instant::expire(&self.pool, limits.max_attempts, 100).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                count = n,
                "queued the deletion of expired instant databases"
            ),
            Err(error) => tracing::warn!(error = %error, "expiring instant databases failed"),
        }
        let every = self.settings.instant_storage_check.as_secs_f64();
        match instant::schedule_storage_checks(&self.pool, every, limits.max_attempts, 100).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "queued storage checks of instant databases"),
            Err(error) => tracing::warn!(error = %error, "scheduling storage checks failed"),
        }
        if self.settings.instant_pool_size > 0 {
            match instant::top_up(
                &self.pool,
                &self.secrets,
                self.settings.instant_pool_size,
                limits,
            )
            .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "queued instant databases for the warm pool"),
                Err(error) => tracing::warn!(error = %error, "filling the instant pool failed"),
            }
        }
    }

    async fn rescue(&self) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        let rescued = queue::rescue_expired(&mut tx, &self.settings.retry, 100).await?;
        for job in &rescued {
            tracing::warn!(job_id = %job.id, attempt = job.attempts, state = %job.state, "rescued a job whose worker was lost");
            effects::apply(&mut tx, job).await?;
        }
        tx.commit().await
    }

    /// Deletes finished jobs past retention, in small batches so no statement holds
    /// many locks or much WAL at once.
    async fn prune(&self, retention: Duration) {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let mut total = 0;
        loop {
            match queue::delete_finished_before(&self.pool, cutoff, 1000).await {
                Ok(deleted) => {
                    total += deleted;
                    if deleted < 1000 {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "pruning finished jobs failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, "pruned finished jobs past retention");
        }
    }

    /// Wakes the loop on each new job and stops steps of cancelled jobs; reconnects
    /// when the connection drops (polling and heartbeats cover the gap).
    async fn listen(self: Arc<Self>, wake: Arc<Notify>) {
        let mut backoff = Backoff::default();
        loop {
            let listener = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener
                    .listen_all([queue::NOTIFY_CHANNEL, queue::CANCEL_CHANNEL])
                    .await?;
                Ok::<_, sqlx::Error>(listener)
            };
            match listener.await {
                Ok(mut listener) => {
                    backoff.succeeded();
                    // Notifications sent while we were away are lost: look now.
                    wake.notify_one();
                    while let Ok(notification) = listener.recv().await {
                        if notification.channel() == queue::CANCEL_CHANNEL {
                            if let Ok(job_id) = notification.payload().parse() {
                                self.stop(job_id, None, StopReason::Cancelled);
                            }
                        } else {
                            wake.notify_one();
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(error = %error, "LISTEN unavailable; polling meanwhile");
                }
            }
            // Also after a dropped connection: a server that drops it at once is not
            // asked again in a tight loop.
            tokio::time::sleep(backoff.failed()).await;
        }
    }
}

fn succeeded(job: &Job) -> FinishedAttempt {
    FinishedAttempt {
        job_id: job.id,
        attempt: job.attempts,
        outcome: AttemptOutcome {
            cancelled: false,
            exit_code: Some(0),
            classification: None,
            error: None,
            stdout: String::new(),
            stderr: String::new(),
        },
        retry_delay: Duration::ZERO,
    }
}

fn failure(class: RetryClassification, error: String) -> AttemptOutcome {
    AttemptOutcome {
        cancelled: false,
        exit_code: None,
        classification: Some(class),
        error: Some(error),
        stdout: String::new(),
        stderr: String::new(),
    }
}

/// Retries of a batch of outcomes before the completer gives up on it (its leases
/// then expire and rescue retries the jobs).
const RECORD_RETRIES: usize = 60;

/// How the worker waits between tries of its work on the control database (claiming,
/// recording outcomes, LISTEN): 100 ms, doubling up to 2.5 s, each wait jittered by
/// up to as much again (so at most 5 s), so workers that lost the database together
/// do not come back in step.
fn control_database_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(2500))
        .with_jitter()
        .without_max_times()
}

/// The waits of a loop that retries by itself (claims, LISTEN): the policy's next wait
/// after each failure, from the first again after a success.
#[derive(Default)]
struct Backoff {
    waits: Option<ExponentialBackoff>,
}

impl Backoff {
    fn failed(&mut self) -> Duration {
        self.waits
            .get_or_insert_with(|| control_database_backoff().build())
            .next()
            .unwrap_or(Duration::from_secs(5))
    }

    fn succeeded(&mut self) {
        self.waits = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_under_five_seconds_and_restarts() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| backoff.failed()).collect();
        let within = |wait: Duration, step_ms: u64| {
            let step = Duration::from_millis(step_ms);
            wait >= step && wait <= step * 2
        };
        assert!(within(waits[0], 100), "{waits:?}");
        assert!(within(waits[1], 200), "{waits:?}");
        assert!(within(waits[4], 1600), "{waits:?}");
        assert!(within(waits[11], 2500), "{waits:?}");
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(5)),
            "{waits:?}"
        );
        backoff.succeeded();
        assert!(within(backoff.failed(), 100));
    }
}
