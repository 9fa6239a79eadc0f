#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Engines, plans and stop/start through the router: what each request records and
//! queues, and every refusal (with nothing queued). The MySQL and Redis clusters here
//! are registered but not running: registration takes a cluster whatever its check
//! found, and nothing in these tests runs a step.

mod common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::{json, Value};

async fn call(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let body = body.map(|b| b.to_string());
    app.call(method, path, Some(&app.key), body.as_deref())
        .await
}

async fn jobs(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// Registers a cluster of `engine` at a port nothing listens on; answers its id.
async fn register(app: &TestApp, name: &str, engine: &str, url: &str) -> String {
    let body = json!({ "name": name, "engine": engine, "url": url, "region": "local" });
    let (status, answer) = app
        .call(
            "POST",
            "/v1/clusters",
            Some(&app.admin_key),
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["cluster"]["engine"], engine);
    assert_eq!(answer["access"]["engine"], engine);
    assert_eq!(answer["access"]["reachable"], false, "{answer}");
    assert!(!answer.to_string().contains("s3cret"), "{answer}");
    answer["cluster"]["id"].as_str().unwrap().to_string()
}

async fn with_engine_clusters() -> (TestApp, String, String) {
    let app = TestApp::new().await;
    let mysql = register(&app, "my", "mysql", "mysql://root:s3cret@127.0.0.1:1/").await;
    let redis = register(&app, "rd", "redis", "redis://admin:s3cret@127.0.0.1:1").await;
    (app, mysql, redis)
}

#[tokio::test]
async fn projects_are_placed_on_a_cluster_of_their_engine_with_its_plan() {
    let (app, mysql, redis) = with_engine_clusters().await;
    let (status, made) = call(
        &app,
        "POST",
        "/v1/projects",
        Some(json!({"name": "m", "engine": "mysql"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{made}");
    let project = &made["project"];
    assert_eq!(project["engine"], "mysql");
    assert_eq!(project["cluster_id"], mysql.as_str());
    assert_eq!(project["plan"], "mysql-small");
    assert_eq!(project["storage_limit_bytes"], Value::Null);
    // MySQL user names are at most 32 characters.
    assert_eq!(project["role_name"].as_str().unwrap().len(), 32);

    // The plan names the engine; storage_gb is the storage limit in GiB.
    let body = json!({"name": "r", "plan": "redis-small"});
    let (status, made) = call(&app, "POST", "/v1/projects", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{made}");
    assert_eq!(made["project"]["engine"], "redis");
    assert_eq!(made["project"]["cluster_id"], redis.as_str());
    let body = json!({"name": "p", "plan": "pg-small", "storage_gb": 3, "max_connections": 9});
    let (status, made) = call(&app, "POST", "/v1/projects", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{made}");
    let project = &made["project"];
    assert_eq!(project["engine"], "postgresql");
    assert_eq!(project["cluster_id"], app.cluster_id.to_string());
    assert_eq!(project["storage_limit_bytes"], 3_i64 << 30);
    assert_eq!(project["max_connections"], 9);
    assert_eq!(project["plan"], "pg-small");

    let (status, plans) = call(&app, "GET", "/v1/plans", None).await;
    assert_eq!(status, StatusCode::OK);
    let engines: Vec<&str> = plans["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["engine"].as_str().unwrap())
        .collect();
    for engine in ["postgresql", "mysql", "redis"] {
        assert!(engines.contains(&engine), "{plans}");
    }
}

#[tokio::test]
async fn bad_engines_and_plans_are_refused_and_queue_nothing() {
    let (app, mysql, _) = with_engine_clusters().await;
    let before = jobs(&app).await;
    let refused = [
        (
            json!({"name": "a", "engine": "oracle"}),
            StatusCode::BAD_REQUEST,
            "engine",
        ),
        (
            json!({"name": "a", "engine": "redis", "plan": "mysql-small"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "mysql plan",
        ),
        (
            json!({"name": "a", "plan": "gold"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "no plan",
        ),
        (
            json!({"name": "a", "storage_gb": 1, "storage_limit_bytes": 5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not both",
        ),
        (
            json!({"name": "a", "storage_gb": 0}),
            StatusCode::BAD_REQUEST,
            "storage_gb",
        ),
        (
            json!({"name": "a", "engine": "redis", "storage_gb": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "storage",
        ),
        (
            json!({"name": "a", "engine": "mysql", "storage_limit_bytes": 5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "storage limit",
        ),
        (
            json!({"name": "a", "engine": "postgresql", "cluster_id": mysql}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "runs mysql",
        ),
    ];
    for (body, status, says) in refused {
        let (got, answer) = call(&app, "POST", "/v1/projects", Some(body.clone())).await;
        assert_eq!(got, status, "{body} → {answer}");
        assert!(answer.to_string().contains(says), "{body} → {answer}");
    }
    assert_eq!(jobs(&app).await, before);

    // Clusters: a URL of another engine, an unknown engine, what only PostgreSQL has.
    let clusters = [
        json!({"name": "x", "engine": "mysql", "url": "postgres://u:p@h/d", "region": "r"}),
        json!({"name": "x", "engine": "postgresql", "url": "redis://u:p@h", "region": "r"}),
        json!({"name": "x", "engine": "mongodb", "url": "mongodb://u:p@h", "region": "r"}),
        json!({"name": "x", "engine": "redis", "url": "redis://u:p@h", "region": "r", "pooler_auth_user": "pool"}),
        json!({"name": "x", "engine": "redis", "url": "redis://u:p@h", "region": "r", "ssl_mode": "require"}),
    ];
    for body in clusters {
        let (status, answer) = app
            .call(
                "POST",
                "/v1/clusters",
                Some(&app.admin_key),
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
    }
}

#[tokio::test]
async fn what_only_postgresql_has_is_refused_for_other_engines() {
    let (app, _, _) = with_engine_clusters().await;
    let (_, made) = call(
        &app,
        "POST",
        "/v1/projects",
        Some(json!({"name": "r", "engine": "redis"})),
    )
    .await;
    let id = made["project"]["id"].as_str().unwrap().to_string();
    sqlx::query("update projects set state = 'ready'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let before = jobs(&app).await;
    let asks = [
        ("GET", format!("/v1/projects/{id}/extensions"), None),
        (
            "POST",
            format!("/v1/projects/{id}/extensions"),
            Some(json!({"name": "citext"})),
        ),
        (
            "POST",
            format!("/v1/projects/{id}/backups"),
            Some(json!({})),
        ),
        (
            "POST",
            format!("/v1/projects/{id}/preview-databases"),
            Some(json!({"mode": "clone"})),
        ),
        (
            "POST",
            format!("/v1/projects/{id}/credentials/rotate"),
            Some(json!({})),
        ),
    ];
    for (method, path, body) in asks {
        let (status, answer) = call(&app, method, &path, body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} → {answer}"
        );
        assert!(
            answer.to_string().contains("not available for redis"),
            "{answer}"
        );
    }
    assert_eq!(jobs(&app).await, before);

    // Credentials in the engine's shape: no database, a key prefix, a redis:// URL.
    let (status, credentials) =
        call(&app, "GET", &format!("/v1/projects/{id}/credentials"), None).await;
    assert_eq!(status, StatusCode::OK, "{credentials}");
    assert_eq!(credentials["engine"], "redis");
    assert_eq!(credentials["key_prefix"], format!("p:{id}:"));
    assert!(credentials.get("database").is_none(), "{credentials}");
    let url = credentials["connection_string"].as_str().unwrap();
    assert!(
        url.starts_with("redis://capy_") && url.ends_with(":1"),
        "{url}"
    );
}

#[tokio::test]
async fn stop_and_start_follow_the_project_state_and_queue_behind_its_jobs() {
    let app = TestApp::new().await;
    let made = app.create_project("p").await;
    let id = made["project"]["id"].as_str().unwrap().to_string();
    let stop = format!("/v1/projects/{id}/stop");
    let start = format!("/v1/projects/{id}/start");
    // Not ready yet: refused, nothing queued.
    let before = jobs(&app).await;
    let (status, answer) = call(&app, "POST", &stop, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let (status, _) = call(&app, "POST", &start, None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(jobs(&app).await, before);

    sqlx::query("update projects set state = 'ready'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, stopping) = call(&app, "POST", &stop, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{stopping}");
    assert_eq!(stopping["job"]["type"], "project.stop");
    assert_eq!(stopping["job"]["locked_resource"], format!("project:{id}"));
    // Asked again while on its way: the same job.
    let (status, again) = call(&app, "POST", &stop, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["job"]["id"], stopping["job"]["id"]);
    // A start right after queues behind the stop.
    let (status, starting) = call(&app, "POST", &start, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{starting}");
    assert_eq!(starting["job"]["type"], "project.start");

    // Once deleting, neither runs.
    let (status, _) = call(&app, "DELETE", &format!("/v1/projects/{id}"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let before = jobs(&app).await;
    for path in [&stop, &start] {
        let (status, answer) = call(&app, "POST", path, None).await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        assert!(answer.to_string().contains("being deleted"), "{answer}");
    }
    assert_eq!(jobs(&app).await, before);
}

#[tokio::test]
async fn a_project_with_previews_is_not_stopped() {
    let app = TestApp::new().await;
    let made = app.create_project("p").await;
    let id = made["project"]["id"].as_str().unwrap().to_string();
    sqlx::query("update projects set state = 'ready'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let path = format!("/v1/projects/{id}/preview-databases");
    let (status, preview) = call(&app, "POST", &path, Some(json!({"mode": "empty"}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{preview}");
    let before = jobs(&app).await;
    let (status, answer) = call(&app, "POST", &format!("/v1/projects/{id}/stop"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(answer.to_string().contains("preview"), "{answer}");
    assert_eq!(jobs(&app).await, before);
}

#[tokio::test]
async fn instant_databases_are_made_on_postgresql_clusters_only() {
    use capy_shared::instant::{self, InstantLimits};
    let (app, _, _) = with_engine_clusters().await;
    // The engine clusters hold no instant database: without the engine rule they come
    // first by load.
    let clusters = instant::clusters_by_load(&app.db.pool, false)
        .await
        .unwrap();
    let ids: Vec<_> = clusters.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![app.cluster_id]);
    let queued = instant::top_up(
        &app.db.pool,
        &app.state.secrets,
        2,
        InstantLimits::default(),
    )
    .await
    .unwrap();
    assert_eq!(queued, 2);
    let elsewhere: i64 = sqlx::query_scalar(
        "select count(*) from projects p join clusters c on c.id = p.cluster_id
         where c.engine <> 'postgresql'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(elsewhere, 0);
}
