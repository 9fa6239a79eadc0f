//! The Redis steps against the test process's private Redis server: the real
//! `capy-step` binary with a StepInput on stdin, then the server used as the tenant
//! (the project's own user and password) trying to leave its prefix.

// Helpers outside #[test] functions panic on failure too: they are test code.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use capy_shared::model::{job_type, redis_prefix, Engine};
use futures::StreamExt as _;
use redis::aio::MultiplexedConnection;
use redis::RedisResult;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use uuid::Uuid;

const EXIT_PERMANENT: i32 = 1;

/// A Redis project as the worker would hand it to the step.
struct Project {
    id: Uuid,
    user: String,
    password: String,
    stopped: bool,
}

impl Project {
    fn new() -> Self {
        let id = Uuid::new_v4();
        Self {
            id,
            user: Engine::Redis.login_name(id),
            password: format!("pw-{}", Uuid::new_v4().simple()),
            stopped: false,
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", redis_prefix(self.id))
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

fn server() -> &'static capy_testkit::TestRedis {
    capy_testkit::redis().unwrap()
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
            "id": project.id, "database_name": "", "role_name": project.user,
            "password": project.password, "max_connections": 5,
            "statement_timeout": "30s", "idle_transaction_timeout": "1min",
            "storage_limit_bytes": null, "stopped": project.stopped,
        },
        "cluster": {
            "id": Uuid::nil(), "name": "test-redis", "engine": "redis",
            "admin_url": server().admin_url(),
        },
    })
}

/// Runs `capy-step` for `job_type`; checks that its output shows no secret.
async fn step(job_type: &str, project: &Project) -> Output {
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
    let output = Output {
        code: output
            .status
            .code()
            .expect("capy-step was killed by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let secrets = [
        project.password.clone(),
        server().admin_password().to_string(),
        server().admin_url(),
    ];
    for secret in secrets {
        for (stream, text) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
            assert!(
                !text.contains(&secret),
                "{job_type} printed a secret on {stream}"
            );
        }
    }
    output
}

fn url_for(user: &str, password: &str) -> String {
    format!(
        "redis://{user}:{password}@{}:{}",
        server().host(),
        server().port()
    )
}

async fn admin() -> MultiplexedConnection {
    let client = redis::Client::open(server().admin_url()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// A session as the project's own user.
async fn as_tenant(project: &Project) -> RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(url_for(&project.user, &project.password))?;
    client.get_multiplexed_async_connection().await
}

async fn query(connection: &mut MultiplexedConnection, args: &[&str]) -> RedisResult<redis::Value> {
    redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(connection)
        .await
}

async fn get(connection: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap()
}

/// `args` is refused by the ACL (NOPERM, or a script's "can't access").
async fn assert_refused(tenant: &mut MultiplexedConnection, args: &[&str]) {
    let answer = query(tenant, args).await;
    let error = answer
        .as_ref()
        .err()
        .unwrap_or_else(|| panic!("{args:?} was allowed: {answer:?}"));
    let text = error.to_string();
    assert!(
        text.contains("NOPERM") || text.contains("no permissions") || text.contains("can't access"),
        "{args:?} failed, but not for permissions: {text}"
    );
}

async fn created(project: &Project) {
    step(job_type::PROJECT_CREATE, project).await.assert_code(0);
}

#[tokio::test]
async fn the_user_reaches_its_own_keys_and_channels() {
    let project = Project::new();
    created(&project).await;
    created(&project).await;
    let mut tenant = as_tenant(&project).await.unwrap();
    query(&mut tenant, &["SET", &project.key("a"), "1"])
        .await
        .unwrap();
    assert_eq!(
        get(&mut tenant, &project.key("a")).await.as_deref(),
        Some("1")
    );

    let client = redis::Client::open(url_for(&project.user, &project.password)).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(project.key("news")).await.unwrap();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(project.key("news"))
        .arg("hello")
        .query_async(&mut tenant)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    let message = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.get_payload::<String>().unwrap(), "hello");
}

#[tokio::test]
async fn the_user_cannot_leave_its_prefix() {
    let project = Project::new();
    let other = Project::new();
    created(&project).await;
    let mut admin = admin().await;
    query(&mut admin, &["SET", &other.key("secret"), "theirs"])
        .await
        .unwrap();
    query(&mut admin, &["SET", "unprefixed", "theirs"])
        .await
        .unwrap();
    let mut tenant = as_tenant(&project).await.unwrap();
    let other_key = other.key("secret");
    let refused: &[&[&str]] = &[
        &["GET", &other_key],
        &["SET", &other_key, "mine"],
        &["GET", "unprefixed"],
        &["SET", "unprefixed", "mine"],
        &["PUBLISH", &other.key("news"), "x"],
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["CONFIG", "SET", "maxmemory", "1"],
        &["KEYS", "*"],
        &["SCAN", "0"],
        &["RANDOMKEY"],
        &["DBSIZE"],
        &["SELECT", "1"],
        &["SWAPDB", "0", "1"],
        &["MOVE", &project.key("a"), "1"],
        &["COPY", &project.key("a"), &project.key("b"), "DB", "1"],
        &["ACL", "SETUSER", &project.user, "~*"],
        &["EVAL", "return redis.call('get', KEYS[1])", "1", &other_key],
        &[
            "EVAL",
            "return redis.call('set', 'unprefixed', 'mine')",
            "0",
        ],
        &["MIGRATE", "127.0.0.1", "1", &project.key("a"), "0", "1000"],
        &["CLIENT", "LIST"],
        &["CLIENT", "TRACKING", "on", "BCAST"],
        &["PUBSUB", "CHANNELS"],
        &["FUNCTION", "FLUSH"],
        &["SCRIPT", "FLUSH"],
        &["INFO"],
    ];
    for args in refused {
        assert_refused(&mut tenant, args).await;
    }
    assert_eq!(get(&mut admin, &other_key).await.as_deref(), Some("theirs"));
    assert_eq!(
        get(&mut admin, "unprefixed").await.as_deref(),
        Some("theirs")
    );
    // Still in database 0, still allowed its own keys.
    query(&mut tenant, &["SET", &project.key("a"), "1"])
        .await
        .unwrap();
    let client = redis::Client::open(url_for(&project.user, &project.password)).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    // The crate does not report a refused SUBSCRIBE: count the receivers instead, once
    // a later subscription to its own channel shows the first one was answered.
    let _ = pubsub.subscribe(other.key("news")).await;
    pubsub.subscribe(project.key("news")).await.unwrap();
    let own: i64 = redis::cmd("PUBLISH")
        .arg(project.key("news"))
        .arg("x")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(own, 1);
    let theirs: i64 = redis::cmd("PUBLISH")
        .arg(other.key("news"))
        .arg("x")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(theirs, 0, "subscribed to another prefix's channel");
}

#[tokio::test]
async fn stop_ends_sessions_and_refuses_logins_until_start() {
    let mut project = Project::new();
    created(&project).await;
    let mut open = as_tenant(&project).await.unwrap();
    query(&mut open, &["SET", &project.key("kept"), "1"])
        .await
        .unwrap();
    step(job_type::PROJECT_STOP, &project).await.assert_code(0);
    step(job_type::PROJECT_STOP, &project).await.assert_code(0);
    assert!(
        query(&mut open, &["PING"]).await.is_err(),
        "the open session survived"
    );
    let refused = as_tenant(&project).await.err().unwrap();
    assert_eq!(
        refused.kind(),
        redis::ErrorKind::AuthenticationFailed,
        "{refused}"
    );
    // An update of a stopped project keeps it stopped.
    project.stopped = true;
    step(job_type::PROJECT_UPDATE, &project)
        .await
        .assert_code(0);
    assert!(
        as_tenant(&project).await.is_err(),
        "an update let a stopped project in"
    );
    project.stopped = false;
    step(job_type::PROJECT_START, &project).await.assert_code(0);
    step(job_type::PROJECT_START, &project).await.assert_code(0);
    let mut tenant = as_tenant(&project).await.unwrap();
    assert_eq!(
        get(&mut tenant, &project.key("kept")).await.as_deref(),
        Some("1")
    );
}

/// The keys under `prefix`, counted by the admin.
async fn count_keys(admin: &mut MultiplexedConnection, prefix: &str) -> usize {
    let mut cursor = 0u64;
    let mut count = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(admin)
            .await
            .unwrap();
        count += keys.len();
        if next == 0 {
            return count;
        }
        cursor = next;
    }
}

async fn write_keys(tenant: &mut MultiplexedConnection, project: &Project, count: usize) {
    let mut pipe = redis::pipe();
    for n in 0..count {
        pipe.set(project.key(&n.to_string()), n).ignore();
    }
    pipe.query_async::<()>(tenant).await.unwrap();
}

#[tokio::test]
async fn delete_removes_the_user_and_its_keys_only() {
    let project = Project::new();
    let neighbour = Project::new();
    created(&project).await;
    created(&neighbour).await;
    let mut tenant = as_tenant(&project).await.unwrap();
    write_keys(&mut tenant, &project, 2500).await;
    let mut theirs = as_tenant(&neighbour).await.unwrap();
    write_keys(&mut theirs, &neighbour, 10).await;
    let mut admin = admin().await;
    assert_eq!(
        count_keys(&mut admin, &redis_prefix(project.id)).await,
        2500
    );

    let first = step(job_type::PROJECT_DELETE, &project).await;
    first.assert_code(0);
    assert!(
        first.stdout.contains("2500 keys deleted"),
        "{}",
        first.stdout
    );
    step(job_type::PROJECT_DELETE, &project)
        .await
        .assert_code(0);

    let user: redis::Value = query(&mut admin, &["ACL", "GETUSER", &project.user])
        .await
        .unwrap();
    assert_eq!(user, redis::Value::Nil, "the user survived");
    assert!(
        query(&mut tenant, &["PING"]).await.is_err(),
        "the open session survived"
    );
    assert_eq!(count_keys(&mut admin, &redis_prefix(project.id)).await, 0);
    assert_eq!(
        count_keys(&mut admin, &redis_prefix(neighbour.id)).await,
        10
    );
    assert_eq!(
        get(&mut theirs, &neighbour.key("3")).await.as_deref(),
        Some("3")
    );
}

#[tokio::test]
async fn other_job_types_and_bad_names_fail_permanently() {
    let project = Project::new();
    let output = step(job_type::PROJECT_BACKUP, &project).await;
    output.assert_code(EXIT_PERMANENT);
    assert!(
        output.stderr.contains("not available for Redis projects"),
        "{}",
        output.stderr
    );
    let mut bad = Project::new();
    bad.user = "default".into();
    let output = step(job_type::PROJECT_DELETE, &bad).await;
    output.assert_code(EXIT_PERMANENT);
    assert!(
        output.stderr.contains("invalid Redis user name"),
        "{}",
        output.stderr
    );
}

#[tokio::test]
async fn check_access_reports_the_admin_rights() {
    use capy_shared::engines::redis::check_access;
    let access = check_access(&server().admin_url()).await;
    assert!(access.reachable && access.can_create_roles, "{access:?}");
    assert!(access.error_kind.is_none(), "{access:?}");
    assert!(
        access.server_version.as_deref().unwrap().starts_with('7'),
        "{access:?}"
    );

    let wrong = check_access(&url_for("admin", "not-the-password")).await;
    assert_eq!(
        wrong.error_kind.as_deref(),
        Some("authentication_failed"),
        "{wrong:?}"
    );
    assert!(!wrong.error.unwrap().contains("not-the-password"));

    let limited = format!("limited_{}", Uuid::new_v4().simple());
    let mut admin = admin().await;
    query(
        &mut admin,
        &[
            "ACL",
            "SETUSER",
            &limited,
            "on",
            ">limited-pw",
            "~*",
            "&*",
            "+@all",
            "-acl",
        ],
    )
    .await
    .unwrap();
    let access = check_access(&url_for(&limited, "limited-pw")).await;
    assert!(access.reachable && !access.can_create_roles, "{access:?}");
    query(&mut admin, &["ACL", "DELUSER", &limited])
        .await
        .unwrap();

    let port = capy_testkit::free_port().unwrap();
    let closed = check_access(&format!("redis://admin:pw@127.0.0.1:{port}")).await;
    assert_eq!(
        closed.error_kind.as_deref(),
        Some("connection_refused"),
        "{closed:?}"
    );
}
