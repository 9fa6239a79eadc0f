#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Registering a cluster or checking its access closes PUBLIC's CONNECT on every
//! database capy does not manage (`postgres`, `template1`, the control database, any
//! other), leaves the project databases to their steps, reports what it could not close,
//! and never locks out the admin or the control plane's own role. Its own test binary
//! (so its own cluster): every check closes databases other tests would see.

mod common;

use axum::http::StatusCode;
use capy_testkit::cluster;
use common::TestApp;
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use uuid::Uuid;

async fn connect(
    user: &str,
    password: &str,
    dbname: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = cluster()
        .unwrap()
        .admin_url_for("postgres")
        .parse()
        .unwrap();
    config.user(user).password(password).dbname(dbname);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &cluster().unwrap().admin_url_for("postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

/// Creates a login role with no rights; answers its name (its password is `pw`).
async fn login_role(admin: &tokio_postgres::Client, prefix: &str) -> String {
    let role = format!("{prefix}_{}", Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("create role {role} login password 'pw'"))
        .await
        .unwrap();
    role
}

fn names(access: &Value, field: &str) -> Vec<String> {
    access[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {access}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

async fn check_access(app: &TestApp, cluster_id: Uuid) -> Value {
    let (status, body) = app
        .call(
            "POST",
            &format!("/v1/clusters/{cluster_id}/check-access"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["access"]["reachable"], true, "{body}");
    body["access"].clone()
}

async fn assert_refused(role: &str, dbname: &str) {
    match connect(role, "pw", dbname).await {
        Ok(_) => panic!("{role} connected to {dbname}"),
        Err(e) => assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{role} → {dbname}: {e}"
        ),
    }
}

#[tokio::test]
async fn check_access_closes_public_connect_where_capy_does_not_manage_the_database() {
    let app = TestApp::new().await;
    let admin = admin().await;
    let control = app.db.name.clone();
    let probe = login_role(&admin, "capy_probe").await;
    for dbname in ["postgres", "template1", control.as_str()] {
        connect(&probe, "pw", dbname)
            .await
            .unwrap_or_else(|e| panic!("before any check, PUBLIC lets {probe} into {dbname}: {e}"));
    }

    // 1. The control plane's role is neither superuser nor owner of its database: it
    // connects through PUBLIC, so that database is reported, not closed.
    let plane = login_role(&admin, "capy_plane").await;
    sqlx::query(&format!(
        "grant select, insert, update, delete on all tables in schema public to {plane}"
    ))
    .execute(&app.db.pool)
    .await
    .unwrap();
    let mut plane_url = url::Url::parse(&app.db.url).unwrap();
    plane_url.set_username(&plane).unwrap();
    plane_url.set_password(Some("pw")).unwrap();
    let plane_pool = sqlx::PgPool::connect(plane_url.as_str()).await.unwrap();
    let report = capy_api::cluster_access::check_and_record(
        &plane_pool,
        app.cluster_id,
        &cluster().unwrap().admin_url_for("postgres"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(report.public_connect_open, vec![control.clone()]);
    for dbname in ["postgres", "template1"] {
        assert!(
            report.public_connect_closed.contains(&dbname.to_string()),
            "{:?}",
            report.public_connect_closed
        );
        assert_refused(&probe, dbname).await;
    }
    plane_pool.close().await;
    connect(&plane, "pw", &control)
        .await
        .expect("the control plane's role was locked out of its database");

    // 2. A project's database is left to its steps; everything else is closed.
    let unmanaged = format!("capy_unmanaged_{}", Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("create database {unmanaged}"))
        .await
        .unwrap();
    let (status, created) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(&json!({"name": "kept"}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let project_db = created["project"]["database_name"]
        .as_str()
        .unwrap()
        .to_string();
    admin
        .batch_execute(&format!("create database {project_db}"))
        .await
        .unwrap();
    let access = check_access(&app, app.cluster_id).await;
    let mut closed = names(&access, "public_connect_closed");
    closed.sort();
    let mut expected = vec![control.clone(), unmanaged.clone()];
    expected.sort();
    assert_eq!(closed, expected, "{access}");
    assert_eq!(names(&access, "public_connect_open"), Vec::<String>::new());
    for dbname in [control.as_str(), unmanaged.as_str()] {
        assert_refused(&probe, dbname).await;
    }
    connect(&probe, "pw", &project_db)
        .await
        .expect("check-access changed a project's database");
    // Nothing left to close; the admin still gets in everywhere.
    let again = check_access(&app, app.cluster_id).await;
    assert_eq!(again["public_connect_closed"], json!([]), "{again}");
    assert_eq!(again["public_connect_open"], json!([]), "{again}");

    // 3. An admin that is not superuser closes only the databases it owns.
    let weak = login_role(&admin, "capy_weak").await;
    let theirs = format!("capy_theirs_{}", Uuid::new_v4().simple());
    let its_own = format!("capy_its_own_{}", Uuid::new_v4().simple());
    for sql in [
        format!("create database {theirs}"),
        format!("create database {its_own} owner {weak}"),
        format!("grant connect on database postgres to {weak}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let mut weak_url = url::Url::parse(&cluster().unwrap().admin_url_for("postgres")).unwrap();
    weak_url.set_username(&weak).unwrap();
    weak_url.set_password(Some("pw")).unwrap();
    let (status, body) = app
        .call(
            "POST",
            "/v1/clusters",
            Some(&app.admin_key),
            Some(&json!({"name": "weak", "region": "eu", "url": weak_url.as_str()}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let access = &body["access"];
    assert_eq!(access["reachable"], true, "{body}");
    assert_eq!(
        names(access, "public_connect_closed"),
        vec![its_own.clone()]
    );
    assert_eq!(names(access, "public_connect_open"), vec![theirs.clone()]);
    assert_refused(&probe, &its_own).await;
    connect(&probe, "pw", &theirs)
        .await
        .expect("a database the admin does not own was changed");

    // 4. `capy-api bootstrap` registers its cluster with the same check.
    let later = format!("capy_later_{}", Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("create database {later}"))
        .await
        .unwrap();
    connect(&probe, "pw", &later).await.unwrap();
    let env_file = std::env::temp_dir().join(format!("capy-bootstrap-{}.env", Uuid::new_v4()));
    let status = std::process::Command::new(capy_testkit::bin_path("capy-api").unwrap())
        .arg("bootstrap")
        .env("CAPY_DATABASE_URL", &app.db.url)
        .env("CAPY_SECRET_KEY", capy_testkit::TEST_SECRET_KEY)
        .env("CAPY_ENV_FILE", &env_file)
        .env("CAPY_API_URL", "http://127.0.0.1:1")
        .env("CAPY_BOOTSTRAP_CLUSTER", "bootstrapped")
        .env(
            "CAPY_BOOTSTRAP_CLUSTER_URL",
            cluster().unwrap().admin_url_for("postgres"),
        )
        .env("CAPY_BOOTSTRAP_CLUSTER_SSL_MODE", "disable")
        .status()
        .unwrap();
    let _ = std::fs::remove_file(&env_file);
    assert!(status.success(), "capy-api bootstrap: {status}");
    assert_refused(&probe, &later).await;
    assert_refused(&probe, &theirs).await;
}
