//! Command line and environment of `capy-worker`. Every flag is also an environment
//! variable.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use capy_shared::queue::RetryPolicy;
use capy_shared::telemetry::LogFormat;

use crate::process::StepLimits;
use crate::runner::WorkerSettings;

#[derive(Debug, clap::Parser)]
#[command(
    name = "capy-worker",
    version,
    about = "Claims capy's jobs and runs their steps"
)]
pub struct Cli {
    #[arg(long, env = "CAPY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The control database.
    #[arg(long, env = "CAPY_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Key that opens project passwords and cluster URLs (as given to the API).
    #[arg(long, env = "CAPY_SECRET_KEY", hide_env_values = true)]
    pub secret_key: String,
    /// This worker's name in `claimed_by` (default: host name and pid).
    #[arg(long, env = "CAPY_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Steps run at once.
    #[arg(long, env = "CAPY_WORKER_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub concurrency: u16,
    /// A claim's lease; heartbeats renew it every third of it.
    #[arg(long, env = "CAPY_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub lease_seconds: u64,
    /// Polling interval, the fallback when notifications are lost.
    #[arg(long, env = "CAPY_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub poll_interval_ms: u64,
    /// Time limit of one attempt's step.
    #[arg(long, env = "CAPY_STEP_TIMEOUT_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub step_timeout_seconds: u64,
    /// Time limit of one job type's steps: `TYPE=SECONDS` (repeatable; comma-separated
    /// in the environment variable), e.g. `project.create=120`.
    #[arg(
        long = "step-timeout",
        env = "CAPY_STEP_TIMEOUTS",
        value_delimiter = ','
    )]
    pub step_timeouts: Vec<String>,
    /// Finished jobs older than this are deleted (0 keeps them).
    #[arg(long, env = "CAPY_JOB_RETENTION_SECONDS", default_value_t = 7 * 24 * 3600)]
    pub job_retention_seconds: u64,
    /// Bytes kept of each of a step's stdout and stderr.
    #[arg(long, env = "CAPY_STEP_OUTPUT_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub step_output_limit_bytes: usize,
    /// First retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "CAPY_RETRY_BASE_DELAY_MS", default_value_t = 2000)]
    pub retry_base_delay_ms: u64,
    #[arg(long, env = "CAPY_RETRY_MAX_DELAY_MS", default_value_t = 600_000)]
    pub retry_max_delay_ms: u64,
    /// On SIGTERM, how long running steps may finish before they are stopped and their
    /// jobs handed back.
    #[arg(long, env = "CAPY_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// Serve Prometheus metrics (and `/healthz`) on this address, e.g. `0.0.0.0:9100`;
    /// off when unset.
    #[arg(long, env = "CAPY_WORKER_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Ready, unassigned instant databases the workers keep on every cluster, so
    /// `POST /v1/databases` answers without waiting for provisioning (0: no pool).
    #[arg(long, env = "CAPY_INSTANT_POOL_SIZE", default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=1000))]
    pub instant_pool_size: i64,
    /// Pool entries and unclaimed instant databases one cluster may hold: the pool is
    /// not topped up past it. Give the API the same.
    #[arg(long, env = "CAPY_INSTANT_MAX_PER_CLUSTER", default_value_t = capy_shared::instant::DEFAULT_MAX_PER_CLUSTER, value_parser = clap::value_parser!(i64).range(0..))]
    pub instant_max_per_cluster: i64,
    /// Seconds between checks of an unclaimed instant database's size against its
    /// storage limit (past it, the database refuses connections until claimed).
    #[arg(long, env = "CAPY_INSTANT_STORAGE_CHECK_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub instant_storage_check_seconds: u64,
    /// The built-in steps' executable (default: `capy-step` beside this binary).
    #[arg(long, env = "CAPY_STEP_BINARY")]
    pub step_binary: Option<PathBuf>,
    /// Replace the command of a job type: `TYPE=COMMAND` (repeatable; comma-separated in
    /// the environment variable), e.g. `project.create=/opt/steps/create.sh`.
    #[arg(
        long = "step-command",
        env = "CAPY_STEP_COMMANDS",
        value_delimiter = ','
    )]
    pub step_commands: Vec<String>,
    /// How often each worker looks for due periodic jobs (scheduled backups, sweeps).
    #[arg(long, env = "CAPY_PERIODIC_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub periodic_interval_ms: u64,
    /// Attempts each job a periodic job queues gets.
    #[arg(long, env = "CAPY_JOB_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub job_max_attempts: i32,
    /// How often workers look for preview databases past their TTL (each expired
    /// preview is deleted once, whatever the number of workers).
    #[arg(long, env = "CAPY_PREVIEW_SWEEP_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub preview_sweep_seconds: u64,
    /// The backup store, handed to the steps that read or write archives.
    #[command(flatten)]
    pub store: capy_shared::store::StoreConfig,
}

impl Cli {
    pub fn worker_settings(&self) -> anyhow::Result<WorkerSettings> {
        let step_binary = match &self.step_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("locating this executable")?
                .with_file_name("capy-step"),
        };
        let commands = by_job_type(&self.step_commands, "--step-command", "COMMAND")?;
        let step_timeouts = by_job_type(&self.step_timeouts, "--step-timeout", "SECONDS")?
            .into_iter()
            .map(|(job_type, seconds)| {
                let seconds: f64 = seconds
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .with_context(|| {
                        format!("--step-timeout {job_type}={seconds}: not a number of seconds")
                    })?;
                Ok((job_type, Duration::from_secs_f64(seconds)))
            })
            .collect::<anyhow::Result<_>>()?;
        let step_timeouts = with_archive_timeouts(step_timeouts);
        let lease = Duration::from_secs(self.lease_seconds);
        Ok(WorkerSettings {
            worker_id: self.worker_id.clone().unwrap_or_else(default_worker_id),
            concurrency: usize::from(self.concurrency),
            lease,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            retry: RetryPolicy {
                base_delay: Duration::from_millis(self.retry_base_delay_ms),
                max_delay: Duration::from_millis(self.retry_max_delay_ms),
            },
            step_limits: StepLimits {
                timeout: Duration::from_secs(self.step_timeout_seconds),
                kill_grace: Duration::from_secs(5),
                output_limit: self.step_output_limit_bytes,
            },
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            default_step: step_binary.to_string_lossy().into_owned(),
            step_commands: commands,
            step_timeouts,
            retention: (self.job_retention_seconds > 0)
                .then(|| Duration::from_secs(self.job_retention_seconds)),
            instant_pool_size: self.instant_pool_size,
            instant_max_per_cluster: self.instant_max_per_cluster,
            instant_storage_check: Duration::from_secs(self.instant_storage_check_seconds),
            store: self.store.clone(),
            periodic_interval: Duration::from_millis(self.periodic_interval_ms),
            periodic_max_attempts: self.job_max_attempts,
            preview_sweep_interval: Duration::from_secs(self.preview_sweep_seconds),
        })
    }
}

/// Steps that copy a whole database (dump, test restore, restore, a preview's clone
/// or reset) take as long as the data does: unless set, they get hours, not the
/// default step's minutes.
const ARCHIVE_STEP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

fn with_archive_timeouts(mut timeouts: HashMap<String, Duration>) -> HashMap<String, Duration> {
    use capy_shared::model::job_type;
    for job_type in [
        job_type::PROJECT_BACKUP,
        job_type::PROJECT_BACKUP_VERIFY,
        job_type::PROJECT_RESTORE,
        job_type::PREVIEW_CREATE,
        job_type::PREVIEW_RESET,
    ] {
        timeouts
            .entry(job_type.to_string())
            .or_insert(ARCHIVE_STEP_TIMEOUT);
    }
    timeouts
}

/// Parses `TYPE=VALUE` entries into a map.
fn by_job_type(
    entries: &[String],
    flag: &str,
    value: &str,
) -> anyhow::Result<HashMap<String, String>> {
    entries
        .iter()
        .map(|entry| {
            let (job_type, rest) = entry
                .split_once('=')
                .filter(|(t, v)| !t.is_empty() && !v.is_empty())
                .with_context(|| format!("{flag} {entry:?} is not TYPE={value}"))?;
            Ok((job_type.to_string(), rest.to_string()))
        })
        .collect()
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copying_steps_get_hours_unless_set() {
        use capy_shared::model::job_type;
        let set = HashMap::from([(job_type::PREVIEW_RESET.to_string(), Duration::from_secs(90))]);
        let timeouts = with_archive_timeouts(set);
        for job_type in [job_type::PROJECT_RESTORE, job_type::PREVIEW_CREATE] {
            assert_eq!(timeouts.get(job_type), Some(&ARCHIVE_STEP_TIMEOUT));
        }
        assert_eq!(
            timeouts.get(job_type::PREVIEW_RESET),
            Some(&Duration::from_secs(90))
        );
        assert_eq!(timeouts.get(job_type::PREVIEW_DELETE), None);
    }
}
