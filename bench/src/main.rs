//! capy's benchmarks. Each prints its figures as JSON lines; none asserts a speed.
//! Build everything first (`cargo build --release --workspace --bins`): the benches run
//! the API and workers as real processes from the same target folder.

mod backup;
mod engines;
mod insert;
mod instant;
mod joblist;
mod latency;
mod metrics;
mod offer;
mod pooler;
mod preview;
mod provision;
mod queue;
mod serverlog;
mod soak;
mod stats;
mod timeline;

use clap::Parser as _;

#[derive(Debug, clap::Parser)]
#[command(
    name = "capy-bench",
    about = "capy's benchmarks (figures as JSON lines)"
)]
struct Cli {
    /// A PostgreSQL superuser URL to run against (default: a private cluster).
    #[arg(
        long,
        env = "CAPY_BENCH_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, clap::Subcommand)]
enum Bench {
    /// POST /v1/projects → job completed, beside the same SQL through psql.
    Provision {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// POST /v1/projects → job completed over plaintext and over TLS (verify-full),
    /// alternating, on one stack.
    Tls {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Jobs per second: a queue of no-op jobs (or trivial child processes with
    /// --spawn) burnt down by worker processes.
    BurnDown(queue::BurnDownArgs),
    /// Insert → claim latency (p50/p95/p99/max) with jobs queued one per transaction
    /// at --rate for --duration, beside a trivial insert + commit at the same rate.
    Latency(latency::LatencyArgs),
    /// The peak burn-down, then --fraction of it offered for --minutes (enqueue_many on
    /// a timer) with workers running: per-minute throughput and insert → claim p99,
    /// dead tuples and table and index sizes at the end against the start.
    Soak(soak::SoakArgs),
    /// The burn-down on an empty table beside the same with finished jobs already in it.
    History(queue::HistoryArgs),
    /// POST /v1/databases → connect + select 1, warm pool and empty pool, beside a raw
    /// CREATE DATABASE.
    Instant {
        #[arg(long, default_value_t = 50)]
        runs: usize,
    },
    /// The API's /metrics scrape time: an empty jobs table, then 1,000,000 finished jobs.
    Metrics(metrics::MetricsArgs),
    /// pgbench TPS (select-only) through the pooler (PgBouncer, transaction mode) beside
    /// direct, same run: -c 20 both ways, then -c 200 through the pooler.
    Pooler(pooler::PoolerArgs),
    /// A project database of --size-mib (default 1 GiB): capy backup → completed,
    /// verification, restore into a new project, beside `pg_dump -Fc | pg_restore` and
    /// `pg_dump -Fc > file` on the same cluster; peak RSS of the workers, steps and
    /// pg_dump/pg_restore while capy runs.
    Backup(backup::BackupArgs),
    /// A parent project of each of --sizes MiB: time to a usable preview database
    /// (clone, and empty) through capy while the parent has a transaction open, beside
    /// `pg_dump | pg_restore` by the shell and `CREATE DATABASE … TEMPLATE` (with no
    /// session on the parent) on the same cluster.
    Preview(preview::PreviewArgs),
    /// POST /v1/projects → job completed per engine (PostgreSQL, MySQL, Redis) on one
    /// stack, beside the engine's own commands run by hand on the same servers.
    Engines {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// The console's queries (the jobs list with each filter, deep paging, the queue
    /// overview) on a few jobs, then on a history of --history jobs, same run.
    Joblist(joblist::JobListArgs),
    /// Jobs into the queue per second: one per transaction (the baseline), one per
    /// statement, and `enqueue_many` batches, same run.
    Insert(insert::InsertArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(url) = &cli.database_url {
        // The test support reads this to use a given cluster instead of its own.
        std::env::set_var("CAPY_TEST_DATABASE_URL", url);
    }
    match cli.bench {
        Bench::Provision { runs } => provision::provision(runs).await,
        Bench::Tls { runs } => provision::tls_cost(runs).await,
        Bench::BurnDown(args) => queue::burn_down(&args).await,
        Bench::Latency(args) => latency::latency(&args).await,
        Bench::History(args) => queue::history(&args).await,
        Bench::Soak(args) => soak::soak(&args).await,
        Bench::Instant { runs } => instant::instant(runs).await,
        Bench::Metrics(args) => metrics::metrics(&args).await,
        Bench::Pooler(args) => pooler::pooler(&args).await,
        Bench::Backup(args) => backup::backup(&args).await,
        Bench::Preview(args) => preview::preview(&args).await,
        Bench::Engines { runs } => engines::engines(runs).await,
        Bench::Joblist(args) => joblist::joblist(&args).await,
        Bench::Insert(args) => insert::insert(&args).await,
    }
}
