//! The worker loop: claim up to the free slots in one statement, run each attempt's
//! step, record outcomes in batches, keep leases alive, rescue jobs of lost workers,
//! prune old jobs, and drain on shutdown.
//!
//! Its rooms: [`claim`] (the loop that claims and starts jobs, LISTEN, the drain),
//! [`attempt`] (one attempt's step and what its end means), [`outcome`] (recording
//! outcomes in batches), [`leases`] (heartbeats, stopping steps), [`periodic`]
//! (rescue, retention, instant databases, schedules and sweeps) and [`retry`] (how
//! the worker waits before trying its control-database work again).

mod attempt;
mod claim;
mod leases;
mod outcome;
mod periodic;
mod retry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capy_shared::crypto::SecretBox;
use capy_shared::db;
use capy_shared::queue::{FinishedAttempt, RetryPolicy};
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::metrics::WorkerMetrics;
use crate::process::{StepLimits, StopReason};

/// Outcomes recorded in one statement, at most.
const FINISH_BATCH: usize = 5000;
/// Jobs claimed in one statement, at most.
const CLAIM_BATCH: usize = 5000;

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
    /// Claims and heartbeats: sessions that never plan a scan of the whole job table.
    queue_pool: PgPool,
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
            // The claim loop and the heartbeats: one connection each.
            queue_pool: db::queue_pool(&pool, 2),
            pool,
            secrets,
            settings,
            metrics,
            running: Mutex::new(HashMap::new()),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}
