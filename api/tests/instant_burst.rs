#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Anonymous abuse of instant databases is bounded: a cluster holds at most its bound
//! of pool entries and unclaimed databases however many requests arrive at once; at the
//! bound the answer is 503 with Retry-After and nothing is queued; organizations'
//! projects keep their room. (Each client's own cap: instant_client_cap.rs.)

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use capy_shared::instant::{self, Entry, InstantLimits};
use capy_testkit::ProcessStack;
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;
use uuid::Uuid;

/// Pool entries and unclaimed databases on `cluster_id`, as the control database has
/// them.
async fn held(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "select count(*) from projects where cluster_id = $1
           and instant_status in ('pool', 'unclaimed') and deleted_at is null",
    )
    .bind(app.cluster_id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

/// `project.create` jobs ever queued for instant databases.
async fn instant_creations(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "select count(*) from jobs j join projects p on p.id = j.project_id
         where j.type = 'project.create' and p.instant_status is not null",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creations_never_pass_the_bound() {
    let app = TestApp::new().await;
    let limits = InstantLimits {
        max_per_cluster: 5,
        ..InstantLimits::default()
    };
    let tasks: Vec<_> = (0..24_u32)
        .map(|n| {
            let pool = app.db.pool.clone();
            let secrets = app.state.secrets.clone();
            let cluster_id = app.cluster_id;
            let entry = if n.is_multiple_of(2) {
                Entry::Pool
            } else {
                Entry::OnTheSpot {
                    logical_replication: false,
                }
            };
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                let made = instant::create_within(&mut tx, &secrets, cluster_id, entry, limits)
                    .await
                    .unwrap();
                // Whatever else the transaction does before it commits widens the race.
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.commit().await.unwrap();
                made.is_some()
            })
        })
        .collect();
    let mut made = 0;
    for task in tasks {
        made += usize::from(task.await.unwrap());
    }
    assert_eq!(made, 5, "creations that took a place");
    assert_eq!(held(&app).await, 5, "instant databases on the cluster");
    assert_eq!(
        instant_creations(&app).await,
        5,
        "project.create jobs queued"
    );
}

async fn post(app: &TestApp, from: [u8; 4]) -> (StatusCode, Option<String>, Value) {
    post_via(app, SocketAddr::from((from, 40000)), None).await
}

/// `POST /v1/databases` from `peer`, with `X-Forwarded-For: forwarded` if given.
async fn post_via(
    app: &TestApp,
    peer: SocketAddr,
    forwarded: Option<&str>,
) -> (StatusCode, Option<String>, Value) {
    let mut request = Request::builder()
        .method("POST")
        .uri("/v1/databases")
        .header("content-type", "application/json");
    if let Some(forwarded) = forwarded {
        request = request.header("x-forwarded-for", forwarded);
    }
    let mut request = request.body(Body::from(r#"{"ref": "bound"}"#)).unwrap();
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = capy_api::router(app.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, retry_after, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn forwarded_for_counts_only_from_a_trusted_proxy_and_ipv6_by_its_64() {
    let mut app = TestApp::new().await;
    app.state.settings.instant_rate_limit_per_minute = 1;
    app.state.settings.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    app.ready_pool(4).await;
    let status = |answer: (StatusCode, Option<String>, Value)| answer.0;

    // A client connecting directly cannot pose as others by writing the header.
    let direct = SocketAddr::from(([203, 0, 113, 5], 40000));
    let first = post_via(&app, direct, Some("198.51.100.1")).await;
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.2);
    let spoofed = post_via(&app, direct, Some("198.51.100.2")).await;
    assert_eq!(
        status(spoofed),
        StatusCode::TOO_MANY_REQUESTS,
        "spoofed X-Forwarded-For believed"
    );

    // Through the trusted proxy, each client is itself, whatever it prepends.
    let proxy = SocketAddr::from(([10, 0, 0, 1], 40000));
    assert_eq!(
        status(post_via(&app, proxy, Some("198.51.100.1")).await),
        StatusCode::CREATED
    );
    assert_eq!(
        status(post_via(&app, proxy, Some("198.51.100.2")).await),
        StatusCode::CREATED
    );
    let prepended = post_via(&app, proxy, Some("198.51.100.3, 198.51.100.2")).await;
    assert_eq!(status(prepended), StatusCode::TOO_MANY_REQUESTS);
    // Another address of the same IPv6 /64 is the same client.
    assert_eq!(
        status(post_via(&app, proxy, Some("2001:db8:7:7::1")).await),
        StatusCode::CREATED
    );
    let same_64 = post_via(&app, proxy, Some("2001:db8:7:7:ffff::2")).await;
    assert_eq!(
        status(same_64),
        StatusCode::TOO_MANY_REQUESTS,
        "a /64 is one client"
    );

    // The address recorded for abuse investigations is the client's.
    let recorded: Vec<String> = sqlx::query_scalar(
        "select client_addr from projects where client_addr is not null order by assigned_at",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        [
            "203.0.113.5",
            "198.51.100.1",
            "198.51.100.2",
            "2001:db8:7:7::1"
        ]
    );
}

#[tokio::test]
async fn at_the_bound_the_answer_is_503_nothing_is_queued_and_projects_keep_their_room() {
    let mut app = TestApp::new().await;
    app.state.settings.instant_max_per_cluster = 2;
    // Two ready pool entries: the bound is reached.
    app.ready_pool(2).await;

    // Pool entries already hold their places: they are handed out, and not replaced.
    for n in 1..=2 {
        let (status, _, body) = post(&app, [10, 0, 0, n]).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, retry_after, body) = post(&app, [10, 0, 0, 3]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], 503, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("instant databases"));
    assert!(body["hint"].is_string(), "{body}");
    let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(seconds >= 1, "{seconds}");
    // The refills spawned by the two hand-outs have had their chance.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(held(&app).await, 2);
    assert_eq!(
        instant_creations(&app).await,
        2,
        "nothing queued at the bound"
    );

    // A cluster whose room for projects is 1: the two instant databases take none of it.
    sqlx::query("update clusters set max_projects = 1")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let create = r#"{"name": "orders"}"#;
    let (status, body) = app
        .call("POST", "/v1/projects", Some(&app.key), Some(create))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name": "more"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}

const REQUESTS: usize = 10_000;
const CONCURRENCY: usize = 48;
const BOUND: i64 = 50;

/// Request `n`'s client, as the trusted proxy in front (127.0.0.1) forwards it: 200
/// IPv4 addresses, and IPv6 addresses spread over 8 /64s of one /48. Each header starts
/// with an address the client made up, which must count for nothing. With the default
/// caps (3 per client, 10 per /48) they could hold 610 databases: the bound binds.
fn forwarded_for(n: usize) -> String {
    let client = if n.is_multiple_of(5) {
        format!("2001:db8:0:{}::{:x}", n % 8, n)
    } else {
        let k = n % 200;
        format!("198.51.{}.{}", k / 100, k % 100 + 1)
    };
    format!("6.6.6.{}, {client}", n % 250)
}

/// The database names of every instant database the control database recorded.
async fn instant_names(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("select database_name from projects where instant_status is not null")
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_10000_leaves_at_most_the_bound_and_projects_still_succeed() {
    let app = TestApp::new().await;
    // The organizations' room on the cluster: one project, which instant databases
    // must not take.
    sqlx::query("update clusters set max_projects = 1")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let env = [
        ("CAPY_INSTANT_POOL_SIZE", "5".to_string()),
        ("CAPY_INSTANT_MAX_PER_CLUSTER", BOUND.to_string()),
        ("CAPY_TRUSTED_PROXIES", "127.0.0.1/32, ::1".to_string()),
        ("CAPY_LEASE_SECONDS", "4".to_string()),
        ("CAPY_WORKER_CONCURRENCY", "8".to_string()),
        // Refusals with Retry-After are logged below WARN: thousands of them here.
        (
            "RUST_LOG",
            std::env::var("CAPY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    let processes = ProcessStack::start(&app.db.url, 2, &env).await.unwrap();
    let http = reqwest::Client::new();
    let url = processes.api_url.clone();

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= REQUESTS {
                        return answers;
                    }
                    let response = http
                        .post(format!("{url}/v1/databases"))
                        .header("x-forwarded-for", forwarded_for(n))
                        .json(&json!({"ref": format!("burst-{n}")}))
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let retry_after = response.headers().contains_key("retry-after");
                    let body: Value = response.json().await.unwrap();
                    answers.push((status, retry_after, body));
                }
            })
        })
        .collect();

    // An organization creates a project while the burst runs.
    while next.load(Ordering::Relaxed) < REQUESTS / 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let project = http
        .post(format!("{url}/v1/projects"))
        .bearer_auth(&app.key)
        .json(&json!({"name": "during-the-burst"}))
        .send()
        .await
        .unwrap();
    let project_status = project.status().as_u16();
    let project: Value = project.json().await.unwrap();
    let in_flight = next.load(Ordering::Relaxed);
    assert_eq!(project_status, 202, "{project}");
    assert!(
        in_flight < REQUESTS,
        "the project was created after the burst"
    );

    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut at_client_cap = 0;
    let mut handed_out = std::collections::HashSet::new();
    for client in clients {
        for (status, retry_after, body) in client.await.unwrap() {
            *statuses.entry(status).or_default() += 1;
            assert!([201, 429, 503].contains(&status), "answer {status}: {body}");
            assert_eq!(body["status"].as_u64().is_some(), status != 201, "{body}");
            if status == 201 {
                assert!(handed_out.insert(body["id"].as_str().unwrap().to_string()));
            } else {
                assert!(retry_after, "{status} without Retry-After: {body}");
                let message = body["message"].as_str().unwrap();
                at_client_cap += usize::from(message.contains("unclaimed"));
            }
        }
    }
    let burst = started.elapsed();
    println!("burst of {REQUESTS} in {burst:?}: answers {statuses:?} ({at_client_cap} of the 429s at a client's cap); the project's POST came after {in_flight} requests");
    let created = statuses.get(&201).copied().unwrap_or(0) as i64;
    assert!(created <= BOUND, "{created} databases handed out");
    assert!(statuses.contains_key(&503), "the bound was never reached");
    assert!(statuses.contains_key(&429), "no client was rate limited");

    // Everything queued runs to its end (the organization's project included), and the
    // pool's top-up has ticked a few times at the bound.
    let job_id: Uuid = project["job"]["id"].as_str().unwrap().parse().unwrap();
    wait_until_idle(&app, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_until_idle(&app, Duration::from_secs(60)).await;
    let job_state: String = sqlx::query_scalar("select state from jobs where id = $1")
        .bind(job_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(job_state, "completed", "the organization's project.create");

    let in_control = held(&app).await;
    let names = instant_names(&app).await;
    let admin = capy_testkit::cluster().unwrap().admin_url_for("postgres");
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let on_cluster: i64 = client
        .query_one(
            "select count(*) from pg_database where datname = any($1)",
            &[&names],
        )
        .await
        .unwrap()
        .get(0);
    let creations = instant_creations(&app).await;
    println!(
        "after the burst: {in_control} instant databases in the control database, {on_cluster} on the cluster, {creations} ever queued (bound {BOUND})"
    );
    assert!(in_control <= BOUND, "{in_control} in the control database");
    assert!(on_cluster <= BOUND, "{on_cluster} on the cluster");
    assert_eq!(
        on_cluster, in_control,
        "every recorded one exists, and no other"
    );
    assert!(creations <= BOUND, "{creations} project.create jobs queued");
    // No client holds more than its cap, nor the /48 more than its own.
    let most: Vec<(String, i64)> = sqlx::query_as(
        "select client_key, count(*) from projects where instant_status = 'unclaimed'
         group by client_key order by 2 desc limit 1",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let per_48: i64 = sqlx::query_scalar(
        "select count(*) from projects where instant_status = 'unclaimed'
           and client_site = '2001:db8::/48'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    println!("most held by one client: {most:?}; by the IPv6 /48: {per_48}");
    assert!(most.iter().all(|(_, n)| *n <= 3), "{most:?}");
    assert!(per_48 <= 10, "{per_48} held by one /48");
    assert!(burst < Duration::from_secs(60), "the burst took {burst:?}");
}

/// Waits until no job is pending or claimed.
async fn wait_until_idle(app: &TestApp, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let busy: i64 =
            sqlx::query_scalar("select count(*) from jobs where state in ('pending', 'claimed')")
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        if busy == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{busy} jobs still busy after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
