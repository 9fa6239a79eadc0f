//! `instant`: POST /v1/databases → a usable connection (connect + `select 1`), with a
//! warm pool and with an empty one, beside a raw `CREATE DATABASE` (then connect +
//! `select 1`) on the same cluster; the warm runs and the floor also as per-phase
//! timelines (see [`crate::timeline`]).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use capy_testkit::{cluster, ProcessStack};
use serde_json::{json, Value};

use crate::provision::control_plane;
use crate::serverlog::{ServerLog, Session};
use crate::stats::now_ms;
use crate::stats::{median_ms, ms};
use crate::timeline::{add_chain, sessions_within, Phases};

/// Connect + select 1 to `url`; answers when (epoch ms) it was connected, and done.
async fn connect_and_select(url: &str) -> anyhow::Result<(f64, f64)> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting")?;
    let connected_ms = now_ms();
    tokio::spawn(connection);
    client.simple_query("select 1").await.context("select 1")?;
    Ok((connected_ms, now_ms()))
}

fn p99_ms(samples: &mut [Duration]) -> f64 {
    crate::stats::percentile_ms(samples, 99)
}

/// One warm or empty-pool run as the client saw it (epoch ms), and the database it
/// connected to.
struct InstantTrace {
    database: String,
    sent_ms: f64,
    answered_ms: f64,
    connected_ms: f64,
    done_ms: f64,
}

/// What [`measure`] answers: POST → select 1, the POST's answer alone, each run's
/// trace.
struct Runs {
    samples: Vec<Duration>,
    answers: Vec<Duration>,
    traces: Vec<InstantTrace>,
}

/// Waits until the workers keep `pool` databases ready, none being made.
async fn wait_for_pool(db: &sqlx::PgPool, pool: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (ready, making): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where state = 'ready'),
                    count(*) filter (where state <> 'ready')
             from projects where instant_status = 'pool' and deleted_at is null",
        )
        .fetch_one(db)
        .await?;
        if ready >= pool as i64 && making == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the pool did not fill");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One POST /v1/databases, then connect + select 1 to what it answered.
async fn one_run(http: &reqwest::Client, api_url: &str) -> anyhow::Result<InstantTrace> {
    let sent_ms = now_ms();
    let created: Value = http
        .post(format!("{api_url}/v1/databases"))
        .json(&json!({"ref": "capy-bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let answered_ms = now_ms();
    let url = created["connection_string"]
        .as_str()
        .context("no connection_string")?;
    let database = url::Url::parse(url)
        .context("the connection string is not a URL")?
        .path()
        .trim_start_matches('/')
        .to_string();
    let (connected_ms, done_ms) = connect_and_select(url).await?;
    Ok(InstantTrace {
        database,
        sent_ms,
        answered_ms,
        connected_ms,
        done_ms,
    })
}

/// Times `runs` creations against a stack whose workers keep `pool` databases ready:
/// POST → select 1, and the POST's answer alone.
async fn measure(runs: usize, pool: usize) -> anyhow::Result<Runs> {
    let (db, _) = control_plane(None).await?;
    let env = [
        ("CAPY_INSTANT_POOL_SIZE", pool.to_string()),
        ("CAPY_LEASE_SECONDS", "4".to_string()),
        ("CAPY_INSTANT_RATE_LIMIT_PER_MINUTE", "1000000".to_string()),
        // Every run's database stays unclaimed: no bound may cut the runs short.
        ("CAPY_INSTANT_MAX_PER_CLUSTER", "1000000".to_string()),
        ("CAPY_INSTANT_MAX_PER_CLIENT", "1000000".to_string()),
    ];
    let stack = ProcessStack::start(&db.url, 2, &env).await?;
    wait_for_pool(&db.pool, pool).await?;
    let http = reqwest::Client::new();
    let mut out = Runs {
        samples: Vec::new(),
        answers: Vec::new(),
        traces: Vec::new(),
    };
    // Two warm-up runs are not counted.
    for run in 0..runs + 2 {
        let started = Instant::now();
        let trace = one_run(&http, &stack.api_url).await?;
        if run >= 2 {
            out.samples.push(started.elapsed());
            out.answers.push(Duration::from_secs_f64(
                (trace.answered_ms - trace.sent_ms).max(0.0) / 1000.0,
            ));
            out.traces.push(trace);
        }
        if pool > 0 {
            // Let the replacement of what was taken catch up, so each run finds a
            // full pool (as a pool sized for its traffic would) and a cluster that is
            // not creating a database meanwhile.
            wait_for_pool(&db.pool, pool).await?;
        }
    }
    Ok(out)
}

pub async fn instant(runs: usize) -> anyhow::Result<()> {
    let log = ServerLog::enable().await?;
    let sessions = || log.as_ref().map(ServerLog::sessions).transpose();
    let report = |pool: &str, mut samples: Vec<Duration>, mut answers: Vec<Duration>| {
        let p50 = median_ms(&mut samples);
        println!(
            "{}",
            json!({
                "bench": "instant",
                "pool": pool,
                "runs": samples.len(),
                "post_to_select_1_ms_p50": p50,
                "post_to_select_1_ms_p99": p99_ms(&mut samples),
                "post_to_select_1_ms_max": ms(samples[samples.len() - 1]),
                "post_answer_ms_p50": median_ms(&mut answers),
                "post_answer_ms_p99": p99_ms(&mut answers),
            })
        );
    };
    let warm = measure(runs, runs.min(20)).await?;
    report("warm", warm.samples.clone(), warm.answers.clone());
    if let Some(sessions) = sessions()? {
        print_timeline("warm", &warm.traces, &sessions);
    }
    let empty = measure(runs, 0).await?;
    report("empty", empty.samples.clone(), empty.answers.clone());

    let mut raw = raw_create(runs).await?;
    let (mut floor, floor_traces) = floor(runs).await?;
    if let Some(sessions) = sessions()? {
        print_timeline("floor", &floor_traces, &sessions);
    }
    println!(
        "{}",
        json!({
            "bench": "instant",
            "baseline": "connect + select 1 to an existing database",
            "runs": runs,
            "ms_p50": median_ms(&mut floor),
            "ms_p99": p99_ms(&mut floor),
        })
    );
    println!(
        "{}",
        json!({
            "bench": "instant",
            "baseline": "raw CREATE DATABASE, then connect + select 1",
            "runs": runs,
            "ms_p50": median_ms(&mut raw),
            "ms_p99": p99_ms(&mut raw),
        })
    );
    Ok(())
}

/// Raw `CREATE DATABASE`, then connect + select 1 (after two warm-ups).
async fn raw_create(runs: usize) -> anyhow::Result<Vec<Duration>> {
    let cluster = cluster()?;
    let (admin, connection) =
        tokio_postgres::connect(&cluster.admin_url_for("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let mut raw = Vec::new();
    for run in 0..runs + 2 {
        let name = format!("bench_raw_{}", uuid::Uuid::new_v4().simple());
        let started = Instant::now();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        connect_and_select(&cluster.admin_url_for(&name)).await?;
        if run >= 2 {
            raw.push(started.elapsed());
        }
    }
    Ok(raw)
}

/// The floor: connect + select 1 to a database that exists and was connected to.
async fn floor(runs: usize) -> anyhow::Result<(Vec<Duration>, Vec<InstantTrace>)> {
    let existing = cluster()?.admin_url_for("postgres");
    let (mut floor, mut traces) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let sent_ms = now_ms();
        let started = Instant::now();
        let (connected_ms, done_ms) = connect_and_select(&existing).await?;
        floor.push(started.elapsed());
        traces.push(InstantTrace {
            database: "postgres".into(),
            sent_ms,
            answered_ms: sent_ms,
            connected_ms,
            done_ms,
        });
    }
    Ok((floor, traces))
}

/// How long sessions to the `postgres` database (the steps' admin sessions, e.g. a
/// pool refill's) other than `client` were open during `trace`, in ms.
fn admin_sessions_overlap(sessions: &[Session], client: &Session, trace: &InstantTrace) -> f64 {
    sessions
        .iter()
        .filter(|s| s.database == "postgres" && !std::ptr::eq(*s, client))
        .filter_map(|s| Some((s.received_ms, s.ended_ms?)))
        .map(|(from, to)| (to.min(trace.done_ms) - from.max(trace.sent_ms)).max(0.0))
        .sum()
}

/// Prints the per-phase timeline of `traces`: the POST, then the client's connection
/// as the server logged it (the session to its database that began after the
/// answer), and how long steps' admin sessions (a pool refill's) were open meanwhile.
fn print_timeline(label: &str, traces: &[InstantTrace], sessions: &[Session]) {
    let mut phases = Phases::default();
    let mut traced = 0;
    for trace in traces {
        let within = sessions_within(sessions, trace.answered_ms, trace.done_ms);
        let Some(client) = within.iter().find(|s| s.database == trace.database) else {
            continue;
        };
        let Some(authorized) = client.authorized_ms else {
            continue;
        };
        traced += 1;
        add_chain(
            &mut phases,
            &[
                ("POST sent", trace.sent_ms),
                ("answered", trace.answered_ms),
                ("connection received", client.received_ms),
                ("authorized", authorized),
                ("client connected", trace.connected_ms),
                ("select 1 answered", trace.done_ms),
            ],
        );
        phases.add("(total)", trace.done_ms - trace.sent_ms);
        let overlap = admin_sessions_overlap(sessions, client, trace);
        phases.add("(side) steps' admin sessions open meanwhile, ms", overlap);
    }
    println!(
        "{}",
        json!({
            "bench": "instant_timeline",
            "pool": label,
            "columns": ["phase", "ms_p50", "ms_mean"],
            "server_log_resolution_ms": 1,
            "runs_traced": traced,
            "phases": phases.figures(),
        })
    );
}
