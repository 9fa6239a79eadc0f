#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed set-up should panic
//! `capy clusters allow-extensions` against a real capy-api process: it sets (and
//! clears) the cluster's allow-list with the admin key, and an organization's key may
//! not.

use std::process::{Command, Output, Stdio};

use capy_api::admin::{self, ClusterSpec, KeyGrant};
use capy_shared::crypto::SecretBox;
use capy_testkit::{cluster, fresh_database, ProcessStack, TEST_SECRET_KEY};
use serde_json::Value;

/// capy-api runs from the target folder: build it, so the test never runs a stale one.
fn build_api() {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "capy-api",
            "--bins",
            "--target-dir",
        ])
        .arg(profile_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    assert!(
        build.status().unwrap().success(),
        "building capy-api failed"
    );
}

fn capy(url: &str, key: &str, admin_key: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capy"));
    command
        .env_clear()
        .current_dir(std::env::temp_dir())
        .env("CAPY_API_URL", url)
        .env("CAPY_API_KEY", key)
        .stdin(Stdio::null())
        .args(args);
    if let Some(admin_key) = admin_key {
        command.env("CAPY_ADMIN_KEY", admin_key);
    }
    command.output().unwrap()
}

fn json(output: &Output) -> Value {
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn the_admin_sets_and_clears_a_clusters_allowed_extensions() {
    build_api();
    let db = fresh_database().await.unwrap();
    let secrets = SecretBox::from_key_text(TEST_SECRET_KEY).unwrap();
    let organization_id = admin::create_organization(&db.pool, "acme").await.unwrap();
    let grant = |name: &str, organization_id, is_admin| KeyGrant {
        name: name.into(),
        organization_id,
        is_admin,
        ..KeyGrant::default()
    };
    let (_, key) = admin::create_api_key(&db.pool, &grant("org", Some(organization_id), false))
        .await
        .unwrap();
    let (_, admin_key) = admin::create_api_key(&db.pool, &grant("admin", None, true))
        .await
        .unwrap();
    let test_cluster = cluster().unwrap();
    let cluster_id = admin::upsert_cluster(
        &db.pool,
        &secrets,
        &ClusterSpec {
            engine: capy_shared::model::Engine::Postgresql,
            name: "local".into(),
            region: "local".into(),
            admin_url: test_cluster.admin_url_for("postgres"),
            public_host: test_cluster.host().to_string(),
            direct_port: i32::from(test_cluster.port),
            pooled_port: i32::from(test_cluster.port),
            pooled_host: None,
            pooler_auth_user: None,
            ssl_mode: "disable".into(),
            max_projects: None,
            ca_pem: None,
        },
    )
    .await
    .unwrap()
    .to_string();
    let stack = ProcessStack::start(&db.url, 0, &[]).await.unwrap();
    let url = stack.api_url.as_str();
    let admin = Some(admin_key.as_str());

    let set = capy(
        url,
        &key,
        admin,
        &[
            "clusters",
            "allow-extensions",
            &cluster_id,
            "file_fdw",
            "postgres_fdw",
            "--output",
            "json",
        ],
    );
    assert_eq!(
        json(&set)["cluster"]["allowed_extensions"],
        serde_json::json!(["file_fdw", "postgres_fdw"])
    );
    let shown = capy(url, &key, admin, &["clusters", "show", &cluster_id]);
    let shown = String::from_utf8(shown.stdout).unwrap();
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("allowed_extensions:") && l.ends_with(" file_fdw,postgres_fdw")),
        "{shown}"
    );

    // No names clears the list.
    let cleared = capy(
        url,
        &key,
        admin,
        &[
            "clusters",
            "allow-extensions",
            &cluster_id,
            "--output",
            "json",
        ],
    );
    assert_eq!(
        json(&cleared)["cluster"]["allowed_extensions"],
        serde_json::json!([])
    );

    // An organization's key may not, and a bad name is the API's 400.
    let forbidden = capy(
        url,
        &key,
        None,
        &["clusters", "allow-extensions", &cluster_id, "file_fdw"],
    );
    assert_eq!(forbidden.status.code(), Some(1), "{forbidden:?}");
    assert!(String::from_utf8_lossy(&forbidden.stderr).contains("(HTTP 403)"));
    let bad = capy(
        url,
        &key,
        admin,
        &["clusters", "allow-extensions", &cluster_id, "File_FDW"],
    );
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("(HTTP 400)"));
}
