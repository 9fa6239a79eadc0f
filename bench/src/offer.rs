//! A steady offered load: operation `k` is due at `start + k / rate`, run by whichever
//! of several tasks is free, so one slow round trip does not hold the schedule back.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinSet;

/// What an offered load did: each operation's round trip and how late it started.
pub struct Offered {
    pub round_trips: Vec<Duration>,
    pub start_lags: Vec<Duration>,
    /// From the first due time to the last operation's end.
    pub elapsed: Duration,
}

impl Offered {
    /// Operations per second actually offered.
    pub fn rate(&self) -> f64 {
        self.round_trips.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The figures as JSON: rate, round trips and start lag (p50/p95/p99/max).
    pub fn figures(&self) -> Value {
        json!({
            "operations": self.round_trips.len(),
            "offered_per_s": crate::stats::round2(self.rate()),
            "round_trip_ms": quantiles(&self.round_trips),
            "start_lag_ms": quantiles(&self.start_lags),
        })
    }
}

/// p50, p95, p99 and max of `samples` in milliseconds.
pub fn quantiles(samples: &[Duration]) -> Value {
    let mut values: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    crate::stats::quantiles(&mut values)
}

/// Runs `op` `rate` times a second for `duration`, from `tasks` tasks.
pub async fn offer<F, Fut>(
    rate: f64,
    duration: Duration,
    tasks: usize,
    op: F,
) -> anyhow::Result<Offered>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    anyhow::ensure!(rate > 0.0, "the rate must be positive");
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let mut set = JoinSet::new();
    for _ in 0..tasks.max(1) {
        let (next, op) = (next.clone(), op.clone());
        set.spawn(async move {
            let mut trips = Vec::new();
            let mut lags = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    return anyhow::Ok((trips, lags));
                }
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let began = Instant::now();
                op().await?;
                trips.push(began.elapsed());
                lags.push(began.saturating_duration_since(due));
            }
        });
    }
    let mut offered = Offered {
        round_trips: Vec::new(),
        start_lags: Vec::new(),
        elapsed: Duration::ZERO,
    };
    while let Some(done) = set.join_next().await {
        let (trips, lags) = done??;
        offered.round_trips.extend(trips);
        offered.start_lags.extend(lags);
    }
    offered.elapsed = start.elapsed();
    Ok(offered)
}
