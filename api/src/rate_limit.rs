//! A sliding-window limit per client address, kept in this process: each API pod
//! counts for itself, so with N pods a client gets up to N times the limit. It takes
//! no lock or query in the control database, so a burst costs the database nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; past this, the oldest idle ones are forgotten first.
const MAX_CLIENTS: usize = 100_000;

#[derive(Debug, Default)]
pub struct RateLimiter {
    hits: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl RateLimiter {
    /// Counts a request of `client`; `Err` with the wait until one is allowed when it
    /// already made `per_minute` in the last minute.
    pub fn check(&self, client: &str, per_minute: i64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        if hits.len() >= MAX_CLIENTS {
            hits.retain(|_, times| times.back().is_some_and(|t| now - *t < WINDOW));
        }
        let times = hits.entry(client.to_string()).or_default();
        while times.front().is_some_and(|t| now - *t >= WINDOW) {
            times.pop_front();
        }
        if i64::try_from(times.len()).unwrap_or(i64::MAX) >= per_minute {
            let oldest = times.front().copied().unwrap_or(now);
            return Err(WINDOW.saturating_sub(now - oldest));
        }
        times.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_limit_and_others_theirs() {
        let limiter = RateLimiter::default();
        assert!(limiter.check("a", 2).is_ok());
        assert!(limiter.check("a", 2).is_ok());
        let wait = limiter.check("a", 2).unwrap_err();
        assert!(wait > Duration::from_secs(59) && wait <= WINDOW, "{wait:?}");
        assert!(limiter.check("b", 2).is_ok());
    }
}
