//! The worker's Prometheus metrics, served on `CAPY_WORKER_METRICS_ADDR` at
//! `/metrics`: attempts by outcome, classification and exit code, attempt durations,
//! steps in flight, claim latency, and the queue's depth read at each scrape.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use capy_shared::model::Job;
use capy_shared::queue;
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use sqlx::PgPool;

pub struct WorkerMetrics {
    registry: Registry,
    attempts: IntCounterVec,
    attempt_seconds: HistogramVec,
    pub steps_in_flight: IntGauge,
    claim_latency: Histogram,
    queue_depth: IntGauge,
    oldest_pending_seconds: prometheus::Gauge,
}

impl WorkerMetrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let attempts = IntCounterVec::new(
            Opts::new(
                "capy_attempts_total",
                "Attempts recorded by this worker, by job type, the job's state after it, classification and exit code",
            ),
            &["type", "state", "classification", "exit_code"],
        )?;
        let attempt_seconds = HistogramVec::new(
            HistogramOpts::new(
                "capy_attempt_duration_seconds",
                "Wall time of a step's attempt, by job type",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["type"],
        )?;
        let steps_in_flight = IntGauge::new("capy_steps_in_flight", "Step processes running now")?;
        let claim_latency = Histogram::with_opts(
            HistogramOpts::new(
                "capy_claim_latency_seconds",
                "From a job becoming runnable (run_at) to its claim",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
            ]),
        )?;
        let queue_depth = IntGauge::new(
            "capy_queue_depth",
            "Runnable pending jobs (read from the control database at scrape)",
        )?;
        let oldest_pending_seconds = prometheus::Gauge::new(
            "capy_oldest_pending_job_age_seconds",
            "How long the oldest runnable pending job has waited",
        )?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(attempt_seconds.clone()))?;
        registry.register(Box::new(steps_in_flight.clone()))?;
        registry.register(Box::new(claim_latency.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(oldest_pending_seconds.clone()))?;
        Ok(Self {
            registry,
            attempts,
            attempt_seconds,
            steps_in_flight,
            claim_latency,
            queue_depth,
            oldest_pending_seconds,
        })
    }

    /// A job's attempt as recorded (the job row after the outcome was written).
    pub fn recorded(&self, job: &Job) {
        let exit_code = job
            .last_exit_code
            .map(|c| c.to_string())
            .unwrap_or_default();
        self.attempts
            .with_label_values(&[
                job.job_type.as_str(),
                job.state.as_str(),
                job.retry_classification.map_or("", |c| c.as_str()),
                exit_code.as_str(),
            ])
            .inc();
    }

    pub fn attempt_took(&self, job_type: &str, seconds: f64) {
        self.attempt_seconds
            .with_label_values(&[job_type])
            .observe(seconds);
    }

    pub fn claimed(&self, jobs: &[Job]) {
        let now = chrono::Utc::now();
        for job in jobs {
            let waited = (now - job.run_at).num_microseconds().unwrap_or(0).max(0);
            self.claim_latency.observe(waited as f64 / 1e6);
        }
    }

    async fn render(&self, pool: &PgPool) -> anyhow::Result<String> {
        let (depth, oldest) = queue::depth(pool).await?;
        self.queue_depth.set(depth);
        self.oldest_pending_seconds.set(oldest);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }
}

/// Serves `/metrics` (and `/healthz`) on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: std::sync::Arc<WorkerMetrics>,
    pool: PgPool,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok" }))
        .with_state((metrics, pool));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving metrics");
    axum::serve(listener, app).await.context("serving metrics")
}

type ScrapeState = (std::sync::Arc<WorkerMetrics>, PgPool);

async fn scrape(State((metrics, pool)): State<ScrapeState>) -> impl IntoResponse {
    match metrics.render(&pool).await {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            text,
        ),
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "rendering metrics failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                "the control database is unavailable\n".to_string(),
            )
        }
    }
}
