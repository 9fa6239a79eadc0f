#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Instant databases: no key, a working connection string at once from the warm pool,
//! claim, expiry, the pool refilling after a burst, and the abuse limits.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use capy_testkit::ProcessStack;
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn pool_ready(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "select count(*) from projects
         where instant_status = 'pool' and state = 'ready' and deleted_at is null",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

async fn wait_for_pool(app: &TestApp, size: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while pool_ready(app).await < size {
        assert!(
            Instant::now() < deadline,
            "the pool has {} of {size} ready databases after {limit:?}",
            pool_ready(app).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Long-polls job `id` until it completes (30 s at most).
async fn wait_for_job(app: &TestApp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let path = format!("/v1/jobs/{id}?wait=5");
        let (_, job) = app.call("GET", &path, Some(&app.key), None).await;
        if job["job"]["state"] == "completed" {
            return;
        }
        assert!(Instant::now() < deadline, "{job}");
    }
}

/// The API and two workers keeping a pool of `size`, ticking every second.
async fn stack(app: &TestApp, size: usize) -> (ProcessStack, reqwest::Client) {
    let env = [
        ("CAPY_INSTANT_POOL_SIZE", size.to_string()),
        ("CAPY_LEASE_SECONDS", "4".to_string()),
        ("CAPY_INSTANT_RATE_LIMIT_PER_MINUTE", "1000".to_string()),
        // Every request comes from 127.0.0.1 here.
        ("CAPY_INSTANT_MAX_PER_CLIENT", "1000".to_string()),
    ];
    let processes = ProcessStack::start(&app.db.url, 2, &env).await.unwrap();
    (processes, reqwest::Client::new())
}

async fn create(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let response = http
        .post(format!("{url}/v1/databases"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_the_pool_works_at_once_and_is_claimed_into_the_organization() {
    let app = TestApp::new().await;
    let (processes, http) = stack(&app, 2).await;
    wait_for_pool(&app, 2, Duration::from_secs(60)).await;

    let (status, database) = create(&http, &processes.api_url, json!({"ref": "my-app"})).await;
    assert_eq!(status, 201, "{database}");
    assert_eq!(database["status"], "UNCLAIMED");
    let created =
        chrono::DateTime::parse_from_rfc3339(database["created_at"].as_str().unwrap()).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(database["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).num_hours(), 72);
    let id = database["id"].as_str().unwrap();
    assert!(database["claim_url"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/claim/{id}")));

    // It takes connections the moment the answer arrives.
    let url = database["connection_string"].as_str().unwrap();
    let client = connect(url).await.unwrap();
    client
        .batch_execute("create table notes (body text); insert into notes values ('hello')")
        .await
        .unwrap();
    drop(client);

    // Not a project of anyone yet.
    let (_, listed) = app.call("GET", "/v1/projects", Some(&app.key), None).await;
    assert_eq!(listed["projects"], json!([]));
    let page = http
        .get(database["claim_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("unclaimed"));

    let claim = |key: Option<&str>, body: Option<&'static str>| {
        let app = &app;
        let path = format!("/v1/databases/{id}/claim");
        let key = key.map(str::to_string);
        async move { app.call("POST", &path, key.as_deref(), body).await }
    };
    let (status, _) = claim(None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, answer) = claim(Some(&app.key), Some(r#"{"name":"my app"}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, claimed) = claim(Some(&app.key), Some(r#"{"name":"kept-db"}"#)).await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    assert_eq!(claimed["project"]["name"], "kept-db");
    assert_eq!(
        claimed["project"]["organization_id"],
        app.organization_id.to_string()
    );
    assert_eq!(claimed["job"]["type"], "project.update");
    let (status, _) = claim(Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "claimed twice");

    let (_, listed) = app.call("GET", "/v1/projects", Some(&app.key), None).await;
    assert_eq!(listed["projects"][0]["id"], id);
    let expires_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select expires_at from projects where id = $1::uuid")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(expires_at, None, "a claimed database does not expire");

    // Its data is still there, and its limit is an ordinary project's once applied.
    wait_for_job(&app, claimed["job"]["id"].as_str().unwrap()).await;
    let client = connect(url).await.unwrap();
    let body: String = client
        .query_one("select body from notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "hello");
    let limit: i32 = client
        .query_one(
            "select rolconnlimit from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(limit, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_database_leaves_nothing_on_the_cluster() {
    let app = TestApp::new().await;
    // No pool: made on the spot.
    let (processes, http) = stack(&app, 0).await;
    let (status, database) = create(&http, &processes.api_url, json!({"ref": "short-lived"})).await;
    assert_eq!(status, 201, "{database}");
    let url = database["connection_string"].as_str().unwrap();
    connect(url)
        .await
        .unwrap()
        .batch_execute("select 1")
        .await
        .unwrap();
    let id = database["id"].as_str().unwrap();
    let name: String = sqlx::query_scalar("select database_name from projects where id = $1::uuid")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();

    // 72 hours pass.
    sqlx::query("update projects set expires_at = now() - interval '1 second' where id = $1::uuid")
        .bind(id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let admin = connect(&capy_testkit::cluster().unwrap().admin_url_for("postgres"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = admin
            .query_one(
                "select (select count(*) from pg_database where datname = $1)
                      + (select count(*) from pg_roles where rolname = $1)",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        let state: String = sqlx::query_scalar("select state from projects where id = $1::uuid")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        if left == 0 && state == "deleted" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there: {left} objects, state {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(connect(url).await.is_err());
    let page = http
        .get(database["claim_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 404);
    let (status, _) = app
        .call(
            "POST",
            &format!("/v1/databases/{id}/claim"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// As a client honouring Retry-After would: one address's creations take turns (a
/// per-address lock, waited for 5 s), so on a loaded machine some of a 50-request burst
/// are told to come back (429 "at once") rather than queued for longer.
async fn create_retrying_busy(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    for _ in 0..10 {
        let (status, answer) = create(http, url, body.clone()).await;
        if status != 429 || !answer.to_string().contains("at once") {
            return (status, answer);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    create(http, url, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_of_50_the_pool_refills_to_its_size() {
    let app = TestApp::new().await;
    let (processes, http) = stack(&app, 3).await;
    wait_for_pool(&app, 3, Duration::from_secs(60)).await;
    let requests = (0..50).map(|n| {
        let http = http.clone();
        let url = processes.api_url.clone();
        async move { create_retrying_busy(&http, &url, json!({"ref": format!("burst-{n}")})).await }
    });
    let answers = futures_join_all(requests).await;
    let mut ids = std::collections::HashSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, 201, "{body}");
        assert!(
            ids.insert(body["id"].as_str().unwrap().to_string()),
            "handed out twice"
        );
    }
    // Every one of them works.
    for (_, body) in answers.iter().step_by(7) {
        connect(body["connection_string"].as_str().unwrap())
            .await
            .unwrap()
            .batch_execute("select 1")
            .await
            .unwrap();
    }
    wait_for_pool(&app, 3, Duration::from_secs(90)).await;
    let pooled: i64 = sqlx::query_scalar(
        "select count(*) from projects where instant_status = 'pool' and deleted_at is null",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(pooled, 3, "the pool holds its size, no more");
}

/// Runs the futures concurrently (a tiny join_all, to need no extra crate).
async fn futures_join_all<
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
>(
    futures: impl Iterator<Item = F>,
) -> Vec<T> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

async fn post(app: &TestApp, body: &str, from: [u8; 4]) -> (StatusCode, Option<String>, Value) {
    let mut request = Request::builder()
        .method("POST")
        .uri("/v1/databases")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((from, 40000))));
    let response = capy_api::router(app.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, retry_after, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn bad_requests_rate_limits_and_logical_replication_get_instagres_answers() {
    let mut app = TestApp::new().await;
    app.state.settings.instant_rate_limit_per_minute = 2;
    // A pool made ready by hand: no worker runs here.
    app.ready_pool(4).await;

    let here = [10, 0, 0, 1];
    let (status, _, body) = post(&app, "{}", here).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"status": 400, "message": "Missing referrer",
               "hint": "Pass a `ref` to the request body to identify the source of the request."})
    );
    for bad in [r#"{"ref": "   "}"#, r#"{"ref": null}"#] {
        let (status, _, body) = post(&app, bad, here).await;
        assert_eq!(
            (status, &body["message"]),
            (StatusCode::BAD_REQUEST, &json!("Missing referrer"))
        );
    }
    for bad in ["not json", r#"{"ref": 7}"#, r#"{"ref": "a", "colour": 1}"#] {
        let (status, _, body) = post(&app, bad, here).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["status"], 400);
    }
    let (status, _, body) = post(&app, &json!({"ref": "x".repeat(101)}).to_string(), here).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Off unless the operator turns it on: a REPLICATION role can drop any slot.
    let cdc = r#"{"ref": "cdc", "logicalReplication": true}"#;
    let (status, _, body) = post(&app, cdc, [10, 0, 0, 3]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["message"], "Logical replication is turned off on this server",
        "{body}"
    );
    // Turned on, it still needs a cluster with wal_level = logical (the test
    // cluster runs with replica).
    app.state.settings.instant_logical_replication = true;
    let (status, _, body) = post(&app, cdc, [10, 0, 0, 3]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("wal_level"),
        "{body}"
    );
    app.state.settings.instant_logical_replication = false;

    for _ in 0..2 {
        let (status, _, body) = post(&app, r#"{"ref": "me"}"#, here).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, retry_after, body) = post(&app, r#"{"ref": "me"}"#, here).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["status"], 429);
    let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&seconds), "{seconds}");
    // Another address is not limited by this one.
    let (status, _, body) = post(&app, r#"{"ref": "me"}"#, [10, 0, 0, 2]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // Unclaimed databases carry the abuse limits.
    let (connections, storage): (i32, Option<i64>) = sqlx::query_as(
        "select max_connections, storage_limit_bytes from projects
         where instant_status = 'unclaimed' limit 1",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((connections, storage), (5, Some(512 * 1024 * 1024)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_past_its_storage_limit_refuses_connections_until_claimed() {
    let app = TestApp::new().await;
    let env = [
        ("CAPY_LEASE_SECONDS", "4".to_string()),
        ("CAPY_INSTANT_STORAGE_CHECK_SECONDS", "1".to_string()),
    ];
    let processes = ProcessStack::start(&app.db.url, 2, &env).await.unwrap();
    let http = reqwest::Client::new();
    let (status, database) = create(&http, &processes.api_url, json!({"ref": "hungry"})).await;
    assert_eq!(status, 201, "{database}");
    let url = database["connection_string"].as_str().unwrap().to_string();
    let id = database["id"].as_str().unwrap();
    let open = connect(&url).await.unwrap();
    open.batch_execute("create table t (x int)").await.unwrap();

    // A few checks pass under the 512 MiB limit; then it is over a limit of 1 byte
    // (filling 512 MiB would only make the test slow).
    tokio::time::sleep(Duration::from_secs(2)).await;
    open.batch_execute("insert into t values (1)")
        .await
        .unwrap();
    sqlx::query("update projects set storage_limit_bytes = 1 where id = $1::uuid")
        .bind(id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = match connect(&url).await {
            Err(e) => e
                .as_db_error()
                .is_some_and(|db| db.message().contains("not currently accepting connections")),
            Ok(_) => false,
        };
        if refused {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting connections");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Sessions are ended just after new ones are refused.
    while open.batch_execute("select 1").await.is_ok() {
        assert!(Instant::now() < deadline, "the open session was not ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (attempts, exit): (i64, Option<i32>) = sqlx::query_as(
        "select count(*), max(last_exit_code) from jobs
         where project_id = $1::uuid and type = 'project.storage_check' and state = 'completed'",
    )
    .bind(id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(attempts >= 2, "{attempts} checks");
    assert_eq!(exit, Some(0));

    // Claimed, it has no storage limit and takes connections again.
    let (status, claimed) = app
        .call(
            "POST",
            &format!("/v1/databases/{id}/claim"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    assert_eq!(claimed["project"]["storage_limit_bytes"], Value::Null);
    wait_for_job(&app, claimed["job"]["id"].as_str().unwrap()).await;
    let again = connect(&url).await.unwrap();
    let rows: i64 = again
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}
