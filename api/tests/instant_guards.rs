#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Guards of instant databases (issue 10). A role with REPLICATION (an instant database
//! with `logicalReplication`) must not stream the whole cluster's WAL: its cluster's
//! pg_hba.conf keeps physical replication to the admin, and a cluster whose check found
//! it open (or could not tell) gets no such database. Claiming counts against the
//! cluster's `max_projects` under its lock. Its own test binary, so its own cluster:
//! it runs with wal_level = logical and its pg_hba.conf is changed for a while.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use capy_shared::instant::{self, Entry, InstantLimits};
use capy_testkit::{cluster, ProcessStack};
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;
use uuid::Uuid;

static LOGICAL: OnceLock<()> = OnceLock::new();

/// The test cluster, restarted once with wal_level = logical before any test uses it.
fn logical_cluster() {
    LOGICAL.get_or_init(|| {
        let test_cluster = cluster().unwrap();
        let psql = capy_testkit::postgres_bin_dir().unwrap().join("psql");
        let output = std::process::Command::new(psql)
            .arg(test_cluster.admin_url_for("postgres"))
            .args(["-c", "alter system set wal_level = logical"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        test_cluster.stop().unwrap();
        test_cluster.start_again().unwrap();
    });
}

/// Runs `IDENTIFY_SYSTEM` over a replication connection (`replication=true` is
/// physical, `database` logical) as the database's own role: Ok, or psql's stderr.
fn identify_system(connection_string: &str, replication: &str) -> Result<(), String> {
    let config: tokio_postgres::Config = connection_string.parse().unwrap();
    let test_cluster = cluster().unwrap();
    let psql = capy_testkit::postgres_bin_dir().unwrap().join("psql");
    let output = std::process::Command::new(psql)
        .arg(format!(
            "host={} port={} user={} dbname={} replication={replication}",
            test_cluster.host(),
            test_cluster.port,
            config.get_user().unwrap(),
            config.get_dbname().unwrap(),
        ))
        .args(["-c", "IDENTIFY_SYSTEM"])
        .env(
            "PGPASSWORD",
            String::from_utf8(config.get_password().unwrap().to_vec()).unwrap(),
        )
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &cluster().unwrap().admin_url_for("postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

/// Appends `rule` to pg_hba.conf (None: puts the original back) and reloads.
async fn hba(admin: &tokio_postgres::Client, original: &str, rule: Option<&str>) {
    let path: String = admin.query_one("show hba_file", &[]).await.unwrap().get(0);
    let text = match rule {
        Some(rule) => format!("{original}\n{rule}\n"),
        None => original.to_string(),
    };
    std::fs::write(&path, text).unwrap();
    admin
        .batch_execute("select pg_reload_conf()")
        .await
        .unwrap();
}

async fn check_access(app: &TestApp) -> Value {
    let path = format!("/v1/clusters/{}/check-access", app.cluster_id);
    let (status, body) = app.call("POST", &path, Some(&app.admin_key), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access"].clone()
}

async fn create(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = http
        .post(format!("{url}/v1/databases"))
        .json(&json!({"ref": "cdc", "logicalReplication": true}))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_role_replicates_its_own_database_but_never_streams_the_cluster() {
    logical_cluster();
    let app = TestApp::new().await;
    let env = [
        ("CAPY_INSTANT_POOL_SIZE", "0".to_string()),
        ("CAPY_INSTANT_RATE_LIMIT_PER_MINUTE", "1000".to_string()),
        ("CAPY_INSTANT_LOGICAL_REPLICATION", "true".to_string()),
    ];
    let processes = ProcessStack::start(&app.db.url, 1, &env).await.unwrap();
    let http = reqwest::Client::new();

    // The testkit's pg_hba.conf keeps `replication` to postgres: the cluster is fit.
    let (status, database) = create(&http, &processes.api_url).await;
    assert_eq!(status, 201, "{database}");
    let url = database["connection_string"].as_str().unwrap();
    let role = url.parse::<tokio_postgres::Config>().unwrap();
    let role = role.get_user().unwrap().to_string();
    let admin = admin().await;
    let replicates: bool = admin
        .query_one(
            "select rolreplication from pg_roles where rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(replicates, "{role} lacks REPLICATION");
    identify_system(url, "database").expect("a logical replication connection to its database");
    let physical = identify_system(url, "true").expect_err("a physical replication connection");
    assert!(
        physical.contains("no pg_hba.conf entry for replication connection"),
        "physical replication was not refused by pg_hba.conf: {physical}"
    );

    // An operator opens physical replication to every role: the role could now stream
    // the whole cluster, and the check says so; no new such database is handed out.
    let path: String = admin.query_one("show hba_file", &[]).await.unwrap().get(0);
    let original = std::fs::read_to_string(&path).unwrap();
    hba(
        &admin,
        &original,
        Some("host replication all 127.0.0.1/32 scram-sha-256"),
    )
    .await;
    // The postmaster reloads asynchronously: new connections see the rule soon after.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut opened = identify_system(url, "true");
    while opened.is_err() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        opened = identify_system(url, "true");
    }
    let access = check_access(&app).await;
    let (status, refusal) = create(&http, &processes.api_url).await;
    let queued: i64 = sqlx::query_scalar("select count(*) from projects")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    hba(&admin, &original, None).await;
    assert_eq!(opened, Ok(()), "the open rule did not take effect");
    assert_eq!(access["physical_replication_open"], true, "{access}");
    assert_eq!(status, 422, "{refusal}");
    assert_eq!(refusal["status"], 422, "{refusal}");
    let message = refusal["message"].as_str().unwrap();
    assert!(message.contains("physical replication open"), "{refusal}");
    assert!(
        refusal["hint"].as_str().unwrap().contains("pg_hba.conf"),
        "{refusal}"
    );
    assert_eq!(queued, 1, "a database was recorded for the refused request");

    // Closed again, the check says so and the service resumes.
    let access = check_access(&app).await;
    assert_eq!(access["physical_replication_open"], false, "{access}");
    let (status, database) = create(&http, &processes.api_url).await;
    assert_eq!(status, 201, "{database}");
}

#[tokio::test]
async fn a_cluster_that_cannot_tell_gets_no_replication_role() {
    logical_cluster();
    let app = TestApp::new().await;
    // A check that could not read pg_hba_file_rules (a non-superuser admin) records
    // unknown; the request checks once more and, still unknown, refuses.
    sqlx::query("update clusters set wal_level = 'logical', physical_replication_open = null")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let admin = admin().await;
    let checker = format!("checker_{}", Uuid::new_v4().simple());
    admin
        .batch_execute(&format!(
            "create role {checker} login password 'pw' createrole createdb;
             grant connect on database postgres to {checker}"
        ))
        .await
        .unwrap();
    let test_cluster = cluster().unwrap();
    let checker_url = format!(
        "postgres://{checker}:pw@{}:{}/postgres",
        test_cluster.host(),
        test_cluster.port
    );
    let sealed = app.state.secrets.seal(&checker_url);
    sqlx::query("update clusters set admin_url_encrypted = $1")
        .bind(sealed)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let access = check_access(&app).await;
    assert_eq!(access["reachable"], true, "{access}");
    assert_eq!(access["physical_replication_open"], Value::Null, "{access}");

    let env = [("CAPY_INSTANT_LOGICAL_REPLICATION", "true".to_string())];
    let processes = ProcessStack::start(&app.db.url, 0, &env).await.unwrap();
    let (status, refusal) = create(&reqwest::Client::new(), &processes.api_url).await;
    assert_eq!(status, 422, "{refusal}");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap()
            .contains("physical replication unknown"),
        "{refusal}"
    );
    let recorded: i64 = sqlx::query_scalar("select count(*) from projects")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 0);
}

/// `n` unclaimed databases on the test cluster, made by hand (no worker runs).
async fn unclaimed(app: &TestApp, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let mut tx = app.db.pool.begin().await.unwrap();
        let entry = Entry::OnTheSpot {
            logical_replication: false,
        };
        let limits = InstantLimits::default();
        let (id, _) = instant::create(&mut tx, &app.state.secrets, app.cluster_id, entry, limits)
            .await
            .unwrap();
        let client = instant::Client {
            address: "10.0.0.1",
            key: "10.0.0.1",
            site: "10.0.0.1",
        };
        instant::assign(&mut tx, id, "me", &client, 3600)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ids.push(id);
    }
    ids
}

async fn claim(state: capy_api::AppState, key: String, id: Uuid) -> (StatusCode, Value) {
    let request = Request::builder()
        .method("POST")
        .uri(format!("/v1/databases/{id}/claim"))
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    let response = capy_api::router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_racing_for_a_clusters_last_places_stop_at_max_projects() {
    logical_cluster();
    let app = TestApp::new().await;
    sqlx::query("update clusters set max_projects = 2")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let ids = unclaimed(&app, 6).await;
    let mut claims = tokio::task::JoinSet::new();
    for id in ids {
        let (state, key) = (app.state.clone(), app.key.clone());
        claims.spawn(claim(state, key, id));
    }
    let answers = claims.join_all().await;
    let won = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!(won, 2, "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != StatusCode::OK) {
        assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("project limit is reached"),
            "{body}"
        );
    }
    let held: i64 = sqlx::query_scalar(
        "select count(*) from projects where organization_id is not null and deleted_at is null",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(held, 2);

    // Nor can POST /v1/projects go past it: one count for both.
    let (status, body) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"one-more"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}

async fn create_project(state: capy_api::AppState, key: String, name: String) -> StatusCode {
    let request = Request::builder()
        .method("POST")
        .uri("/v1/projects")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(json!({ "name": name }).to_string()))
        .unwrap();
    capy_api::router(state)
        .oneshot(request)
        .await
        .unwrap()
        .status()
}

/// Placement counts after taking the cluster's lock, by a statement of its own: one
/// that waited for the lock would count the projects as they were before it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_racing_for_a_clusters_last_places_stop_at_max_projects() {
    logical_cluster();
    let app = TestApp::new().await;
    sqlx::query("update clusters set max_projects = 2")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let mut creations = tokio::task::JoinSet::new();
    for n in 0..6 {
        let (state, key) = (app.state.clone(), app.key.clone());
        creations.spawn(create_project(state, key, format!("racer-{n}")));
    }
    let statuses = creations.join_all().await;
    let accepted = statuses
        .iter()
        .filter(|s| **s == StatusCode::ACCEPTED)
        .count();
    assert_eq!(accepted, 2, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| [StatusCode::ACCEPTED, StatusCode::UNPROCESSABLE_ENTITY].contains(s)),
        "{statuses:?}"
    );
}
