//! `provision`: POST /v1/projects → job completed, beside the same SQL through psql;
//! then both as per-phase timelines (see [`crate::timeline`]).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use capy_api::admin::{self, ClusterSpec, KeyGrant};
use capy_shared::crypto::{self, SecretBox};
use capy_shared::ident::{quote_ident, quote_literal};
use capy_testkit::{
    cluster, fresh_database, postgres_bin_dir, ProcessStack, TestCluster, TEST_SECRET_KEY,
};
use serde_json::{json, Value};

use crate::serverlog::ServerLog;
use crate::stats::now_ms;
use crate::stats::{median_ms, ms, round2};
use crate::timeline::{self, ClientTrace, Phases};

/// A fresh control database with an organization key and the private cluster
/// registered as `local` (behind `pooler` when given).
pub async fn control_plane(
    pooler: Option<&capy_testkit::TestPooler>,
) -> anyhow::Result<(capy_testkit::TestDatabase, String)> {
    let cluster = cluster()?;
    let db = fresh_database().await?;
    let secrets = SecretBox::from_key_text(TEST_SECRET_KEY)?;
    let organization_id = admin::create_organization(&db.pool, "bench").await?;
    let grant = KeyGrant {
        name: "bench".into(),
        organization_id: Some(organization_id),
        ..KeyGrant::default()
    };
    let (_, key) = admin::create_api_key(&db.pool, &grant).await?;
    admin::upsert_cluster(
        &db.pool,
        &secrets,
        &ClusterSpec {
            engine: capy_shared::model::Engine::Postgresql,
            name: "local".into(),
            region: "local".into(),
            admin_url: cluster.admin_url_for("postgres"),
            public_host: cluster.host().to_string(),
            direct_port: i32::from(cluster.port),
            pooled_port: i32::from(pooler.map_or(cluster.port, |p| p.port)),
            pooled_host: pooler.map(|p| p.host().to_string()),
            pooler_auth_user: pooler.map(|_| capy_testkit::POOLER_AUTH_USER.to_string()),
            ssl_mode: "disable".into(),
            max_projects: None,
            ca_pem: None,
        },
    )
    .await?;
    Ok((db, key))
}

pub async fn provision(runs: usize) -> anyhow::Result<()> {
    let log = ServerLog::enable().await?;
    let (db, key) = control_plane(None).await?;
    let stack = ProcessStack::start(&db.url, 2, &[]).await?;
    let http = reqwest::Client::new();

    // Two warm-up runs are not counted. capy and psql alternate, so the machine's
    // drift falls on both alike.
    let (mut capy, mut traces, mut windows) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs + 2 {
        let body = json!({"name": format!("bench-{run}")});
        let (took, trace) = post_traced(&http, &stack, &key, body).await?;
        let window = psql_once().await?;
        if run >= 2 {
            capy.push(took);
            traces.push(trace);
            windows.push(window);
        }
    }
    let mut direct: Vec<Duration> = windows.iter().map(|w| w.0).collect();

    let capy_p50 = median_ms(&mut capy);
    let psql_p50 = median_ms(&mut direct);
    println!(
        "{}",
        json!({
            "bench": "provision",
            "runs": runs,
            "workers": 2,
            "post_to_completed_ms_p50": capy_p50,
            "post_to_completed_ms_min": ms(capy[0]),
            "post_to_completed_ms_max": ms(capy[capy.len() - 1]),
            "psql_same_sql_ms_p50": psql_p50,
            "psql_same_sql_ms_min": ms(direct[0]),
            "psql_same_sql_ms_max": ms(direct[direct.len() - 1]),
            "overhead_ms_p50": round2(capy_p50 - psql_p50),
            "ratio_p50": round2(capy_p50 / psql_p50),
        })
    );
    if let Some(log) = log {
        print_timeline(&log, &db, &traces, &windows).await?;
    }
    Ok(())
}

/// The per-phase timeline of the capy runs and of the psql runs (medians and means).
async fn print_timeline(
    log: &ServerLog,
    db: &capy_testkit::TestDatabase,
    traces: &[ClientTrace],
    windows: &[(Duration, f64, f64)],
) -> anyhow::Result<()> {
    let sessions = log.sessions()?;
    let ids: Vec<uuid::Uuid> = traces.iter().map(|t| t.job_id).collect();
    let jobs = timeline::job_times(&db.pool, &ids).await?;
    let (mut capy, mut capy_statements) = (Phases::default(), Phases::default());
    let mut traced = 0;
    for trace in traces {
        let Some(job) = jobs.get(&trace.job_id) else {
            continue;
        };
        let added = timeline::add_provision_run(
            &mut capy,
            &mut capy_statements,
            trace,
            job,
            &sessions,
            &db.name,
        );
        traced += usize::from(added.is_some());
    }
    let (mut psql, mut psql_statements) = (Phases::default(), Phases::default());
    for (_, from, to) in windows {
        timeline::add_psql_run(&mut psql, &mut psql_statements, *from, *to, &sessions);
    }
    println!(
        "{}",
        json!({
            "bench": "provision_timeline",
            "columns": ["phase", "ms_p50", "ms_mean"],
            "server_log_resolution_ms": 1,
            "runs_traced": traced,
            "capy": capy.figures(),
            "capy_step_statements_ms": capy_statements.figures(),
            "psql": psql.figures(),
            "psql_statements_ms": psql_statements.figures(),
        })
    );
    Ok(())
}

/// `runs` (after two warm-ups) of what `project.create` does on PostgreSQL, run by hand
/// through psql on the private cluster.
pub(crate) async fn psql_runs(runs: usize) -> anyhow::Result<Vec<Duration>> {
    let mut direct = Vec::new();
    for run in 0..runs + 2 {
        let (took, _, _) = psql_once().await?;
        if run >= 2 {
            direct.push(took);
        }
    }
    Ok(direct)
}

/// One psql run of what `project.create` does, over plaintext as the step talks to
/// the cluster (`sslmode=disable`, as the cluster is registered); answers how long it
/// took and when (epoch ms) psql was spawned and seen to exit.
pub(crate) async fn psql_once() -> anyhow::Result<(Duration, f64, f64)> {
    let psql = postgres_bin_dir()?.join("psql");
    let admin_url = format!("{}?sslmode=disable", cluster()?.admin_url_for("postgres"));
    let script = project_sql(
        &format!("bench_psql_{}", uuid::Uuid::new_v4().simple()),
        cluster()?,
    )?;
    let from_ms = now_ms();
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-", &admin_url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("running psql")?;
    use tokio::io::AsyncWriteExt as _;
    let mut stdin = child.stdin.take().context("psql stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    anyhow::ensure!(child.wait().await?.success(), "psql failed");
    Ok((started.elapsed(), from_ms, now_ms()))
}

/// POST /v1/projects with `body`, then polls its job until completed.
pub(crate) async fn post_to_completed(
    http: &reqwest::Client,
    stack: &ProcessStack,
    key: &str,
    body: Value,
) -> anyhow::Result<Duration> {
    Ok(post_traced(http, stack, key, body).await?.0)
}

/// [`post_to_completed`], with when (epoch ms) the client sent, had its answer and saw
/// the job completed.
pub(crate) async fn post_traced(
    http: &reqwest::Client,
    stack: &ProcessStack,
    key: &str,
    body: Value,
) -> anyhow::Result<(Duration, ClientTrace)> {
    let sent_ms = now_ms();
    let started = Instant::now();
    let created: Value = http
        .post(format!("{}/v1/projects", stack.api_url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let answered_ms = now_ms();
    let job_id: uuid::Uuid = created["job"]["id"]
        .as_str()
        .context("no job id")?
        .parse()
        .context("the job id is not a UUID")?;
    loop {
        let shown: Value = http
            // A long poll, as the CLI follows a job: answered when the state changes.
            .get(format!("{}/v1/jobs/{job_id}?wait=10", stack.api_url))
            .bearer_auth(key)
            .send()
            .await?
            .json()
            .await?;
        match shown["job"]["state"].as_str() {
            Some("completed") => {
                let trace = ClientTrace {
                    job_id,
                    sent_ms,
                    answered_ms,
                    seen_ms: now_ms(),
                };
                return Ok((started.elapsed(), trace));
            }
            Some("failed") => anyhow::bail!("job failed: {}", shown["job"]["error"]),
            _ => {}
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "job took over 60 s"
        );
    }
}

/// The cost of TLS on POST → completed: one stack, the private cluster registered
/// twice (`sslmode=disable`, and `verify-full` with its CA), runs alternating between
/// the two so the machine's noise falls on both alike.
pub async fn tls_cost(runs: usize) -> anyhow::Result<()> {
    let cluster = cluster()?;
    let ca_pem = cluster
        .certificates()
        .context("the cluster has no certificates (CAPY_BENCH_DATABASE_URL given?)")?
        .ca_pem
        .clone();
    let (db, key) = control_plane(None).await?;
    let secrets = SecretBox::from_key_text(TEST_SECRET_KEY)?;
    let base = cluster.admin_url_for("postgres");
    let mut cluster_ids = Vec::new();
    for (name, url, ca) in [
        ("plain", format!("{base}?sslmode=disable"), None),
        (
            "tls",
            format!(
                "{}?sslmode=verify-full",
                base.replace("@127.0.0.1:", "@localhost:")
            ),
            Some(ca_pem.clone()),
        ),
    ] {
        let spec = bench_cluster(name, url, ca);
        cluster_ids.push(admin::upsert_cluster(&db.pool, &secrets, &spec).await?);
    }
    let stack = ProcessStack::start(&db.url, 2, &[]).await?;
    let http = reqwest::Client::new();
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for run in 0..runs + 2 {
        for (cluster_id, into, mode) in [
            (cluster_ids[0], &mut plain, "plain"),
            (cluster_ids[1], &mut tls, "tls"),
        ] {
            let body = json!({"name": format!("bench-{mode}-{run}"), "cluster_id": cluster_id});
            let took = post_to_completed(&http, &stack, &key, body).await?;
            if run >= 2 {
                into.push(took);
            }
        }
    }
    let (plain_p50, tls_p50) = (median_ms(&mut plain), median_ms(&mut tls));
    println!(
        "{}",
        json!({
            "bench": "tls",
            "runs": runs,
            "post_to_completed_plain_ms_p50": plain_p50,
            "post_to_completed_tls_verify_full_ms_p50": tls_p50,
            "tls_extra_ms_p50": round2(tls_p50 - plain_p50),
            "ratio": round2(tls_p50 / plain_p50),
        })
    );
    Ok(())
}

fn bench_cluster(name: &str, admin_url: String, ca_pem: Option<String>) -> ClusterSpec {
    let cluster = cluster().ok();
    let port = cluster.map_or(5432, |c| i32::from(c.port));
    ClusterSpec {
        engine: capy_shared::model::Engine::Postgresql,
        name: name.into(),
        region: "local".into(),
        admin_url,
        public_host: "localhost".into(),
        direct_port: port,
        pooled_port: port,
        ssl_mode: "disable".into(),
        max_projects: None,
        ca_pem,
        pooled_host: None,
        pooler_auth_user: None,
    }
}

/// What the `project.create` step runs, as one psql script (autocommit per statement):
/// on `postgres` as the admin, the owner role, the login, the database and its grants;
/// then inside the new database as the admin (schema `public` to the login), and last
/// a session as the login itself (the step's check that it connects).
fn project_sql(name: &str, cluster: &TestCluster) -> anyhow::Result<String> {
    let role = quote_ident(name);
    let owner_name = format!("{name}_owner");
    let owner = quote_ident(&owner_name);
    let password = crypto::generate_password();
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let inside = format!("{}?sslmode=disable", cluster.admin_url_for(name));
    let mut as_login = url::Url::parse(&inside)?;
    as_login
        .set_username(name)
        .and_then(|()| as_login.set_password(Some(&password)))
        .map_err(|()| anyhow::anyhow!("the cluster's URL takes no user"))?;
    Ok(format!(
        "select current_user = session_user, current_user::text, session_user::text;
         select 1 from pg_roles where rolname = {owner_lit};
         CREATE ROLE {owner} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS;
         select 1 from pg_roles where rolname = {lit};
         CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 20 PASSWORD {pw};
         select 1 where pg_has_role({lit}::name, {owner_lit}::name, 'MEMBER');
         select 1 from pg_database where datname = {lit};
         CREATE DATABASE {role} OWNER {owner} TEMPLATE template0 ALLOW_CONNECTIONS false;
         ALTER DATABASE {role} OWNER TO {owner};
         ALTER DATABASE {role} RESET ALL;
         ALTER DATABASE {role} IS_TEMPLATE false;
         ALTER DATABASE {role} CONNECTION LIMIT 20;
         ALTER DATABASE {role} SET statement_timeout = '60s';
         ALTER DATABASE {role} SET idle_in_transaction_session_timeout = '60s';
         select distinct a.grantee from pg_database d,
                aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
          where d.datname = {lit} and a.grantee <> d.datdba;
         REVOKE ALL ON DATABASE {role} FROM PUBLIC;
         REVOKE GRANT OPTION FOR ALL ON DATABASE {role} FROM {role} CASCADE;
         GRANT CONNECT, TEMPORARY, CREATE ON DATABASE {role} TO {role};
         select datallowconn from pg_database where datname = {lit};
         ALTER DATABASE {role} ALLOW_CONNECTIONS true;
         \\c {inside}
         select current_user = session_user;
         select pg_catalog.pg_get_userbyid(nspowner)::text from pg_catalog.pg_namespace
          where nspname = 'public';
         ALTER SCHEMA public OWNER TO {role};
         \\c {as_login}
         select 1;\n",
        lit = quote_literal(name),
        owner_lit = quote_literal(&owner_name),
        pw = quote_literal(&verifier),
    ))
}
