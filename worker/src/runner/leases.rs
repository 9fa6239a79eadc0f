//! The running attempts and their leases: registering an attempt, renewing the leases
//! (heartbeats), and stopping steps whose jobs are no longer ours or were cancelled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use capy_shared::model::Job;
use capy_shared::queue;
use tokio::sync::watch;
use uuid::Uuid;

use super::{Running, RunningEntry, Worker};
use crate::process::StopReason;

impl Worker {
    /// Registers a running attempt. An older attempt of the same job still running
    /// here (this worker rescued its own job after an outage, then claimed it again)
    /// is no longer ours: it is stopped.
    pub(super) fn register(
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

    /// Renews the leases of running attempts; stops the steps of jobs no longer ours
    /// or cancelled. A worker that cannot renew for two thirds of a lease stops its
    /// steps itself, before any other worker may rescue their jobs.
    pub(super) async fn heartbeats(self: Arc<Self>) {
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
            let beat = queue::heartbeat(
                &self.queue_pool,
                &self.settings.worker_id,
                &ids,
                &attempts,
                lease,
            );
            match tokio::time::timeout(lease / 3, beat).await {
                Ok(Ok(held)) => {
                    renewed = Instant::now();
                    self.stop_unheld(&ids, &attempts, held.into_iter().collect());
                }
                Ok(Err(error)) => tracing::warn!(error = %error, "heartbeat failed"),
                Err(_) => tracing::warn!("heartbeat timed out"),
            }
        }
    }

    /// Stops the attempts a heartbeat did not renew (`held` has no entry: the job is
    /// no longer ours) or found cancelled (`held` is true).
    fn stop_unheld(&self, ids: &[Uuid], attempts: &[i32], held: HashMap<Uuid, bool>) {
        for (id, attempt) in ids.iter().zip(attempts) {
            match held.get(id) {
                None => self.stop(*id, Some(*attempt), StopReason::LeaseLost),
                Some(true) => self.stop(*id, Some(*attempt), StopReason::Cancelled),
                Some(false) => {}
            }
        }
    }

    /// Stops the running attempt of `job_id` (only attempt `attempt`, when given).
    pub(super) fn stop(&self, job_id: Uuid, attempt: Option<i32>, reason: StopReason) {
        if let Some(running) = self.running().get(&job_id) {
            if attempt.is_none_or(|a| a == running.attempt) {
                let _ = running.stop.send(Some(reason));
            }
        }
    }

    pub(super) fn stop_all(&self, reason: StopReason) {
        for running in self.running().values() {
            let _ = running.stop.send(Some(reason));
        }
    }
}
