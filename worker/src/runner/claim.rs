//! The claim loop: claims up to the free slots in one statement, starts each job, wakes
//! on NOTIFY, and drains on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capy_shared::model::{job_type, Job};
use capy_shared::queue::{self, ClaimKey, FinishedAttempt};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use super::retry::Backoff;
use super::{Outcome, Worker, CLAIM_BATCH, FINISH_BATCH};
use crate::process::StopReason;
use crate::sweeps;

impl Worker {
    /// Works until `shutdown` resolves, then drains: no new claims; running steps get
    /// the grace period, then are stopped and their jobs handed back.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(
            worker = self.settings.worker_id,
            concurrency = self.settings.concurrency,
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
        self.claim_loop(&mut attempts, &wake, &finished_tx, shutdown)
            .await;
        self.drain(attempts).await;
        drop(finished_tx);
        let _ = completer.await;
        for task in background {
            task.abort();
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    /// Claims while there are free slots, until `shutdown` resolves.
    async fn claim_loop(
        self: &Arc<Self>,
        attempts: &mut JoinSet<()>,
        wake: &Notify,
        finished: &mpsc::Sender<Outcome>,
        shutdown: impl Future<Output = ()>,
    ) {
        let settings = &self.settings;
        let mut backoff = Backoff::default();
        let mut floor = ClaimFloor::default();
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
            let idle_wait = if free > 0 {
                let from = floor.key(&self.queue_pool).await;
                self.claim(free, from, attempts, finished, &mut backoff)
                    .await
            } else {
                settings.poll_interval
            };
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
    }

    /// Claims up to `free` jobs and starts them; answers how long to wait, at most,
    /// before claiming again.
    async fn claim(
        self: &Arc<Self>,
        free: usize,
        from: Option<ClaimKey>,
        attempts: &mut JoinSet<()>,
        finished: &mpsc::Sender<Outcome>,
        backoff: &mut Backoff,
    ) -> Duration {
        let settings = &self.settings;
        let claimed = queue::claim(
            &self.queue_pool,
            &settings.worker_id,
            free as i64,
            settings.lease,
            from,
        )
        .await;
        let jobs = match claimed {
            Ok(jobs) => jobs,
            Err(error) => {
                let wait = backoff.failed();
                tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "claiming jobs failed");
                return wait;
            }
        };
        backoff.succeeded();
        self.metrics.claimed(&jobs);
        self.announce_claimed(&jobs);
        // More may be waiting: claim again as soon as a slot frees.
        let wait = if jobs.len() == free {
            Duration::ZERO
        } else {
            settings.poll_interval
        };
        for job in jobs {
            if !self.start(job, attempts, finished).await {
                break;
            }
        }
        wait
    }

    /// Tells the API's waiters that jobs they may watch are claimed, off the claim's
    /// path: a lost announcement only makes a waiter see the change at its next look.
    fn announce_claimed(&self, jobs: &[Job]) {
        let ids = queue::announced(jobs);
        if ids.is_empty() {
            return;
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            if let Err(error) = queue::announce_changes(&pool, &ids).await {
                tracing::debug!(error = %error, "announcing claimed jobs failed");
            }
        });
    }

    /// Starts a claimed job: a sweep or a step in a task of its own, a no-op recorded
    /// at once. False when the completer is gone.
    async fn start(
        self: &Arc<Self>,
        job: Job,
        attempts: &mut JoinSet<()>,
        finished: &mpsc::Sender<Outcome>,
    ) -> bool {
        if sweeps::is_sweep(&job.job_type) {
            attempts.spawn(self.clone().sweep(job, finished.clone()));
        } else if job.job_type == job_type::NOOP {
            let outcome = Outcome {
                finished: FinishedAttempt::succeeded(&job),
                entry: None,
            };
            return finished.send(outcome).await.is_ok();
        } else {
            attempts.spawn(self.clone().attempt(job, finished.clone()));
        }
        true
    }

    /// Waits the grace period for the running attempts; then stops the rest, whose
    /// jobs are handed back.
    async fn drain(&self, mut attempts: JoinSet<()>) {
        let grace = self.settings.shutdown_grace;
        tracing::info!(
            running = attempts.len(),
            grace_s = grace.as_secs(),
            "draining"
        );
        let drained = tokio::time::timeout(grace, async {
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
    }

    /// Wakes the loop on each new job and stops steps of cancelled jobs; reconnects
    /// when the connection drops (polling and heartbeats cover the gap).
    pub(super) async fn listen(self: Arc<Self>, wake: Arc<Notify>) {
        let mut backoff = Backoff::default();
        loop {
            match self.listener().await {
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

    async fn listener(&self) -> sqlx::Result<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener
            .listen_all([queue::NOTIFY_CHANNEL, queue::CANCEL_CHANNEL])
            .await?;
        Ok(listener)
    }
}

/// How often a worker takes its claim floor again ([`ClaimKey`]): the longest a job
/// queued below the floor waits for its claim.
const CLAIM_FLOOR_EVERY: Duration = Duration::from_secs(1);

/// The worker's claim floor, taken again every [`CLAIM_FLOOR_EVERY`].
#[derive(Default)]
struct ClaimFloor {
    key: Option<ClaimKey>,
    taken: Option<Instant>,
}

impl ClaimFloor {
    /// The floor for the next claim; none (claim from the front) while it cannot be
    /// taken.
    async fn key(&mut self, pool: &PgPool) -> Option<ClaimKey> {
        if self
            .taken
            .is_none_or(|at| at.elapsed() >= CLAIM_FLOOR_EVERY)
        {
            self.taken = Some(Instant::now());
            self.key = queue::claim_floor(pool)
                .await
                .inspect_err(
                    |error| tracing::debug!(error = %error, "taking the claim floor failed"),
                )
                .ok();
        }
        self.key
    }
}
