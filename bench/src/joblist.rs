//! `joblist`: what the operator console asks for, timed over HTTP on loopback (an upper
//! bound of the server's time): the jobs list with each filter, paging deep, and
//! `GET /v1/queue`, first on an organization with 1,000 jobs (the baseline: pages as
//! full as later), then with a long history (1,000,000 jobs by default), same run.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::provision::control_plane;
use crate::stats::{median_ms, percentile_ms, round2};

#[derive(Debug, clap::Args)]
pub struct JobListArgs {
    /// Jobs of the organization inserted before the second round.
    #[arg(long, default_value_t = 1_000_000)]
    history: i64,
    /// Jobs in the organization for the baseline round.
    #[arg(long, default_value_t = 1_000)]
    baseline: i64,
    /// Requests per query and round.
    #[arg(long, default_value_t = 100)]
    requests: usize,
}

/// The queries a console page makes, by name.
const QUERIES: [(&str, &str); 7] = [
    ("newest", "/v1/jobs?limit=50"),
    ("state_failed", "/v1/jobs?limit=50&state=failed"),
    ("state_pending", "/v1/jobs?limit=50&state=pending"),
    ("type_rare", "/v1/jobs?limit=50&type=project.create"),
    ("project", "/v1/jobs?limit=50&project_id={project}"),
    (
        "failed_of_type",
        "/v1/jobs?limit=50&state=failed&type=project.backup",
    ),
    ("queue_overview", "/v1/queue"),
];

pub async fn joblist(args: &JobListArgs) -> anyhow::Result<()> {
    let (db, key) = control_plane(None).await?;
    let stack = capy_testkit::ProcessStack::start(&db.url, 0, &[]).await?;
    let http = reqwest::Client::new();
    let api = Api {
        http: &http,
        base: &stack.api_url,
        key: &key,
    };
    // With no workers, the project stays provisioning and its job pending.
    let project = api.post("/v1/projects", json!({"name": "joblist"})).await?;
    let project_id: Uuid = project["project"]["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no project id in {project}"))?;
    add_history(&db.pool, project_id, args.baseline, "baseline").await?;
    let baseline = round(&api, project_id, args.requests).await?;
    let inserting = Instant::now();
    add_history(&db.pool, project_id, args.history - args.baseline, "history").await?;
    let insert_ms = inserting.elapsed().as_millis();
    let full = round(&api, project_id, args.requests).await?;
    let deep = page_deep(&api, 40).await?;
    let mut figures = serde_json::Map::new();
    for ((name, mut empty), (_, mut long)) in baseline.into_iter().zip(full) {
        let (p50, p95) = (median_ms(&mut long), percentile_ms(&mut long, 95));
        let base_p50 = median_ms(&mut empty);
        figures.insert(
            name.into(),
            json!({"baseline_p50_ms": base_p50, "baseline_p95_ms": percentile_ms(&mut empty, 95),
                   "p50_ms": p50, "p95_ms": p95, "p50_ratio": round2(p50 / base_p50)}),
        );
    }
    println!(
        "{}",
        json!({"bench": "joblist", "history_jobs": args.history, "insert_ms": insert_ms,
               "baseline_jobs": args.baseline, "requests_per_query": args.requests, "queries": figures,
               "forty_pages_of_50_total_ms": deep})
    );
    Ok(())
}

struct Api<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    key: &'a str,
}

impl Api<'_> {
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.key)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "GET {path}: {status} {body}");
        Ok(body)
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.key)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "POST {path}: {status} {body}");
        Ok(body)
    }
}

/// Times every query `requests` times (after one not counted), interleaved.
async fn round(
    api: &Api<'_>,
    project_id: Uuid,
    requests: usize,
) -> anyhow::Result<Vec<(&'static str, Vec<Duration>)>> {
    let paths: Vec<String> = QUERIES
        .iter()
        .map(|(_, path)| path.replace("{project}", &project_id.to_string()))
        .collect();
    let mut samples: Vec<(&'static str, Vec<Duration>)> = QUERIES
        .iter()
        .map(|(name, _)| (*name, Vec::new()))
        .collect();
    for run in 0..=requests {
        for (path, (_, times)) in paths.iter().zip(samples.iter_mut()) {
            let started = Instant::now();
            api.get(path).await?;
            if run > 0 {
                times.push(started.elapsed());
            }
        }
    }
    Ok(samples)
}

/// Follows the newest-first list's cursor through `pages` pages: the total time.
async fn page_deep(api: &Api<'_>, pages: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut cursor: Option<String> = None;
    for _ in 0..pages {
        let path = match &cursor {
            Some(after) => format!("/v1/jobs?limit=50&cursor={after}"),
            None => "/v1/jobs?limit=50".into(),
        };
        let page = api.get(&path).await?;
        cursor = page["next_cursor"].as_str().map(str::to_string);
        anyhow::ensure!(cursor.is_some(), "the history ended before {pages} pages");
    }
    Ok(round2(started.elapsed().as_secs_f64() * 1000.0))
}

/// `rows` finished jobs of the project's organization over the last 7 days, ids
/// ordered by time as capy's (UUIDv7) are: mostly `project.update`, some backups, a
/// few creates; 95% completed, 4% failed, 1% cancelled; one in ten of the project.
async fn add_history(pool: &PgPool, project_id: Uuid, rows: i64, salt: &str) -> anyhow::Result<()> {
    sqlx::query(
        "insert into jobs (id, type, state, organization_id, project_id, attempts, max_attempts,
                           claimed_by, claimed_at, started_at, completed_at, last_exit_code,
                           last_stdout, last_stderr)
         select (lpad(to_hex((extract(epoch from t) * 1000)::int8), 12, '0')
                 || '7' || substr(md5(g::text || $3), 1, 19))::uuid,
                case when g % 100 = 0 then 'project.create'
                     when g % 10 = 0 then 'project.backup' else 'project.update' end,
                case when g % 100 < 95 then 'completed' when g % 100 < 99 then 'failed'
                     else 'cancelled' end,
                p.organization_id, case when g % 10 = 3 then p.id end, 1, 3,
                'history', t, t, t, 0, '', ''
         from projects p,
              lateral (select g, now() - make_interval(secs => 604800.0 * g / $2) as t
                       from generate_series(1, $2) g) s
         where p.id = $1",
    )
    .bind(project_id)
    .bind(rows)
    .bind(salt)
    .execute(pool)
    .await?;
    sqlx::query("vacuum analyze jobs").execute(pool).await?;
    Ok(())
}
