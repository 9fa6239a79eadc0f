//! Prometheus metrics of the queue, read from the control database at each scrape
//! through partial indexes only (see [`crate::job_metrics`]): jobs by type and state,
//! the queue's depth and the age of its oldest runnable job. (Attempt durations,
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
    counts: &[(String, String, i64)],
    window: Duration,
    depth: i64,
    oldest: f64,
) -> prometheus::Result<String> {
    let registry = Registry::new();
    let jobs = IntGaugeVec::new(
        Opts::new(
            "capy_jobs",
            format!(
                "Jobs by type and state: pending and claimed now; completed, failed and cancelled in the last {} s",
                window.as_secs()
            ),
        ),
        &["type", "state"],
    )?;
    let queue_depth = IntGauge::new("capy_queue_depth", "Runnable pending jobs")?;
    let oldest_pending = Gauge::new(
        "capy_oldest_pending_job_age_seconds",
        "How long the oldest runnable pending job has waited",
    )?;
    for (job_type, job_state, count) in counts {
        jobs.with_label_values(&[job_type.as_str(), job_state.as_str()])
            .set(*count);
    }
    queue_depth.set(depth);
    oldest_pending.set(oldest);
    registry.register(Box::new(jobs))?;
    registry.register(Box::new(queue_depth))?;
    registry.register(Box::new(oldest_pending))?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}
