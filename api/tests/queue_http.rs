#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! `GET /v1/queue`: each key counts its own jobs only (organization, project, or the
//! fleet for platform admins), and only admins see the workers.

mod common;

use axum::http::StatusCode;
use capy_api::admin::{self, KeyGrant};
use common::{new_key, TestApp};
use serde_json::Value;
use uuid::Uuid;

fn job_of(created: &Value) -> Uuid {
    created["job"]["id"].as_str().unwrap().parse().unwrap()
}

async fn overview(app: &TestApp, key: &str, query: &str) -> Value {
    let (status, body) = app
        .call("GET", &format!("/v1/queue{query}"), Some(key), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn type_counts<'a>(body: &'a Value, job_type: &str) -> &'a Value {
    body["by_type"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == job_type)
        .unwrap_or_else(|| panic!("no {job_type} in {body}"))
}

#[tokio::test]
async fn each_key_counts_its_own_jobs_and_only_admins_see_workers() {
    let app = TestApp::new().await;
    let pool = &app.db.pool;
    // Organization A: P1's job held by worker w2, P2's failed on w1, P4's pending.
    let p1 = app.create_project("queue-p1").await;
    let p2 = app.create_project("queue-p2").await;
    app.create_project("queue-p4").await;
    sqlx::query(
        "update jobs set state = 'claimed', claimed_by = 'w2', claimed_at = now(),
                         lease_expires_at = now() + interval '1 minute', attempts = 1
         where id = $1",
    )
    .bind(job_of(&p1))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "update jobs set state = 'failed', claimed_by = 'w1', completed_at = now(), attempts = 1
         where id = $1",
    )
    .bind(job_of(&p2))
    .execute(pool)
    .await
    .unwrap();
    // Organization B: one pending job.
    let b_org = admin::create_organization(pool, "queue-b").await.unwrap();
    let b_key = new_key(&app.db, b_org).await;
    let (status, _) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&b_key),
            Some(r#"{"name":"queue-b1"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let a = overview(&app, &app.key, "").await;
    assert_eq!(a["scope"], "organization");
    assert_eq!(
        (a["pending"].as_i64(), a["claimed"].as_i64()),
        (Some(1), Some(1)),
        "{a}"
    );
    let creates = type_counts(&a, "project.create");
    assert_eq!(
        (&creates["pending"], &creates["claimed"], &creates["failed"]),
        (&Value::from(1), &Value::from(1), &Value::from(1)),
        "{a}"
    );
    assert_eq!(a["last_hour"]["failed"], 1, "{a}");
    assert_eq!(a["last_hour"]["failure_rate"], 1.0, "{a}");
    assert_eq!(a["last_hour"]["buckets"].as_array().unwrap().len(), 12);
    assert!(
        a["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0,
        "{a}"
    );
    assert!(
        a["workers"].is_null(),
        "an organization key sees no workers: {a}"
    );
    // An admin asking for A's figures gets the same counts.
    let a_by_admin = overview(
        &app,
        &app.admin_key,
        &format!("?organization_id={}", app.organization_id),
    )
    .await;
    assert_eq!(a_by_admin["pending"], a["pending"]);

    let b = overview(&app, &b_key, "").await;
    assert_eq!(
        (b["pending"].as_i64(), b["claimed"].as_i64()),
        (Some(1), Some(0)),
        "{b}"
    );
    assert_eq!(b["last_hour"]["failed"], 0, "A's failure is not B's: {b}");
    // An organization key's organization_id is its own, whatever it asks for.
    let b_asks_for_a = overview(
        &app,
        &b_key,
        &format!("?organization_id={}", app.organization_id),
    )
    .await;
    assert_eq!(b_asks_for_a["pending"], b["pending"], "{b_asks_for_a}");

    let narrowed = admin::create_api_key(
        pool,
        &KeyGrant {
            name: "p1".into(),
            organization_id: Some(app.organization_id),
            project_id: Some(p1["project"]["id"].as_str().unwrap().parse().unwrap()),
            ..KeyGrant::default()
        },
    )
    .await
    .unwrap()
    .1;
    let p1_only = overview(&app, &narrowed, "").await;
    assert_eq!(p1_only["scope"], "project");
    assert_eq!(
        (p1_only["pending"].as_i64(), p1_only["claimed"].as_i64()),
        (Some(0), Some(1)),
        "{p1_only}"
    );

    let fleet = overview(&app, &app.admin_key, "").await;
    assert_eq!(fleet["scope"], "fleet");
    assert!(fleet["pending"].as_i64().unwrap() >= 2, "{fleet}");
    let workers = fleet["workers"].as_array().unwrap();
    let worker = |name: &str| {
        workers
            .iter()
            .find(|w| w["worker"] == name)
            .unwrap_or_else(|| panic!("no {name}: {fleet}"))
    };
    assert_eq!(worker("w2")["in_flight"], 1);
    assert_eq!(worker("w2")["jobs"][0], p1["job"]["id"]);
    assert_eq!(worker("w1")["in_flight"], 0, "w1 finished its job: {fleet}");
}

#[tokio::test]
async fn unknown_parameters_and_keys_without_read_are_refused() {
    let app = TestApp::new().await;
    let (status, body) = app
        .call("GET", "/v1/queue?state=pending", Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let write_only = admin::create_api_key(
        &app.db.pool,
        &KeyGrant {
            name: "w".into(),
            organization_id: Some(app.organization_id),
            scopes: Some(vec!["write".into()]),
            ..KeyGrant::default()
        },
    )
    .await
    .unwrap()
    .1;
    let (status, body) = app.call("GET", "/v1/queue", Some(&write_only), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = app.call("GET", "/v1/queue", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
