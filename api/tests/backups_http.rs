#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Backups and exports through the API (no workers: jobs are checked as queued, and
//! their outcomes applied by hand), and the backups' SQL against a fresh database.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use capy_shared::backups;
use capy_shared::model::{Job, JobState, JOB_COLUMNS};
use capy_shared::store::{BackupStore, StoreConfig};
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;
use uuid::Uuid;

/// An app with a folder backup store and a ready project; answers the project's id.
async fn app_with_store() -> (TestApp, String, std::path::PathBuf) {
    let mut app = TestApp::new().await;
    let folder = std::env::temp_dir().join(format!("capy-backups-{}", Uuid::new_v4().simple()));
    let config = StoreConfig {
        url: Some(format!("file://{}", folder.display())),
        ..StoreConfig::default()
    };
    app.state.backup_store = Some(BackupStore::open(&config).unwrap());
    let project = ready_project(&app, "shop").await;
    (app, project, folder)
}

async fn ready_project(app: &TestApp, name: &str) -> String {
    let created = app.create_project(name).await;
    let id = s(&created["project"]["id"]).to_string();
    sqlx::query("update projects set state = 'ready' where id = $1::uuid")
        .bind(&id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    id
}

fn s(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

async fn job(app: &TestApp, id: &str) -> Job {
    sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs where id = $1::uuid"
    ))
    .bind(id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

/// Ends job `id` in `state` with `stdout`, and applies it as a worker would.
async fn finish(app: &TestApp, id: &str, state: &str, stdout: &str, error: Option<&str>) {
    let mut job = job(app, id).await;
    job.state = JobState::parse(state).expect("a job state");
    job.last_stdout = Some(stdout.into());
    job.error = error.map(String::from);
    sqlx::query("update jobs set state = $2 where id = $1")
        .bind(job.id)
        .bind(state)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let mut tx = app.db.pool.begin().await.unwrap();
    capy_shared::effects::apply(&mut tx, &job).await.unwrap();
    tx.commit().await.unwrap();
}

/// A `project.backup` result line.
fn result_line(size: i64) -> String {
    format!(
        "capy-result {}",
        json!({"size_bytes": size, "sha256": "ab".repeat(32), "tables": 1, "rows": 3,
               "extensions": [], "server_version_num": 170000})
    )
}

#[tokio::test]
async fn a_backup_is_queued_listed_and_shown() {
    let (app, project, _) = app_with_store().await;
    let path = format!("/v1/projects/{project}/backups");
    let (status, created) = app
        .call(
            "POST",
            &path,
            Some(&app.key),
            Some(r#"{"label":" nightly "}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let backup = &created["backup"];
    let job = &created["job"];
    assert_eq!(backup["state"], "pending");
    assert_eq!(backup["kind"], "backup");
    assert_eq!(backup["label"], "nightly");
    assert_eq!(backup["verification_state"], "pending");
    assert_eq!(backup["job_id"], job["id"]);
    assert_eq!(job["type"], "project.backup");
    assert_eq!(job["project_id"], project.as_str());
    assert_eq!(job["locked_resource"], format!("project:{project}"));
    let key = format!("projects/{project}/backups/{}.dump", s(&backup["id"]));
    assert_eq!(backup["backup_key"], key.as_str());
    assert_eq!(
        job["args"],
        json!({"backup_id": backup["id"], "backup_key": key})
    );

    let (status, listed) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["backups"], json!([backup]));
    assert_eq!(listed["next_cursor"], Value::Null);
    let one = format!("/v1/backups/{}", s(&backup["id"]));
    let (status, shown) = app.call("GET", &one, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["backup"], *backup);

    // An export is listed apart, and not verified.
    let exports = format!("/v1/projects/{project}/exports");
    let (status, export) = app.call("POST", &exports, Some(&app.key), Some("{}")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{export}");
    assert_eq!(export["export"]["verification_state"], "skipped");
    assert_eq!(export["export"]["kind"], "export");
    let (_, listed) = app.call("GET", &exports, Some(&app.key), None).await;
    assert_eq!(listed["exports"], json!([export["export"]]));
    let (_, listed) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1);
    // A backup is not an export, nor the other way round.
    let (status, _) = app
        .call(
            "GET",
            &format!("/v1/exports/{}", s(&backup["id"])),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Paging: two more backups, pages of two.
    for _ in 0..2 {
        let (status, _) = app.call("POST", &path, Some(&app.key), Some("{}")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let (_, first) = app
        .call("GET", &format!("{path}?limit=2"), Some(&app.key), None)
        .await;
    assert_eq!(first["backups"].as_array().unwrap().len(), 2);
    let cursor = s(&first["next_cursor"]);
    let (_, second) = app
        .call(
            "GET",
            &format!("{path}?limit=2&cursor={cursor}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(second["backups"], json!([backup]), "{second}");
}

#[tokio::test]
async fn the_same_idempotency_key_makes_one_backup() {
    let (app, project, _) = app_with_store().await;
    let send = || async {
        let request = Request::builder()
            .method("POST")
            .uri(format!("/v1/projects/{project}/backups"))
            .header("authorization", format!("Bearer {}", app.key))
            .header("content-type", "application/json")
            .header("idempotency-key", "backup-once")
            .body(Body::from("{}"))
            .unwrap();
        let response = capy_api::router(app.state.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice::<Value>(&bytes).unwrap())
    };
    let (status, first) = send().await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = send().await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(first["backup"]["id"], again["backup"]["id"]);
    assert_eq!(count(&app, "select count(*) from backups").await, 1);
}

#[tokio::test]
async fn refusals_queue_nothing() {
    let (mut app, project, _) = app_with_store().await;
    let path = format!("/v1/projects/{project}/backups");
    let long = json!({ "label": "x".repeat(101) }).to_string();
    let (status, answer) = app.call("POST", &path, Some(&app.key), Some(&long)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(s(&answer["error"]).contains("label"), "{answer}");
    let (status, answer) = app
        .call(
            "GET",
            &format!("/v1/backups/{}", Uuid::now_v7()),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");

    // A project still provisioning, or being deleted, is not backed up.
    let other = app.create_project("fresh").await;
    let other = s(&other["project"]["id"]).to_string();
    let (status, answer) = app
        .call(
            "POST",
            &format!("/v1/projects/{other}/backups"),
            Some(&app.key),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let (status, _) = app
        .call(
            "DELETE",
            &format!("/v1/projects/{project}"),
            Some(&app.key),
            None,
        )
        .await;
    assert!(status.is_success());
    let (status, answer) = app.call("POST", &path, Some(&app.key), Some("{}")).await;
    assert!(
        status == StatusCode::CONFLICT || status == StatusCode::NOT_FOUND,
        "{status} {answer}"
    );

    // Without a store, nothing is made.
    let ready = ready_project(&app, "nostore").await;
    app.state.backup_store = None;
    for what in ["backups", "exports"] {
        let path = format!("/v1/projects/{ready}/{what}");
        let (status, answer) = app.call("POST", &path, Some(&app.key), Some("{}")).await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        assert!(
            s(&answer["error"]).contains("no backup store is configured"),
            "{answer}"
        );
    }
    assert_eq!(count(&app, "select count(*) from backups").await, 0);
    let jobs = "select count(*) from jobs where type like '%backup%'";
    assert_eq!(count(&app, jobs).await, 0);
}

#[tokio::test]
async fn another_organizations_key_finds_no_backup() {
    let (app, project, _) = app_with_store().await;
    let (_, created) = app
        .call(
            "POST",
            &format!("/v1/projects/{project}/backups"),
            Some(&app.key),
            Some("{}"),
        )
        .await;
    let backup = s(&created["backup"]["id"]).to_string();
    let (_, export) = app
        .call(
            "POST",
            &format!("/v1/projects/{project}/exports"),
            Some(&app.key),
            Some("{}"),
        )
        .await;
    let export = s(&export["export"]["id"]).to_string();
    sqlx::query("update backups set state = 'completed'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let other = capy_api::admin::create_organization(&app.db.pool, "other")
        .await
        .unwrap();
    let other_key = common::new_key(&app.db, other).await;
    let before = count(&app, "select count(*) from jobs").await;
    for (method, path) in [
        ("GET", format!("/v1/backups/{backup}")),
        ("DELETE", format!("/v1/backups/{backup}")),
        ("POST", format!("/v1/backups/{backup}/verify")),
        ("GET", format!("/v1/exports/{export}")),
        ("GET", format!("/v1/exports/{export}/download")),
        ("GET", format!("/v1/projects/{project}/backups")),
        ("POST", format!("/v1/projects/{project}/backups")),
        (
            "GET",
            format!("/v1/projects/{project}/scheduled-backups/default"),
        ),
    ] {
        let body = (method == "POST").then_some("{}");
        let (status, answer) = app.call(method, &path, Some(&other_key), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        assert!(!answer.to_string().contains(&backup), "{answer}");
    }
    assert_eq!(count(&app, "select count(*) from jobs").await, before);
    assert_eq!(
        count(
            &app,
            "select count(*) from backups where state = 'completed'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn the_default_schedule_round_trips() {
    let (app, project, _) = app_with_store().await;
    let path = format!("/v1/projects/{project}/scheduled-backups/default");
    let (status, answer) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    for (body, field) in [
        (
            r#"{"cron_hour":24,"cron_minute":0,"is_active":true}"#,
            "cron_hour",
        ),
        (
            r#"{"cron_hour":1,"cron_minute":60,"is_active":true}"#,
            "cron_minute",
        ),
        (
            r#"{"cron_hour":1,"cron_minute":0,"is_active":true,"retention_days":0}"#,
            "retention_days",
        ),
    ] {
        let (status, answer) = app.call("PUT", &path, Some(&app.key), Some(body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert!(s(&answer["error"]).contains(field), "{answer}");
    }
    assert_eq!(count(&app, "select count(*) from periodic_jobs").await, 0);

    let body =
        r#"{"cron_hour":3,"cron_minute":15,"is_active":true,"label":"daily","retention_days":14}"#;
    let (status, put) = app.call("PUT", &path, Some(&app.key), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(put["name"], "default");
    assert_eq!(put["project_id"], project.as_str());
    assert_eq!(
        (&put["cron_hour"], &put["cron_minute"]),
        (&json!(3), &json!(15))
    );
    assert_eq!(
        (&put["label"], &put["retention_days"]),
        (&json!("daily"), &json!(14))
    );
    let next: chrono::DateTime<chrono::Utc> = s(&put["next_run_at"]).parse().unwrap();
    assert!(next > chrono::Utc::now());
    assert!(next <= chrono::Utc::now() + chrono::Duration::days(1));
    assert_eq!(next.format("%H:%M").to_string(), "03:15");
    let (status, got) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, put);

    let row: (String, i32, bool, Value) = sqlx::query_as(
        "select job_type, minute_of_day, is_active, args from periodic_jobs where name = $1",
    )
    .bind(format!("project:{project}:backup:default"))
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "project.backup".into(),
            195,
            true,
            json!({"label": "daily", "retention_days": 14, "schedule_name": "default"})
        )
    );

    // PUT replaces; inactive stays inactive; retention defaults to 7.
    let body = r#"{"cron_hour":0,"cron_minute":0,"is_active":false}"#;
    let (status, put) = app.call("PUT", &path, Some(&app.key), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(
        (&put["is_active"], &put["retention_days"]),
        (&json!(false), &json!(7))
    );
    assert_eq!(put["label"], Value::Null);
    assert_eq!(count(&app, "select count(*) from periodic_jobs").await, 1);
    assert_eq!(
        count(&app, "select count(*) from periodic_jobs where is_active").await,
        0
    );
}

#[tokio::test]
async fn deleting_twice_queues_one_job_and_verify_queues_its_job() {
    let (app, project, _) = app_with_store().await;
    let (_, created) = app
        .call(
            "POST",
            &format!("/v1/projects/{project}/backups"),
            Some(&app.key),
            Some("{}"),
        )
        .await;
    let id = s(&created["backup"]["id"]).to_string();
    let path = format!("/v1/backups/{id}");
    // Still being made: neither deleted nor verified.
    let (status, answer) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let verify = format!("{path}/verify");
    let (status, answer) = app.call("POST", &verify, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");

    // The dump completes: its result is recorded and a verification queued.
    finish(
        &app,
        s(&created["job"]["id"]),
        "completed",
        &result_line(42),
        None,
    )
    .await;
    let (_, shown) = app.call("GET", &path, Some(&app.key), None).await;
    let backup = &shown["backup"];
    assert_eq!(backup["state"], "completed", "{shown}");
    assert_eq!(backup["size_bytes"], 42);
    assert_eq!(backup["sha256"], "ab".repeat(32));
    assert_eq!(
        backup["expires_at"],
        Value::Null,
        "an unscheduled backup is kept"
    );
    let verify_jobs = format!(
        "select count(*) from jobs where type = 'project.backup_verify' and locked_resource = 'project:{project}'"
    );
    assert_eq!(count(&app, &verify_jobs).await, 1);
    // Asking again answers the job in flight.
    let (status, verified) = app.call("POST", &verify, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{verified}");
    assert_eq!(verified["job"]["type"], "project.backup_verify");
    assert_eq!(verified["job"]["args"]["backup_id"], id.as_str());
    assert_eq!(count(&app, &verify_jobs).await, 1);
    // A verification refused because its project went says nothing of the archive.
    let gone = format!(
        "{}: this project.backup_verify job does not run",
        capy_shared::queue::PROJECT_GONE_ERROR
    );
    finish(&app, s(&verified["job"]["id"]), "failed", "", Some(&gone)).await;
    let (_, shown) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(shown["backup"]["verification_state"], "skipped", "{shown}");
    let (status, verified) = app.call("POST", &verify, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{verified}");
    finish(
        &app,
        s(&verified["job"]["id"]),
        "failed",
        "",
        Some("rows differ in public.t"),
    )
    .await;
    let (_, shown) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(shown["backup"]["verification_state"], "failed");
    assert_eq!(
        shown["backup"]["verification_error"],
        "rows differ in public.t"
    );

    let (status, deleted) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{deleted}");
    assert_eq!(deleted["backup"]["state"], "deleting");
    let job = &deleted["job"];
    assert_eq!(job["type"], "backup.delete");
    assert_eq!(job["project_id"], Value::Null);
    assert_eq!(
        job["organization_id"],
        app.organization_id.to_string().as_str()
    );
    assert_eq!(job["locked_resource"], format!("backup:{id}"));
    let (status, again) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["job"]["id"], job["id"]);
    assert_eq!(again["backup"]["state"], "deleting");
    let delete_jobs = "select count(*) from jobs where type = 'backup.delete'";
    assert_eq!(count(&app, delete_jobs).await, 1);

    finish(&app, s(&job["id"]), "completed", "", None).await;
    let (status, again) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["backup"]["state"], "deleted");
    assert_eq!(count(&app, delete_jobs).await, 1);
    let (_, listed) = app
        .call(
            "GET",
            &format!("/v1/projects/{project}/backups"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(
        listed["backups"],
        json!([]),
        "deleted backups are not listed"
    );
}

/// Completes export `id` by hand: its row, and `bytes` as its archive in the folder.
async fn complete_export(app: &TestApp, folder: &std::path::Path, id: &str, bytes: &[u8]) {
    let key: String = sqlx::query_scalar(
        "update backups set state = 'completed', completed_at = now() where id = $1::uuid
         returning backup_key",
    )
    .bind(id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let file = folder.join(&key);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, bytes).unwrap();
}

/// GET `path` without a key; answers status, headers and the raw body.
async fn fetch(app: &TestApp, path: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let request = Request::builder().uri(path).body(Body::empty()).unwrap();
    let response = capy_api::router(app.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, bytes.to_vec())
}

#[tokio::test]
async fn a_completed_export_downloads_through_a_signed_url() {
    let (app, project, folder) = app_with_store().await;
    let (_, created) = app
        .call(
            "POST",
            &format!("/v1/projects/{project}/exports"),
            Some(&app.key),
            Some("{}"),
        )
        .await;
    let id = s(&created["export"]["id"]).to_string();
    let download = format!("/v1/exports/{id}/download");
    let (status, answer) = app.call("GET", &download, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "not completed yet: {answer}");

    let archive = b"PGDMP\x01\x02 not really a dump".to_vec();
    complete_export(&app, &folder, &id, &archive).await;
    let (status, answer) = app.call("GET", &download, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let url = s(&answer["url"]);
    let path = url
        .strip_prefix(app.state.settings.public_url.as_str())
        .unwrap();
    assert!(
        path.starts_with(&format!("/v1/exports/{id}/file?expires=")),
        "{url}"
    );
    let expires: chrono::DateTime<chrono::Utc> = s(&answer["expires_at"]).parse().unwrap();
    assert!(expires > chrono::Utc::now() + chrono::Duration::minutes(4));

    let (status, headers, body) = fetch(&app, path).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, archive);
    assert_eq!(headers["content-type"], "application/octet-stream");
    let disposition = headers["content-disposition"].to_str().unwrap();
    assert!(
        disposition.starts_with("attachment; filename="),
        "{disposition}"
    );
    assert!(
        disposition.contains(&format!("-{id}.dump")),
        "{disposition}"
    );

    // Altered, unsigned, another export's, or expired: 403.
    let (head, last) = path.split_at(path.len() - 1);
    let tampered = format!("{head}{}", if last == "0" { "1" } else { "0" });
    let other = path.replace(&id, &Uuid::now_v7().to_string());
    let unsigned = format!("/v1/exports/{id}/file");
    let past = chrono::Utc::now().timestamp() - 10;
    let signature = app.state.secrets.sign(&format!("{id}.{past}"));
    let expired = format!("/v1/exports/{id}/file?expires={past}&signature={signature}");
    for bad in [&tampered, &other, &unsigned, &expired] {
        let (status, _, body) = fetch(&app, bad).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{bad}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(!body.starts_with(b"PGDMP"));
    }

    // The download URL needs credentials:read.
    let reader = capy_api::admin::create_api_key(
        &app.db.pool,
        &capy_api::admin::KeyGrant {
            name: "reader".into(),
            organization_id: Some(app.organization_id),
            scopes: Some(vec!["read".into(), "write".into()]),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .1;
    let (status, _) = app.call("GET", &download, Some(&reader), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn outcomes_and_expiry_apply_once() {
    let (app, project, _) = app_with_store().await;
    let project: Uuid = project.parse().unwrap();
    let mut tx = app.db.pool.begin().await.unwrap();
    let new = backups::NewBackup {
        project_id: project,
        kind: capy_shared::model::BackupKind::Backup,
        label: None,
        schedule_name: Some("default".into()),
        retention_days: Some(3),
        max_attempts: 2,
    };
    let (backup, job) = backups::queue_backup(&mut tx, &new).await.unwrap().unwrap();
    tx.commit().await.unwrap();
    assert_eq!(backup.schedule_name.as_deref(), Some("default"));
    let export_new = backups::NewBackup {
        kind: capy_shared::model::BackupKind::Export,
        schedule_name: None,
        retention_days: None,
        ..new.clone()
    };
    let mut tx = app.db.pool.begin().await.unwrap();
    let (export, export_job) = backups::queue_backup(&mut tx, &export_new)
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();

    // Applied twice, a completion queues one verification.
    finish(
        &app,
        &job.id.to_string(),
        "completed",
        &result_line(7),
        None,
    )
    .await;
    finish(
        &app,
        &job.id.to_string(),
        "completed",
        &result_line(7),
        None,
    )
    .await;
    let verify = "select count(*) from jobs where type = 'project.backup_verify'";
    assert_eq!(count(&app, verify).await, 1);
    let days: f64 = sqlx::query_scalar(
        "select (extract(epoch from expires_at - completed_at) / 86400)::float8 from backups where id = $1",
    )
    .bind(backup.id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!((days - 3.0).abs() < 0.01, "{days}");
    // An export expires after 7 days and is never verified; a failure is recorded.
    finish(
        &app,
        &export_job.id.to_string(),
        "failed",
        "",
        Some("pg_dump: error"),
    )
    .await;
    let (state, error): (String, Option<String>) =
        sqlx::query_as("select state, error from backups where id = $1")
            .bind(export.id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), error.as_deref()),
        ("failed", Some("pg_dump: error"))
    );
    assert_eq!(count(&app, verify).await, 1);

    // Past their expiry, both are marked and each gets one delete, however many run.
    sqlx::query("update backups set expires_at = now() - interval '1 minute'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let run = || async {
        let mut tx = app.db.pool.begin().await.unwrap();
        let marked = backups::expire(&mut tx, 10).await.unwrap();
        tx.commit().await.unwrap();
        marked
    };
    let (a, b, c) = tokio::join!(run(), run(), run());
    assert_eq!(a + b + c, 2);
    let deletes = "select count(*) from jobs where type = 'backup.delete' and project_id is null \
                   and organization_id is not null and locked_resource like 'backup:%'";
    assert_eq!(count(&app, deletes).await, 2);
    assert_eq!(
        count(
            &app,
            "select count(*) from backups where state = 'deleting'"
        )
        .await,
        2
    );
    assert_eq!(run().await, 0);

    // A delete that failed leaves the backup deleting; asking again queues another.
    let failed: String = sqlx::query_scalar(
        "select id::text from jobs where type = 'backup.delete' and args->>'backup_id' = $1",
    )
    .bind(backup.id.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    finish(&app, &failed, "failed", "", Some("store unreachable")).await;
    let mut tx = app.db.pool.begin().await.unwrap();
    let (again, retry) = backups::request_delete(&mut tx, backup.id, 2)
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(again.state, capy_shared::model::BackupState::Deleting);
    assert_ne!(retry.id.to_string(), failed);
    assert_eq!(count(&app, deletes).await, 3);

    // A project being deleted gets no backup.
    sqlx::query("update projects set state = 'deleting' where id = $1")
        .bind(project)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let mut tx = app.db.pool.begin().await.unwrap();
    assert!(backups::queue_backup(&mut tx, &new)
        .await
        .unwrap()
        .is_none());
}
