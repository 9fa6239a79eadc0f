//! The MySQL steps against the test process's private MariaDB: the real `capy-step`
//! binary, a StepInput on its stdin, then the tenant's own sessions trying to escape.
// Helpers outside #[test] functions panic on failure too: they are test code.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use capy_shared::engines::mysql::{check_access, error_number};
use capy_shared::model::{job_type, Engine};
use serde_json::{json, Value};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{Connection as _, Executor as _, MySqlConnection};
use tokio::io::AsyncWriteExt as _;
use uuid::Uuid;

const EXIT_PERMANENT: i32 = 1;

/// A project as the worker would hand it to the step.
struct Project {
    id: Uuid,
    database: String,
    user: String,
    /// Holds `'` and `\`: the step's quoting is under test too.
    password: String,
    max_connections: i32,
    stopped: bool,
}

impl Project {
    fn new() -> Self {
        let id = Uuid::new_v4();
        Self {
            id,
            database: format!("capy_{}", id.simple()),
            user: Engine::Mysql.login_name(id),
            password: format!("pw'\\{}", Uuid::new_v4().simple()),
            max_connections: 3,
            stopped: false,
        }
    }
}

fn admin_url() -> String {
    capy_testkit::mariadb().unwrap().admin_url()
}

fn admin_password() -> String {
    capy_testkit::mariadb().unwrap().password().to_string()
}

fn input(job_type: &str, project: &Project) -> Value {
    let now = chrono::Utc::now();
    json!({
        "job": {
            "id": Uuid::now_v7(), "type": job_type, "state": "claimed",
            "organization_id": Uuid::new_v4(), "project_id": project.id,
            "cluster_id": Uuid::nil(), "preview_database_id": null, "attempts": 1,
            "max_attempts": 3, "run_at": now, "claimed_at": now, "claimed_by": "test",
            "started_at": now, "completed_at": null, "error": null, "last_exit_code": null,
            "last_stdout": null, "last_stderr": null,
            "locked_resource": format!("project:{}", project.id),
            "retry_classification": null, "args": {}, "cancel_requested_at": null,
            "created_at": now, "updated_at": now,
        },
        "project": {
            "id": project.id, "database_name": project.database, "role_name": project.user,
            "password": project.password, "max_connections": project.max_connections,
            "statement_timeout": "30s", "idle_transaction_timeout": "1min",
            "storage_limit_bytes": null, "stopped": project.stopped,
        },
        "cluster": {
            "id": Uuid::nil(), "name": "test-mariadb", "admin_url": admin_url(),
            "engine": "mysql",
        },
    })
}

/// Runs `capy-step` for `job_type`, checks that its output shows no secret, and
/// returns its exit code and output.
async fn step(job_type: &str, project: &Project) -> (i32, String) {
    let stdin = serde_json::to_vec(&input(job_type, project)).unwrap();
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
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("capy-step did not finish within 60 s")
        .unwrap();
    let text = format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for secret in [project.password.clone(), admin_password(), admin_url()] {
        assert!(
            !text.contains(&secret),
            "{job_type} printed a secret:\n{text}"
        );
    }
    (output.status.code().unwrap(), text)
}

/// Runs `job_type` and asserts it succeeded.
async fn step_ok(job_type: &str, project: &Project) {
    let started = Instant::now();
    let (code, text) = step(job_type, project).await;
    assert_eq!(code, 0, "{job_type} failed:\n{text}");
    eprintln!("{job_type}: {} ms", started.elapsed().as_millis());
}

fn server_options() -> MySqlConnectOptions {
    let server = capy_testkit::mariadb().unwrap();
    MySqlConnectOptions::new()
        .host(server.host())
        .port(server.port())
}

async fn admin() -> MySqlConnection {
    MySqlConnection::connect(&admin_url()).await.unwrap()
}

/// The project's user, with its password, in its database.
async fn as_tenant(project: &Project) -> Result<MySqlConnection, sqlx::Error> {
    let options = server_options()
        .username(&project.user)
        .password(&project.password)
        .database(&project.database);
    MySqlConnection::connect_with(&options).await
}

async fn count(connection: &mut MySqlConnection, sql: &str, name: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(name)
        .fetch_one(connection)
        .await
        .unwrap()
}

/// Runs `sql` as the tenant; it must be refused by the server.
async fn refused(tenant: &mut MySqlConnection, sql: &str) {
    let result = tenant.execute(sql).await;
    let error = result
        .err()
        .unwrap_or_else(|| panic!("the tenant could run: {sql}"));
    assert!(
        error_number(&error).is_some(),
        "{sql}: not a server refusal: {error}"
    );
}

#[tokio::test]
async fn create_twice_gives_the_user_its_own_database_and_nothing_else() {
    let project = Project::new();
    let other = Project::new();
    step_ok(job_type::PROJECT_CREATE, &other).await;
    step_ok(job_type::PROJECT_CREATE, &project).await;
    step_ok(job_type::PROJECT_CREATE, &project).await;
    let mut admin = admin().await;
    let other_table = format!("CREATE TABLE `{}`.secrets (v TEXT)", other.database);
    admin.execute(other_table.as_str()).await.unwrap();

    let mut tenant = as_tenant(&project).await.unwrap();
    tenant
        .execute("CREATE TABLE notes (v TEXT); INSERT INTO notes VALUES ('mine')")
        .await
        .unwrap();
    let mine: String = sqlx::query_scalar("SELECT v FROM notes")
        .fetch_one(&mut tenant)
        .await
        .unwrap();
    assert_eq!(mine, "mine");

    let hex = project.id.simple();
    for sql in [
        format!("USE `{}`", other.database),
        format!("SELECT * FROM `{}`.secrets", other.database),
        format!("CREATE TABLE `{}`.mine (v INT)", other.database),
        "USE mysql".to_string(),
        "SELECT * FROM mysql.user".to_string(),
        // `_` is a wildcard in GRANT: an unescaped grant would let it make these.
        format!("CREATE DATABASE `capyx{hex}`"),
        "CREATE DATABASE elsewhere".to_string(),
        "CREATE USER 'evil'@'%' IDENTIFIED BY 'x'".to_string(),
        format!(
            "GRANT SELECT ON `{}`.* TO `{}`@'%'",
            project.database, other.user
        ),
        "SET GLOBAL max_connections = 1".to_string(),
    ] {
        refused(&mut tenant, &sql).await;
    }
    let grants: Vec<String> =
        sqlx::query_scalar(&format!("SHOW GRANTS FOR `{}`@'%'", project.user))
            .fetch_all(&mut admin)
            .await
            .unwrap();
    assert!(
        grants.iter().all(|g| !g.contains("GRANT OPTION")
            && !g.contains("EVENT")
            && !g.contains("ALL PRIVILEGES")
            && (g.starts_with("GRANT USAGE ON *.*") || !g.contains("*.*"))),
        "{grants:?}"
    );
    connection_limit_holds(&project, tenant).await;
}

/// `max_connections` sessions in all (`open` is the first); one more is refused.
async fn connection_limit_holds(project: &Project, open: MySqlConnection) {
    let mut sessions = vec![open];
    for _ in 1..project.max_connections {
        sessions.push(as_tenant(project).await.unwrap());
    }
    let Err(error) = as_tenant(project).await else {
        panic!("one session too many was let in");
    };
    assert_eq!(error_number(&error), Some(1226), "{error}");
    drop(sessions);
}

#[tokio::test]
async fn stop_ends_sessions_and_refuses_logins_until_start() {
    let mut project = Project::new();
    step_ok(job_type::PROJECT_CREATE, &project).await;
    let mut open = as_tenant(&project).await.unwrap();
    open.execute("SELECT 1").await.unwrap();

    step_ok(job_type::PROJECT_STOP, &project).await;
    step_ok(job_type::PROJECT_STOP, &project).await;
    assert!(
        open.execute("SELECT 1").await.is_err(),
        "a session outlived the stop"
    );
    assert!(
        as_tenant(&project).await.is_err(),
        "a stopped project let a login in"
    );

    project.stopped = true;
    project.max_connections = 4;
    step_ok(job_type::PROJECT_UPDATE, &project).await;
    step_ok(job_type::PROJECT_CREATE, &project).await;
    assert!(
        as_tenant(&project).await.is_err(),
        "a converge unlocked a stopped project"
    );

    project.stopped = false;
    step_ok(job_type::PROJECT_START, &project).await;
    step_ok(job_type::PROJECT_START, &project).await;
    let mut back = as_tenant(&project).await.unwrap();
    back.execute("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn delete_twice_removes_the_database_and_the_user() {
    let project = Project::new();
    step_ok(job_type::PROJECT_CREATE, &project).await;
    // An open transaction holding a table: the drop must end it, not wait for it.
    let mut open = as_tenant(&project).await.unwrap();
    open.execute("CREATE TABLE t (v INT); BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    step_ok(job_type::PROJECT_DELETE, &project).await;
    step_ok(job_type::PROJECT_DELETE, &project).await;
    let mut admin = admin().await;
    let users = "SELECT COUNT(*) FROM mysql.user WHERE User = ?";
    assert_eq!(count(&mut admin, users, &project.user).await, 0);
    let schemata = "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?";
    assert_eq!(count(&mut admin, schemata, &project.database).await, 0);
    assert!(
        open.execute("SELECT 1").await.is_err(),
        "a session outlived the delete"
    );
}

#[tokio::test]
async fn other_job_types_and_bad_names_fail_permanently() {
    let project = Project::new();
    let (code, text) = step(job_type::PROJECT_BACKUP, &project).await;
    assert_eq!(code, EXIT_PERMANENT, "{text}");
    assert!(
        text.contains("is not available for MySQL projects"),
        "{text}"
    );

    let mut hostile = Project::new();
    hostile.user = "capy_x'@'%' IDENTIFIED BY 'x".into();
    let (code, text) = step(job_type::PROJECT_CREATE, &hostile).await;
    assert_eq!(code, EXIT_PERMANENT, "{text}");
    let mut long = Project::new();
    long.user = format!("capy_{}", Uuid::new_v4().simple());
    let (code, text) = step(job_type::PROJECT_CREATE, &long).await;
    assert_eq!(
        code, EXIT_PERMANENT,
        "a 37-character user name was taken:\n{text}"
    );
}

#[tokio::test]
async fn check_access_reports_the_admins_rights_and_refusals() {
    let access = check_access(&admin_url().replace("mysql://", "mariadb://")).await;
    assert!(access.reachable && access.error.is_none(), "{access:?}");
    assert!(
        access.can_create_roles && access.can_create_databases,
        "{access:?}"
    );
    assert!(access.server_version.unwrap().contains("MariaDB"));

    let wrong = admin_url().replace(&admin_password(), "wrong-password");
    let access = check_access(&wrong).await;
    assert_eq!(
        access.error_kind.as_deref(),
        Some("authentication_failed"),
        "{access:?}"
    );
    assert!(!access.error.unwrap().contains("wrong-password"));

    let closed = format!(
        "mysql://root:x@127.0.0.1:{}/",
        capy_testkit::free_port().unwrap()
    );
    let access = check_access(&closed).await;
    assert_eq!(
        access.error_kind.as_deref(),
        Some("connection_refused"),
        "{access:?}"
    );

    let project = Project::new();
    step_ok(job_type::PROJECT_CREATE, &project).await;
    let server = capy_testkit::mariadb().unwrap();
    let password = project.password.replace('\\', "%5C").replace('\'', "%27");
    let tenant_url = format!(
        "mysql://{}:{password}@{}:{}/",
        project.user,
        server.host(),
        server.port()
    );
    let access = check_access(&tenant_url).await;
    assert!(access.reachable && access.error.is_none(), "{access:?}");
    assert!(
        !access.can_create_roles && !access.can_create_databases,
        "{access:?}"
    );
}
