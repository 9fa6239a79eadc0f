//! The backup steps against the test process's private cluster and a folder store:
//! the real `capy-step` binary with a StepInput on its stdin, the tenant acting through
//! its own login, and the store's files and the catalogs read afterwards.

// Helpers outside #[test] functions panic on failure too: they are test code.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use capy_shared::model::job_type;
use capy_shared::store::{archive_key, manifest_key};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use uuid::Uuid;

const EXIT_PERMANENT: i32 = 1;

struct Project {
    id: Uuid,
    name: String,
    password: String,
}

impl Project {
    fn new() -> Self {
        Self {
            id: Uuid::new_v4(),
            name: format!("capy_{}", Uuid::new_v4().simple()),
            password: format!("pw-{}", Uuid::new_v4().simple()),
        }
    }
}

/// A folder store, removed at the end of the test.
struct Store(PathBuf);

impl Store {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("capy-store-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn url(&self) -> String {
        format!("file://{}", self.0.display())
    }

    fn file(&self, key: &str) -> PathBuf {
        self.0.join(key)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A backup of a project in a store.
struct Backup {
    id: Uuid,
    key: String,
}

impl Backup {
    fn of(project: &Project) -> Self {
        let id = Uuid::now_v7();
        Self {
            id,
            key: archive_key(project.id, id),
        }
    }

    fn args(&self) -> Value {
        json!({"backup_id": self.id, "backup_key": self.key})
    }
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    fn result(&self) -> Value {
        capy_shared::step::parse_result(&self.stdout).expect("a result line")
    }

    fn last_error(&self) -> &str {
        self.stderr.lines().last().unwrap_or_default()
    }
}

fn admin_url() -> String {
    capy_testkit::cluster().unwrap().admin_url_for("postgres")
}

fn input(job_type: &str, project: &Project, args: Value, store: &Store) -> Value {
    let now = chrono::Utc::now();
    json!({
        "job": {
            "id": Uuid::now_v7(), "type": job_type, "state": "claimed",
            "organization_id": Uuid::new_v4(), "project_id": project.id,
            "cluster_id": Uuid::nil(), "preview_database_id": null,
            "attempts": 1, "max_attempts": 3, "run_at": now, "claimed_at": now,
            "claimed_by": "test", "started_at": now, "completed_at": null, "error": null,
            "last_exit_code": null, "last_stdout": null, "last_stderr": null,
            "locked_resource": format!("project:{}", project.id),
            "retry_classification": null, "args": args, "cancel_requested_at": null,
            "created_at": now, "updated_at": now,
        },
        "project": {
            "id": project.id, "database_name": project.name, "role_name": project.name,
            "password": project.password, "max_connections": 5,
            "statement_timeout": "30s", "idle_transaction_timeout": "1min",
            "storage_limit_bytes": null,
        },
        "cluster": {"id": Uuid::nil(), "name": "test-cluster", "admin_url": admin_url()},
        "store": {"url": store.url(), "s3_region": "us-east-1"},
    })
}

/// Runs `capy-step` for `job_type`; checks that its output shows no password.
async fn step(job_type: &str, project: &Project, args: Value, store: &Store) -> Output {
    let stdin = serde_json::to_vec(&input(job_type, project, args, store)).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_capy-step"))
        .env("CAPY_JOB_TYPE", job_type)
        .env("CAPY_ATTEMPT", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(&stdin).await.unwrap();
    drop(pipe);
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .expect("capy-step did not finish within 120 s")
    .unwrap();
    let output = Output {
        code: output
            .status
            .code()
            .expect("capy-step was killed by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let config: tokio_postgres::Config = admin_url().parse().unwrap();
    let admin_password = String::from_utf8(config.get_password().unwrap().to_vec()).unwrap();
    for secret in [project.password.clone(), admin_password] {
        for text in [&output.stdout, &output.stderr] {
            assert!(!text.contains(&secret), "{job_type} printed a password");
        }
    }
    output
}

async fn connect(config: tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn admin(dbname: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
    config.dbname(dbname);
    connect(config).await
}

/// The project's own login, in its database.
async fn as_tenant(project: &Project) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
    config
        .user(&project.name)
        .password(&project.password)
        .dbname(&project.name);
    connect(config).await
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// `(table, owner)` of the project's tables outside the system schemas.
async fn owners(project: &Project) -> Vec<(String, String)> {
    admin(&project.name)
        .await
        .query(
            "select schemaname || '.' || tablename, tableowner::text from pg_tables
             where schemaname not in ('pg_catalog', 'information_schema') order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn database_exists(name: &str) -> bool {
    admin("postgres")
        .await
        .query_opt("select 1 from pg_database where datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

async fn create_project(project: &Project, store: &Store) {
    step(job_type::PROJECT_CREATE, project, json!({}), store)
        .await
        .assert_code(0);
}

/// The tenant's data: an extension (trusted, the tenant's own), two schemas, rows.
async fn fill(project: &Project) {
    as_tenant(project)
        .await
        .batch_execute(
            "create extension pgcrypto;
             create table orders (id int primary key, h bytea default digest('x', 'sha256'));
             insert into orders (id) select generate_series(1, 100);
             comment on table orders is 'the orders';
             create schema app;
             create table app.items (id bigserial primary key, name text not null);
             insert into app.items (name) select 'item ' || g from generate_series(1, 7) g;",
        )
        .await
        .unwrap();
}

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

async fn back_up(project: &Project, backup: &Backup, store: &Store) -> Value {
    let output = step(job_type::PROJECT_BACKUP, project, backup.args(), store).await;
    output.assert_code(0);
    let result = output.result();
    let archive = store.file(&backup.key);
    assert_eq!(
        result["size_bytes"].as_u64(),
        Some(std::fs::metadata(&archive).unwrap().len())
    );
    assert_eq!(
        result["sha256"].as_str(),
        Some(sha256_of(&archive).as_str())
    );
    assert!(store.file(&manifest_key(&backup.key)).is_file());
    result
}

#[tokio::test]
async fn backup_verify_restore_and_delete() {
    let store = Store::new();
    let project = Project::new();
    create_project(&project, &store).await;
    fill(&project).await;
    let backup = Backup::of(&project);
    for _ in 0..2 {
        let result = back_up(&project, &backup, &store).await;
        assert_eq!(result["tables"], 2);
        assert_eq!(result["rows"], 107);
        assert_eq!(result["extensions"][0]["name"], "pgcrypto");
        assert!(result["server_version_num"].as_i64().unwrap() >= 100_000);
    }
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(store.file(&manifest_key(&backup.key))).unwrap())
            .unwrap();
    assert_eq!(
        manifest["tables"],
        json!([{"schema": "app", "name": "items", "rows": 7},
               {"schema": "public", "name": "orders", "rows": 100}])
    );

    for _ in 0..2 {
        let output = step(
            job_type::PROJECT_BACKUP_VERIFY,
            &project,
            backup.args(),
            &store,
        )
        .await;
        output.assert_code(0);
        assert_eq!(
            output.result(),
            json!({"verified": true, "tables": 2, "rows": 107})
        );
    }
    let scratch = format!("capy_verify_{}", backup.id.simple());
    assert!(!database_exists(&scratch).await);

    restore_over_the_project(&project, &backup, &store).await;
    restore_into_a_new_project(&backup, &store).await;
    tampered_manifest_fails(&project, &backup, &store).await;
    assert!(!database_exists(&scratch).await);

    for _ in 0..2 {
        step(job_type::BACKUP_DELETE, &project, backup.args(), &store)
            .await
            .assert_code(0);
        assert!(!store.file(&backup.key).exists());
        assert!(!store.file(&manifest_key(&backup.key)).exists());
    }
}

async fn restore_over_the_project(project: &Project, backup: &Backup, store: &Store) {
    let tenant = as_tenant(project).await;
    tenant
        .batch_execute("drop table orders; insert into app.items (name) values ('later')")
        .await
        .unwrap();
    let args = json!({"backup_id": backup.id, "backup_key": backup.key, "mode": "project"});
    for _ in 0..2 {
        let output = step(job_type::PROJECT_RESTORE, project, args.clone(), store).await;
        output.assert_code(0);
        assert_eq!(output.result()["restored"], true);
    }
    let tenant = as_tenant(project).await;
    assert_eq!(count(&tenant, "select count(*) from orders").await, 100);
    assert_eq!(count(&tenant, "select count(*) from app.items").await, 7);
    // The extension's function works, and the tenant may write again.
    tenant
        .batch_execute(
            "insert into orders (id) values (101); insert into app.items (name) values ('x')",
        )
        .await
        .unwrap();
    assert_eq!(
        owners(project).await,
        vec![
            ("app.items".into(), project.name.clone()),
            ("public.orders".into(), project.name.clone())
        ]
    );
}

async fn restore_into_a_new_project(backup: &Backup, store: &Store) {
    // Its create has not run: the restore makes the role and the database.
    let target = Project::new();
    let args = json!({"backup_id": backup.id, "backup_key": backup.key, "mode": "new_project"});
    for _ in 0..2 {
        step(job_type::PROJECT_RESTORE, &target, args.clone(), store)
            .await
            .assert_code(0);
    }
    let tenant = as_tenant(&target).await;
    assert_eq!(count(&tenant, "select count(*) from orders").await, 100);
    assert_eq!(count(&tenant, "select count(*) from app.items").await, 7);
    assert_eq!(
        owners(&target).await,
        vec![
            ("app.items".into(), target.name.clone()),
            ("public.orders".into(), target.name.clone())
        ]
    );
}

async fn tampered_manifest_fails(project: &Project, backup: &Backup, store: &Store) {
    let path = store.file(&manifest_key(&backup.key));
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["tables"][1]["rows"] = json!(99);
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let output = step(
        job_type::PROJECT_BACKUP_VERIFY,
        project,
        backup.args(),
        store,
    )
    .await;
    output.assert_code(EXIT_PERMANENT);
    assert_eq!(
        output.last_error(),
        "error: table public.orders: 99 rows in the backup, 100 restored"
    );
}

/// A tenant's function in a CHECK constraint runs while the rows are restored: it
/// must run with the tenant's rights alone, in the verification and the restore.
#[tokio::test]
async fn a_hostile_archive_gains_nothing() {
    let store = Store::new();
    let project = Project::new();
    create_project(&project, &store).await;
    let intruder = format!("intruder_{}", Uuid::new_v4().simple());
    as_tenant(&project)
        .await
        .batch_execute(&format!(
            "create function public.sneaky(v int) returns boolean language plpgsql as $$
             begin
               begin reset role; exception when others then null; end;
               begin execute 'create role {intruder} superuser login password ''x''';
               exception when others then null; end;
               return v > 0;
             end $$;
             create table guarded (v int check (public.sneaky(v)));
             insert into guarded values (1), (2), (3);"
        ))
        .await
        .unwrap();
    let backup = Backup::of(&project);
    back_up(&project, &backup, &store).await;
    step(
        job_type::PROJECT_BACKUP_VERIFY,
        &project,
        backup.args(),
        &store,
    )
    .await
    .assert_code(0);
    let args = json!({"backup_id": backup.id, "backup_key": backup.key, "mode": "project"});
    step(job_type::PROJECT_RESTORE, &project, args, &store)
        .await
        .assert_code(0);
    let roles = admin("postgres")
        .await
        .query("select 1 from pg_roles where rolname = $1", &[&intruder])
        .await
        .unwrap();
    assert!(roles.is_empty(), "the archive's function created a role");
    let tenant = as_tenant(&project).await;
    assert_eq!(count(&tenant, "select count(*) from guarded").await, 3);
}

/// Backup, verification and an overwriting restore touch only the project's own
/// archives (a restore into a new project may read another's).
#[tokio::test]
async fn a_key_of_another_project_is_refused() {
    let store = Store::new();
    let project = Project::new();
    let other = Backup::of(&Project::new());
    let mut restore_args = other.args();
    restore_args["mode"] = json!("project");
    for (job_type, args) in [
        (job_type::PROJECT_BACKUP, other.args()),
        (job_type::PROJECT_BACKUP_VERIFY, other.args()),
        (job_type::PROJECT_RESTORE, restore_args),
    ] {
        let output = step(job_type, &project, args, &store).await;
        output.assert_code(EXIT_PERMANENT);
        assert!(
            output.last_error().contains("another project"),
            "{job_type}: {}",
            output.stderr
        );
    }
}
