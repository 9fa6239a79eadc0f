//! Job state changes as the workers announce them (`queue::CHANGED_CHANNEL`), for
//! requests that wait on a job (`GET /v1/jobs/{id}?wait=N`, an instant database made
//! on the spot): they look again as soon as their job is announced, and otherwise
//! every fallback period (`CAPY_JOB_WAIT_FALLBACK_MS`), which covers announcements lost
//! while the listener reconnects.

use std::time::Duration;

use capy_shared::queue::CHANGED_CHANNEL;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;
use uuid::Uuid;

/// How often a waiter looks again when its job was not announced, by default.
pub const FALLBACK_LOOK: Duration = Duration::from_millis(250);
/// Announced ids held for waiters that have not read them yet; a waiter that falls
/// further behind looks again at once.
const BUFFERED: usize = 4096;
/// Pause before listening again after the connection dropped or could not be made.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// The announced job ids, to each waiter.
#[derive(Debug, Clone)]
pub struct JobChanges {
    sender: broadcast::Sender<Uuid>,
    fallback: Duration,
}

impl Default for JobChanges {
    /// Nothing announced: waiters look every [`FALLBACK_LOOK`] only.
    fn default() -> Self {
        Self {
            sender: broadcast::channel(BUFFERED).0,
            fallback: FALLBACK_LOOK,
        }
    }
}

impl JobChanges {
    /// Listens on the control database in a task of its own, for the life of the
    /// process (reconnecting when the connection drops); waiters whose job was not
    /// announced look again every `fallback`.
    pub fn listen(pool: PgPool, fallback: Duration) -> Self {
        let changes = Self {
            fallback,
            ..Self::default()
        };
        let sender = changes.sender.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = relay(&pool, &sender).await {
                    tracing::debug!(error = %error, "job announcements unavailable; waiters poll meanwhile");
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        });
        changes
    }

    /// A subscription; take it before reading the job, so no change is missed between.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            announced: self.sender.subscribe(),
            fallback: self.fallback,
        }
    }
}

/// Passes each announced id on until the connection fails.
async fn relay(pool: &PgPool, sender: &broadcast::Sender<Uuid>) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANGED_CHANNEL).await?;
    loop {
        let notification = listener.recv().await?;
        for id in notification.payload().split(',') {
            if let Ok(id) = id.parse() {
                // No receiver: nobody waits, nothing to do.
                let _ = sender.send(id);
            }
        }
    }
}

/// One waiter's view of the announcements.
pub struct Subscription {
    announced: broadcast::Receiver<Uuid>,
    fallback: Duration,
}

impl Subscription {
    /// Returns when job `id` is announced, when announcements were missed (so the
    /// caller looks again), or after `at_most` (bounded by the fallback period).
    pub async fn next_look(&mut self, id: Uuid, at_most: Duration) {
        let announced = async {
            loop {
                match self.announced.recv().await {
                    Ok(changed) if changed == id => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    // The listener never stops; should it, the timeout below answers.
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        let _ = tokio::time::timeout(at_most.min(self.fallback), announced).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    /// How long `next_look` took, on tokio's paused clock, with `sent` announced once
    /// the wait began (`None`: nothing announced).
    async fn look(changes: &JobChanges, id: Uuid, before: &[Uuid], sent: Option<Uuid>) -> Duration {
        let mut subscription = changes.subscribe();
        for other in before {
            let _ = changes.sender.send(*other);
        }
        let sender = changes.sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(id) = sent {
                let _ = sender.send(id);
            }
        });
        let started = Instant::now();
        subscription.next_look(id, Duration::from_secs(30)).await;
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_looks_again_when_its_job_is_announced() {
        let changes = JobChanges::default();
        let id = Uuid::now_v7();
        assert_eq!(
            look(&changes, id, &[], Some(id)).await,
            Duration::from_millis(10)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn other_jobs_announced_leave_the_waiter_to_its_fallback() {
        let changes = JobChanges::default();
        let other = Some(Uuid::now_v7());
        assert_eq!(
            look(&changes, Uuid::now_v7(), &[], other).await,
            FALLBACK_LOOK
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_fell_behind_the_announcements_looks_again_at_once() {
        let changes = JobChanges::default();
        // More announcements than are kept: the waiter may have missed its own.
        let missed: Vec<Uuid> = (0..=BUFFERED).map(|_| Uuid::now_v7()).collect();
        assert_eq!(
            look(&changes, Uuid::now_v7(), &missed, None).await,
            Duration::ZERO
        );
    }
}
