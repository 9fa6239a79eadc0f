//! Figures: medians and rounding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Sorts `samples` and answers their median in milliseconds.
pub fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    let mid = samples.len() / 2;
    if samples.len().is_multiple_of(2) {
        round2((ms(samples[mid - 1]) + ms(samples[mid])) / 2.0)
    } else {
        ms(samples[mid])
    }
}

/// The `percent`th percentile in milliseconds (nearest rank; the samples get sorted).
pub fn percentile_ms(samples: &mut [Duration], percent: usize) -> f64 {
    samples.sort();
    let rank = (samples.len() * percent).div_ceil(100).max(1);
    ms(samples[rank - 1])
}

pub fn ms(duration: Duration) -> f64 {
    round2(duration.as_secs_f64() * 1000.0)
}

pub fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.is_empty() {
        f64::NAN
    } else if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// p50, p95, p99 (nearest rank) and max of `values` (sorted in place), rounded; null
/// when there are none.
pub fn quantiles(values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    let Some(max) = values.last() else {
        return Value::Null;
    };
    let at = |percent: usize| {
        let rank = (values.len() * percent).div_ceil(100).max(1);
        round2(values[rank - 1])
    };
    json!({"p50": at(50), "p95": at(95), "p99": at(99), "max": round2(*max)})
}

/// Now, in milliseconds since the epoch (the server's timestamps share the clock).
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}
