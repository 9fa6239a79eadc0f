//! `preview`: time to a usable preview database through capy (POST → its job
//! completed → the preview's own login runs `select 1`) while the parent has a session
//! inside a transaction, beside the raw ways on the same cluster in the same run:
//! `createdb && pg_dump -Fc | pg_restore --no-owner` by the shell, and `CREATE DATABASE
//! … TEMPLATE` with no other session connected (a floor capy cannot use: PostgreSQL
//! refuses it while the parent has sessions, which is shown once per size). `empty`
//! is timed beside `pg_dump -Fc --schema-only | pg_restore`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use capy_shared::ident::quote_ident;
use capy_testkit::{cluster, postgres_bin_dir, ProcessStack};
use serde_json::json;

use crate::backup::{shell, Api};
use crate::stats::{median_ms, ms, round2};

#[derive(Debug, clap::Args)]
pub struct PreviewArgs {
    /// The parents' sizes in MiB, comma-separated (one parent per size).
    #[arg(long, alias = "size-mib", value_delimiter = ',', default_values_t = [100, 1024])]
    sizes: Vec<u64>,
    /// Runs of each measure per size; medians are printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Rows inserted per statement while filling a parent, at most (about 80 MiB).
const FILL_BATCH_ROWS: i64 = 250_000;
/// What one row takes on disk with its index entry, roughly: sizes each batch so the
/// parent ends close to its size.
const ROW_BYTES: i64 = 340;
/// The row the parent's open transaction inserts: a clone must not have it.
const UNCOMMITTED_ID: i64 = -1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Clone,
    Empty,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Clone => "clone",
            Self::Empty => "empty",
        }
    }

    /// pg_dump's flags for the same copy by hand.
    fn dump_flags(self) -> &'static str {
        match self {
            Self::Clone => "-Fc",
            Self::Empty => "-Fc --schema-only",
        }
    }
}

/// A parent project filled to a size.
struct Parent {
    id: String,
    database: String,
    /// Its own login's connection string.
    url: String,
    bytes: i64,
    max_id: i64,
}

#[derive(Default)]
struct Samples {
    capy_clone: Vec<Duration>,
    pipe: Vec<Duration>,
    template: Vec<Duration>,
    capy_empty: Vec<Duration>,
    schema_pipe: Vec<Duration>,
}

/// One size's medians, in milliseconds.
struct Row {
    size_mib: u64,
    parent_bytes: i64,
    capy_clone: f64,
    pipe: f64,
    template: f64,
    capy_empty: f64,
    schema_pipe: f64,
    refusal: Refusal,
}

/// What `CREATE DATABASE … TEMPLATE` answered while the parent had a session open.
struct Refusal {
    error: String,
    after: Duration,
}

pub async fn preview(args: &PreviewArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(!args.sizes.is_empty(), "--sizes needs at least one size");
    let (db, key) = crate::provision::control_plane(None).await?;
    let env = [("CAPY_STEP_TIMEOUT_SECONDS", "3600".to_string())];
    let stack = ProcessStack::start(&db.url, 2, &env).await?;
    let api = Api {
        http: reqwest::Client::new(),
        url: stack.api_url.clone(),
        key,
    };
    let mut rows = Vec::new();
    for &size_mib in &args.sizes {
        let row = one_size(&api, size_mib, args.runs).await?;
        print_json(args.runs, &row);
        rows.push(row);
    }
    print_table(args.runs, &rows);
    Ok(())
}

/// A parent of `size_mib`; the TEMPLATE refusal; then `runs` rounds of every measure,
/// interleaved so each sees the same conditions.
async fn one_size(api: &Api, size_mib: u64, runs: usize) -> anyhow::Result<Row> {
    let filling = Instant::now();
    let parent = make_parent(api, size_mib).await?;
    eprintln!(
        "parent of {} MiB filled in {:.1}s",
        parent.bytes / (1024 * 1024),
        filling.elapsed().as_secs_f64()
    );
    let refusal = template_refused(&parent).await?;
    let mut samples = Samples::default();
    for run in 1..=runs {
        samples
            .capy_clone
            .push(capy_preview(api, &parent, Mode::Clone).await?);
        samples.pipe.push(pipe(&parent, Mode::Clone).await?);
        samples
            .template
            .push(template_floor(&parent.database).await?);
        samples
            .capy_empty
            .push(capy_preview(api, &parent, Mode::Empty).await?);
        samples.schema_pipe.push(pipe(&parent, Mode::Empty).await?);
        eprintln!("{size_mib} MiB: run {run} of {runs} done");
    }
    let deleted = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/projects/{}", parent.id),
            None,
        )
        .await?;
    api.job_done(&deleted).await?;
    Ok(Row {
        size_mib,
        parent_bytes: parent.bytes,
        capy_clone: median_ms(&mut samples.capy_clone),
        pipe: median_ms(&mut samples.pipe),
        template: median_ms(&mut samples.template),
        capy_empty: median_ms(&mut samples.capy_empty),
        schema_pipe: median_ms(&mut samples.schema_pipe),
        refusal,
    })
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting")?;
    tokio::spawn(connection);
    Ok(client)
}

/// A project through the API, filled as its own login until its database holds
/// `size_mib`: one table of wide rows with a primary key (so a copy rebuilds an index).
async fn make_parent(api: &Api, size_mib: u64) -> anyhow::Result<Parent> {
    let created = api
        .call(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"name": format!("bench-parent-{size_mib}")})),
        )
        .await?;
    api.job_done(&created).await?;
    let id = created["project"]["id"]
        .as_str()
        .context("no project id")?
        .to_string();
    let database = created["project"]["database_name"]
        .as_str()
        .context("no database")?
        .to_string();
    let credentials = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/projects/{id}/credentials"),
            None,
        )
        .await?;
    let url = credentials["connection_string"]
        .as_str()
        .context("no connection string")?
        .to_string();
    let (bytes, max_id) = fill(&url, size_mib).await?;
    Ok(Parent {
        id,
        database,
        url,
        bytes,
        max_id,
    })
}

/// Inserts batches of wide rows until the database holds `size_mib`; answers its
/// size and the last id. The connection is closed on return (TEMPLATE needs none).
async fn fill(url: &str, size_mib: u64) -> anyhow::Result<(i64, i64)> {
    let client = connect(url).await?;
    client
        .batch_execute(
            "set statement_timeout = 0;
             create table big (id bigint primary key, payload text not null)",
        )
        .await?;
    let target = i64::try_from(size_mib * 1024 * 1024)?;
    let mut next: i64 = 1;
    loop {
        let size: i64 = client
            .query_one("select pg_database_size(current_database())", &[])
            .await?
            .get(0);
        if size >= target {
            client.batch_execute("vacuum analyze big").await?;
            return Ok((size, next - 1));
        }
        let rows = ((target - size) / ROW_BYTES).clamp(1_000, FILL_BATCH_ROWS);
        client
            .execute(
                "insert into big
                 select g, md5(g::text) || repeat(to_hex(g * 2654435761), 16) || md5((g * 7)::text)
                 from generate_series($1::bigint, $1::bigint + $2::bigint - 1) g",
                &[&next, &rows],
            )
            .await?;
        next += rows;
    }
}

/// A session of the parent's own login inside a transaction that has written a row.
struct OpenTransaction(tokio_postgres::Client);

impl OpenTransaction {
    async fn begin(parent: &Parent) -> anyhow::Result<Self> {
        let client = connect(&parent.url).await?;
        // The project's timeouts would end a session idle in its transaction for the
        // length of a 1 GiB copy.
        client
            .batch_execute(&format!(
                "set statement_timeout = 0; set idle_in_transaction_session_timeout = 0;
                 begin; insert into big values ({UNCOMMITTED_ID}, 'uncommitted')"
            ))
            .await?;
        Ok(Self(client))
    }

    /// Commits (the proof the session was not disturbed), then removes the row again.
    async fn commit(self) -> anyhow::Result<()> {
        self.0
            .batch_execute("commit")
            .await
            .context("the parent's open transaction did not commit")?;
        let removed = self
            .0
            .execute("delete from big where id = $1", &[&UNCOMMITTED_ID])
            .await?;
        anyhow::ensure!(removed == 1, "the parent's committed row is missing");
        Ok(())
    }
}

/// capy: POST → job completed → the preview's login runs `select 1`, while the parent
/// has a transaction open; then checks what the preview holds and deletes it.
async fn capy_preview(api: &Api, parent: &Parent, mode: Mode) -> anyhow::Result<Duration> {
    let open = OpenTransaction::begin(parent).await?;
    let started = Instant::now();
    let answer = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/projects/{}/preview-databases", parent.id),
            Some(json!({"mode": mode.as_str()})),
        )
        .await?;
    api.job_done(&answer).await?;
    let id = answer["preview"]["id"]
        .as_str()
        .context("no preview id")?
        .to_string();
    let credentials = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/preview-databases/{id}/connections"),
            None,
        )
        .await?;
    let preview = connect(
        credentials["connection_string"]
            .as_str()
            .context("no connection string")?,
    )
    .await?;
    preview.simple_query("select 1").await?;
    let took = started.elapsed();
    open.commit().await?;
    check_preview(&preview, parent, mode).await?;
    drop(preview);
    let deleted = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/preview-databases/{id}"),
            None,
        )
        .await?;
    api.job_done(&deleted).await?;
    Ok(took)
}

/// A clone has the parent's committed rows and not the uncommitted one; an empty
/// preview has the table and no rows.
async fn check_preview(
    preview: &tokio_postgres::Client,
    parent: &Parent,
    mode: Mode,
) -> anyhow::Result<()> {
    let row = preview
        .query_one(
            "select coalesce(max(id), 0), count(*) filter (where id = $1) from big",
            &[&UNCOMMITTED_ID],
        )
        .await?;
    let (max_id, uncommitted): (i64, i64) = (row.get(0), row.get(1));
    let expected = match mode {
        Mode::Clone => parent.max_id,
        Mode::Empty => 0,
    };
    anyhow::ensure!(
        (max_id, uncommitted) == (expected, 0),
        "the {} preview holds max(id) {max_id} and {uncommitted} uncommitted row(s); \
         expected max(id) {expected} and none",
        mode.as_str()
    );
    Ok(())
}

/// The shell's way, as the cluster's superuser, with the same open transaction on
/// the parent: `createdb`, then `pg_dump | pg_restore --no-owner` into it.
async fn pipe(parent: &Parent, mode: Mode) -> anyhow::Result<Duration> {
    let cluster = cluster()?;
    let bin = postgres_bin_dir()?;
    let target = format!("bench_pipe_{}", uuid::Uuid::new_v4().simple());
    let script = format!(
        "set -o pipefail; {createdb} --maintenance-db=\"$ADMIN\" \"$NAME\" && \
         {dump} {flags} -d \"$SOURCE\" | {restore} --no-owner -d \"$TARGET\"",
        createdb = bin.join("createdb").display(),
        dump = bin.join("pg_dump").display(),
        flags = mode.dump_flags(),
        restore = bin.join("pg_restore").display(),
    );
    let env = [
        ("ADMIN", cluster.admin_url_for("postgres")),
        ("NAME", target.clone()),
        ("SOURCE", cluster.admin_url_for(&parent.database)),
        ("TARGET", cluster.admin_url_for(&target)),
    ];
    let open = OpenTransaction::begin(parent).await?;
    let started = Instant::now();
    shell(&script, &env).await?;
    let took = started.elapsed();
    open.commit().await?;
    drop_database(&target).await?;
    Ok(took)
}

async fn admin() -> anyhow::Result<tokio_postgres::Client> {
    connect(&cluster()?.admin_url_for("postgres")).await
}

async fn drop_database(name: &str) -> anyhow::Result<()> {
    admin()
        .await?
        .batch_execute(&format!("drop database {}", quote_ident(name)))
        .await?;
    Ok(())
}

/// `CREATE DATABASE … TEMPLATE parent` with no session on the parent: the floor.
async fn template_floor(database: &str) -> anyhow::Result<Duration> {
    let admin = admin().await?;
    wait_until_unused(&admin, database).await?;
    let copy = format!("bench_template_{}", uuid::Uuid::new_v4().simple());
    let sql = format!(
        "create database {} template {}",
        quote_ident(&copy),
        quote_ident(database)
    );
    let started = Instant::now();
    admin.batch_execute(&sql).await?;
    let took = started.elapsed();
    admin
        .batch_execute(&format!("drop database {}", quote_ident(&copy)))
        .await?;
    Ok(took)
}

/// Sessions closed a moment ago may still be exiting; PostgreSQL would wait for them
/// inside the timed statement.
async fn wait_until_unused(admin: &tokio_postgres::Client, database: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sessions: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity where datname = $1",
                &[&database],
            )
            .await?
            .get(0);
        if sessions == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{database} still has {sessions} session(s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `CREATE DATABASE … TEMPLATE parent` while the parent has a transaction open: what
/// PostgreSQL answers, and after how long.
async fn template_refused(parent: &Parent) -> anyhow::Result<Refusal> {
    let open = OpenTransaction::begin(parent).await?;
    let copy = format!("bench_template_{}", uuid::Uuid::new_v4().simple());
    let sql = format!(
        "create database {} template {}",
        quote_ident(&copy),
        quote_ident(&parent.database)
    );
    let started = Instant::now();
    let answer = admin().await?.batch_execute(&sql).await;
    let after = started.elapsed();
    open.commit().await?;
    let Err(error) = answer else {
        drop_database(&copy).await?;
        anyhow::bail!("CREATE DATABASE … TEMPLATE succeeded while the parent had a session");
    };
    let error = match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        },
        None => error.to_string(),
    };
    Ok(Refusal { error, after })
}

fn ratio(capy: f64, baseline: f64) -> f64 {
    round2(capy / baseline)
}

fn print_json(runs: usize, row: &Row) {
    println!(
        "{}",
        json!({
            "bench": "preview",
            "runs": runs,
            "size_mib": row.size_mib,
            "parent_bytes": row.parent_bytes,
            "capy_clone_ms_p50": row.capy_clone,
            "pg_dump_pipe_pg_restore_ms_p50": row.pipe,
            "clone_vs_pipe_ratio": ratio(row.capy_clone, row.pipe),
            "template_no_sessions_ms_p50": row.template,
            "template_with_a_session": {
                "error": row.refusal.error,
                "after_ms": ms(row.refusal.after),
            },
            "capy_empty_ms_p50": row.capy_empty,
            "pg_dump_schema_only_pipe_ms_p50": row.schema_pipe,
            "empty_vs_schema_pipe_ratio": ratio(row.capy_empty, row.schema_pipe),
        })
    );
}

fn seconds(ms: f64) -> String {
    format!("{:.2}s", ms / 1000.0)
}

fn print_table(runs: usize, rows: &[Row]) {
    println!("\nmedians of {runs} run(s); capy with a transaction open on the parent");
    println!(
        "{:>9}  {:>10}  {:>10}  {:>6}  {:>14}  {:>10}  {:>12}  {:>6}",
        "size",
        "capy clone",
        "dump|rest.",
        "ratio",
        "TEMPLATE floor",
        "capy empty",
        "schema dump|",
        "ratio"
    );
    for row in rows {
        println!(
            "{:>9}  {:>10}  {:>10}  {:>6.2}  {:>14}  {:>10}  {:>12}  {:>6.2}",
            format!("{} MiB", row.size_mib),
            seconds(row.capy_clone),
            seconds(row.pipe),
            ratio(row.capy_clone, row.pipe),
            seconds(row.template),
            seconds(row.capy_empty),
            seconds(row.schema_pipe),
            ratio(row.capy_empty, row.schema_pipe),
        );
    }
    for row in rows {
        println!(
            "TEMPLATE with a session open on the {} MiB parent: refused after {}: {}",
            row.size_mib,
            seconds(ms(row.refusal.after)),
            row.refusal.error
        );
    }
}
