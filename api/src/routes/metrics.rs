//! Prometheus metrics of the queue, read from the control database at each scrape
//! through partial indexes only (see [`crate::job_metrics`]): live jobs by type and
//! state, those finished in a recent window, the queue's depth and the age of its oldest runnable job. (Attempt durations,
//! outcomes and claim latency are on each worker's `/metrics`.) Served on the public
//! port, or on `CAPY_METRICS_ADDR` alone.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use capy_shared::queue;
use prometheus::{Encoder as _, Gauge, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::bodies::ErrorResponses;
use crate::error::{ApiError, ApiResult};
use crate::{job_metrics, AppState};

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
              ErrorResponses))]
pub async fn scrape(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let window = state.settings.metrics_finished_window;
    let counts = job_metrics::jobs_by_type_and_state(&state.pool, window).await?;
    let (depth, oldest) = queue::depth(&state.pool).await?;
    let text = render(&counts, window, depth, oldest).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

fn render(
    counts: &[job_metrics::JobCount],
    window: Duration,
    depth: i64,
    oldest: f64,
) -> prometheus::Result<String> {
    let registry = Registry::new();
    let jobs = IntGaugeVec::new(
        Opts::new(
            "capy_jobs",
            "Live jobs by type and state (pending, claimed)",
        ),
        &["type", "state"],
    )?;
    let finished = IntGaugeVec::new(
        Opts::new(
            "capy_jobs_finished_recent",
            format!(
                "Jobs that finished (completed, failed, cancelled) in the last capy_jobs_finished_window_seconds ({} s), by type and state",
                window.as_secs()
            ),
        ),
        &["type", "state"],
    )?;
    let finished_window = IntGauge::new(
        "capy_jobs_finished_window_seconds",
        "The window capy_jobs_finished_recent counts",
    )?;
    let queue_depth = IntGauge::new("capy_queue_depth", "Runnable pending jobs")?;
    let oldest_pending = Gauge::new(
        "capy_oldest_pending_job_age_seconds",
        "How long the oldest runnable pending job has waited",
    )?;
    for count in counts {
        let gauge = if count.live { &jobs } else { &finished };
        gauge
            .with_label_values(&[count.job_type.as_str(), count.state.as_str()])
            .set(count.count);
    }
    finished_window.set(i64::try_from(window.as_secs()).unwrap_or(i64::MAX));
    queue_depth.set(depth);
    oldest_pending.set(oldest);
    registry.register(Box::new(jobs))?;
    registry.register(Box::new(finished))?;
    registry.register(Box::new(finished_window))?;
    registry.register(Box::new(queue_depth))?;
    registry.register(Box::new(oldest_pending))?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}
