#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed set-up should panic
//! `capy previews …` against a real capy-api and worker, cloning on the test cluster.

use std::process::{Command, Output, Stdio};

use capy_api::admin::{self, ClusterSpec, KeyGrant};
use capy_shared::crypto::SecretBox;
use capy_testkit::{cluster, fresh_database, ProcessStack, TEST_SECRET_KEY};
use serde_json::Value;

/// The API and the worker run from the target folder: build them, so the test never
/// runs stale ones.
fn build_stack() {
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
            "-p",
            "capy-worker",
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
        "building capy-api and capy-worker failed"
    );
}

fn capy(url: &str, key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capy"))
        .env_clear()
        .current_dir(std::env::temp_dir())
        .env("CAPY_API_URL", url)
        .env("CAPY_API_KEY", key)
        .stdin(Stdio::null())
        .args(args)
        .output()
        .unwrap()
}

#[track_caller]
fn json(output: &Output) -> Value {
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The value of a `key: value` line of the human output.
#[track_caller]
fn field(output: &Output, key: &str) -> String {
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no '{key}:' line: {output:?}"))
}

#[track_caller]
fn refused(output: &Output, code: i32, says: &str) {
    assert_eq!(output.status.code(), Some(code), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(says), "expected '{says}': {output:?}");
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn count_items(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0)
}

/// A control database with an organization's key and the test cluster, and the API
/// with one worker; answers the stack and the key.
async fn start_stack() -> (capy_testkit::TestDatabase, ProcessStack, String) {
    build_stack();
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
    let env = [("CAPY_RETRY_BASE_DELAY_MS", "50".to_string())];
    let stack = ProcessStack::start(&db.url, 1, &env).await.unwrap();
    (db, stack, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_is_cloned_connected_to_listed_extended_reset_and_deleted() {
    let (_db, stack, key) = start_stack().await;
    let url = stack.api_url.as_str();
    let run = |args: &[&str]| capy(url, &key, args);

    let parent = json(&run(&[
        "projects", "create", "shop", "--wait", "-o", "json",
    ]));
    let project = parent["project"]["id"].as_str().unwrap().to_string();
    let credentials = json(&run(&["projects", "credentials", &project, "-o", "json"]));
    let parent_db = connect(credentials["connection_string"].as_str().unwrap())
        .await
        .unwrap();
    parent_db
        .batch_execute(
            "create table items (id int primary key); insert into items values (1), (2), (3)",
        )
        .await
        .unwrap();

    // Bad input: a mode clap does not know is a usage error (exit 2, nothing asked); a
    // TTL of 0 hours is the API's 422; an unknown preview is its 404.
    refused(
        &run(&[
            "previews",
            "create",
            "--project",
            &project,
            "--mode",
            "copy",
        ]),
        2,
        "copy",
    );
    refused(
        &run(&[
            "previews",
            "create",
            "--project",
            &project,
            "--ttl-hours",
            "0",
        ]),
        1,
        "HTTP 422",
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    refused(&run(&["previews", "show", &unknown]), 1, "HTTP 404");
    let listed = json(&run(&[
        "previews",
        "list",
        "--project",
        &project,
        "-o",
        "json",
    ]));
    assert_eq!(
        listed["preview_databases"],
        serde_json::json!([]),
        "{listed}"
    );

    // A clone, waited for: the human output is the ready preview; the job's lines are on stderr.
    let created = run(&[
        "previews",
        "create",
        "--project",
        &project,
        "--name",
        "pr-1",
        "--ttl-hours",
        "2",
        "--wait",
    ]);
    assert_eq!(field(&created, "state"), "ready");
    assert_eq!(field(&created, "mode"), "clone");
    assert_eq!(field(&created, "name"), "pr-1");
    assert!(
        String::from_utf8_lossy(&created.stderr).contains(": completed"),
        "{created:?}"
    );
    let id = field(&created, "id");
    let role = field(&created, "role_name");

    // Its connection strings carry its own login's password; the clone has the rows,
    // and what it writes does not reach the parent.
    let connections = run(&["previews", "connections", &id]);
    assert_eq!(field(&connections, "username"), role);
    assert_ne!(field(&connections, "password"), "-");
    let preview_url = field(&connections, "connection_string");
    let preview_db = connect(&preview_url).await.unwrap();
    let who: String = preview_db
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, role);
    assert_eq!(count_items(&preview_db).await, 3);
    preview_db
        .execute("insert into items values (4)", &[])
        .await
        .unwrap();
    assert_eq!(count_items(&parent_db).await, 3);
    drop(preview_db);

    // Listed (a table, and JSON), shown, extended.
    let table = run(&["previews", "list", "--project", &project]);
    let table_text = String::from_utf8_lossy(&table.stdout);
    assert!(table_text.starts_with("ID "), "{table:?}");
    assert!(
        table_text.contains(&id) && table_text.contains("ready"),
        "{table:?}"
    );
    let shown = json(&run(&["previews", "show", &id, "-o", "json"]));
    assert_eq!(shown["preview"]["project_id"], project.as_str());
    let expires = shown["preview"]["ttl_expires_at"]
        .as_str()
        .unwrap()
        .to_string();
    let extended = json(&run(&[
        "previews",
        "extend",
        &id,
        "--ttl-hours",
        "5",
        "-o",
        "json",
    ]));
    let extended_to = extended["preview"]["ttl_expires_at"].as_str().unwrap();
    assert!(extended_to > expires.as_str(), "{expires} → {extended}");
    refused(
        &run(&["previews", "extend", &id, "--ttl-hours", "100000"]),
        1,
        "HTTP 422",
    );

    // An empty preview: the schema without the rows, under the default name.
    let empty = json(&run(&[
        "previews",
        "create",
        "--project",
        &project,
        "--mode",
        "empty",
        "--wait",
        "-o",
        "json",
    ]));
    assert_eq!(empty["job"]["state"], "completed", "{empty}");
    assert_eq!(empty["preview"]["state"], "ready", "{empty}");
    assert_eq!(empty["preview"]["mode"], "empty", "{empty}");
    let empty_id = empty["preview"]["id"].as_str().unwrap();
    assert_eq!(
        empty["preview"]["name"],
        format!("preview-{}", &empty_id[..8]).as_str()
    );
    let empty_credentials = json(&run(&["previews", "connections", empty_id, "-o", "json"]));
    let empty_db = connect(empty_credentials["connection_string"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(count_items(&empty_db).await, 0);
    drop(empty_db);

    // A reset makes it again from the parent: the preview's own write is gone.
    parent_db
        .execute("insert into items values (10)", &[])
        .await
        .unwrap();
    let reset = json(&run(&["previews", "reset", &id, "--wait", "-o", "json"]));
    assert_eq!(reset["job"]["type"], "project.preview_reset", "{reset}");
    assert_eq!(reset["job"]["state"], "completed", "{reset}");
    assert_eq!(reset["preview"]["state"], "ready", "{reset}");
    let connections = json(&run(&["previews", "connections", &id, "-o", "json"]));
    let preview_url = connections["connection_string"].as_str().unwrap();
    let preview_db = connect(preview_url).await.unwrap();
    let ids: Vec<i32> = preview_db
        .query("select id from items order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(ids, [1, 2, 3, 10]);
    drop(preview_db);

    // Deleted and waited for: its login no longer connects, it is no longer listed,
    // and it has no connection strings.
    let deleted = json(&run(&["previews", "delete", &id, "--wait", "-o", "json"]));
    assert_eq!(
        deleted["job"]["type"], "project.preview_delete",
        "{deleted}"
    );
    assert_eq!(deleted["job"]["state"], "completed", "{deleted}");
    assert!(connect(preview_url).await.is_err(), "the login still works");
    let listed = json(&run(&[
        "previews",
        "list",
        "--project",
        &project,
        "-o",
        "json",
    ]));
    let ids: Vec<&str> = listed["preview_databases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(ids, [empty_id], "{listed}");
    let gone = run(&["previews", "connections", &id]);
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    assert!(gone.stdout.is_empty(), "{gone:?}");
    assert_eq!(count_items(&parent_db).await, 4, "the parent is untouched");
}
