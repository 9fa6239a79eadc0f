#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! The admin and key endpoints over HTTP, with their error answers: organizations,
//! API keys, clusters (registration, listing, access checks) and project placement.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use axum::http::StatusCode;
use capy_testkit::{cluster, free_port};
use common::TestApp;
use serde_json::{json, Value};

fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"))
}

/// Creates an organization through the admin API; answers its id.
async fn create_organization(app: &TestApp, name: &str) -> String {
    let body = json!({ "name": name }).to_string();
    let (status, answer) = app
        .call(
            "POST",
            "/v1/organizations",
            Some(&app.admin_key),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    text(&answer["organization"]["id"]).to_string()
}

/// Creates a key with `creator`; answers the whole 201 body.
async fn create_key(app: &TestApp, creator: &str, body: Value) -> Value {
    let (status, answer) = app
        .call(
            "POST",
            "/v1/api_keys",
            Some(creator),
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body} → {answer}");
    answer
}

/// Creates a project with `key`; answers its id.
async fn create_project(app: &TestApp, key: &str, body: Value) -> String {
    let (status, answer) = app
        .call("POST", "/v1/projects", Some(key), Some(&body.to_string()))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body} → {answer}");
    text(&answer["project"]["id"]).to_string()
}

/// Registers a cluster through the admin API; answers status and body.
async fn register(app: &TestApp, body: Value) -> (StatusCode, Value) {
    app.call(
        "POST",
        "/v1/clusters",
        Some(&app.admin_key),
        Some(&body.to_string()),
    )
    .await
}

/// The test cluster's admin URL, and its password.
fn test_cluster_url() -> (String, String) {
    let admin_url = cluster().unwrap().admin_url_for("postgres");
    let password = url::Url::parse(&admin_url)
        .unwrap()
        .password()
        .unwrap()
        .to_string();
    assert!(password.len() >= 8, "the test cluster has a real password");
    (admin_url, password)
}

// ---------------------------------------------------------------------------------
// Organizations

#[tokio::test]
async fn organizations_are_created_by_admins_only_with_sane_names() {
    let app = TestApp::new().await;
    let (status, body) = app
        .call(
            "POST",
            "/v1/organizations",
            Some(&app.admin_key),
            Some(r#"{"name":"Globex Corp"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["organization"]["name"], "Globex Corp");
    uuid::Uuid::parse_str(text(&body["organization"]["id"])).unwrap();

    let (status, body) = app
        .call(
            "POST",
            "/v1/organizations",
            Some(&app.key),
            Some(r#"{"name":"sneaky"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(error_of(&body).contains("admin"), "{body}");

    let long = json!({ "name": "a".repeat(101) }).to_string();
    let bad = [
        r#"{"name":""}"#.to_string(),
        r#"{"name":"   "}"#.to_string(),
        long,
        json!({ "name": "tab\there" }).to_string(),
        json!({ "name": "nul\u{1}byte" }).to_string(),
        r#"{"name":"ok","extra":1}"#.to_string(),
        r#"{}"#.to_string(),
    ];
    for body in &bad {
        let (status, answer) = app
            .call(
                "POST",
                "/v1/organizations",
                Some(&app.admin_key),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        error_of(&answer);
    }
    // 100 characters is still fine.
    create_organization(&app, &"b".repeat(100)).await;
    let count: i64 = sqlx::query_scalar("select count(*) from organizations")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 3, "acme, Globex Corp and the 100-character one");
}

#[tokio::test]
async fn organizations_are_listed_in_pages_to_admins_and_one_to_its_key() {
    let app = TestApp::new().await;
    let mut expected: HashSet<String> = HashSet::from([app.organization_id.to_string()]);
    for name in ["one", "two", "three"] {
        expected.insert(create_organization(&app, name).await);
    }

    let (status, first) = app
        .call(
            "GET",
            "/v1/organizations?limit=2",
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["organizations"].as_array().unwrap().len(), 2);
    let cursor = text(&first["next_cursor"]).to_string();
    let (status, second) = app
        .call(
            "GET",
            &format!("/v1/organizations?limit=2&cursor={cursor}"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["organizations"].as_array().unwrap().len(), 2);
    assert!(second["next_cursor"].is_null(), "{second}");
    let seen: Vec<String> = first["organizations"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["organizations"].as_array().unwrap())
        .map(|o| text(&o["id"]).to_string())
        .collect();
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "no duplicates across pages: {seen:?}"
    );
    assert_eq!(unique, expected);

    let (status, own) = app
        .call("GET", "/v1/organizations", Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{own}");
    let own = own["organizations"].as_array().unwrap();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(own[0]["id"], app.organization_id.to_string());
    assert_eq!(own[0]["name"], "acme");

    for query in [
        "cursor=not-base64!",
        "cursor=eA", // base64 of "x": not an id
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=many",
    ] {
        let (status, body) = app
            .call(
                "GET",
                &format!("/v1/organizations?{query}"),
                Some(&app.admin_key),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query} → {body}");
        error_of(&body);
    }
}

// ---------------------------------------------------------------------------------
// API keys

#[tokio::test]
async fn a_created_key_is_shown_once_and_works() {
    let app = TestApp::new().await;
    let created = create_key(&app, &app.key, json!({"name": "ci", "scopes": ["read"]})).await;
    let key = text(&created["key"]).to_string();
    assert!(key.starts_with("capy_live_"), "{key}");
    let prefix = text(&created["api_key"]["key_prefix"]);
    assert!(
        key.starts_with(prefix) && prefix.len() < key.len(),
        "{prefix}"
    );
    assert!(prefix.len() > "capy_live_".len(), "{prefix}");
    assert_eq!(created["api_key"]["name"], "ci");
    assert_eq!(created["api_key"]["scopes"], json!(["read"]));
    assert_eq!(
        created["api_key"]["organization_id"],
        app.organization_id.to_string()
    );
    assert!(created["api_key"]["project_id"].is_null());

    let (status, me) = app.call("GET", "/v1/me", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["scopes"], json!(["read"]));
    assert_eq!(me["organization_id"], app.organization_id.to_string());
    assert!(me["project_id"].is_null());
    assert_eq!(me["admin"], false);
    assert_eq!(me["key_id"], created["api_key"]["id"]);

    // Without scopes, the new key gets all of its creator's.
    let all = create_key(&app, &app.key, json!({"name": "all"})).await;
    assert_eq!(
        all["api_key"]["scopes"],
        json!(["read", "write", "credentials:read"])
    );

    // Listing never shows a secret: neither the plaintext nor its hash.
    let hashes: Vec<(String, String)> =
        sqlx::query_as("select encode(key_hash, 'hex'), encode(key_hash, 'base64') from api_keys")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    for lister in [&app.key, &app.admin_key] {
        let (status, listed) = app.call("GET", "/v1/api_keys", Some(lister), None).await;
        assert_eq!(status, StatusCode::OK, "{listed}");
        let keys = listed["api_keys"].as_array().unwrap();
        assert!(keys.len() >= 3, "{listed}");
        let raw = listed.to_string();
        for secret in [key.as_str(), text(&all["key"])] {
            assert!(!raw.contains(secret), "plaintext listed: {raw}");
        }
        for (hex, base64) in &hashes {
            assert!(!raw.contains(hex.as_str()) && !raw.contains(base64.as_str()));
        }
        for listed_key in keys {
            for field in listed_key.as_object().unwrap().keys() {
                assert!(
                    !field.contains("hash") && field != "key",
                    "a secret-looking field '{field}' in {listed_key}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_key_never_grants_more_than_its_creator_and_bad_grants_are_400() {
    let app = TestApp::new().await;
    let read_only = create_key(&app, &app.key, json!({"name": "ro", "scopes": ["read"]})).await;
    let read_only = text(&read_only["key"]).to_string();
    let (status, body) = app
        .call(
            "POST",
            "/v1/api_keys",
            Some(&read_only),
            Some(r#"{"name":"escalate","scopes":["write"]}"#),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // A write-only key may create keys, but none with a scope it lacks.
    let writer = create_key(&app, &app.key, json!({"name": "w", "scopes": ["write"]})).await;
    let writer = text(&writer["key"]).to_string();
    for scopes in [json!(["read"]), json!(["write", "credentials:read"])] {
        let body = json!({"name": "escalate", "scopes": scopes}).to_string();
        let (status, answer) = app
            .call("POST", "/v1/api_keys", Some(&writer), Some(&body))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body} → {answer}");
        assert!(error_of(&answer).contains("scope"), "{answer}");
    }
    let narrower = create_key(&app, &writer, json!({"name": "w2"})).await;
    assert_eq!(narrower["api_key"]["scopes"], json!(["write"]));

    let past = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let long = "n".repeat(101);
    let bad = [
        json!({"name": "x", "scopes": ["admin"]}),
        json!({"name": "x", "scopes": ["read", "delete"]}),
        json!({"name": "x", "scopes": []}),
        json!({"name": "x", "expires_at": past}),
        json!({"name": "x", "expires_at": "tomorrow"}),
        json!({"name": ""}),
        json!({"name": long}),
        json!({"name": "x", "project_id": "not-a-uuid"}),
        json!({"name": "x", "colour": "red"}),
        json!({}),
    ];
    for body in bad {
        let (status, answer) = app
            .call(
                "POST",
                "/v1/api_keys",
                Some(&app.key),
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        error_of(&answer);
    }

    // An admin must say which organization the key is for.
    let (status, body) = app
        .call(
            "POST",
            "/v1/api_keys",
            Some(&app.admin_key),
            Some(r#"{"name":"orphan"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_of(&body).contains("organization_id"), "{body}");
    let unknown = json!({"name": "x", "organization_id": uuid::Uuid::now_v7()}).to_string();
    let (status, body) = app
        .call("POST", "/v1/api_keys", Some(&app.admin_key), Some(&unknown))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let count: i64 = sqlx::query_scalar("select count(*) from api_keys")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 5, "org key, admin key, ro, w, w2: nothing else");
}

#[tokio::test]
async fn a_project_scoped_key_sees_only_its_project() {
    let app = TestApp::new().await;
    let p1 = create_project(&app, &app.key, json!({"name": "first"})).await;
    create_project(&app, &app.key, json!({"name": "second"})).await;
    let created = create_key(&app, &app.key, json!({"name": "p1", "project_id": p1})).await;
    assert_eq!(created["api_key"]["project_id"], p1.as_str());
    let key = text(&created["key"]).to_string();

    let (status, me) = app.call("GET", "/v1/me", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["project_id"], p1.as_str());
    let (status, listed) = app.call("GET", "/v1/projects", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let projects = listed["projects"].as_array().unwrap();
    assert_eq!(projects.len(), 1, "{listed}");
    assert_eq!(projects[0]["id"], p1.as_str());
    let (_, listed) = app.call("GET", "/v1/projects", Some(&app.key), None).await;
    assert_eq!(listed["projects"].as_array().unwrap().len(), 2);

    // A key of another organization's project: 404, as if it did not exist.
    let other_org = create_organization(&app, "other").await;
    let other_key = create_key(
        &app,
        &app.admin_key,
        json!({"name": "other", "organization_id": other_org}),
    )
    .await;
    let other_key = text(&other_key["key"]).to_string();
    let theirs = create_project(&app, &other_key, json!({"name": "theirs"})).await;
    for body in [
        json!({"name": "x", "project_id": theirs}),
        json!({"name": "x", "project_id": uuid::Uuid::now_v7()}),
        json!({"name": "x", "organization_id": other_org}),
    ] {
        let (status, answer) = app
            .call(
                "POST",
                "/v1/api_keys",
                Some(&app.key),
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body} → {answer}");
        assert!(!answer.to_string().contains(&theirs), "{answer}");
    }
}

#[tokio::test]
async fn a_revoked_key_is_refused_at_once() {
    let app = TestApp::new().await;
    let created = create_key(&app, &app.key, json!({"name": "doomed"})).await;
    let key = text(&created["key"]).to_string();
    let id = text(&created["api_key"]["id"]).to_string();
    let (status, _) = app.call("GET", "/v1/me", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK);

    let (status, revoked) = app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(!revoked["api_key"]["revoked_at"].is_null(), "{revoked}");
    let (status, body) = app.call("GET", "/v1/me", Some(&key), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(error_of(&body).contains("revoked"), "{body}");

    let (status, again) = app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        again["api_key"]["revoked_at"], revoked["api_key"]["revoked_at"],
        "revoking again keeps the first revocation time"
    );

    // Another organization's key: not found, and untouched.
    let other_org = create_organization(&app, "other").await;
    let other = create_key(
        &app,
        &app.admin_key,
        json!({"name": "other", "organization_id": other_org}),
    )
    .await;
    let other_id = text(&other["api_key"]["id"]);
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{other_id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = app
        .call("GET", "/v1/me", Some(text(&other["key"])), None)
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the other organization's key still works"
    );
    // Nor may an organization revoke the admin key.
    let admin_id: uuid::Uuid = sqlx::query_scalar("select id from api_keys where is_admin")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{admin_id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{}", uuid::Uuid::now_v7()),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = app
        .call("DELETE", "/v1/api_keys/not-a-uuid", Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn a_key_stops_working_when_it_expires() {
    let app = TestApp::new().await;
    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let created = create_key(
        &app,
        &app.key,
        json!({"name": "brief", "expires_at": expires_at.to_rfc3339()}),
    )
    .await;
    assert!(!created["api_key"]["expires_at"].is_null());
    let key = text(&created["key"]).to_string();
    let (status, body) = app.call("GET", "/v1/me", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = app.call("GET", "/v1/me", Some(&key), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(error_of(&body).contains("expired"), "{body}");
}

// ---------------------------------------------------------------------------------
// Clusters

#[tokio::test]
async fn a_cluster_is_registered_checked_and_never_shows_its_password() {
    let app = TestApp::new().await;
    let (admin_url, password) = test_cluster_url();
    let (status, body) = register(
        &app,
        json!({"name": "second", "region": "eu", "url": admin_url, "ssl_mode": "disable"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let access = &body["access"];
    assert_eq!(access["reachable"], true, "{body}");
    assert!(!text(&access["server_version"]).is_empty(), "{body}");
    assert_eq!(access["can_create_databases"], true, "{body}");
    assert_eq!(access["can_create_roles"], true, "{body}");
    assert_eq!(access["is_superuser"], true, "{body}");
    assert!(
        access["error_kind"].is_null() && access["error"].is_null(),
        "{body}"
    );
    assert!(access["latency_ms"].as_f64().unwrap() >= 0.0);
    let cluster = &body["cluster"];
    assert_eq!(cluster["name"], "second");
    assert_eq!(cluster["region"], "eu");
    assert_eq!(cluster["project_count"], 0);
    assert!(!cluster["last_checked_at"].is_null(), "{body}");
    let id = text(&cluster["id"]).to_string();

    let (status, listed) = app
        .call("GET", "/v1/clusters", Some(&app.admin_key), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["clusters"].as_array().unwrap().len(), 2, "{listed}");
    let (status, shown) = app
        .call(
            "GET",
            &format!("/v1/clusters/{id}"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["cluster"]["id"], id.as_str());
    let (status, checked) = app
        .call(
            "POST",
            &format!("/v1/clusters/{id}/check-access"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{checked}");
    assert_eq!(checked["access"]["reachable"], true, "{checked}");

    for answer in [&body, &listed, &shown, &checked] {
        assert!(
            !answer.to_string().contains(&password),
            "the admin password is shown: {answer}"
        );
    }
    let mut shown_urls = vec![text(&cluster["admin_url"]).to_string()];
    shown_urls.extend(
        listed["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| text(&c["admin_url"]).to_string()),
    );
    shown_urls.push(text(&shown["cluster"]["admin_url"]).to_string());
    for shown_url in shown_urls {
        let parsed = url::Url::parse(&shown_url).unwrap();
        assert_eq!(parsed.password(), None, "{shown_url}");
        assert_eq!(parsed.username(), "postgres", "{shown_url}");
    }

    // A password given as a query parameter is hidden as well.
    let no_password = admin_url.replace(&format!(":{password}@"), "@");
    let in_query = format!("{no_password}?password={password}&application_name=x");
    let (status, body) = register(
        &app,
        json!({"name": "in-query", "region": "eu", "url": in_query}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["access"]["reachable"], true, "{body}");
    assert!(!body.to_string().contains(&password), "{body}");
    let (_, listed) = app
        .call("GET", "/v1/clusters", Some(&app.admin_key), None)
        .await;
    assert!(!listed.to_string().contains(&password), "{listed}");
}

#[tokio::test]
async fn bad_cluster_registrations_are_refused() {
    let app = TestApp::new().await;
    let (admin_url, _) = test_cluster_url();
    let (status, body) = register(
        &app,
        json!({"name": "local", "region": "eu", "url": admin_url}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body).contains("local"), "{body}");

    let good = json!({"name": "fine", "region": "eu", "url": admin_url});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let bad = [
        with("url", json!("mysql://u:p@127.0.0.1:3306/db")),
        with("url", json!("https://example.com/db")),
        with("url", json!("postgres:///postgres")),
        with("url", json!("postgres://")),
        with("url", json!("garbage")),
        with("url", json!("")),
        with("url", json!("postgres://u:p@host:notaport/db")),
        with("ssl_mode", json!("sometimes")),
        with("ssl_mode", json!("")),
        with("direct_port", json!(0)),
        with("direct_port", json!(70000)),
        with("pooled_port", json!(-5)),
        with("name", json!("")),
        with("name", json!("Upper")),
        with("name", json!("has space")),
        with("name", json!("n".repeat(64))),
        with("region", json!("EU West")),
        with("region", json!("")),
        with("public_host", json!("bad host/")),
        with("max_projects", json!(-1)),
        with("colour", json!("red")),
        json!({"name": "fine", "region": "eu"}),
    ];
    for body in bad {
        let (status, answer) = register(&app, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        error_of(&answer);
    }
    let count: i64 = sqlx::query_scalar("select count(*) from clusters")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "nothing was registered");
}

#[tokio::test]
async fn cluster_endpoints_are_for_admins_only() {
    let app = TestApp::new().await;
    let (admin_url, _) = test_cluster_url();
    let id = app.cluster_id;
    let register_body = json!({"name": "mine", "region": "eu", "url": admin_url}).to_string();
    let calls: [(&str, String, Option<&str>); 4] = [
        ("GET", "/v1/clusters".into(), None),
        ("POST", "/v1/clusters".into(), Some(register_body.as_str())),
        ("GET", format!("/v1/clusters/{id}"), None),
        ("POST", format!("/v1/clusters/{id}/check-access"), None),
    ];
    for (method, path, body) in &calls {
        let (status, answer) = app.call(method, path, Some(&app.key), *body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path} → {answer}");
        assert!(!answer.to_string().contains("postgres://"), "{answer}");
    }
    let count: i64 = sqlx::query_scalar("select count(*) from clusters")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);

    let unknown = uuid::Uuid::now_v7();
    for (method, path) in [
        ("GET", format!("/v1/clusters/{unknown}")),
        ("POST", format!("/v1/clusters/{unknown}/check-access")),
    ] {
        let (status, answer) = app.call(method, &path, Some(&app.admin_key), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path} → {answer}");
    }
    let (status, answer) = app
        .call("GET", "/v1/clusters/nope", Some(&app.admin_key), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = app
        .call("GET", "/v1/clusters?cursor=@@@", Some(&app.admin_key), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
}

/// Registers `url` as cluster `name`, then checks it again; both reports must agree.
async fn unreachable(app: &TestApp, name: &str, url: &str) -> Value {
    let (status, body) = register(app, json!({"name": name, "region": "eu", "url": url})).await;
    assert_eq!(status, StatusCode::CREATED, "{url} → {body}");
    assert_eq!(body["access"]["reachable"], false, "{url} → {body}");
    let id = text(&body["cluster"]["id"]).to_string();
    let (status, checked) = app
        .call(
            "POST",
            &format!("/v1/clusters/{id}/check-access"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{checked}");
    let access = checked["access"].clone();
    assert_eq!(access["reachable"], false, "{access}");
    assert_eq!(
        access["error_kind"], body["access"]["error_kind"],
        "{access}"
    );
    assert!(access["server_version"].is_null(), "{access}");
    assert_eq!(access["can_create_databases"], false, "{access}");
    assert_eq!(access["can_create_roles"], false, "{access}");
    assert!(!text(&access["error"]).is_empty(), "{access}");
    access
}

#[tokio::test]
async fn check_access_names_a_wrong_password_port_or_host() {
    let app = TestApp::new().await;
    let (admin_url, password) = test_cluster_url();
    let test_cluster = cluster().unwrap();

    // The test cluster asks for a password over TCP (initdb --auth-host=scram-sha-256);
    // make sure, since a server given by CAPY_TEST_DATABASE_URL might trust instead.
    let wrong_password = admin_url.replace(&format!(":{password}@"), ":not-the-password@");
    assert_ne!(wrong_password, admin_url);
    let trusts = tokio_postgres::connect(&wrong_password, tokio_postgres::NoTls)
        .await
        .is_ok();
    if trusts {
        eprintln!("the test cluster trusts TCP logins: the wrong-password case is skipped");
    } else {
        let access = unreachable(&app, "bad-password", &wrong_password).await;
        assert_eq!(access["error_kind"], "authentication_failed", "{access}");
        assert!(!access.to_string().contains("not-the-password"), "{access}");
    }

    let port = free_port().unwrap();
    let wrong_port = format!(
        "postgres://postgres:{password}@{}:{port}/postgres",
        test_cluster.host()
    );
    let access = unreachable(&app, "bad-port", &wrong_port).await;
    assert_eq!(access["error_kind"], "connection_refused", "{access}");

    let wrong_host = format!(
        "postgres://postgres:{password}@nonexistent.invalid:{}/postgres",
        test_cluster.port
    );
    let access = unreachable(&app, "bad-host", &wrong_host).await;
    assert_eq!(access["error_kind"], "host_not_found", "{access}");

    let wrong_database = format!(
        "postgres://postgres:{password}@{}:{}/no_such_database",
        test_cluster.host(),
        test_cluster.port
    );
    let access = unreachable(&app, "bad-database", &wrong_database).await;
    assert_eq!(access["error_kind"], "database_not_found", "{access}");

    // None of the reports shows the password.
    let (_, listed) = app
        .call("GET", "/v1/clusters", Some(&app.admin_key), None)
        .await;
    assert_eq!(
        listed["clusters"].as_array().unwrap().len(),
        5 - usize::from(trusts)
    );
    assert!(!listed.to_string().contains(&password), "{listed}");
}

// ---------------------------------------------------------------------------------
// Placement

#[tokio::test]
async fn projects_are_placed_where_asked_or_refused_with_422() {
    let app = TestApp::new().await;
    let (admin_url, _) = test_cluster_url();
    let (status, body) = register(
        &app,
        json!({"name": "second", "region": "eu", "url": admin_url}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let second = text(&body["cluster"]["id"]).to_string();
    let (status, body) = register(
        &app,
        json!({"name": "no-room", "region": "full", "url": admin_url, "max_projects": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["cluster"]["max_projects"], 0);
    let no_room = text(&body["cluster"]["id"]).to_string();

    let (status, body) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(&json!({"name": "placed", "cluster_id": second}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["project"]["cluster_id"], second.as_str());
    assert_eq!(body["project"]["region"], "eu");
    assert_eq!(body["job"]["cluster_id"], second.as_str());
    let (_, shown) = app
        .call(
            "GET",
            &format!("/v1/clusters/{second}"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(shown["cluster"]["project_count"], 1, "{shown}");

    let (status, body) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"by-region","region":"eu"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["project"]["cluster_id"], second.as_str());

    let unknown = uuid::Uuid::now_v7();
    let refused = [
        (json!({"name": "r1", "region": "full"}), "full"),
        (json!({"name": "r2", "cluster_id": no_room}), "full"),
        (json!({"name": "r3", "region": "mars"}), "mars"),
        (json!({"name": "r4", "cluster_id": unknown}), "no cluster"),
        (
            json!({"name": "r5", "cluster_id": second, "region": "local"}),
            "region",
        ),
        (
            json!({"name": "r6", "cluster_id": app.cluster_id, "region": "eu"}),
            "region",
        ),
    ];
    for (body, expected) in refused {
        let (status, answer) = app
            .call(
                "POST",
                "/v1/projects",
                Some(&app.key),
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} → {answer}"
        );
        let message = error_of(&answer);
        assert!(message.contains(expected), "{body} → {message}");
    }
    let count: i64 = sqlx::query_scalar("select count(*) from projects")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 2, "no refused project was recorded");
}

#[tokio::test]
async fn a_role_without_rights_is_reachable_but_reported_as_such() {
    let app = TestApp::new().await;
    let (admin_url, password) = test_cluster_url();
    let role = format!("capy_weak_{}", uuid::Uuid::new_v4().simple());
    let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "create role {role} login password 'weak-pw-123' nosuperuser nocreaterole nocreatedb;
             grant connect on database postgres to {role}"
        ))
        .await
        .unwrap();
    let weak_url = admin_url.replace(
        &format!("postgres:{password}@"),
        &format!("{role}:weak-pw-123@"),
    );
    assert_ne!(weak_url, admin_url);
    let (status, body) = register(
        &app,
        json!({"name": "weak", "region": "eu", "url": weak_url}),
    )
    .await;
    client
        .batch_execute(&format!(
            "revoke connect on database postgres from {role}; drop role {role}"
        ))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let access = &body["access"];
    assert_eq!(access["reachable"], true, "{body}");
    // It owns no database, so it closes none (PUBLIC's CONNECT is not its to revoke).
    assert_eq!(access["public_connect_closed"], json!([]), "{body}");
    assert_eq!(access["is_superuser"], false, "{body}");
    assert_eq!(access["can_create_roles"], false, "{body}");
    assert_eq!(access["can_create_databases"], false, "{body}");
    assert!(!body.to_string().contains("weak-pw-123"), "{body}");
}

/// `POST /v1/clusters` checks the name, then upserts (`on conflict (name) do update`):
/// two registrations of one name at once may both pass the check, and the second then
/// silently replaces the first's URL and region while both answer 201.
#[tokio::test]
async fn two_registrations_of_one_name_at_once_give_one_409() {
    let app = TestApp::new().await;
    let (admin_url, password) = test_cluster_url();
    let other_url = admin_url.replace(&format!(":{password}@"), ":other-password@");
    for round in 0..5 {
        let name = format!("twin-{round}");
        let (first, second, third) = tokio::join!(
            register(
                &app,
                json!({"name": name, "region": "eu", "url": admin_url})
            ),
            register(
                &app,
                json!({"name": name, "region": "us", "url": other_url})
            ),
            register(
                &app,
                json!({"name": name, "region": "ap", "url": other_url})
            ),
        );
        let created = [&first, &second, &third]
            .iter()
            .filter(|(status, _)| *status == StatusCode::CREATED)
            .count();
        assert_eq!(
            created, 1,
            "one registration of '{name}' wins, the others get 409:\n{}\n{}\n{}",
            first.1, second.1, third.1
        );
    }
}

/// Sends a request with an `Idempotency-Key`; answers status, the replay header and
/// the JSON body.
async fn call_idempotent(
    app: &TestApp,
    path: &str,
    key: &str,
    idempotency_key: &str,
    body: &str,
) -> (StatusCode, bool, Value) {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let request = axum::http::Request::builder()
        .method("POST")
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("idempotency-key", idempotency_key)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let response = capy_api::router(app.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn a_revoked_key_gets_no_replay_of_its_idempotent_answers() {
    let app = TestApp::new().await;
    let creator = create_key(&app, &app.key, json!({"name": "creator"})).await;
    let creator_key = text(&creator["key"]).to_string();
    let body = r#"{"name":"made-idempotently"}"#;
    let (status, replayed, first) =
        call_idempotent(&app, "/v1/api_keys", &creator_key, "idem-1", body).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert!(!replayed);
    let (status, replayed, again) =
        call_idempotent(&app, "/v1/api_keys", &creator_key, "idem-1", body).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true), "{again}");
    assert_eq!(again, first);

    let (status, _) = app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{}", text(&creator["api_key"]["id"])),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.call("GET", "/v1/me", Some(&creator_key), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, replayed, answer) =
        call_idempotent(&app, "/v1/api_keys", &creator_key, "idem-1", body).await;
    assert_eq!(
        (status, replayed),
        (StatusCode::UNAUTHORIZED, false),
        "a revoked key was answered: {answer}"
    );
}

#[tokio::test]
async fn a_new_keys_plaintext_is_not_kept_in_the_control_database() {
    let app = TestApp::new().await;
    let (status, _, created) = call_idempotent(
        &app,
        "/v1/api_keys",
        &app.key,
        "idem-plaintext",
        r#"{"name":"kept"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let plaintext = text(&created["key"]);
    let stored: i64 = sqlx::query_scalar(
        "select count(*) from idempotency_keys
         where position(convert_to($1, 'UTF8') in coalesce(body, ''::bytea)) > 0",
    )
    .bind(plaintext)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "the plaintext of {plaintext} is stored");
}
