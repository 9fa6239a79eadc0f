#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Lifecycles that stay dead: no job of a deleted project runs again (the API refuses
//! the retry, the worker refuses the step); keys cannot outlive the keys that made
//! them nor the project they are narrowed to; an Idempotency-Key's answer commits with
//! the work it guards. Over HTTP (the router, no port) against the real control
//! database; the resurrection test runs real worker processes against the test cluster.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use capy_testkit::{cluster, ProcessStack};
use common::TestApp;
use serde_json::Value;

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"))
}

fn id_of(value: &Value) -> String {
    value["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {value}"))
        .to_string()
}

/// Waits until job `id` has ended (completed, failed or cancelled); answers its state
/// and error.
async fn wait_for_end(app: &TestApp, id: &str) -> (String, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (state, error): (String, Option<String>) =
            sqlx::query_as("select state, error from jobs where id = $1::uuid")
                .bind(id)
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        if matches!(state.as_str(), "completed" | "failed" | "cancelled") {
            return (state, error);
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still {state} after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether database `name` exists on the test cluster.
async fn database_exists(name: &str) -> bool {
    let admin = sqlx::PgPool::connect(&cluster().unwrap().admin_url_for("postgres"))
        .await
        .unwrap();
    let exists = sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
        .bind(name)
        .fetch_one(&admin)
        .await
        .unwrap();
    admin.close().await;
    exists
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_project_stays_deleted_whatever_job_is_retried() {
    let app = TestApp::new().await;
    // Queued with no worker running, so every step is decided before any runs.
    let (status, created) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"phoenix"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let project_id = id_of(&created["project"]);
    let first_job = id_of(&created["job"]);
    let (database, role): (String, String) =
        sqlx::query_as("select database_name, role_name from projects where id = $1::uuid")
            .bind(&project_id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();

    let (status, body) = app
        .call(
            "POST",
            &format!("/v1/jobs/{first_job}/cancel"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .call(
            "POST",
            &format!("/v1/projects/{project_id}/retry-provisioning"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // Pending when the delete is queued: it waits behind locked_resource, and must not
    // create the database once the project is being deleted.
    let pending_create = id_of(&body["job"]);
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/v1/projects/{project_id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let delete_job = id_of(&body["job"]);

    let env = [("CAPY_RETRY_BASE_DELAY_MS", "50".to_string())];
    let _workers = ProcessStack::start(&app.db.url, 1, &env).await.unwrap();
    let (state, error) = wait_for_end(&app, &pending_create).await;
    assert_eq!(state, "failed", "the create queued before the delete ran");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("deleted or being deleted")),
        "{error:?}"
    );
    assert_eq!(wait_for_end(&app, &delete_job).await.0, "completed");
    let (status, _) = app
        .call(
            "GET",
            &format!("/v1/projects/{project_id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The API refuses to run any of its jobs again, with a reason.
    for job in [&first_job, &pending_create] {
        let (status, body) = app
            .call(
                "POST",
                &format!("/v1/jobs/{job}/retry"),
                Some(&app.key),
                None,
            )
            .await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "retrying a job of a deleted project: {body}"
        );
        assert!(
            error_of(&body).contains("deleted or being deleted"),
            "{body}"
        );
    }

    // And should a job of it be queued anyway (an older API, a hand-edited row), the
    // worker does not run its step.
    sqlx::query(
        "update jobs set state = 'pending', run_at = now(), completed_at = null,
                max_attempts = attempts + 3, seq = default
         where id = $1::uuid",
    )
    .bind(&first_job)
    .execute(&app.db.pool)
    .await
    .unwrap();
    sqlx::query("select pg_notify('capy_jobs', '')")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (state, error) = wait_for_end(&app, &first_job).await;
    assert_eq!(state, "failed", "{error:?}");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("deleted or being deleted")),
        "{error:?}"
    );
    assert!(
        !database_exists(&database).await,
        "database {database} (role {role}) came back after its project was deleted"
    );
}
