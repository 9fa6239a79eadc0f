//! The built-in steps against the test process's private cluster: the real `capy-step`
//! binary, a StepInput on its stdin, and the catalogs read afterwards.

// Helpers outside #[test] functions panic on failure too: they are test code.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;

use capy_shared::model::job_type;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use uuid::Uuid;

const EXIT_PERMANENT: i32 = 1;

/// A project as the worker would hand it to the step.
struct Project {
    id: Uuid,
    /// The database's name (and its first login's).
    name: String,
    /// The login: `name` until a rotation.
    role_name: String,
    password: String,
    previous_role_name: Option<String>,
    /// A rotation's new login and its password.
    pending_login: Option<(String, String)>,
    max_connections: i32,
    statement_timeout: String,
    idle_transaction_timeout: String,
}

impl Project {
    fn new() -> Self {
        let name = format!("capy_{}", Uuid::new_v4().simple());
        Self {
            id: Uuid::new_v4(),
            role_name: name.clone(),
            name,
            password: format!("pw-{}", Uuid::new_v4().simple()),
            previous_role_name: None,
            pending_login: None,
            max_connections: 5,
            statement_timeout: "30s".into(),
            idle_transaction_timeout: "1min".into(),
        }
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
}

fn admin_url() -> String {
    capy_testkit::cluster().unwrap().admin_url_for("postgres")
}

fn admin_password() -> String {
    let config: tokio_postgres::Config = admin_url().parse().unwrap();
    String::from_utf8(config.get_password().unwrap().to_vec()).unwrap()
}

fn input(job_type: &str, project: &Project, args: Value, admin_url: &str) -> Value {
    let now = chrono::Utc::now();
    json!({
        "job": {
            "id": Uuid::now_v7(),
            "type": job_type,
            "state": "claimed",
            "organization_id": Uuid::new_v4(),
            "project_id": project.id,
            "cluster_id": Uuid::nil(),
            "preview_database_id": null,
            "attempts": 1,
            "max_attempts": 3,
            "run_at": now,
            "claimed_at": now,
            "claimed_by": "test",
            "started_at": now,
            "completed_at": null,
            "error": null,
            "last_exit_code": null,
            "last_stdout": null,
            "last_stderr": null,
            "locked_resource": format!("project:{}", project.id),
            "retry_classification": null,
            "args": args,
            "cancel_requested_at": null,
            "created_at": now,
            "updated_at": now,
        },
        "project": {
            "id": project.id,
            "database_name": project.name,
            "role_name": project.role_name,
            "password": project.password,
            "previous_role_name": project.previous_role_name,
            "pending_login": project.pending_login.as_ref()
                .map(|(role_name, password)| json!({"role_name": role_name, "password": password})),
            "max_connections": project.max_connections,
            "statement_timeout": project.statement_timeout,
            "idle_transaction_timeout": project.idle_transaction_timeout,
            "storage_limit_bytes": null,
        },
        "cluster": {
            "id": Uuid::nil(),
            "name": "test-cluster",
            "admin_url": admin_url,
        },
    })
}

/// Runs `capy-step` for `job_type`; checks that its output shows no password.
async fn step_with(job_type: &str, project: &Project, args: Value, admin_url: &str) -> Output {
    let stdin = serde_json::to_vec(&input(job_type, project, args, admin_url)).unwrap();
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
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("capy-step did not finish within 60 s")
        .unwrap();
    let output = Output {
        code: output
            .status
            .code()
            .expect("capy-step was killed by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let pending = project.pending_login.as_ref().map(|(_, p)| p.clone());
    for secret in [project.password.clone(), admin_password(), admin_url.into()]
        .into_iter()
        .chain(pending)
    {
        for (stream, text) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
            assert!(
                !text.contains(&secret),
                "{job_type} printed a password on {stream}"
            );
        }
    }
    output
}

async fn step(job_type: &str, project: &Project, args: Value) -> Output {
    step_with(job_type, project, args, &admin_url()).await
}

async fn connect(
    config: tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The cluster's admin, in database `dbname`.
async fn admin(dbname: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
    config.dbname(dbname);
    connect(config).await.unwrap()
}

/// The project's own role, with its password, in its database.
async fn as_project(project: &Project) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
    config
        .user(&project.role_name)
        .password(&project.password)
        .dbname(&project.name);
    connect(config).await
}

/// Login `role` with `password`, in the project's database.
async fn as_login(
    project: &Project,
    role: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
    config.user(role).password(password).dbname(&project.name);
    connect(config).await
}

async fn count(client: &tokio_postgres::Client, sql: &str, name: &str) -> i64 {
    client.query_one(sql, &[&name]).await.unwrap().get(0)
}

async fn extension_version(project: &Project, name: &str) -> Option<String> {
    admin(&project.name)
        .await
        .query_opt(
            "select extversion from pg_extension where extname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test]
async fn update_applies_the_recorded_settings_and_may_run_again() {
    let mut project = Project::new();
    step(job_type::PROJECT_CREATE, &project, json!({}))
        .await
        .assert_code(0);

    project.max_connections = 7;
    project.statement_timeout = "45s".into();
    project.idle_transaction_timeout = "2min".into();
    for _ in 0..2 {
        let output = step(job_type::PROJECT_UPDATE, &project, json!({})).await;
        output.assert_code(0);
        assert!(
            output.stdout.contains("settings applied"),
            "{}",
            output.stdout
        );
    }

    let postgres = admin("postgres").await;
    let datconnlimit: i32 = postgres
        .query_one(
            "select datconnlimit from pg_database where datname = $1",
            &[&project.name],
        )
        .await
        .unwrap()
        .get(0);
    let rolconnlimit: i32 = postgres
        .query_one(
            "select rolconnlimit from pg_roles where rolname = $1",
            &[&project.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((datconnlimit, rolconnlimit), (7, 7));
    let settings: Vec<String> = postgres
        .query_one(
            "select s.setconfig from pg_db_role_setting s
             join pg_database d on d.oid = s.setdatabase
             where d.datname = $1 and s.setrole = 0",
            &[&project.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        settings.contains(&"statement_timeout=45s".to_string()),
        "{settings:?}"
    );
    assert!(
        settings.contains(&"idle_in_transaction_session_timeout=2min".to_string()),
        "{settings:?}"
    );

    let session = as_project(&project).await.unwrap();
    let show = |setting: &'static str| {
        let session = &session;
        async move {
            let row = session
                .query_one(&format!("show {setting}"), &[])
                .await
                .unwrap();
            row.get::<_, String>(0)
        }
    };
    assert_eq!(show("statement_timeout").await, "45s");
    assert_eq!(show("idle_in_transaction_session_timeout").await, "2min");
}

#[tokio::test]
async fn update_of_a_project_never_provisioned_fails_permanently() {
    let project = Project::new();
    let output = step(job_type::PROJECT_UPDATE, &project, json!({})).await;
    output.assert_code(EXIT_PERMANENT);
    assert!(
        output.stderr.contains("does not exist"),
        "{}",
        output.stderr
    );
    let postgres = admin("postgres").await;
    assert_eq!(
        count(
            &postgres,
            "select count(*) from pg_roles where rolname = $1",
            &project.name
        )
        .await,
        0,
        "update created the role"
    );
}

#[tokio::test]
async fn extensions_are_enabled_for_the_project_and_disabled_again() {
    let project = Project::new();
    step(job_type::PROJECT_CREATE, &project, json!({}))
        .await
        .assert_code(0);

    let output = step(
        job_type::PROJECT_EXTENSION_ENABLE,
        &project,
        json!({"name": "pgcrypto"}),
    )
    .await;
    output.assert_code(0);
    let installed = extension_version(&project, "pgcrypto")
        .await
        .expect("pgcrypto is not in pg_extension");
    assert!(
        output
            .stdout
            .contains(&format!("version {installed} installed")),
        "{}",
        output.stdout
    );

    // The project's own role can use it.
    let session = as_project(&project).await.unwrap();
    let hash: String = session
        .query_one("select encode(digest('x', 'sha256'), 'hex')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        hash,
        "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    );

    // Again, and again with the installed version asked for explicitly.
    step(
        job_type::PROJECT_EXTENSION_ENABLE,
        &project,
        json!({"name": "pgcrypto"}),
    )
    .await
    .assert_code(0);
    step(
        job_type::PROJECT_EXTENSION_ENABLE,
        &project,
        json!({"name": "pgcrypto", "version": installed}),
    )
    .await
    .assert_code(0);

    // A name with '-' is quoted.
    step(
        job_type::PROJECT_EXTENSION_ENABLE,
        &project,
        json!({"name": "uuid-ossp", "version": null}),
    )
    .await
    .assert_code(0);
    session
        .query_one("select uuid_generate_v4()", &[])
        .await
        .unwrap();

    // No CASCADE: a view using pgcrypto keeps it, and the refusal is permanent.
    session
        .batch_execute("create view hashed as select digest('y', 'sha256') as h")
        .await
        .unwrap();
    let output = step(
        job_type::PROJECT_EXTENSION_DISABLE,
        &project,
        json!({"name": "pgcrypto"}),
    )
    .await;
    output.assert_code(EXIT_PERMANENT);
    assert!(output.stderr.contains("2BP01"), "{}", output.stderr);
    assert!(extension_version(&project, "pgcrypto").await.is_some());
    session.batch_execute("drop view hashed").await.unwrap();

    for _ in 0..2 {
        step(
            job_type::PROJECT_EXTENSION_DISABLE,
            &project,
            json!({"name": "pgcrypto"}),
        )
        .await
        .assert_code(0);
        assert_eq!(extension_version(&project, "pgcrypto").await, None);
    }
    assert!(
        extension_version(&project, "uuid-ossp").await.is_some(),
        "disabling pgcrypto dropped uuid-ossp"
    );
}

#[tokio::test]
async fn extensions_and_versions_the_cluster_lacks_fail_permanently() {
    let project = Project::new();
    step(job_type::PROJECT_CREATE, &project, json!({}))
        .await
        .assert_code(0);

    let output = step(
        job_type::PROJECT_EXTENSION_ENABLE,
        &project,
        json!({"name": "no_such_ext"}),
    )
    .await;
    output.assert_code(EXIT_PERMANENT);
    assert!(
        output.stderr.contains("\"no_such_ext\" is not available"),
        "{}",
        output.stderr
    );

    let output = step(
        job_type::PROJECT_EXTENSION_ENABLE,
        &project,
        json!({"name": "pgcrypto", "version": "9.9"}),
    )
    .await;
    output.assert_code(EXIT_PERMANENT);
    assert!(
        output
            .stderr
            .contains("version \"9.9\" of extension \"pgcrypto\" is not available"),
        "{}",
        output.stderr
    );
    assert_eq!(extension_version(&project, "pgcrypto").await, None);

    for args in [
        json!({"name": "PgCrypto\"; drop database postgres; --"}),
        json!({"name": "pgcrypto", "version": "1.3'; --"}),
        json!({}),
    ] {
        step(job_type::PROJECT_EXTENSION_ENABLE, &project, args)
            .await
            .assert_code(EXIT_PERMANENT);
    }
}

#[tokio::test]
async fn delete_ends_open_sessions_and_may_run_again() {
    let project = Project::new();
    step(job_type::PROJECT_CREATE, &project, json!({}))
        .await
        .assert_code(0);
    let session = as_project(&project).await.unwrap();
    session.query_one("select 1", &[]).await.unwrap();

    let output = step(job_type::PROJECT_DELETE, &project, json!({})).await;
    output.assert_code(0);
    assert!(output.stdout.contains("dropped"), "{}", output.stdout);

    let postgres = admin("postgres").await;
    assert_eq!(
        count(
            &postgres,
            "select count(*) from pg_database where datname = $1",
            &project.name
        )
        .await,
        0,
        "the database is still there"
    );
    assert_eq!(
        count(
            &postgres,
            "select count(*) from pg_roles where rolname = $1",
            &project.name
        )
        .await,
        0,
        "the role is still there"
    );
    assert!(
        session.query_one("select 1", &[]).await.is_err(),
        "the open session survived the delete"
    );
    assert!(as_project(&project).await.is_err());

    let output = step(job_type::PROJECT_DELETE, &project, json!({})).await;
    output.assert_code(0);
    assert!(output.stdout.contains("already gone"), "{}", output.stdout);
}

#[tokio::test]
async fn delete_after_a_partial_run_finishes_the_job() {
    let project = Project::new();
    step(job_type::PROJECT_CREATE, &project, json!({}))
        .await
        .assert_code(0);
    // As if an earlier attempt dropped the database and died before the role.
    let postgres = admin("postgres").await;
    postgres
        .batch_execute(&format!("drop database {} with (force)", project.name))
        .await
        .unwrap();

    step(job_type::PROJECT_DELETE, &project, json!({}))
        .await
        .assert_code(0);
    assert_eq!(
        count(
            &postgres,
            "select count(*) from pg_roles where rolname = $1",
            &project.name
        )
        .await,
        0,
        "the role is still there"
    );
}

#[tokio::test]
async fn no_step_prints_a_password() {
    // step_with checks every run's output; this drives each step through its success
    // and failure paths, including a failed admin login.
    let mut project = Project::new();
    let ok = |output: Output| output.assert_code(0).stdout.clone();
    let mut printed = String::new();
    printed += &ok(step(job_type::PROJECT_CREATE, &project, json!({})).await);
    printed += &ok(step(job_type::PROJECT_CREATE, &project, json!({})).await);
    project.max_connections = 3;
    printed += &ok(step(job_type::PROJECT_UPDATE, &project, json!({})).await);
    let ext = json!({"name": "pgcrypto"});
    printed += &ok(step(job_type::PROJECT_EXTENSION_ENABLE, &project, ext.clone()).await);
    printed += &ok(step(job_type::PROJECT_EXTENSION_DISABLE, &project, ext.clone()).await);
    step(
        job_type::PROJECT_EXTENSION_ENABLE,
        &project,
        json!({"name": "pgcrypto", "version": "0.0"}),
    )
    .await
    .assert_code(EXIT_PERMANENT);

    let wrong_password = format!("wrong-{}", Uuid::new_v4().simple());
    let port = capy_testkit::cluster().unwrap().port;
    let bad_url = format!("postgres://postgres:{wrong_password}@127.0.0.1:{port}/postgres");
    for job in [
        job_type::PROJECT_UPDATE,
        job_type::PROJECT_EXTENSION_ENABLE,
        job_type::PROJECT_DELETE,
    ] {
        let output = step_with(job, &project, ext.clone(), &bad_url).await;
        output.assert_code(EXIT_PERMANENT);
        assert!(
            output.stderr.contains("could not connect"),
            "{}",
            output.stderr
        );
        assert!(
            !output.stderr.contains(&wrong_password),
            "{}",
            output.stderr
        );
        assert!(
            !output.stdout.contains(&wrong_password),
            "{}",
            output.stdout
        );
    }

    printed += &ok(step(job_type::PROJECT_DELETE, &project, json!({})).await);
    // The steps did print something: the check above is not vacuous.
    assert!(printed.contains(&project.name), "{printed}");
}

/// The roles named after the project's database (its logins and its owner role).
async fn roles_of(project: &Project) -> Vec<String> {
    admin("postgres")
        .await
        .query(
            "select rolname::text from pg_roles where starts_with(rolname, $1) order by 1",
            &[&project.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Rotate, update during the grace, retire and delete, each run twice where a retry
/// could run it again: the old login keeps its grants through an update, is refused
/// once retired, and the new one owns what the old one made.
#[tokio::test]
async fn rotation_steps_may_run_twice_and_an_update_keeps_the_previous_login() {
    let mut project = Project::new();
    step(job_type::PROJECT_CREATE, &project, json!({}))
        .await
        .assert_code(0);
    let (old_role, old_password) = (project.role_name.clone(), project.password.clone());
    as_project(&project)
        .await
        .unwrap()
        .batch_execute("create table notes (body text)")
        .await
        .unwrap();
    let new_role = format!("{}_r1", project.name);
    let new_password = format!("pw-{}", Uuid::new_v4().simple());
    project.pending_login = Some((new_role.clone(), new_password.clone()));
    for _ in 0..2 {
        let output = step(job_type::PROJECT_ROTATE_CREDENTIALS, &project, json!({})).await;
        assert!(
            output.assert_code(0).stdout.contains("connects"),
            "{}",
            output.stdout
        );
    }
    // What the job's completion records; then an update during the grace.
    project.role_name = new_role.clone();
    project.password = new_password.clone();
    project.previous_role_name = Some(old_role.clone());
    project.pending_login = None;
    project.max_connections = 4;
    step(job_type::PROJECT_UPDATE, &project, json!({}))
        .await
        .assert_code(0);
    for (role, password) in [(&old_role, &old_password), (&new_role, &new_password)] {
        let client = as_login(&project, role, password).await.unwrap();
        client
            .execute("insert into notes values ($1)", &[role])
            .await
            .unwrap();
    }

    // Another tenant grants the old login a privilege in its own database (which
    // would keep DROP ROLE from succeeding), and is made a member of the current
    // login (as a trigger planted with the old credentials could do before
    // PostgreSQL 16): the retire undoes both.
    let other = Project::new();
    step(job_type::PROJECT_CREATE, &other, json!({}))
        .await
        .assert_code(0);
    as_project(&other)
        .await
        .unwrap()
        .batch_execute(&format!(
            "create table lent (x int); grant select on lent to \"{old_role}\""
        ))
        .await
        .unwrap();
    let admin_session = admin("postgres").await;
    admin_session
        .batch_execute(&format!("grant \"{new_role}\" to \"{}\"", other.role_name))
        .await
        .unwrap();
    let members = "select count(*) from pg_auth_members m join pg_roles g on g.oid = m.roleid
                   join pg_roles r on r.oid = m.member where g.rolname = $1 and r.rolname <> $1";

    let retire = json!({ "role": old_role });
    step(
        job_type::PROJECT_RETIRE_CREDENTIALS,
        &project,
        retire.clone(),
    )
    .await
    .assert_code(0);
    assert_eq!(
        count(
            &admin_session,
            "select count(*) from pg_roles where rolname = $1",
            &old_role
        )
        .await,
        0
    );
    assert_eq!(count(&admin_session, members, &new_role).await, 0);
    let again = step(job_type::PROJECT_RETIRE_CREDENTIALS, &project, retire).await;
    assert!(
        again.assert_code(0).stdout.contains("already gone"),
        "{}",
        again.stdout
    );
    assert!(as_login(&project, &old_role, &old_password).await.is_err());
    let new = as_login(&project, &new_role, &new_password).await.unwrap();
    let row = new
        .query_one(
            "select (select count(*) from notes),
                    (select tableowner::text from pg_tables where tablename = 'notes')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, String>(1)),
        (2, new_role.clone())
    );
    // Never the current login, nor a role not of the project's making.
    for role in [new_role.as_str(), "postgres", "capy_other_r1"] {
        step(
            job_type::PROJECT_RETIRE_CREDENTIALS,
            &project,
            json!({ "role": role }),
        )
        .await
        .assert_code(EXIT_PERMANENT);
    }

    // A rotation that made its login but never completed: the delete drops it too.
    project.previous_role_name = None;
    project.pending_login = Some((format!("{}_r2", project.name), "pw-r2-x".into()));
    step(job_type::PROJECT_ROTATE_CREDENTIALS, &project, json!({}))
        .await
        .assert_code(0);
    assert_eq!(roles_of(&project).await.len(), 3, "owner, r1 and r2");
    for _ in 0..2 {
        step(job_type::PROJECT_DELETE, &project, json!({}))
            .await
            .assert_code(0);
    }
    assert!(roles_of(&project).await.is_empty());
}
