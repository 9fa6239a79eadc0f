#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Preview databases through the API (no workers: jobs are checked as queued, and
//! their outcomes applied by hand as a worker would): create, list, show, extend,
//! reset, delete, connections; bad input refused with nothing queued; a project's
//! delete queueing its previews' deletes first; a full cluster refusing a preview.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use capy_shared::model::{Job, JobState, JOB_COLUMNS};
use chrono::{DateTime, Utc};
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;
use uuid::Uuid;

async fn ready_project(app: &TestApp, name: &str) -> String {
    let created = app.create_project(name).await;
    let id = s(&created["project"]["id"]).to_string();
    set_project_state(app, &id, "ready").await;
    id
}

async fn set_project_state(app: &TestApp, id: &str, state: &str) {
    sqlx::query("update projects set state = $2 where id = $1::uuid")
        .bind(id)
        .bind(state)
        .execute(&app.db.pool)
        .await
        .unwrap();
}

fn s(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

fn previews_of(project: &str) -> String {
    format!("/v1/projects/{project}/preview-databases")
}

fn preview_path(preview: &Value, rest: &str) -> String {
    format!("/v1/preview-databases/{}{rest}", s(&preview["id"]))
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// Jobs and preview rows: what a refused request must leave as it was.
async fn queued(app: &TestApp) -> (i64, i64) {
    (
        count(app, "select count(*) from jobs").await,
        count(app, "select count(*) from preview_databases").await,
    )
}

/// POSTs a preview of `project` with `body`; answers `{preview, job}` (202 expected).
async fn create(app: &TestApp, project: &str, body: Value) -> Value {
    let (status, created) = app
        .call(
            "POST",
            &previews_of(project),
            Some(&app.key),
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body} → {created}");
    created
}

/// Ends job `id` in `state` and applies it as a worker would.
async fn finish(app: &TestApp, id: &str, state: &str) {
    let mut job: Job = sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs where id = $1::uuid"
    ))
    .bind(id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    job.state = JobState::parse(state).expect("a job state");
    job.error = (state != "completed").then(|| "it broke".to_string());
    let mut tx = app.db.pool.begin().await.unwrap();
    sqlx::query("update jobs set state = $2, error = $3 where id = $1")
        .bind(job.id)
        .bind(state)
        .bind(&job.error)
        .execute(&mut *tx)
        .await
        .unwrap();
    capy_shared::effects::apply(&mut tx, &job).await.unwrap();
    tx.commit().await.unwrap();
}

/// A created preview, made ready by its job; answers it as shown.
async fn ready_preview(app: &TestApp, project: &str, body: Value) -> Value {
    let created = create(app, project, body).await;
    finish(app, s(&created["job"]["id"]), "completed").await;
    let (status, shown) = app
        .call(
            "GET",
            &preview_path(&created["preview"], ""),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["preview"]["state"], "ready", "{shown}");
    shown["preview"].clone()
}

fn time(value: &Value) -> DateTime<Utc> {
    s(value).parse().unwrap()
}

/// Asserts `at` is `from_now` after now, give or take 30 seconds.
fn about_from_now(at: &Value, from_now: Duration) {
    let expected = Utc::now() + chrono::Duration::from_std(from_now).unwrap();
    let off = (time(at) - expected).num_seconds().abs();
    assert!(off < 30, "{at} is {off}s off now + {from_now:?}");
}

async fn key_with_scopes(app: &TestApp, scopes: Value) -> String {
    let body = json!({"name": "scoped", "scopes": scopes}).to_string();
    let (status, created) = app
        .call("POST", "/v1/api_keys", Some(&app.key), Some(&body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    s(&created["key"]).to_string()
}

#[tokio::test]
async fn a_preview_is_queued_as_a_job_of_its_parent() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    let created = create(&app, &project, json!({"mode": "clone"})).await;
    let preview = &created["preview"];
    let job = &created["job"];
    let id: Uuid = s(&preview["id"]).parse().unwrap();

    assert_eq!(preview["state"], "provisioning");
    assert_eq!(preview["mode"], "clone");
    assert_eq!(preview["project_id"], project.as_str());
    let hex = id.simple().to_string();
    assert_eq!(preview["name"], format!("preview-{}", &hex[..8]));
    assert_eq!(preview["database_name"], format!("capy_pv_{hex}"));
    assert_eq!(preview["role_name"], preview["database_name"]);
    assert_eq!(preview["latest_job_id"], job["id"]);
    assert_eq!(preview["source_kind"], "project");
    // The project's limits when none are given; its database as the source.
    let (_, parent) = app
        .call(
            "GET",
            &format!("/v1/projects/{project}"),
            Some(&app.key),
            None,
        )
        .await;
    let parent = &parent["project"];
    assert_eq!(preview["source_database"], parent["database_name"]);
    for field in [
        "max_connections",
        "statement_timeout",
        "idle_transaction_timeout",
        "public_host",
        "direct_port",
        "ssl_mode",
    ] {
        assert_eq!(preview[field], parent[field], "{field}");
    }
    about_from_now(&preview["ttl_expires_at"], Duration::from_secs(24 * 3600));

    assert_eq!(job["type"], "project.preview_create");
    assert_eq!(job["state"], "pending");
    assert_eq!(job["preview_database_id"], preview["id"]);
    assert_eq!(job["project_id"], project.as_str());
    assert_eq!(job["cluster_id"], app.cluster_id.to_string());
    assert_eq!(job["locked_resource"], format!("project:{project}"));
    assert_eq!(job["args"], json!({ "mode": "clone" }));

    // The password is sealed in the row, and in no answer.
    let sealed: Vec<u8> =
        sqlx::query_scalar("select password_encrypted from preview_databases where id = $1")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let password = app.state.secrets.open(&sealed).unwrap();
    assert!(password.len() >= 20);
    assert!(!created.to_string().contains(&password), "{created}");
}

#[tokio::test]
async fn limits_names_and_ttls_are_taken_as_given() {
    let mut app = TestApp::new().await;
    // One TTL hour lasts a minute here, as the e2e tests set it.
    app.state.settings.preview_ttl.hour = Duration::from_secs(60);
    let project = ready_project(&app, "shop").await;
    let body = json!({"mode": "empty", "name": "Feature_42", "ttl_hours": 2,
                      "max_connections": 5, "statement_timeout": "5s",
                      "idle_transaction_timeout": "1min", "storage_limit_bytes": 1000000});
    let created = create(&app, &project, body).await;
    let preview = &created["preview"];
    assert_eq!(preview["mode"], "empty");
    assert_eq!(preview["name"], "Feature_42");
    assert_eq!(preview["max_connections"], 5);
    assert_eq!(preview["statement_timeout"], "5s");
    assert_eq!(preview["idle_transaction_timeout"], "1min");
    assert_eq!(preview["storage_limit_bytes"], 1000000);
    about_from_now(&preview["ttl_expires_at"], Duration::from_secs(120));

    // The default TTL, in the same short hours; a whole number written as 3.0.
    let created = create(&app, &project, json!({"mode": "clone"})).await;
    about_from_now(
        &created["preview"]["ttl_expires_at"],
        Duration::from_secs(24 * 60),
    );
    let created = create(&app, &project, json!({"mode": "clone", "ttl_hours": 3.0})).await;
    about_from_now(
        &created["preview"]["ttl_expires_at"],
        Duration::from_secs(180),
    );
    // Names are unique per project: another project may use one.
    let other = ready_project(&app, "other").await;
    create(&app, &other, json!({"mode": "clone", "name": "Feature_42"})).await;
}

#[tokio::test]
async fn previews_are_listed_newest_first_in_pages_and_shown() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        let created = create(&app, &project, json!({"mode": "clone", "name": name})).await;
        ids.push(s(&created["preview"]["id"]).to_string());
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut path = format!("{}?limit=2", previews_of(&project));
    loop {
        let (status, page) = app.call("GET", &path, Some(&app.key), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for preview in page["preview_databases"].as_array().unwrap() {
            seen.push(s(&preview["id"]).to_string());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("{}?limit=2&cursor={cursor}", previews_of(&project)),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let (status, shown) = app
        .call(
            "GET",
            &format!("/v1/preview-databases/{}", ids[0]),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["preview"]["name"], "three");
    let missing = format!("/v1/preview-databases/{}", Uuid::now_v7());
    let (status, answer) = app.call("GET", &missing, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let (status, answer) = app
        .call("GET", "/v1/preview-databases/nope", Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    // A key narrowed to the project sees its previews; one narrowed to another does not.
    let other = ready_project(&app, "other").await;
    for (narrowed_to, expected) in [(&project, StatusCode::OK), (&other, StatusCode::NOT_FOUND)] {
        let body = json!({"name": "narrow", "project_id": narrowed_to}).to_string();
        let (_, key) = app
            .call("POST", "/v1/api_keys", Some(&app.key), Some(&body))
            .await;
        let key = s(&key["key"]);
        let path = format!("/v1/preview-databases/{}", ids[0]);
        let (status, answer) = app.call("GET", &path, Some(key), None).await;
        assert_eq!(status, expected, "{answer}");
        let (status, answer) = app
            .call("GET", &previews_of(&project), Some(key), None)
            .await;
        assert_eq!(status, expected, "{answer}");
    }
}

#[tokio::test]
async fn extend_sets_the_ttl_from_now_within_the_bounds() {
    let mut app = TestApp::new().await;
    app.state.settings.preview_ttl.hour = Duration::from_secs(60);
    let project = ready_project(&app, "shop").await;
    let created = create(&app, &project, json!({"mode": "clone", "ttl_hours": 1})).await;
    let path = preview_path(&created["preview"], "/extend");
    let (status, extended) = app
        .call("POST", &path, Some(&app.key), Some(r#"{"ttl_hours": 168}"#))
        .await;
    assert_eq!(status, StatusCode::OK, "{extended}");
    about_from_now(
        &extended["preview"]["ttl_expires_at"],
        Duration::from_secs(168 * 60),
    );
    assert!(extended.get("job").is_none(), "{extended}");
    let before = queued(&app).await;
    let expiry: DateTime<Utc> = sqlx::query_scalar("select ttl_expires_at from preview_databases")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    for (body, expected) in [
        (r#"{"ttl_hours": 0}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"ttl_hours": 169}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"ttl_hours": -5}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"ttl_hours": 1.5}"#, StatusCode::BAD_REQUEST),
        (r#"{"ttl_hours": null}"#, StatusCode::BAD_REQUEST),
        (r#"{"ttl_hours": "2"}"#, StatusCode::BAD_REQUEST),
        ("{}", StatusCode::BAD_REQUEST),
        (
            r#"{"ttl_hours": 2, "forever": true}"#,
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, answer) = app.call("POST", &path, Some(&app.key), Some(body)).await;
        assert_eq!(status, expected, "{body} → {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (status, answer) = app
        .call("POST", &path, Some(&app.key), Some(r#"{"ttl_hours": 169}"#))
        .await;
    assert!(
        s(&answer["error"]).contains("from 1 to 168"),
        "{status} {answer}"
    );
    let after: DateTime<Utc> = sqlx::query_scalar("select ttl_expires_at from preview_databases")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!((queued(&app).await, after), (before, expiry));

    // Being deleted, it cannot be extended.
    let (status, _) = app
        .call(
            "DELETE",
            &preview_path(&created["preview"], ""),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, answer) = app
        .call("POST", &path, Some(&app.key), Some(r#"{"ttl_hours": 2}"#))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(s(&answer["error"]).contains("deleting"), "{answer}");
}

#[tokio::test]
async fn reset_wants_a_ready_or_failed_preview_of_a_ready_project() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    let created = create(&app, &project, json!({"mode": "clone"})).await;
    let path = preview_path(&created["preview"], "/reset");

    // Still provisioning: 409, nothing queued.
    let before = queued(&app).await;
    let (status, answer) = app.call("POST", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(s(&answer["error"]).contains("provisioning"), "{answer}");
    assert_eq!(queued(&app).await, before);

    finish(&app, s(&created["job"]["id"]), "completed").await;
    // No body, `{}` and `null` alike; each reset waits for the one before.
    let mut jobs = Vec::new();
    for body in [None, Some("{}"), Some("null")] {
        let (status, reset) = app.call("POST", &path, Some(&app.key), body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body:?} → {reset}");
        assert_eq!(reset["job"]["type"], "project.preview_reset");
        assert_eq!(
            reset["job"]["preview_database_id"],
            created["preview"]["id"]
        );
        assert_eq!(reset["job"]["project_id"], project.as_str());
        assert_eq!(reset["preview"]["state"], "provisioning");
        assert_eq!(reset["preview"]["latest_job_id"], reset["job"]["id"]);
        let job = s(&reset["job"]["id"]).to_string();
        // A failed reset leaves the preview in error, which may be reset again.
        finish(
            &app,
            &job,
            if jobs.is_empty() {
                "failed"
            } else {
                "completed"
            },
        )
        .await;
        jobs.push(job);
    }
    let before = queued(&app).await;
    let (status, answer) = app
        .call("POST", &path, Some(&app.key), Some(r#"{"mode":"empty"}"#))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    // The project in error: 409, nothing queued, the preview as it was.
    set_project_state(&app, &project, "error").await;
    let (status, answer) = app.call("POST", &path, Some(&app.key), Some("{}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(s(&answer["error"]).contains("state: error"), "{answer}");
    assert_eq!(queued(&app).await, before);
    let (_, shown) = app
        .call(
            "GET",
            &preview_path(&created["preview"], ""),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(shown["preview"]["state"], "ready", "{shown}");
}

#[tokio::test]
async fn a_delete_asked_twice_is_one_job_and_the_preview_then_goes() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    let preview = ready_preview(&app, &project, json!({"mode": "clone", "name": "gone"})).await;
    let path = preview_path(&preview, "");
    let (status, first) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(first["preview"]["state"], "deleting");
    assert_eq!(first["job"]["type"], "project.preview_delete");
    assert_eq!(first["job"]["preview_database_id"], preview["id"]);
    assert_eq!(first["job"]["project_id"], project.as_str());
    let before = queued(&app).await;
    let (status, again) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["job"]["id"], first["job"]["id"]);
    assert_eq!(queued(&app).await, before);
    // Neither reset nor connections while it goes.
    let (status, answer) = app
        .call(
            "POST",
            &preview_path(&preview, "/reset"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let (status, answer) = app
        .call(
            "GET",
            &preview_path(&preview, "/connections"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");

    finish(&app, s(&first["job"]["id"]), "completed").await;
    for method in ["GET", "DELETE"] {
        let (status, answer) = app.call(method, &path, Some(&app.key), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} → {answer}");
    }
    let (_, listed) = app
        .call("GET", &previews_of(&project), Some(&app.key), None)
        .await;
    assert_eq!(listed["preview_databases"], json!([]), "{listed}");
    // Its name is free again.
    create(&app, &project, json!({"mode": "clone", "name": "gone"})).await;
}

#[tokio::test]
async fn connections_are_the_previews_own_login_and_need_their_scope() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    let created = create(&app, &project, json!({"mode": "clone"})).await;
    let path = preview_path(&created["preview"], "/connections");
    let (status, answer) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "not ready yet: {answer}");
    finish(&app, s(&created["job"]["id"]), "completed").await;

    let (status, login) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let preview = &created["preview"];
    assert_eq!(login["username"], preview["role_name"]);
    assert_eq!(login["database"], preview["database_name"]);
    assert_eq!(login["host"], preview["public_host"]);
    assert_eq!(login["port"], preview["direct_port"]);
    assert_eq!(login["ssl_mode"], preview["ssl_mode"]);
    let password = s(&login["password"]);
    let url = url::Url::parse(s(&login["connection_string"])).unwrap();
    assert_eq!(url.username(), s(&preview["role_name"]));
    assert_eq!(url.password(), Some(password));
    assert_eq!(url.path(), format!("/{}", s(&preview["database_name"])));
    let pooled = url::Url::parse(s(&login["pooled_connection_string"])).unwrap();
    assert_eq!(pooled.username(), s(&preview["role_name"]));
    assert_eq!(
        pooled.port().map(i32::from),
        preview["pooled_port"].as_i64().map(|p| p as i32)
    );
    assert!(login.get("previous_username").is_none(), "{login}");

    // Never the project's own password.
    let (_, parent) = app
        .call(
            "GET",
            &format!("/v1/projects/{project}/credentials"),
            Some(&app.key),
            None,
        )
        .await;
    assert_ne!(parent["password"], login["password"]);
    assert_ne!(parent["username"], login["username"]);

    for scopes in [json!(["read"]), json!(["read", "write"])] {
        let key = key_with_scopes(&app, scopes).await;
        let (status, answer) = app.call("GET", &path, Some(&key), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
        assert!(!answer.to_string().contains(password), "{answer}");
    }
    let key = key_with_scopes(&app, json!(["credentials:read"])).await;
    let (status, _) = app.call("GET", &path, Some(&key), None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_is_refused_and_queues_nothing() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    create(&app, &project, json!({"mode": "clone", "name": "taken"})).await;
    let long = "n".repeat(64);
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            json!({"mode": "snapshot"}),
            StatusCode::BAD_REQUEST,
            "unknown variant",
        ),
        (
            json!({"mode": "CLONE"}),
            StatusCode::BAD_REQUEST,
            "unknown variant",
        ),
        (json!({"mode": null}), StatusCode::BAD_REQUEST, "mode"),
        (json!({}), StatusCode::BAD_REQUEST, "missing field `mode`"),
        (
            json!({"mode": "clone", "ttl_hours": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ttl_hours",
        ),
        (
            json!({"mode": "clone", "ttl_hours": 169}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ttl_hours",
        ),
        (
            json!({"mode": "clone", "ttl_hours": -1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ttl_hours",
        ),
        (
            json!({"mode": "clone", "ttl_hours": 2.5}),
            StatusCode::BAD_REQUEST,
            "whole number",
        ),
        (
            json!({"mode": "clone", "name": "bad name"}),
            StatusCode::BAD_REQUEST,
            "name must be",
        ),
        (
            json!({"mode": "clone", "name": "-dash"}),
            StatusCode::BAD_REQUEST,
            "name must be",
        ),
        (
            json!({"mode": "clone", "name": ""}),
            StatusCode::BAD_REQUEST,
            "name must be",
        ),
        (
            json!({"mode": "clone", "name": long}),
            StatusCode::BAD_REQUEST,
            "name must be",
        ),
        (
            json!({"mode": "clone", "name": "x;drop"}),
            StatusCode::BAD_REQUEST,
            "name must be",
        ),
        (
            json!({"mode": "clone", "max_connections": 0}),
            StatusCode::BAD_REQUEST,
            "max_connections",
        ),
        (
            json!({"mode": "clone", "statement_timeout": "forever"}),
            StatusCode::BAD_REQUEST,
            "statement_timeout",
        ),
        (
            json!({"mode": "clone", "idle_transaction_timeout": "1 s"}),
            StatusCode::BAD_REQUEST,
            "idle_transaction_timeout",
        ),
        (
            json!({"mode": "clone", "storage_limit_bytes": -1}),
            StatusCode::BAD_REQUEST,
            "storage_limit_bytes",
        ),
        (
            json!({"mode": "clone", "colour": "red"}),
            StatusCode::BAD_REQUEST,
            "unknown field `colour`",
        ),
        (
            json!({"mode": "clone", "name": "taken"}),
            StatusCode::CONFLICT,
            "name",
        ),
    ];
    let before = queued(&app).await;
    let path = previews_of(&project);
    for (body, expected, says) in &cases {
        let (status, answer) = app
            .call("POST", &path, Some(&app.key), Some(&body.to_string()))
            .await;
        assert_eq!(status, *expected, "{body} → {answer}");
        assert!(s(&answer["error"]).contains(says), "{body} → {answer}");
    }
    for body in ["not json", "[]", "null"] {
        let (status, answer) = app.call("POST", &path, Some(&app.key), Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
    }
    let (status, answer) = app.call("POST", &path, Some(&app.key), None).await;
    assert!(status.is_client_error(), "no body → {status} {answer}");
    assert_eq!(queued(&app).await, before);

    // A project that is not ready, or being deleted: 409.
    let body = json!({"mode": "clone"}).to_string();
    for state in ["error", "provisioning", "deleting"] {
        set_project_state(&app, &project, state).await;
        let (status, answer) = app.call("POST", &path, Some(&app.key), Some(&body)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{state}: {answer}");
        assert!(
            s(&answer["error"]).contains(&format!("state: {state}")),
            "{answer}"
        );
    }
    set_project_state(&app, &project, "ready").await;

    // Another organization's project, or none: 404. A read-only key: 403.
    let admin = app.admin_key.clone();
    let (_, org) = app
        .call(
            "POST",
            "/v1/organizations",
            Some(&admin),
            Some(r#"{"name":"bravo"}"#),
        )
        .await;
    let body_b = json!({"name": "bravo-key", "organization_id": org["organization"]["id"]});
    let (_, b_key) = app
        .call(
            "POST",
            "/v1/api_keys",
            Some(&admin),
            Some(&body_b.to_string()),
        )
        .await;
    let b_key = s(&b_key["key"]).to_string();
    let (status, answer) = app.call("POST", &path, Some(&b_key), Some(&body)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert!(!answer.to_string().contains(&project), "{answer}");
    let nowhere = previews_of(&Uuid::now_v7().to_string());
    let (status, answer) = app
        .call("POST", &nowhere, Some(&app.key), Some(&body))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let reader = key_with_scopes(&app, json!(["read"])).await;
    let (status, answer) = app.call("POST", &path, Some(&reader), Some(&body)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, answer) = app.call("POST", &path, None, Some(&body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    // The new key above is not a job or a preview.
    assert_eq!(queued(&app).await, before);
}

/// POSTs with an Idempotency-Key; answers status and body.
async fn post_once(app: &TestApp, path: &str, key: &str, body: &str) -> (StatusCode, Value) {
    let request = Request::builder()
        .method("POST")
        .uri(path)
        .header("authorization", format!("Bearer {}", app.key))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = capy_api::router(app.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn an_idempotency_key_makes_one_preview_one_reset_one_extend() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    let path = previews_of(&project);
    let body = r#"{"mode":"clone"}"#;
    let (status, first) = post_once(&app, &path, "preview-once", body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let before = queued(&app).await;
    let (status, again) = post_once(&app, &path, "preview-once", body).await;
    assert_eq!((status, &again), (StatusCode::ACCEPTED, &first));
    assert_eq!(queued(&app).await, before);
    let (status, answer) = post_once(&app, &path, "preview-once", r#"{"mode":"empty"}"#).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "another request, same key: {answer}"
    );

    finish(&app, s(&first["job"]["id"]), "completed").await;
    let reset = preview_path(&first["preview"], "/reset");
    let (status, reset_first) = post_once(&app, &reset, "reset-once", "{}").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reset_first}");
    let before = queued(&app).await;
    let (_, reset_again) = post_once(&app, &reset, "reset-once", "{}").await;
    assert_eq!(reset_again, reset_first);
    assert_eq!(queued(&app).await, before);

    let extend = preview_path(&first["preview"], "/extend");
    let (status, extended) = post_once(&app, &extend, "extend-once", r#"{"ttl_hours":5}"#).await;
    assert_eq!(status, StatusCode::OK, "{extended}");
    let (_, replayed) = post_once(&app, &extend, "extend-once", r#"{"ttl_hours":5}"#).await;
    assert_eq!(replayed, extended);
}

#[tokio::test]
async fn a_project_delete_queues_its_previews_deletes_first() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    let ready = ready_preview(&app, &project, json!({"mode": "clone", "name": "ready"})).await;
    let pending = create(&app, &project, json!({"mode": "empty", "name": "pending"})).await;
    let asked = ready_preview(&app, &project, json!({"mode": "clone", "name": "asked"})).await;
    // One already being deleted keeps its one delete; one whose delete failed gets
    // another.
    let (_, asked_delete) = app
        .call("DELETE", &preview_path(&asked, ""), Some(&app.key), None)
        .await;
    let broken = ready_preview(&app, &project, json!({"mode": "clone", "name": "broken"})).await;
    let (_, broken_delete) = app
        .call("DELETE", &preview_path(&broken, ""), Some(&app.key), None)
        .await;
    finish(&app, s(&broken_delete["job"]["id"]), "failed").await;
    // Another project's preview is left alone.
    let other = ready_project(&app, "other").await;
    let bystander = ready_preview(&app, &other, json!({"mode": "clone"})).await;

    let (status, deleted) = app
        .call(
            "DELETE",
            &format!("/v1/projects/{project}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{deleted}");
    let project_delete = s(&deleted["job"]["id"]).to_string();
    let rows: Vec<(Uuid, String, Option<Uuid>, i64)> = sqlx::query_as(
        "select id, type, preview_database_id, seq from jobs
         where project_id = $1::uuid and type in ('project.preview_delete', 'project.delete')
           and state = 'pending'
         order by seq",
    )
    .bind(&project)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let order: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|(_, kind, preview, _)| (kind.clone(), preview.map(|p| p.to_string())))
        .collect();
    let id = |v: &Value| Some(s(&v["id"]).to_string());
    assert_eq!(
        order,
        vec![
            ("project.preview_delete".into(), id(&asked)),
            ("project.preview_delete".into(), id(&ready)),
            ("project.preview_delete".into(), id(&pending["preview"])),
            ("project.preview_delete".into(), id(&broken)),
            ("project.delete".into(), None),
        ]
    );
    assert_eq!(rows[0].0.to_string(), s(&asked_delete["job"]["id"]));
    assert_eq!(rows[4].0.to_string(), project_delete);
    for preview in [&ready, &pending["preview"], &asked, &broken] {
        let state: String =
            sqlx::query_scalar("select state from preview_databases where id = $1::uuid")
                .bind(s(&preview["id"]))
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        assert_eq!(state, "deleting");
    }
    let (_, shown) = app
        .call("GET", &preview_path(&bystander, ""), Some(&app.key), None)
        .await;
    assert_eq!(shown["preview"]["state"], "ready", "{shown}");

    // Asked again: the same delete, nothing more queued; no new preview meanwhile.
    let before = queued(&app).await;
    let (status, again) = app
        .call(
            "DELETE",
            &format!("/v1/projects/{project}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(
        (status, s(&again["job"]["id"])),
        (StatusCode::ACCEPTED, project_delete.as_str())
    );
    let (status, answer) = app
        .call(
            "POST",
            &previews_of(&project),
            Some(&app.key),
            Some(r#"{"mode":"clone"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(queued(&app).await, before);
}

async fn set_max_projects(app: &TestApp, max: i32) {
    sqlx::query("update clusters set max_projects = $2 where id = $1")
        .bind(app.cluster_id)
        .bind(max)
        .execute(&app.db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn previews_take_the_clusters_room() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    set_max_projects(&app, 2).await;
    let preview = ready_preview(&app, &project, json!({"mode": "clone"})).await;

    // The project and its preview fill the cluster: no second preview, no project.
    let before = queued(&app).await;
    let (status, answer) = app
        .call(
            "POST",
            &previews_of(&project),
            Some(&app.key),
            Some(r#"{"mode":"clone"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(s(&answer["error"]).contains("full"), "{answer}");
    let (status, answer) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"third"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(queued(&app).await, before);

    // A preview being deleted still holds its place; a deleted one frees it.
    let (_, deleted) = app
        .call("DELETE", &preview_path(&preview, ""), Some(&app.key), None)
        .await;
    let (status, _) = app
        .call(
            "POST",
            &previews_of(&project),
            Some(&app.key),
            Some(r#"{"mode":"clone"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    finish(&app, s(&deleted["job"]["id"]), "completed").await;
    create(&app, &project, json!({"mode": "clone"})).await;
    // Raised, there is room again.
    set_max_projects(&app, 3).await;
    create(&app, &project, json!({"mode": "empty"})).await;
}

/// A failed create of a preview that is then deleted is not retried (409): only the
/// preview's delete may run again once it is going.
#[tokio::test]
async fn a_gone_previews_create_is_not_retried() {
    let app = TestApp::new().await;
    let project = ready_project(&app, "shop").await;
    let created = create(&app, &project, json!({"mode": "clone", "name": "broken"})).await;
    let create_job = s(&created["job"]["id"]).to_string();
    finish(&app, &create_job, "failed").await;
    let retry = format!("/v1/jobs/{create_job}/retry");
    let (status, deleted) = app
        .call(
            "DELETE",
            &preview_path(&created["preview"], ""),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{deleted}");
    let (status, answer) = app.call("POST", &retry, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    // Its delete, failed, may be retried.
    let delete_job = s(&deleted["job"]["id"]).to_string();
    finish(&app, &delete_job, "failed").await;
    let (status, answer) = app
        .call(
            "POST",
            &format!("/v1/jobs/{delete_job}/retry"),
            Some(&app.key),
            None,
        )
        .await;
    assert!(status.is_success(), "{status}: {answer}");
}
