#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Lifecycles that stay dead: no job of a deleted project runs again (the API refuses
//! the retry, the worker refuses the step); keys cannot outlive the keys that made
//! them nor the project they are narrowed to; an Idempotency-Key's answer commits with
//! the work it guards. Over HTTP (the router, no port) against the real control
//! database; the resurrection test runs real worker processes against the test cluster.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use capy_api::router;
use capy_testkit::{cluster, ProcessStack};
use chrono::{DateTime, Utc};
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

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

// ---------------------------------------------------------------------------------
// Keys: none outlives the key that made it, nor the project it is narrowed to.

/// Creates a key with `creator`; answers its plaintext and record.
/// A delete that fails or is cancelled leaves the project `deleting` (with the reason),
/// never live again: provisioning cannot be retried nor settings changed, and DELETE
/// again queues a new delete. (An older capy turned it back to `error`, which is live.)
#[tokio::test]
async fn a_cancelled_delete_never_brings_the_project_back() {
    let app = TestApp::new().await;
    let (status, created) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"lazarus"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let project_id = id_of(&created["project"]);
    let (status, deleting) = app
        .call(
            "DELETE",
            &format!("/v1/projects/{project_id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{deleting}");
    let delete_job = id_of(&deleting["job"]);
    let (status, body) = app
        .call(
            "POST",
            &format!("/v1/jobs/{delete_job}/cancel"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (state, last_error): (String, Option<String>) =
        sqlx::query_as("select state, last_error from projects where id = $1::uuid")
            .bind(&project_id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        state, "deleting",
        "a cancelled delete made the project live again"
    );
    assert_eq!(last_error.as_deref(), Some("deletion was cancelled"));
    let (status, body) = app
        .call(
            "POST",
            &format!("/v1/projects/{project_id}/retry-provisioning"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "retry-provisioning after a cancelled delete: {body}"
    );
    let (status, again) = app
        .call(
            "DELETE",
            &format!("/v1/projects/{project_id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_ne!(
        id_of(&again["job"]),
        delete_job,
        "DELETE again queues a new delete"
    );
}

async fn make_key(app: &TestApp, creator: &str, body: Value) -> (String, Value) {
    let (status, answer) = app
        .call(
            "POST",
            "/v1/api_keys",
            Some(creator),
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body} → {answer}");
    (
        answer["key"].as_str().unwrap().to_string(),
        answer["api_key"].clone(),
    )
}

/// What `GET /v1/me` answers `key`: 200, or 401 with the reason.
async fn me(app: &TestApp, key: &str) -> (StatusCode, Value) {
    app.call("GET", "/v1/me", Some(key), None).await
}

async fn assert_refused(app: &TestApp, key: &str, why: &str) {
    let (status, body) = me(app, key).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the key still works: {body}"
    );
    assert!(error_of(&body).contains(why), "{body}");
}

fn expiry(record: &Value) -> Option<DateTime<Utc>> {
    record["expires_at"].as_str().map(|at| at.parse().unwrap())
}

#[tokio::test]
async fn a_key_cannot_outlive_the_key_that_made_it() {
    let app = TestApp::new().await;
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    let (k1, r1) = make_key(
        &app,
        &app.key,
        json!({"name": "k1", "expires_at": in_an_hour.to_rfc3339()}),
    )
    .await;
    // No expiry asked: the maker's.
    let (k2, r2) = make_key(&app, &k1, json!({"name": "k2"})).await;
    assert_eq!(expiry(&r2), expiry(&r1), "{r2}");
    assert_eq!(r2["created_by_key_id"], r1["id"], "{r2}");
    // Later than the maker's: refused, with the reason.
    let later = in_an_hour + chrono::Duration::hours(1);
    let (status, body) = app
        .call(
            "POST",
            "/v1/api_keys",
            Some(&k2),
            Some(&json!({"name": "k3", "expires_at": later.to_rfc3339()}).to_string()),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a key made a key that outlives it: {body}"
    );
    assert!(error_of(&body).contains("outlive"), "{body}");
    // Earlier is fine.
    let sooner = Utc::now() + chrono::Duration::minutes(30);
    let (k4, r4) = make_key(
        &app,
        &k2,
        json!({"name": "k4", "expires_at": sooner.to_rfc3339()}),
    )
    .await;
    assert_eq!(
        expiry(&r4).map(|at| at.timestamp()),
        Some(sooner.timestamp())
    );
    assert_eq!(me(&app, &k4).await.0, StatusCode::OK);

    // When k1 expires (brought forward here, as time would), everything it made ends
    // with it, whatever their own expiry says.
    sqlx::query("update api_keys set expires_at = now() - interval '1 second' where id = $1::uuid")
        .bind(r1["id"].as_str().unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_refused(&app, &k1, "expired").await;
    for key in [&k2, &k4] {
        assert_refused(&app, key, "made this key has expired").await;
    }
    assert_eq!(me(&app, &app.key).await.0, StatusCode::OK);
}

#[tokio::test]
async fn revoking_a_key_ends_every_key_it_made_transitively() {
    let app = TestApp::new().await;
    let (k1, r1) = make_key(&app, &app.key, json!({"name": "k1"})).await;
    let (k2, r2) = make_key(&app, &k1, json!({"name": "k2"})).await;
    let (k3, r3) = make_key(&app, &k2, json!({"name": "k3"})).await;
    let (sibling, sibling_record) = make_key(&app, &app.key, json!({"name": "sibling"})).await;
    for key in [&k1, &k2, &k3, &sibling] {
        assert_eq!(me(&app, key).await.0, StatusCode::OK);
    }

    let (status, body) = app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{}", r1["id"].as_str().unwrap()),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for key in [&k1, &k2, &k3] {
        assert_refused(&app, key, "revoked").await;
    }
    assert_eq!(me(&app, &sibling).await.0, StatusCode::OK);
    assert_eq!(me(&app, &app.key).await.0, StatusCode::OK);
    let (_, list) = app.call("GET", "/v1/api_keys", Some(&app.key), None).await;
    for made in [&r2, &r3] {
        let shown = list["api_keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == made["id"])
            .unwrap();
        assert!(shown["revoked_at"].is_string(), "shown as live: {shown}");
    }

    // Authentication reads the lineage itself: a maker revoked without the cascade
    // (a key made while the revoke ran, say) still ends what it made.
    let (made_by_sibling, _) = make_key(&app, &sibling, json!({"name": "grandchild"})).await;
    sqlx::query("update api_keys set revoked_at = now() where id = $1::uuid")
        .bind(sibling_record["id"].as_str().unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_refused(&app, &made_by_sibling, "made this key has been revoked").await;
}

#[tokio::test]
async fn deleting_a_project_ends_the_keys_narrowed_to_it() {
    let app = TestApp::new().await;
    let mut projects = Vec::new();
    for name in ["doomed", "gone-by-worker"] {
        let (status, body) = app
            .call(
                "POST",
                "/v1/projects",
                Some(&app.key),
                Some(&json!({ "name": name }).to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        projects.push(id_of(&body["project"]));
    }
    let (narrowed, _) = make_key(
        &app,
        &app.key,
        json!({"name": "narrowed", "project_id": projects[0]}),
    )
    .await;
    let (made_by_narrowed, _) = make_key(&app, &narrowed, json!({"name": "its own"})).await;
    let path = format!("/v1/projects/{}", projects[0]);
    assert_eq!(
        app.call("GET", &path, Some(&made_by_narrowed), None)
            .await
            .0,
        StatusCode::OK
    );

    let (status, body) = app.call("DELETE", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    for key in [&narrowed, &made_by_narrowed] {
        assert_refused(&app, key, "revoked").await;
    }
    // No new key narrowed to it either.
    let (status, body) = app
        .call(
            "POST",
            "/v1/api_keys",
            Some(&app.key),
            Some(&json!({"name": "late", "project_id": projects[0]}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // A project deleted by other means (a worker's delete, an instant database's
    // expiry) ends its keys at authentication.
    let (other, _) = make_key(
        &app,
        &app.key,
        json!({"name": "other", "project_id": projects[1]}),
    )
    .await;
    assert_eq!(me(&app, &other).await.0, StatusCode::OK);
    sqlx::query("update projects set state = 'deleted', deleted_at = now() where id = $1::uuid")
        .bind(&projects[1])
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_refused(&app, &other, "narrowed to is deleted").await;
    assert_eq!(me(&app, &app.key).await.0, StatusCode::OK);
}

// ---------------------------------------------------------------------------------
// Idempotency-Key: the answer commits with the work it guards.

/// Sends a POST with an Idempotency-Key; answers status and body.
async fn post_with_key(
    app: &TestApp,
    idempotency_key: &str,
    path: &str,
    body: &str,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method("POST")
        .uri(path)
        .header("authorization", format!("Bearer {}", app.key))
        .header("content-type", "application/json")
        .header("idempotency-key", idempotency_key)
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router(app.state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn keys_named(app: &TestApp, name: &str) -> i64 {
    sqlx::query_scalar("select count(*) from api_keys where name = $1")
        .bind(name)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// Makes storing an Idempotency-Key's answer fail, in the database itself, until the
/// answer returned is dropped.
async fn break_answer_storage(app: &TestApp) {
    for statement in [
        "create function capy_test_refuse_answer() returns trigger language plpgsql as $$
         begin raise exception 'injected failure: the answer cannot be stored'; end $$",
        "create trigger refuse_answer before update on idempotency_keys for each row
         when (new.status is not null) execute function capy_test_refuse_answer()",
    ] {
        sqlx::query(statement).execute(&app.db.pool).await.unwrap();
    }
}

async fn repair_answer_storage(app: &TestApp) {
    sqlx::query("drop trigger refuse_answer on idempotency_keys")
        .execute(&app.db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failure_storing_the_answer_never_runs_the_request_twice() {
    let app = TestApp::new().await;
    let body = r#"{"name":"exactly-once"}"#;
    break_answer_storage(&app).await;
    let (status, answer) = post_with_key(&app, "idem-1", "/v1/api_keys", body).await;
    assert!(status.is_server_error(), "{status} {answer}");
    repair_answer_storage(&app).await;
    // The request is presumed dead once its hold runs out (brought forward here): its
    // key may be taken again.
    sqlx::query(
        "update idempotency_keys set created_at = now() - interval '10 minutes'
         where status is null",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();

    let (status, answer) = post_with_key(&app, "idem-1", "/v1/api_keys", body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        keys_named(&app, "exactly-once").await,
        1,
        "the request ran twice: its work committed without its answer"
    );
    let (status, replayed) = post_with_key(&app, "idem-1", "/v1/api_keys", body).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(replayed, answer, "the stored answer is the one sent");
    assert_eq!(keys_named(&app, "exactly-once").await, 1);
}

#[tokio::test]
async fn a_reservation_holds_while_its_request_lives_and_is_taken_again_after() {
    let app = TestApp::new().await;
    let scope = capy_shared::crypto::hash_api_key(&format!("Bearer {}", app.key));
    let path = "/v1/projects";
    let body = r#"{"name":"held"}"#;
    // A request holding the key (no answer yet): a repeat is refused, not run.
    sqlx::query(
        "insert into idempotency_keys (scope, key, request_hash, reservation)
         values ($1, 'held',
                 sha256(convert_to($2, 'UTF8') || '\\x00'::bytea || convert_to($3, 'UTF8')),
                 gen_random_uuid())",
    )
    .bind(&scope)
    .bind(path)
    .bind(body)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let (status, answer) = post_with_key(&app, "held", path, body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(error_of(&answer).contains("still running"), "{answer}");
    // Once its request is presumed dead, the key is taken again and the work done.
    sqlx::query("update idempotency_keys set created_at = now() - interval '10 minutes'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, answer) = post_with_key(&app, "held", path, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let stored: (Option<i16>, bool) =
        sqlx::query_as("select status, body is not null from idempotency_keys where key = 'held'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(stored, (Some(202), true));
}

/// How many backends of this database wait on a lock.
async fn lock_waiters(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database() and wait_event_type = 'Lock'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

/// Waits until `count` backends of this database wait on a lock.
async fn wait_for_lock_waiters(app: &TestApp, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting = lock_waiters(app).await;
        if waiting >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} of {count} requests waiting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_presumed_dead_cannot_commit_once_its_key_is_taken_again() {
    let app = TestApp::new().await;
    let body = r#"{"name":"slow"}"#;
    // New keys wait (their insert needs a lock this holds); reads go on.
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("lock table api_keys in share mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let first = {
        let app_state = app.state.clone();
        let key = app.key.clone();
        tokio::spawn(async move { send_post(app_state, &key, "slow", body).await })
    };
    wait_for_lock_waiters(&app, 1).await;
    // The first request has held its key past the hold: presumed dead, the repeat
    // takes the key and runs.
    sqlx::query("update idempotency_keys set created_at = now() - interval '10 minutes'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let second = {
        let app_state = app.state.clone();
        let key = app.key.clone();
        tokio::spawn(async move { send_post(app_state, &key, "slow", body).await })
    };
    wait_for_lock_waiters(&app, 2).await;
    // The key's row (now the second request's) is held too, so whichever request
    // would store its answer there waits: the first request, if it tried (it must
    // not), would be first in line.
    let mut row_holder = app.db.pool.begin().await.unwrap();
    sqlx::query("select 1 from idempotency_keys where key = 'slow' for update")
        .execute(&mut *row_holder)
        .await
        .unwrap();
    blocker.commit().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !first.is_finished() && lock_waiters(&app).await < 2 {
        assert!(
            Instant::now() < deadline,
            "the first request neither ended nor waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    row_holder.commit().await.unwrap();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());

    assert_eq!(
        keys_named(&app, "slow").await,
        1,
        "both requests did the work: {first:?} / {second:?}"
    );
    assert_eq!(first.0, StatusCode::CONFLICT, "{first:?}");
    assert!(
        error_of(&first.1).contains("taken by a repeat"),
        "{first:?}"
    );
    assert_eq!(second.0, StatusCode::CREATED, "{second:?}");
    // The key answers the second request's answer from now on.
    let (status, replayed) = post_with_key(&app, "slow", "/v1/api_keys", body).await;
    assert_eq!((status, &replayed), (StatusCode::CREATED, &second.1));
}

async fn send_post(
    state: capy_api::AppState,
    key: &str,
    idempotency_key: &str,
    body: &str,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method("POST")
        .uri("/v1/api_keys")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("idempotency-key", idempotency_key)
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}
