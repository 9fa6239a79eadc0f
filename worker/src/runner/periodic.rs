//! The worker's periodic work: rescuing jobs of lost workers, pruning finished jobs
//! and idempotency keys past retention, tending instant databases, queueing the due
//! slots of periodic jobs, and the sweeps those queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capy_shared::model::{Job, RetryClassification};
use capy_shared::queue::FinishedAttempt;
use capy_shared::{effects, instant, periodic, queue};
use tokio::sync::mpsc;

use super::outcome::failure;
use super::{Outcome, Worker};
use crate::sweeps;

impl Worker {
    /// Rescues expired leases (every quarter lease) and prunes old jobs (every minute).
    pub(super) async fn maintenance(self: Arc<Self>) {
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
    pub(super) async fn periodic(self: Arc<Self>) {
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
    pub(super) async fn sweep(self: Arc<Self>, job: Job, finished: mpsc::Sender<Outcome>) {
        let result = sweeps::run(
            &self.pool,
            &job.job_type,
            self.settings.periodic_max_attempts,
        )
        .await;
        let mut done = FinishedAttempt::succeeded(&job);
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

    /// Takes back the jobs whose leases expired (their worker is lost), with their
    /// effects on their projects.
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
}
