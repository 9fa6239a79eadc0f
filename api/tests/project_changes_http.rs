#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! PATCH, DELETE, retry-provisioning, extensions, the jobs list and Idempotency-Key,
//! driven through the router without a port. No worker runs: jobs stay queued, and the
//! tests finish them by hand where they need an outcome.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use capy_api::router;
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

async fn create_project(app: &TestApp, name: &str) -> (String, Value) {
    let (status, body) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(&json!({ "name": name }).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    (body["project"]["id"].as_str().unwrap().to_string(), body)
}

/// Ends a job as a worker would have, and applies its effect on the project.
async fn finish_job(app: &TestApp, job_id: &str, state: &str) {
    let mut tx = app.db.pool.begin().await.unwrap();
    let job: capy_shared::model::Job = sqlx::query_as(&format!(
        "update jobs set state = $2, completed_at = now(), error = case $2 when 'failed' then 'boom' end
         where id = $1::uuid returning {}",
        capy_shared::model::JOB_COLUMNS
    ))
    .bind(job_id)
    .bind(state)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    capy_shared::effects::apply(&mut tx, &job).await.unwrap();
    tx.commit().await.unwrap();
}

async fn job_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn patch_records_settings_and_queues_an_update_behind_the_create() {
    let app = TestApp::new().await;
    let (id, created) = create_project(&app, "shop").await;
    let path = format!("/v1/projects/{id}");

    // A rename alone changes nothing on the cluster: no job.
    let (status, body) = app
        .call("PATCH", &path, Some(&app.key), Some(r#"{"name":"shop-2"}"#))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["project"]["name"], "shop-2");
    assert!(body.get("job").is_none(), "{body}");
    assert_eq!(job_count(&app).await, 1);

    // An empty PATCH answers the project unchanged.
    let (status, body) = app.call("PATCH", &path, Some(&app.key), Some("{}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["project"]["name"], "shop-2");

    let (status, body) = app
        .call(
            "PATCH",
            &path,
            Some(&app.key),
            Some(r#"{"max_connections":9,"statement_timeout":"5s","storage_limit_bytes":1048576}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["project"]["max_connections"], 9);
    assert_eq!(body["project"]["statement_timeout"], "5s");
    assert_eq!(body["project"]["storage_limit_bytes"], 1048576);
    let job = &body["job"];
    assert_eq!(job["type"], "project.update");
    assert_eq!(job["state"], "pending");
    // Queued behind the still-pending create, on the same resource.
    assert_eq!(job["locked_resource"], created["job"]["locked_resource"]);
    assert_eq!(body["project"]["latest_job_id"], job["id"]);

    // null removes the storage limit; no cluster setting changed, so no job.
    let (status, body) = app
        .call(
            "PATCH",
            &path,
            Some(&app.key),
            Some(r#"{"storage_limit_bytes":null}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["project"]["storage_limit_bytes"], Value::Null);
    assert!(body.get("job").is_none());

    for bad in [
        r#"{"max_connections":0}"#,
        r#"{"statement_timeout":"soon"}"#,
        r#"{"name":"no spaces"}"#,
        r#"{"storage_limit_bytes":-1}"#,
        r#"{"plan":"pro"}"#,
        r#"{"max_connections":"9"}"#,
    ] {
        let (status, answer) = app.call("PATCH", &path, Some(&app.key), Some(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {answer}");
        assert!(answer["error"].as_str().unwrap().len() > 10, "{answer}");
    }
    create_project(&app, "taken").await;
    let (status, _) = app
        .call("PATCH", &path, Some(&app.key), Some(r#"{"name":"taken"}"#))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn delete_queues_one_job_and_the_project_leaves_the_list_when_it_completes() {
    let app = TestApp::new().await;
    let (id, created) = create_project(&app, "doomed").await;
    let path = format!("/v1/projects/{id}");
    let (status, body) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = body["job"].clone();
    assert_eq!(job["type"], "project.delete");
    assert_eq!(job["locked_resource"], created["job"]["locked_resource"]);

    // Deleting again answers the same job; changes are refused meanwhile.
    let (status, again) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again["job"]["id"], job["id"]);
    let (_, shown) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(shown["project"]["state"], "deleting");
    let (status, _) = app
        .call(
            "PATCH",
            &path,
            Some(&app.key),
            Some(r#"{"max_connections":3}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // The create finishing first leaves the project deleting; the delete ends it.
    finish_job(&app, created["job"]["id"].as_str().unwrap(), "completed").await;
    let (_, shown) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(shown["project"]["state"], "deleting");
    finish_job(&app, job["id"].as_str().unwrap(), "completed").await;
    let (status, _) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listed) = app.call("GET", "/v1/projects", Some(&app.key), None).await;
    assert_eq!(listed["projects"], json!([]));
    let (status, _) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Its name is free again.
    create_project(&app, "doomed").await;
}

#[tokio::test]
async fn retry_provisioning_answers_the_job_in_flight_or_queues_a_new_one() {
    let app = TestApp::new().await;
    let (id, created) = create_project(&app, "flaky").await;
    let path = format!("/v1/projects/{id}/retry-provisioning");
    let (status, body) = app.call("POST", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["job"]["id"], created["job"]["id"]);

    finish_job(&app, created["job"]["id"].as_str().unwrap(), "failed").await;
    let (_, shown) = app
        .call("GET", &format!("/v1/projects/{id}"), Some(&app.key), None)
        .await;
    assert_eq!(shown["project"]["state"], "error");
    let (status, body) = app.call("POST", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["job"]["type"], "project.create");
    assert_ne!(body["job"]["id"], created["job"]["id"]);
    let (_, shown) = app
        .call("GET", &format!("/v1/projects/{id}"), Some(&app.key), None)
        .await;
    assert_eq!(shown["project"]["state"], "provisioning");
    assert_eq!(shown["project"]["latest_job_id"], body["job"]["id"]);

    finish_job(&app, body["job"]["id"].as_str().unwrap(), "completed").await;
    let (status, answer) = app.call("POST", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
}

#[tokio::test]
async fn extensions_are_listed_from_the_cluster_and_unknown_ones_refused_before_queueing() {
    let app = TestApp::new().await;
    let (id, _) = create_project(&app, "ext").await;
    let path = format!("/v1/projects/{id}/extensions");

    // The catalog is read from the real cluster on first use.
    let (status, body) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let extensions = body["extensions"].as_array().unwrap();
    let pgcrypto = extensions
        .iter()
        .find(|e| e["name"] == "pgcrypto")
        .expect("the test cluster offers pgcrypto");
    assert_eq!(pgcrypto["enabled"], false);
    assert_eq!(pgcrypto["installed_version"], Value::Null);
    assert_eq!(pgcrypto["trusted"], true);
    assert!(pgcrypto["default_version"].as_str().unwrap().contains('.'));
    assert!(!pgcrypto["description"].as_str().unwrap().is_empty());

    // Pages by name.
    let (_, first) = app
        .call("GET", &format!("{path}?limit=2"), Some(&app.key), None)
        .await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = app
        .call(
            "GET",
            &format!("{path}?limit=2&cursor={cursor}"),
            Some(&app.key),
            None,
        )
        .await;
    let names = |page: &Value| -> Vec<String> {
        page["extensions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    let expected: Vec<String> = extensions
        .iter()
        .take(4)
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!([names(&first), names(&second)].concat(), expected);

    let before = job_count(&app).await;
    let (status, answer) = app
        .call(
            "POST",
            &path,
            Some(&app.key),
            Some(r#"{"name":"no_such_ext"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("no_such_ext"));
    for bad in [
        r#"{"name":"Robert'); drop table x;--"}"#,
        r#"{"name":""}"#,
        r#"{"name":"pgcrypto","version":"1.3; drop"}"#,
        r#"{}"#,
    ] {
        let (status, answer) = app.call("POST", &path, Some(&app.key), Some(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {answer}");
    }
    let (status, _) = app
        .call(
            "DELETE",
            &format!("{path}/no_such_ext"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app
        .call(
            "DELETE",
            &format!("{path}/BAD%20NAME"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(job_count(&app).await, before, "nothing was queued");

    let (status, body) = app
        .call(
            "POST",
            &path,
            Some(&app.key),
            Some(r#"{"name":"pgcrypto"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["job"]["type"], "project.extension_enable");
    assert_eq!(body["job"]["args"]["name"], "pgcrypto");
    finish_job(&app, body["job"]["id"].as_str().unwrap(), "completed").await;
    let (_, listed) = app.call("GET", &path, Some(&app.key), None).await;
    let pgcrypto = listed["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "pgcrypto")
        .unwrap()
        .clone();
    assert_eq!(pgcrypto["enabled"], true);
    assert_eq!(pgcrypto["installed_version"], pgcrypto["default_version"]);

    let (status, body) = app
        .call("DELETE", &format!("{path}/pgcrypto"), Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["job"]["type"], "project.extension_disable");
    finish_job(&app, body["job"]["id"].as_str().unwrap(), "completed").await;
    let (_, listed) = app.call("GET", &path, Some(&app.key), None).await;
    assert!(listed["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["enabled"] == false));
}

#[tokio::test]
async fn jobs_are_listed_newest_first_with_filters_and_cursors() {
    let app = TestApp::new().await;
    let (first, _) = create_project(&app, "one").await;
    let (second, _) = create_project(&app, "two").await;
    app.call(
        "PATCH",
        &format!("/v1/projects/{first}"),
        Some(&app.key),
        Some(r#"{"max_connections":3}"#),
    )
    .await;
    // An internal job (no organization) is never listed to an organization.
    sqlx::query(
        "insert into jobs (id, type, max_attempts) values (gen_random_uuid(), 'capy.noop', 1)",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();

    let list = |query: &'static str| {
        let app = &app;
        async move {
            let (status, body) = app
                .call("GET", &format!("/v1/jobs{query}"), Some(&app.key), None)
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            body
        }
    };
    let all = list("").await;
    let types: Vec<&str> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["project.update", "project.create", "project.create"]
    );
    assert_eq!(all["next_cursor"], Value::Null);

    let body = list("?type=project.create").await;
    assert_eq!(body["jobs"].as_array().unwrap().len(), 2);
    let (status, body) = app
        .call(
            "GET",
            &format!("/v1/jobs?project_id={second}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(body["jobs"][0]["project_id"], second);
    assert_eq!(list("?state=completed").await["jobs"], json!([]));

    let page1 = list("?limit=2").await;
    assert_eq!(page1["jobs"].as_array().unwrap().len(), 2);
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let (_, page2) = app
        .call(
            "GET",
            &format!("/v1/jobs?limit=2&cursor={cursor}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(page2["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(page2["next_cursor"], Value::Null);
    assert_eq!(page2["jobs"][0]["id"], all["jobs"][2]["id"]);

    for bad in [
        "?status=failed",
        "?state=stuck",
        "?limit=0",
        "?limit=999",
        "?cursor=%%%",
        "?project_id=nope",
    ] {
        let (status, answer) = app
            .call("GET", &format!("/v1/jobs{bad}"), Some(&app.key), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {answer}");
    }
    // A misspelt filter is refused, never ignored (which would list everything).
    let (_, answer) = app
        .call("GET", "/v1/jobs?status=failed", Some(&app.key), None)
        .await;
    assert!(
        answer["error"].as_str().unwrap().contains("'status'"),
        "{answer}"
    );
    for path in [
        "/v1/projects?colour=red",
        "/v1/organizations?x=1",
        "/v1/api_keys?org=1",
    ] {
        let (status, answer) = app.call("GET", path, Some(&app.key), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {answer}");
    }
}

/// Sends a POST with an Idempotency-Key; answers status, the replay header and body.
async fn post_once(
    app: &TestApp,
    key: &str,
    idempotency_key: &str,
    path: &str,
    body: &str,
) -> (StatusCode, bool, Value) {
    let request = Request::builder()
        .method("POST")
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("idempotency-key", idempotency_key)
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router(app.state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer_and_refuses_another_body() {
    let app = TestApp::new().await;
    let body = r#"{"name":"once"}"#;
    let (status, replayed, first) = post_once(&app, &app.key, "k-1", "/v1/projects", body).await;
    assert_eq!((status, replayed), (StatusCode::ACCEPTED, false), "{first}");
    let (status, replayed, second) = post_once(&app, &app.key, "k-1", "/v1/projects", body).await;
    assert_eq!((status, replayed), (StatusCode::ACCEPTED, true));
    assert_eq!(first, second);
    assert_eq!(job_count(&app).await, 1, "the work was done once");

    let (status, _, answer) =
        post_once(&app, &app.key, "k-1", "/v1/projects", r#"{"name":"twice"}"#).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");

    // An error answer is remembered too: the same request gets the same 409.
    let (status, _, _) = post_once(&app, &app.key, "k-2", "/v1/projects", body).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, replayed, _) = post_once(&app, &app.key, "k-2", "/v1/projects", body).await;
    assert_eq!((status, replayed), (StatusCode::CONFLICT, true));

    // Keys are per caller: another key's "k-1" is its own.
    let other = common::new_key(&app.db, app.organization_id).await;
    let (status, replayed, _) =
        post_once(&app, &other, "k-1", "/v1/projects", r#"{"name":"other"}"#).await;
    assert_eq!((status, replayed), (StatusCode::ACCEPTED, false));

    for bad in ["", &"x".repeat(256), "tab\there"] {
        let request = Request::builder()
            .method("POST")
            .uri("/v1/projects")
            .header("authorization", format!("Bearer {}", app.key))
            .header("content-type", "application/json")
            .header("idempotency-key", bad)
            .body(Body::from(body))
            .unwrap();
        let response = router(app.state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad:?}");
    }
}
