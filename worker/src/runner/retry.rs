//! How the worker waits before trying its work on the control database again
//! (claiming, recording outcomes, LISTEN), with `backon`. The retries of failed jobs
//! are the queue's (`RetryPolicy`, in SQL), not these.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// Retries of a batch of outcomes before the completer gives up on it (its leases
/// then expire and rescue retries the jobs).
pub(super) const RECORD_RETRIES: usize = 60;

/// How the worker waits between tries of its work on the control database (claiming,
/// recording outcomes, LISTEN): 100 ms, doubling up to 2.5 s, each wait jittered by
/// up to as much again (so at most 5 s), so workers that lost the database together
/// do not come back in step.
pub(super) fn control_database_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(2500))
        .with_jitter()
        .without_max_times()
}

/// The waits of a loop that retries by itself (claims, LISTEN): the policy's next wait
/// after each failure, from the first again after a success.
#[derive(Default)]
pub(super) struct Backoff {
    waits: Option<ExponentialBackoff>,
}

impl Backoff {
    pub(super) fn failed(&mut self) -> Duration {
        self.waits
            .get_or_insert_with(|| control_database_backoff().build())
            .next()
            .unwrap_or(Duration::from_secs(5))
    }

    pub(super) fn succeeded(&mut self) {
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
