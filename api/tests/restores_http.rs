#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Approvals and restores, driven through the router without a port. No worker runs:
//! backups are rows written here by hand (completed, failed, pending, another
//! organization's), and jobs stay queued, finished by hand where a test needs an
//! outcome. Every refusal is checked to queue nothing.

mod common;

use axum::http::StatusCode;
use capy_api::admin;
use common::{new_key, TestApp};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A project of the organization (its create job queued), made `ready` by hand.
async fn ready_project(app: &TestApp, key: &str, name: &str) -> String {
    let body = json!({ "name": name }).to_string();
    let (status, created) = app
        .call("POST", "/v1/projects", Some(key), Some(&body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["project"]["id"].as_str().unwrap().to_string();
    sqlx::query("update projects set state = 'ready' where id = $1::uuid")
        .bind(&id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    id
}

/// A backup row of `project`, as the backups work would leave it.
async fn backup(app: &TestApp, project: &str, state: &str, verification: &str) -> String {
    let id = Uuid::now_v7();
    let manifest = json!({
        "tables": 2, "rows": 10, "server_version_num": 170000,
        "extensions": [
            {"name": "plpgsql", "version": "1.0"},
            {"name": "pgcrypto", "version": "1.3"},
            {"name": "citext", "version": null},
            {"name": "bad name; drop", "version": "1"},
        ],
    });
    sqlx::query(
        "insert into backups (id, organization_id, project_id, kind, backup_key, database_name,
                              state, verification_state, verification_error, manifest)
         select $1, p.organization_id, p.id, 'backup',
                'projects/' || p.id || '/backups/' || $1 || '.dump', p.database_name, $3, $4,
                case $4 when 'failed' then 'row counts differ' end, $5
         from projects p where p.id = $2::uuid",
    )
    .bind(id)
    .bind(project)
    .bind(state)
    .bind(verification)
    .bind(manifest)
    .execute(&app.db.pool)
    .await
    .unwrap();
    id.to_string()
}

async fn job_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

async fn project_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from projects")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

async fn approve(app: &TestApp, project: &str) -> Value {
    let (status, body) = app
        .call(
            "POST",
            &format!("/v1/projects/{project}/approvals"),
            Some(&app.key),
            Some(r#"{"action":"project.restore_overwrite"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

async fn restore(app: &TestApp, project: &str, body: Value) -> (StatusCode, Value) {
    app.call(
        "POST",
        &format!("/v1/projects/{project}/restores"),
        Some(&app.key),
        Some(&body.to_string()),
    )
    .await
}

/// The project's jobs in queue order: `(type, args, locked_resource)`.
async fn jobs_of(app: &TestApp, project: &str) -> Vec<(String, Value, String)> {
    sqlx::query_as(
        "select type, args, locked_resource from jobs where project_id = $1::uuid order by seq",
    )
    .bind(project)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn approvals_are_hashed_tokens_and_refused_for_production() {
    let app = TestApp::new().await;
    let project = ready_project(&app, &app.key, "shop").await;
    let approval = approve(&app, &project).await;
    assert_eq!(approval["action"], "project.restore_overwrite");
    let token = approval["token"].as_str().unwrap();
    // 32 random bytes, base64url without padding.
    assert_eq!(token.len(), 43, "{approval}");
    assert!(token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    let (hash, minutes): (Vec<u8>, f64) = sqlx::query_as(
        "select token_hash, extract(epoch from expires_at - now())::float8 / 60
         from approvals where id = $1::uuid",
    )
    .bind(approval["id"].as_str().unwrap())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(hash, Sha256::digest(token.as_bytes()).to_vec());
    assert!((9.0..=10.0).contains(&minutes), "{minutes}");

    let path = format!("/v1/projects/{project}/approvals");
    for body in [r#"{"action":"project.delete"}"#, r#"{"action":""}"#] {
        let (status, answer) = app.call("POST", &path, Some(&app.key), Some(body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    }
    sqlx::query("update projects set environment = 'production' where id = $1::uuid")
        .bind(&project)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, answer) = app
        .call(
            "POST",
            &path,
            Some(&app.key),
            Some(r#"{"action":"project.restore_overwrite"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("restore into a new project"));
    // And a restore over it, even with the approval made before: refused.
    let backup_id = backup(&app, &project, "completed", "verified").await;
    let jobs = job_count(&app).await;
    let (status, answer) = restore(
        &app,
        &project,
        json!({"backup_id": backup_id, "target_kind": "project", "approval_token": token}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(job_count(&app).await, jobs);
}

#[tokio::test]
async fn a_restore_into_a_new_project_queues_create_extensions_and_restore_in_order() {
    let app = TestApp::new().await;
    let source = ready_project(&app, &app.key, "shop").await;
    sqlx::query("update projects set max_connections = 7 where id = $1::uuid")
        .bind(&source)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let backup_id = backup(&app, &source, "completed", "verified").await;
    let body = json!({"backup_id": backup_id, "target_kind": "new_project"});
    let (status, answer) = app
        .call(
            "POST",
            &format!("/v1/projects/{source}/restores"),
            Some(&app.key),
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let project = &answer["project"];
    let id = project["id"].as_str().unwrap();
    assert_ne!(id, source);
    assert_eq!(project["state"], "provisioning");
    assert_eq!(project["cluster_id"], app.cluster_id.to_string());
    assert_eq!(project["max_connections"], 7, "the source's settings");
    let name = project["name"].as_str().unwrap();
    assert!(name.starts_with("shop-restore-"), "{name}");
    assert_eq!(name.len(), "shop-restore-".len() + 8, "{name}");
    assert_eq!(answer["job"]["type"], "project.restore");
    assert_eq!(answer["job"]["project_id"], id);

    let lock = format!("project:{id}");
    let jobs = jobs_of(&app, id).await;
    let key = format!("projects/{source}/backups/{backup_id}.dump");
    let expected = vec![
        ("project.create".to_string(), json!({}), lock.clone()),
        (
            "project.extension_enable".to_string(),
            json!({"name": "pgcrypto", "version": "1.3"}),
            lock.clone(),
        ),
        (
            "project.extension_enable".to_string(),
            json!({"name": "citext", "version": null}),
            lock.clone(),
        ),
        (
            "project.restore".to_string(),
            json!({"backup_id": backup_id, "backup_key": key, "mode": "new_project"}),
            lock.clone(),
        ),
    ];
    assert_eq!(jobs, expected);
    let latest: Uuid = sqlx::query_scalar("select latest_job_id from projects where id = $1::uuid")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(latest.to_string(), answer["job"]["id"].as_str().unwrap());

    // A name of one's own; taken → 409, nothing queued. Idempotency-Key replays.
    let jobs = job_count(&app).await;
    let body = json!({"backup_id": backup_id, "target_kind": "new_project", "name": "shop"});
    let (status, answer) = restore(&app, &source, body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(job_count(&app).await, jobs);
    let body = json!({"backup_id": backup_id, "target_kind": "new_project", "name": "copy"});
    let first = idempotent_restore(&app, &source, &body).await;
    let again = idempotent_restore(&app, &source, &body).await;
    assert_eq!(first, again);
    assert_eq!(first["project"]["name"], "copy");
    assert_eq!(job_count(&app).await, jobs + 4, "one restore, not two");

    // A key narrowed to the source project cannot make projects.
    let narrowed = narrowed_key(&app, &source).await;
    let (status, answer) = app
        .call(
            "POST",
            &format!("/v1/projects/{source}/restores"),
            Some(&narrowed),
            Some(&json!({"backup_id": backup_id, "target_kind": "new_project"}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(job_count(&app).await, jobs + 4);
}

async fn idempotent_restore(app: &TestApp, project: &str, body: &Value) -> Value {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let request = Request::builder()
        .method("POST")
        .uri(format!("/v1/projects/{project}/restores"))
        .header("authorization", format!("Bearer {}", app.key))
        .header("content-type", "application/json")
        .header("idempotency-key", "restore-1")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = capy_api::router(app.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

async fn narrowed_key(app: &TestApp, project: &str) -> String {
    let (status, created) = app
        .call(
            "POST",
            "/v1/api_keys",
            Some(&app.key),
            Some(&json!({"name": "narrow", "project_id": project}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["key"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn an_overwrite_needs_a_fresh_unused_approval_of_the_project() {
    let app = TestApp::new().await;
    let project = ready_project(&app, &app.key, "shop").await;
    let other = ready_project(&app, &app.key, "other").await;
    let backup_id = backup(&app, &project, "completed", "pending").await;
    let others_backup = backup(&app, &other, "completed", "verified").await;
    let jobs = job_count(&app).await;
    let overwrite = |token: Option<&str>, backup: &str| json!({"backup_id": backup, "target_kind": "project", "approval_token": token});

    let (status, answer) = restore(&app, &project, overwrite(None, &backup_id)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("approval"));
    let (status, answer) = restore(&app, &project, overwrite(Some("nope"), &backup_id)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    // Another project's approval does not do for this one.
    let others_token = approve(&app, &other).await["token"].clone();
    let (status, answer) =
        restore(&app, &project, overwrite(others_token.as_str(), &backup_id)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");

    let approval = approve(&app, &project).await;
    let token = approval["token"].as_str().unwrap();
    let (status, answer) = restore(&app, &project, overwrite(Some(token), &others_backup)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("new project"));
    assert_eq!(job_count(&app).await, jobs, "no refusal queued anything");

    let (status, answer) = restore(&app, &project, overwrite(Some(token), &backup_id)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let job = answer["job"]["id"].as_str().unwrap().to_string();
    assert_eq!(answer["project"]["id"], project.as_str());
    assert_eq!(
        answer["job"]["locked_resource"],
        format!("project:{project}")
    );
    assert_eq!(answer["job"]["args"]["mode"], "project");
    assert_eq!(answer["job"]["args"]["backup_id"], backup_id.as_str());
    let (used, job_id): (bool, Option<Uuid>) =
        sqlx::query_as("select used_at is not null, job_id from approvals where id = $1::uuid")
            .bind(approval["id"].as_str().unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(used);
    assert_eq!(job_id.unwrap().to_string(), job);
    assert_eq!(job_count(&app).await, jobs + 1);

    let (status, answer) = restore(&app, &project, overwrite(Some(token), &backup_id)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains(&job), "{answer}");
    assert_eq!(job_count(&app).await, jobs + 1);

    let expired = approve(&app, &project).await;
    sqlx::query(
        "update approvals set expires_at = now() - interval '1 second' where id = $1::uuid",
    )
    .bind(expired["id"].as_str().unwrap())
    .execute(&app.db.pool)
    .await
    .unwrap();
    let token = expired["token"].as_str().unwrap();
    let (status, answer) = restore(&app, &project, overwrite(Some(token), &backup_id)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("expired"));

    // A project that is not ready is not overwritten; the token stays unused.
    let fresh = approve(&app, &project).await;
    sqlx::query("update projects set state = 'error' where id = $1::uuid")
        .bind(&project)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let token = fresh["token"].as_str().unwrap();
    let (status, answer) = restore(&app, &project, overwrite(Some(token), &backup_id)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(job_count(&app).await, jobs + 1);
    let unused: bool =
        sqlx::query_scalar("select used_at is null from approvals where id = $1::uuid")
            .bind(fresh["id"].as_str().unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(unused);
}

#[tokio::test]
async fn backups_that_cannot_be_restored_are_refused_and_nothing_is_queued() {
    let app = TestApp::new().await;
    let project = ready_project(&app, &app.key, "shop").await;
    let b_org = admin::create_organization(&app.db.pool, "bravo")
        .await
        .unwrap();
    let b_key = new_key(&app.db, b_org).await;
    let b_project = ready_project(&app, &b_key, "bravo-shop").await;
    let foreign = backup(&app, &b_project, "completed", "verified").await;
    let failed = backup(&app, &project, "failed", "pending").await;
    let pending = backup(&app, &project, "pending", "pending").await;
    let unverified = backup(&app, &project, "completed", "failed").await;
    let jobs = job_count(&app).await;
    let projects = project_count(&app).await;
    let unknown = Uuid::now_v7().to_string();
    for kind in ["new_project", "project"] {
        let token = approve(&app, &project).await["token"].clone();
        let token = (kind == "project").then_some(token);
        let body = |backup: &str| json!({"backup_id": backup, "target_kind": kind, "approval_token": token});
        for (backup, expected, says) in [
            (&foreign, StatusCode::NOT_FOUND, "backup not found"),
            (&unknown, StatusCode::NOT_FOUND, "backup not found"),
            (&failed, StatusCode::CONFLICT, "not completed"),
            (&pending, StatusCode::CONFLICT, "not completed"),
            (&unverified, StatusCode::CONFLICT, "row counts differ"),
        ] {
            let (status, answer) = restore(&app, &project, body(backup)).await;
            assert_eq!(status, expected, "{kind} {backup}: {answer}");
            let error = answer["error"].as_str().unwrap();
            assert!(error.contains(says), "{error}");
        }
    }
    assert_eq!(job_count(&app).await, jobs);
    assert_eq!(project_count(&app).await, projects);
    let used: i64 = sqlx::query_scalar("select count(*) from approvals where used_at is not null")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(used, 0);

    // Bad input: 400 or 422, before anything.
    for body in [
        json!({"backup_id": pending, "target_kind": "elsewhere"}),
        json!({"backup_id": "x", "target_kind": "project"}),
        json!({"backup_id": pending, "target_kind": "new_project", "name": "bad name"}),
    ] {
        let (status, answer) = restore(&app, &project, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    }
    for body in [
        json!({"backup_id": pending, "target_kind": "project", "name": "x", "approval_token": "t"}),
        json!({"backup_id": pending, "target_kind": "new_project", "approval_token": "t"}),
    ] {
        let (status, answer) = restore(&app, &project, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    }
    assert_eq!(job_count(&app).await, jobs);
}

/// Ends a job as a worker would have, and applies its effect on the project.
async fn finish_job(app: &TestApp, job_id: &str, state: &str) {
    let mut tx = app.db.pool.begin().await.unwrap();
    let job: capy_shared::model::Job = sqlx::query_as(&format!(
        "update jobs set state = $2, completed_at = now(),
                error = case $2 when 'failed' then 'pg_restore: boom' end
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

#[tokio::test]
async fn a_restores_outcome_shows_on_its_project() {
    let app = TestApp::new().await;
    let project = ready_project(&app, &app.key, "shop").await;
    let backup_id = backup(&app, &project, "completed", "verified").await;
    let last_error = async || -> (String, Option<String>) {
        sqlx::query_as("select state, last_error from projects where id = $1::uuid")
            .bind(&project)
            .fetch_one(&app.db.pool)
            .await
            .unwrap()
    };
    let mut job_ids = Vec::new();
    for _ in 0..2 {
        let token = approve(&app, &project).await["token"].clone();
        let body =
            json!({"backup_id": backup_id, "target_kind": "project", "approval_token": token});
        let (status, answer) = restore(&app, &project, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        job_ids.push(answer["job"]["id"].as_str().unwrap().to_string());
    }
    finish_job(&app, &job_ids[0], "failed").await;
    assert_eq!(
        last_error().await,
        (
            "ready".into(),
            Some("restore failed: pg_restore: boom".into())
        )
    );
    finish_job(&app, &job_ids[1], "completed").await;
    assert_eq!(last_error().await, ("ready".into(), None));
}
