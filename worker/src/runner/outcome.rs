//! The completer: records attempts' outcomes in batches, with their effects on their
//! projects, retrying while the control database is unreachable.

use std::sync::Arc;

use backon::Retryable as _;
use capy_shared::effects;
use capy_shared::model::RetryClassification;
use capy_shared::queue::{self, AttemptOutcome, FinishedAttempt};
use tokio::sync::mpsc;

use super::retry::{control_database_backoff, RECORD_RETRIES};
use super::{Outcome, RunningEntry, Worker, FINISH_BATCH};

impl Worker {
    /// Records outcomes in batches, retrying while the control database is
    /// unreachable; returns when every sender is gone and all is written.
    pub(super) async fn complete(self: Arc<Self>, mut outcomes: mpsc::Receiver<Outcome>) {
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

    /// Writes one batch and its effects in one transaction; answers how many of its
    /// attempts were still ours to record.
    async fn record(&self, batch: &[FinishedAttempt]) -> sqlx::Result<usize> {
        let mut outcomes = queue::Outcomes::begin(&self.pool).await?;
        let jobs = outcomes.finish(&self.settings.worker_id, batch).await?;
        let announced = queue::announced(&jobs);
        if announced.is_empty() && !jobs.iter().any(effects::may_apply) {
            // Internal work alone (no-ops, sweeps): nothing more to write.
            outcomes.commit().await?;
        } else {
            let mut tx = outcomes.planner_back().await?;
            queue::announce_changes(&mut *tx, &announced).await?;
            for job in &jobs {
                effects::apply(&mut tx, job).await?;
            }
            tx.commit().await?;
        }
        for job in &jobs {
            tracing::info!(job_id = %job.id, attempt = job.attempts, state = %job.state, "outcome recorded");
            self.metrics.recorded(job);
        }
        Ok(jobs.len())
    }
}

/// A failed attempt whose step did not run (or did not run to its end).
pub(super) fn failure(class: RetryClassification, error: String) -> AttemptOutcome {
    AttemptOutcome {
        cancelled: false,
        exit_code: None,
        classification: Some(class),
        error: Some(error),
        stdout: String::new(),
        stderr: String::new(),
    }
}
