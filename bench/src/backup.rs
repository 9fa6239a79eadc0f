//! `backup`: a project database of a given size backed up, verified and restored into
//! a new project through capy, beside `pg_dump -Fc | pg_restore` by hand and
//! `pg_dump -Fc > file` alone on the same cluster, with the peak memory of the
//! processes doing the work while capy runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use capy_shared::ident::quote_ident;
use capy_testkit::{cluster, postgres_bin_dir, ProcessStack};
use serde_json::{json, Value};

use crate::stats::{median_ms, round2};

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The project database's size to build, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keep the archives in the test S3 server (moto) instead of a local folder.
    #[arg(long)]
    s3: bool,
}

/// The processes whose memory is sampled.
const WATCHED: [&str; 4] = ["capy-worker", "capy-step", "pg_dump", "pg_restore"];

pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
    pub key: String,
}

impl Api {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "{path}: {status} {body}");
        Ok(body)
    }

    /// Polls until `path`'s `field` object has `key` in `done`; fails on `failed`.
    async fn wait(
        &self,
        path: &str,
        field: &str,
        key: &str,
        done: &[&str],
    ) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let value = self.call(reqwest::Method::GET, path, None).await?[field].clone();
            let state = value[key].as_str().unwrap_or_default();
            if done.contains(&state) {
                return Ok(value);
            }
            anyhow::ensure!(
                state != "failed" && value["state"] != "failed",
                "{path} failed: {value}"
            );
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(3600),
                "{path} took over an hour"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn job_done(&self, answer: &Value) -> anyhow::Result<Value> {
        let id = answer["job"]["id"].as_str().context("no job id")?;
        self.wait(&format!("/v1/jobs/{id}"), "job", "state", &["completed"])
            .await
    }
}

pub async fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    let (db, key) = crate::provision::control_plane(None).await?;
    let folder = std::env::temp_dir().join(format!(
        "capy-bench-backups-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut env = vec![("CAPY_STEP_TIMEOUT_SECONDS", "3600".to_string())];
    if args.s3 {
        env.extend(capy_testkit::s3()?.env("bench"));
    } else {
        env.push(("CAPY_BACKUP_STORE", format!("file://{}", folder.display())));
    }
    let stack = ProcessStack::start(&db.url, 2, &env).await?;
    let api = Api {
        http: reqwest::Client::new(),
        url: stack.api_url.clone(),
        key,
    };
    let created = api
        .call(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"name": "bench-backup"})),
        )
        .await?;
    api.job_done(&created).await?;
    let project = created["project"]["id"]
        .as_str()
        .context("no project id")?
        .to_string();
    let database = created["project"]["database_name"]
        .as_str()
        .context("no database")?
        .to_string();
    let database_bytes = fill(&api, &project, args.size_mib).await?;

    let mut figures = Figures::default();
    let peaks = Peaks::start();
    for _ in 0..args.runs {
        capy_run(&api, &project, &mut figures).await?;
    }
    let peak_rss_kib = peaks.stop();
    for _ in 0..args.runs {
        by_hand(&database, &mut figures).await?;
    }
    let _ = std::fs::remove_dir_all(&folder);
    print_figures(args, database_bytes, figures, peak_rss_kib);
    Ok(())
}

#[derive(Default)]
struct Figures {
    backup: Vec<Duration>,
    verify: Vec<Duration>,
    restore: Vec<Duration>,
    pipeline: Vec<Duration>,
    dump_to_file: Vec<Duration>,
    archive_bytes: i64,
    dump_file_bytes: u64,
}

/// Fills the project's database as its tenant until it holds `size_mib`; answers its size.
async fn fill(api: &Api, project: &str, size_mib: u64) -> anyhow::Result<i64> {
    let credentials = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/projects/{project}/credentials"),
            None,
        )
        .await?;
    let url = credentials["connection_string"]
        .as_str()
        .context("no connection string")?;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("set statement_timeout = 0; create table big (id bigint primary key, a text, b text, c text)")
        .await?;
    let target = i64::try_from(size_mib * 1024 * 1024)?;
    let mut next: i64 = 0;
    loop {
        let size: i64 = client
            .query_one("select pg_database_size(current_database())", &[])
            .await?
            .get(0);
        if size >= target {
            client.batch_execute("vacuum analyze big").await?;
            return Ok(size);
        }
        client
            .execute(
                "insert into big select g, md5(g::text), md5((g + 1)::text), md5((g + 2)::text)
                 from generate_series($1::bigint, $1::bigint + 499999) g",
                &[&next],
            )
            .await?;
        next += 500_000;
    }
}

/// One capy round: backup → completed, verification → verified, restore into a new
/// project → completed (that project deleted afterwards).
async fn capy_run(api: &Api, project: &str, figures: &mut Figures) -> anyhow::Result<()> {
    let started = Instant::now();
    let answer = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/backups"),
            Some(json!({"label": "bench"})),
        )
        .await?;
    let id = answer["backup"]["id"]
        .as_str()
        .context("no backup id")?
        .to_string();
    let path = format!("/v1/backups/{id}");
    let done = api.wait(&path, "backup", "state", &["completed"]).await?;
    figures.backup.push(started.elapsed());
    figures.archive_bytes = done["size_bytes"].as_i64().unwrap_or_default();
    let verifying = Instant::now();
    api.wait(&path, "backup", "verification_state", &["verified"])
        .await?;
    figures.verify.push(verifying.elapsed());

    let restoring = Instant::now();
    let body = json!({"backup_id": id, "target_kind": "new_project", "name": "bench-restored"});
    let answer = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/restores"),
            Some(body),
        )
        .await?;
    api.job_done(&answer).await?;
    figures.restore.push(restoring.elapsed());
    let restored = answer["project"]["id"]
        .as_str()
        .context("no restored project")?;
    let deleted = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/projects/{restored}"),
            None,
        )
        .await?;
    api.job_done(&deleted).await?;
    Ok(())
}

/// The same by hand, as the cluster's superuser: `pg_dump -Fc | pg_restore` into a
/// scratch database, then `pg_dump -Fc > file`.
async fn by_hand(database: &str, figures: &mut Figures) -> anyhow::Result<()> {
    let cluster = cluster()?;
    let bin = postgres_bin_dir()?;
    let scratch = format!("bench_scratch_{}", uuid::Uuid::new_v4().simple());
    let admin = cluster.admin_url_for("postgres");
    psql(
        &bin,
        &admin,
        &format!("create database {}", quote_ident(&scratch)),
    )
    .await?;
    let pipeline = format!(
        "set -o pipefail; {dump} -Fc -N capy_pooler -d \"$SOURCE\" | {restore} --no-owner --no-acl -d \"$TARGET\"",
        dump = bin.join("pg_dump").display(),
        restore = bin.join("pg_restore").display(),
    );
    let started = Instant::now();
    shell(
        &pipeline,
        &[
            ("SOURCE", cluster.admin_url_for(database)),
            ("TARGET", cluster.admin_url_for(&scratch)),
        ],
    )
    .await?;
    figures.pipeline.push(started.elapsed());
    psql(
        &bin,
        &admin,
        &format!("drop database {}", quote_ident(&scratch)),
    )
    .await?;

    let file: PathBuf = std::env::temp_dir().join(format!("{scratch}.dump"));
    let to_file = format!(
        "{} -Fc -N capy_pooler -d \"$SOURCE\" > \"$FILE\"",
        bin.join("pg_dump").display()
    );
    let started = Instant::now();
    shell(
        &to_file,
        &[
            ("SOURCE", cluster.admin_url_for(database)),
            ("FILE", file.display().to_string()),
        ],
    )
    .await?;
    figures.dump_to_file.push(started.elapsed());
    figures.dump_file_bytes = std::fs::metadata(&file)
        .map(|m| m.len())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Runs `script` with bash; URLs (with passwords) go through the environment, not argv.
pub async fn shell(script: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("bash")
        .args(["-c", script])
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .status()
        .await
        .context("running bash")?;
    anyhow::ensure!(status.success(), "`{script}` failed: {status}");
    Ok(())
}

async fn psql(bin: &std::path::Path, url: &str, sql: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new(bin.join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql, url])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "psql -c {sql} failed");
    Ok(())
}

/// Samples VmHWM/VmRSS of the watched processes every 100 ms from a thread.
struct Peaks {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeMap<String, u64>>,
}

impl Peaks {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peaks = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) {
                sample(&mut peaks);
                std::thread::sleep(Duration::from_millis(100));
            }
            peaks
        });
        Self { stop, thread }
    }

    /// The peak of each watched program, in KiB (the largest of its processes).
    fn stop(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn sample(peaks: &mut BTreeMap<String, u64>) {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let Some(name) = WATCHED.iter().find(|w| comm.trim() == **w) else {
            continue;
        };
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let kib = status
            .lines()
            .filter(|l| l.starts_with("VmHWM:") || l.starts_with("VmRSS:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .max()
            .unwrap_or_default();
        let peak = peaks.entry((*name).to_string()).or_insert(0);
        *peak = (*peak).max(kib);
    }
}

fn print_figures(
    args: &BackupArgs,
    database_bytes: i64,
    mut f: Figures,
    peaks: BTreeMap<String, u64>,
) {
    let backup = median_ms(&mut f.backup);
    let verify = median_ms(&mut f.verify);
    let restore = median_ms(&mut f.restore);
    let pipeline = median_ms(&mut f.pipeline);
    let to_file = median_ms(&mut f.dump_to_file);
    println!(
        "{}",
        json!({
            "bench": "backup",
            "runs": args.runs,
            "store": if args.s3 { "s3 (moto)" } else { "folder" },
            "database_bytes": database_bytes,
            "archive_bytes": f.archive_bytes,
            "pg_dump_file_bytes": f.dump_file_bytes,
            "capy_backup_ms_p50": backup,
            "capy_verify_ms_p50": verify,
            "capy_restore_new_project_ms_p50": restore,
            "pg_dump_pipe_pg_restore_ms_p50": pipeline,
            "pg_dump_to_file_ms_p50": to_file,
            "backup_vs_pg_dump_to_file_ratio": round2(backup / to_file),
            "backup_plus_restore_vs_pipeline_ratio": round2((backup + restore) / pipeline),
            "peak_rss_kib": peaks,
        })
    );
}
