#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! One client cannot fill a cluster's bound of instant databases: it holds at most its
//! cap of live unclaimed ones (per IPv4 address or IPv6 /64, and per IPv6 /48), from
//! the pool or made on the spot, however many requests it sends at once. At the cap
//! the answer is 429 in Instagres's shape with a hint and Retry-After, and nothing is
//! taken or queued; claiming one or its expiry frees a place.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use capy_shared::instant::ClientCaps;
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;

/// `POST /v1/databases` from `peer`: status, Retry-After and body.
async fn post(app: &TestApp, peer: &str) -> (StatusCode, Option<u64>, Value) {
    let peer: IpAddr = peer.parse().unwrap();
    let mut request = Request::builder()
        .method("POST")
        .uri("/v1/databases")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"ref": "cap"}"#))
        .unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(peer, 40000)));
    let response = capy_api::router(app.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, retry_after, serde_json::from_slice(&bytes).unwrap())
}

/// Ready pool entries left, and databases ever handed out or made for a request
/// (the pool's refills, queued as entries are taken, are neither).
async fn pool_and_handed_out(app: &TestApp) -> (i64, i64) {
    sqlx::query_as(
        "select (select count(*) from projects where instant_status = 'pool'
                   and state = 'ready' and deleted_at is null),
                (select count(*) from projects where instant_status in ('unclaimed', 'claimed'))",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

fn app_with_caps(app: &mut TestApp, per_key: i64, per_site: i64) {
    app.state.settings.instant_client_caps = ClientCaps { per_key, per_site };
    // A request that finds the pool empty gives up quickly: no worker runs here.
    app.state.settings.instant_wait = Duration::from_millis(200);
}

/// A refusal at the cap, in Instagres's shape.
fn assert_at_cap(answer: &(StatusCode, Option<u64>, Value), what: &str) {
    let (status, retry_after, body) = answer;
    assert_eq!(
        *status,
        StatusCode::TOO_MANY_REQUESTS,
        "{what}: not refused at the cap: {body}"
    );
    assert_eq!(body["status"], 429, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("unclaimed"),
        "{body}"
    );
    assert!(body["hint"].as_str().unwrap().contains("claim"), "{body}");
    // The wait is until the client's first database expires: about 72 hours.
    let seconds = retry_after.expect("Retry-After");
    assert!((71 * 3600..=72 * 3600).contains(&seconds), "{seconds}");
}

#[tokio::test]
async fn a_client_holds_at_most_its_cap_and_a_claim_or_an_expiry_frees_a_place() {
    let mut app = TestApp::new().await;
    app_with_caps(&mut app, 2, 3);
    app.ready_pool(6).await;

    let ipv4 = "203.0.113.9";
    let mut mine = Vec::new();
    for _ in 0..2 {
        let (status, _, body) = post(&app, ipv4).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        mine.push(body["id"].as_str().unwrap().to_string());
    }
    // At the cap with the pool still full: nothing is taken from it.
    assert_at_cap(&post(&app, ipv4).await, "from the pool");
    assert_eq!(pool_and_handed_out(&app).await, (4, 2));

    // IPv6: a /64 is one client, and a /48 holds its own, larger cap.
    for peer in ["2001:db8:5:1::1", "2001:db8:5:1:ffff::2"] {
        let (status, _, body) = post(&app, peer).await;
        assert_eq!(status, StatusCode::CREATED, "{peer}: {body}");
    }
    assert_at_cap(&post(&app, "2001:db8:5:1::3").await, "same /64");
    let (status, _, body) = post(&app, "2001:db8:5:2::1").await;
    assert_eq!(status, StatusCode::CREATED, "another /64: {body}");
    assert_at_cap(&post(&app, "2001:db8:5:3::1").await, "same /48");
    let (status, _, body) = post(&app, "2001:db8:6::1").await;
    assert_eq!(status, StatusCode::CREATED, "another /48: {body}");
    let keys: Vec<(String, String)> = sqlx::query_as(
        "select client_key, client_site from projects
         where client_addr like '2001:db8:5:%' order by assigned_at",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        keys.iter()
            .map(|(k, s)| (k.as_str(), s.as_str()))
            .collect::<Vec<_>>(),
        [
            ("2001:db8:5:1::/64", "2001:db8:5::/48"),
            ("2001:db8:5:1::/64", "2001:db8:5::/48"),
            ("2001:db8:5:2::/64", "2001:db8:5::/48"),
        ]
    );

    // The pool is empty now: at the cap, nothing is made on the spot either.
    assert_eq!(pool_and_handed_out(&app).await, (0, 6));
    assert_at_cap(&post(&app, ipv4).await, "on the spot");
    assert_eq!(pool_and_handed_out(&app).await, (0, 6), "queued at the cap");

    // Claiming one frees a place.
    app.ready_pool(2).await;
    let (status, body) = app
        .call(
            "POST",
            &format!("/v1/databases/{}/claim", mine[0]),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = post(&app, ipv4).await;
    assert_eq!(status, StatusCode::CREATED, "after a claim: {body}");
    assert_at_cap(&post(&app, ipv4).await, "after a claim");

    // So does an expiry, before the database is even deleted.
    sqlx::query("update projects set expires_at = now() - interval '1 second' where id = $1::uuid")
        .bind(&mine[1])
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, _, body) = post(&app, ipv4).await;
    assert_eq!(status, StatusCode::CREATED, "after an expiry: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_of_one_client_never_pass_its_cap() {
    let mut app = TestApp::new().await;
    app_with_caps(&mut app, 3, 10);
    app.ready_pool(24).await;
    let app = std::sync::Arc::new(app);
    let tasks: Vec<_> = (0..24)
        .map(|n| {
            let app = app.clone();
            // One IPv6 /64, many addresses in it.
            tokio::spawn(async move { post(&app, &format!("2001:db8:9:9::{n:x}")).await.0 })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        let status = task.await.unwrap();
        assert!(
            [StatusCode::CREATED, StatusCode::TOO_MANY_REQUESTS].contains(&status),
            "{status}"
        );
        created += usize::from(status == StatusCode::CREATED);
    }
    let held: i64 = sqlx::query_scalar(
        "select count(*) from projects where client_key = '2001:db8:9:9::/64'
           and instant_status = 'unclaimed'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((created, held), (3, 3), "handed out to one /64");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_while_another_of_its_site_holds_the_lock() {
    let mut app = TestApp::new().await;
    app_with_caps(&mut app, 3, 10);
    app.ready_pool(1).await;
    // Another request of the site's /48 holds its lock for a while.
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('capy:instant-client:' || $1, 0))")
        .bind("2001:db8:4::/48")
        .execute(&mut *holder)
        .await
        .unwrap();
    let app = std::sync::Arc::new(app);
    let started = std::time::Instant::now();
    let request = tokio::spawn({
        let app = app.clone();
        async move { post(&app, "2001:db8:4:1::1").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken: i64 =
        sqlx::query_scalar("select count(*) from projects where instant_status = 'unclaimed'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(taken, 0, "handed out while the site's lock was held");
    holder.commit().await.unwrap();
    let (status, _, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(300));
}
