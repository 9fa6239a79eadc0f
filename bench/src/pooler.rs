//! `pooler`: pgbench's select-only TPS through the cluster's PgBouncer (transaction
//! mode, SCRAM through auth_query) beside the same directly, in one run, on a project
//! made through the API; then 200 clients through the pooler, which the project's
//! limit would refuse directly. The limit is [`MAX_CONNECTIONS`]: 20 direct clients
//! plus the pooler's idle server connections from the previous round.

use anyhow::Context as _;
use capy_testkit::{pooler as test_pooler, ProcessStack};
use serde_json::{json, Value};

use crate::provision::control_plane;
use crate::stats::{median, round2};

const MAX_CONNECTIONS: i32 = 40;

#[derive(Debug, clap::Args)]
pub struct PoolerArgs {
    /// Each pgbench run's length in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// How many times each of the three runs is repeated (medians are printed).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

pub async fn pooler(args: &PoolerArgs) -> anyhow::Result<()> {
    let pooler = test_pooler()?;
    let (db, key) = control_plane(Some(pooler)).await?;
    let stack = ProcessStack::start(&db.url, 1, &[]).await?;
    let (direct, pooled) = project_urls(&stack.api_url, &key).await?;
    pgbench(&direct, &["-i", "-s", "1", "-q"]).await?;
    let runs: [(&str, &str, u32); 3] = [
        ("direct", &direct, 20),
        ("pooled", &pooled, 20),
        ("pooled", &pooled, 200),
    ];
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    for _ in 0..args.repeats {
        for (n, (_, url, clients)) in runs.iter().enumerate() {
            let seconds = args.seconds.to_string();
            let clients = clients.to_string();
            let output = pgbench(
                url,
                &["-S", "-n", "-j", "2", "-c", &clients, "-T", &seconds],
            )
            .await?;
            tps[n].push(parse_tps(&output)?);
        }
    }
    for ((endpoint, _, clients), mut samples) in runs.into_iter().zip(tps) {
        println!(
            "{}",
            json!({
                "bench": "pooler",
                "endpoint": endpoint,
                "clients": clients,
                "seconds": args.seconds,
                "project_max_connections": MAX_CONNECTIONS,
                "tps_runs": samples.iter().map(|t| round2(*t)).collect::<Vec<_>>(),
                "tps_median": round2(median(&mut samples)),
            })
        );
    }
    Ok(())
}

/// A project made through the API; its direct and pooled URLs.
async fn project_urls(api: &str, key: &str) -> anyhow::Result<(String, String)> {
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{api}/v1/projects"))
        .bearer_auth(key)
        .json(&json!({"name": "bench-pooler", "max_connections": MAX_CONNECTIONS}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["project"]["id"].as_str().context("no project id")?;
    let job = created["job"]["id"].as_str().context("no job id")?;
    let shown: Value = http
        .get(format!("{api}/v1/jobs/{job}?wait=60"))
        .bearer_auth(key)
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(
        shown["job"]["state"] == "completed",
        "project.create did not complete: {}",
        shown["job"]
    );
    let urls: Value = http
        .get(format!("{api}/v1/projects/{id}/connections"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let url = |k: &str| urls[k].as_str().map(str::to_string).context("no URL");
    Ok((url("direct_url")?, url("pooled_url")?))
}

/// Runs pgbench against `url` (its password through PGPASSWORD, not argv); answers
/// its standard output.
async fn pgbench(url: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut url = url::Url::parse(url)?;
    let password = url.password().unwrap_or_default().to_string();
    let _ = url.set_password(None);
    let program = capy_testkit::postgres_bin_dir()
        .map(|dir| dir.join("pgbench"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "pgbench".into());
    let output = tokio::process::Command::new(program)
        .args(args)
        .arg(url.as_str())
        .env("PGPASSWORD", password)
        .output()
        .await
        .context("running pgbench")?;
    anyhow::ensure!(
        output.status.success(),
        "pgbench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `tps = 1234.5 (without initial connection time)`.
fn parse_tps(output: &str) -> anyhow::Result<f64> {
    output
        .lines()
        .find(|line| line.starts_with("tps = "))
        .and_then(|line| line["tps = ".len()..].split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no tps in pgbench's output: {output}"))
}
