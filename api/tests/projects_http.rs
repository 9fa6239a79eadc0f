//! The projects and jobs endpoints, driven through the router without a port.

mod common;

use axum::http::StatusCode;
use capy_api::admin::{self, KeyGrant};
use common::{new_key, TestApp};
use serde_json::json;

#[tokio::test]
async fn create_records_a_provisioning_project_and_a_pending_job() {
    let app = TestApp::new().await;
    let (status, body) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"shop-db","max_connections":7,"statement_timeout":"15s"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let project = &body["project"];
    let job = &body["job"];
    assert_eq!(project["name"], "shop-db");
    assert_eq!(project["state"], "provisioning");
    assert_eq!(project["max_connections"], 7);
    assert_eq!(project["statement_timeout"], "15s");
    assert_eq!(project["idle_transaction_timeout"], "60s");
    assert_eq!(project["region"], "local");
    assert_eq!(project["organization_id"], app.organization_id.to_string());
    assert_eq!(project["cluster_id"], app.cluster_id.to_string());
    assert_eq!(project["latest_job_id"], job["id"]);
    assert!(project.get("password").is_none() && project.get("password_encrypted").is_none());
    assert_eq!(job["type"], "project.create");
    assert_eq!(job["state"], "pending");
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["project_id"], project["id"]);
    assert_eq!(
        job["locked_resource"],
        format!("project:{}", project["id"].as_str().unwrap())
    );

    // The password is stored sealed, not in the clear.
    let sealed: Vec<u8> = sqlx::query_scalar("select password_encrypted from projects")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let password = common::secrets().open(&sealed).unwrap();
    assert!(password.len() >= 32);

    let id = project["id"].as_str().unwrap();
    let (status, shown) = app
        .call("GET", &format!("/v1/projects/{id}"), Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["project"]["id"], project["id"]);
    let (status, listed) = app.call("GET", "/v1/projects", Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["projects"].as_array().unwrap().len(), 1);
    let job_id = job["id"].as_str().unwrap();
    let (status, shown) = app
        .call("GET", &format!("/v1/jobs/{job_id}"), Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["job"]["state"], "pending");

    // Connections exist only once the project is ready.
    let (status, body) = app
        .call(
            "GET",
            &format!("/v1/projects/{id}/connections"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

#[tokio::test]
async fn bad_project_bodies_get_a_clear_400() {
    let app = TestApp::new().await;
    let long_name = format!(r#"{{"name":"{}"}}"#, "a".repeat(64));
    let cases: Vec<(&str, &str)> = vec![
        (r#"{"name":""}"#, "name must be"),
        (&long_name, "name must be"),
        (r#"{"name":"bad name"}"#, "name must be"),
        (r#"{"name":"x'; drop table projects; --"}"#, "name must be"),
        (r#"{"name":"-leading"}"#, "name must be"),
        (r#"{"name":"caf\u00e9"}"#, "name must be"),
        (r#"{"name":"ok","colour":"red"}"#, "unknown field `colour`"),
        (r#"{"name":42}"#, "invalid type"),
        (r#"{"name":"ok","max_connections":"ten"}"#, "invalid type"),
        (r#"{"name":"ok","max_connections":0}"#, "max_connections"),
        (
            r#"{"name":"ok","statement_timeout":"1 week"}"#,
            "statement_timeout",
        ),
        (
            r#"{"name":"ok","storage_limit_bytes":-1}"#,
            "storage_limit_bytes",
        ),
        (r#"{"name":"ok","region":"US East"}"#, "region"),
        (r#"{}"#, "missing field `name`"),
        (r#"{"name":"ok""#, "malformed JSON"),
        ("not json", "malformed JSON"),
        ("[]", "invalid request body"),
    ];
    for (body, expected) in cases {
        let (status, answer) = app
            .call("POST", "/v1/projects", Some(&app.key), Some(body))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(expected), "{body} → {message}");
    }
    let count: i64 = sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "no job may be queued for a refused request");
}

#[tokio::test]
async fn a_body_without_json_content_type_is_refused() {
    let app = TestApp::new().await;
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/projects")
        .header("authorization", format!("Bearer {}", app.key))
        .body(axum::body::Body::from(r#"{"name":"x"}"#))
        .unwrap();
    use tower::ServiceExt as _;
    let response = capy_api::router(app.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn duplicate_names_conflict_and_missing_room_is_422() {
    let app = TestApp::new().await;
    let body = r#"{"name":"twice"}"#;
    let (status, _) = app
        .call("POST", "/v1/projects", Some(&app.key), Some(body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, answer) = app
        .call("POST", "/v1/projects", Some(&app.key), Some(body))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");

    let (status, answer) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"far","region":"mars-1"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("mars-1"));
}

#[tokio::test]
async fn keys_are_checked() {
    let app = TestApp::new().await;
    let (status, answer) = app.call("GET", "/v1/projects", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer["error"].as_str().unwrap().contains("missing"));

    for bad in [
        "capy_live_nothex",
        "Basic dXNlcjpwYXNz",
        "capy_live_",
        &"x".repeat(5000),
    ] {
        let (status, answer) = app.call("GET", "/v1/projects", Some(bad), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}: {answer}");
    }
    // Well formed, but no such key.
    let unknown = capy_shared::crypto::generate_api_key().plaintext;
    let (status, answer) = app.call("GET", "/v1/projects", Some(&unknown), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["error"], "invalid API key");

    // Revoked.
    let revoked = new_key(&app.db, app.organization_id).await;
    sqlx::query("update api_keys set revoked_at = now() where key_hash = $1")
        .bind(capy_shared::crypto::hash_api_key(&revoked))
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, answer) = app.call("GET", "/v1/projects", Some(&revoked), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer["error"].as_str().unwrap().contains("revoked"));

    // Expired.
    let expired = new_key(&app.db, app.organization_id).await;
    sqlx::query("update api_keys set expires_at = now() - interval '1 minute' where key_hash = $1")
        .bind(capy_shared::crypto::hash_api_key(&expired))
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, answer) = app.call("GET", "/v1/projects", Some(&expired), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer["error"].as_str().unwrap().contains("expired"));

    // The admin key manages the platform; it does not own projects.
    let (status, _) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.admin_key),
            Some(r#"{"name":"x"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A read-only key cannot create.
    let (_, read_only) = admin::create_api_key(
        &app.db.pool,
        &KeyGrant {
            name: "ro".into(),
            organization_id: Some(app.organization_id),
            scopes: Some(vec!["read".into()]),
            ..KeyGrant::default()
        },
    )
    .await
    .unwrap();
    let (status, _) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&read_only),
            Some(r#"{"name":"x"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app
        .call("GET", "/v1/projects", Some(&read_only), None)
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn another_organizations_key_sees_nothing() {
    let app = TestApp::new().await;
    let (_, created) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"mine"}"#),
        )
        .await;
    let project_id = created["project"]["id"].as_str().unwrap().to_string();
    let job_id = created["job"]["id"].as_str().unwrap().to_string();
    sqlx::query("update projects set state = 'ready'")
        .execute(&app.db.pool)
        .await
        .unwrap();

    let other_org = admin::create_organization(&app.db.pool, "other")
        .await
        .unwrap();
    let other_key = new_key(&app.db, other_org).await;
    for path in [
        format!("/v1/projects/{project_id}"),
        format!("/v1/projects/{project_id}/connections"),
        format!("/v1/jobs/{job_id}"),
    ] {
        let (status, answer) = app.call("GET", &path, Some(&other_key), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {answer}");
        assert!(
            !answer.to_string().contains(&project_id),
            "{path} leaked: {answer}"
        );
    }
    let (status, listed) = app
        .call("GET", "/v1/projects", Some(&other_key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed, json!({"projects": [], "next_cursor": null}));

    // Our own key reads the connection; the password appears only there.
    let (status, connections) = app
        .call(
            "GET",
            &format!("/v1/projects/{project_id}/connections"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{connections}");
    let direct = connections["direct_url"].as_str().unwrap();
    let password = url::Url::parse(direct)
        .unwrap()
        .password()
        .unwrap()
        .to_string();
    assert!(password.len() >= 32);
    let (_, shown) = app
        .call(
            "GET",
            &format!("/v1/projects/{project_id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert!(!shown.to_string().contains(&password));
}

#[tokio::test]
async fn malformed_ids_and_unknown_routes() {
    let app = TestApp::new().await;
    let (status, answer) = app
        .call("GET", "/v1/projects/not-a-uuid", Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, _) = app
        .call(
            "GET",
            &format!("/v1/jobs/{}", uuid::Uuid::new_v4()),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.call("GET", "/v1/nothing", Some(&app.key), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.call("PUT", "/v1/projects", Some(&app.key), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn oversized_bodies_and_out_of_range_timeouts_are_refused() {
    let app = TestApp::new().await;
    let huge = format!(
        r#"{{"name":"big","environment":"{}"}}"#,
        "x".repeat(100_000)
    );
    let (status, answer) = app
        .call("POST", "/v1/projects", Some(&app.key), Some(&huge))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("larger than"));

    for timeout in ["25d", "2147483648", "9999999999s"] {
        let body = format!(r#"{{"name":"t","idle_transaction_timeout":"{timeout}"}}"#);
        let (status, answer) = app
            .call("POST", "/v1/projects", Some(&app.key), Some(&body))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{timeout}: {answer}");
    }
}

#[tokio::test]
async fn me_attempts_and_wait() {
    let app = TestApp::new().await;
    let (status, me) = app.call("GET", "/v1/me", Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["organization_id"], app.organization_id.to_string());
    assert_eq!(me["admin"], false);
    assert_eq!(me["scopes"], json!(["read", "write", "credentials:read"]));
    let (status, _) = app.call("GET", "/v1/me", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (_, created) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"p"}"#),
        )
        .await;
    let job_id = created["job"]["id"].as_str().unwrap().to_string();
    let (status, attempts) = app
        .call(
            "GET",
            &format!("/v1/jobs/{job_id}/attempts"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(attempts, json!({"attempts": [], "next_cursor": null}));

    // No worker runs here: a wait ends at its deadline with the state unchanged.
    let started = std::time::Instant::now();
    let (status, waited) = app
        .call(
            "GET",
            &format!("/v1/jobs/{job_id}?wait=1"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(waited["job"]["state"], "pending");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    for bad in ["wait=61", "wait=-1", "wait=soon", "colour=red"] {
        let (status, answer) = app
            .call(
                "GET",
                &format!("/v1/jobs/{job_id}?{bad}"),
                Some(&app.key),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {answer}");
    }

    let other_org = admin::create_organization(&app.db.pool, "other")
        .await
        .unwrap();
    let other_key = new_key(&app.db, other_org).await;
    let (status, _) = app
        .call(
            "GET",
            &format!("/v1/jobs/{job_id}/attempts"),
            Some(&other_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
