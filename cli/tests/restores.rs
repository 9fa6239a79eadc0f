#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed set-up should panic
//! `capy restores create` and `capy approvals create` against a real capy-api process.

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
async fn restores_are_asked_into_a_new_project_or_over_the_project_with_an_approval() {
    build_api();
    let db = fresh_database().await.unwrap();
    let secrets = SecretBox::from_key_text(TEST_SECRET_KEY).unwrap();
    let organization_id = admin::create_organization(&db.pool, "acme").await.unwrap();
    let grant = KeyGrant {
        name: "org".into(),
        organization_id: Some(organization_id),
        ..KeyGrant::default()
    };
    let (_, key) = admin::create_api_key(&db.pool, &grant).await.unwrap();
    let test_cluster = cluster().unwrap();
    admin::upsert_cluster(
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
    .unwrap();
    // No worker: jobs stay queued; the project is made ready and the backup written by hand.
    // Restores are refused without a backup store: a folder of the test's own.
    let store =
        std::env::temp_dir().join(format!("capy-cli-store-{}", uuid::Uuid::new_v4().simple()));
    let env = [("CAPY_BACKUP_STORE", format!("file://{}", store.display()))];
    let stack = ProcessStack::start(&db.url, 0, &env).await.unwrap();
    let url = stack.api_url.as_str();
    let created = json(&capy(
        url,
        &key,
        None,
        &["projects", "create", "shop", "-o", "json"],
    ));
    let project = created["project"]["id"].as_str().unwrap().to_string();
    let backup = uuid::Uuid::now_v7();
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let id: uuid::Uuid = project.parse().unwrap();
    client
        .execute("update projects set state = 'ready' where id = $1", &[&id])
        .await
        .unwrap();
    client
        .execute(
            "insert into backups (id, organization_id, project_id, kind, backup_key,
                                  database_name, state, verification_state, manifest)
             select $1::uuid, organization_id, id, 'backup',
                    'projects/' || id || '/backups/' || $1::uuid || '.dump', database_name,
                    'completed', 'verified', '{\"extensions\": []}'
             from projects where id = $2",
            &[&backup, &id],
        )
        .await
        .unwrap();
    let backup = backup.to_string();
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restores", "create", &project, "--backup", &backup, "-o", "json",
        ];
        args.extend_from_slice(extra);
        capy(url, &key, None, &args)
    };

    let new = json(&restore(&["--into", "new-project", "--name", "shop-copy"]));
    assert_eq!(new["project"]["name"], "shop-copy");
    assert_eq!(new["job"]["type"], "project.restore");
    assert_eq!(new["job"]["args"]["mode"], "new_project");

    // Overwriting needs an approval: none is a usage error (exit 2), nothing asked.
    let refused = restore(&["--into", "project"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let approval = json(&capy(
        url,
        &key,
        None,
        &["approvals", "create", &project, "-o", "json"],
    ));
    let token = approval["token"].as_str().unwrap();
    let over = json(&restore(&["--into", "project", "--approval", token]));
    assert_eq!(over["project"]["id"], project.as_str());
    assert_eq!(over["job"]["args"]["mode"], "project");
    // The same token again: the API's 409 names the job it authorized.
    let again = restore(&["--into", "project", "--approval", token]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    let job = over["job"]["id"].as_str().unwrap();
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(job),
        "{again:?}"
    );
    // --approve asks for one itself.
    let approved = json(&restore(&["--into", "project", "--approve"]));
    assert_eq!(approved["job"]["args"]["mode"], "project");
}
