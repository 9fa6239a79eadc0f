#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Each engine end to end, through the REST API with real workers, as its tenant would
//! use it: create, connect with the engine's own client as the project's user and
//! write, stop (new connections refused, open sessions ended), start, delete (user and
//! data gone). PostgreSQL's stop also survives a settings change made while stopped.

mod common;

use capy_testkit::ProcessStack;
use common::http::{text, try_connect, Api};
use common::TestApp;
use serde_json::{json, Value};

struct Stack {
    app: TestApp,
    api: Api,
    _processes: ProcessStack,
}

impl Stack {
    async fn start() -> Self {
        let app = TestApp::new().await;
        let env = [
            ("CAPY_RETRY_BASE_DELAY_MS", "50".to_string()),
            ("CAPY_POLL_INTERVAL_MS", "100".to_string()),
        ];
        let processes = ProcessStack::start(&app.db.url, 1, &env).await.unwrap();
        Self {
            api: Api::new(&processes.api_url, &app.key),
            app,
            _processes: processes,
        }
    }

    /// POSTs `path` and waits for the job it answers to complete.
    async fn run(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.api.post(path, body).await;
        assert_eq!(status, 202, "POST {path}: {answer}");
        self.api.job_completes(&answer).await;
        answer
    }

    async fn state(&self, project: &str) -> String {
        let shown = self.api.get(&format!("/v1/projects/{project}")).await;
        text(&shown["project"]["state"]).to_string()
    }

    async fn credentials(&self, project: &str) -> Value {
        self.api
            .get(&format!("/v1/projects/{project}/credentials"))
            .await
    }
}

#[tokio::test]
async fn a_stopped_postgresql_project_refuses_its_login_until_started() {
    let stack = Stack::start().await;
    let project = stack.api.ready_project("pg").await;
    let url = text(&stack.credentials(&project).await["connection_string"]).to_string();
    let open = try_connect(&url).await.unwrap();
    open.batch_execute("create table t (n int); insert into t values (1)")
        .await
        .unwrap();

    stack
        .run(&format!("/v1/projects/{project}/stop"), json!({}))
        .await;
    assert_eq!(stack.state(&project).await, "stopped");
    // The open session was ended, and a new one is refused.
    assert!(open.simple_query("select 1").await.is_err());
    let Err(refused) = try_connect(&url).await else {
        panic!("a stopped project's login connects");
    };
    let message = refused.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("not permitted to log in")),
        "{refused:?}"
    );

    // A settings change while stopped is applied, and the login stays refused.
    let (status, changed) = stack
        .api
        .request(
            reqwest::Method::PATCH,
            &format!("/v1/projects/{project}"),
            Some(json!({ "max_connections": 7 })),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    stack.api.wait_for_job(text(&changed["job"]["id"])).await;
    assert!(try_connect(&url).await.is_err());

    stack
        .run(&format!("/v1/projects/{project}/start"), json!({}))
        .await;
    assert_eq!(stack.state(&project).await, "ready");
    let back = try_connect(&url).await.unwrap();
    let rows = back.query("select n from t", &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "the data stayed while stopped");
    let limit: i32 = back
        .query_one(
            "select rolconnlimit from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(limit, 7);
    drop(stack.app);
}

/// Registers a cluster of `engine` through the API (as the operator would) and
/// answers its access report.
async fn register(stack: &Stack, name: &str, engine: &str, url: &str) -> Value {
    let admin = Api::new(&stack.api.url, &stack.app.admin_key);
    let body = json!({ "name": name, "engine": engine, "url": url, "region": "local" });
    let (status, answer) = admin.post("/v1/clusters", body).await;
    assert_eq!(status, 201, "{answer}");
    let password = url::Url::parse(url)
        .unwrap()
        .password()
        .unwrap()
        .to_string();
    assert!(!answer.to_string().contains(&password), "{answer}");
    answer["access"].clone()
}

/// A Redis project made through the API: its id and credentials.
async fn redis_project(stack: &Stack, name: &str) -> (String, Value) {
    let answer = stack
        .run("/v1/projects", json!({ "name": name, "engine": "redis" }))
        .await;
    let id = text(&answer["project"]["id"]).to_string();
    assert_eq!(stack.state(&id).await, "ready");
    let credentials = stack.credentials(&id).await;
    (id, credentials)
}

async fn redis_as(credentials: &Value) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(text(&credentials["connection_string"]))?;
    client.get_multiplexed_async_connection().await
}

/// The server's answer to `command` as the tenant: Ok, or the error's code.
async fn refused(connection: &mut redis::aio::MultiplexedConnection, command: &[&str]) -> bool {
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    let answer: redis::RedisResult<redis::Value> = cmd.query_async(connection).await;
    answer.is_err_and(|e| e.code() == Some("NOPERM"))
}

#[tokio::test]
async fn a_redis_project_lives_in_its_prefix_and_can_be_stopped_started_and_deleted() {
    let server = capy_testkit::redis().unwrap();
    let stack = Stack::start().await;
    let access = register(&stack, "local-redis", "redis", &server.admin_url()).await;
    assert_eq!(access["reachable"], true, "{access}");
    assert_eq!(access["can_create_roles"], true, "{access}");

    let (a, a_login) = redis_project(&stack, "cache-a").await;
    let (_b, b_login) = redis_project(&stack, "cache-b").await;
    let prefix = text(&a_login["key_prefix"]).to_string();
    assert_eq!(prefix, format!("p:{a}:"));
    let mut tenant = redis_as(&a_login).await.unwrap();
    let key = format!("{prefix}greeting");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("hello")
        .query_async(&mut tenant)
        .await
        .unwrap();

    // Another project's user reaches none of it, nor the server's own commands.
    let mut other = redis_as(&b_login).await.unwrap();
    for command in [
        &["GET", key.as_str()][..],
        &["SET", "unprefixed", "x"],
        &["FLUSHALL"],
        &["CONFIG", "SET", "maxmemory", "1"],
        &["KEYS", "*"],
        &["SELECT", "1"],
    ] {
        assert!(
            refused(&mut other, command).await,
            "{command:?} was allowed"
        );
    }

    // Stopped: the open connection is ended and the login refused; started: back.
    stack
        .run(&format!("/v1/projects/{a}/stop"), json!({}))
        .await;
    assert_eq!(stack.state(&a).await, "stopped");
    let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut tenant).await;
    assert!(ping.is_err(), "the open connection survived the stop");
    assert!(
        redis_as(&a_login).await.is_err(),
        "a stopped user logged in"
    );
    stack
        .run(&format!("/v1/projects/{a}/start"), json!({}))
        .await;
    let mut tenant = redis_as(&a_login).await.unwrap();
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut tenant)
        .await
        .unwrap();
    assert_eq!(value, "hello", "the data stayed while stopped");

    // Deleted: the user and its keys are gone.
    let (status, deleting) = stack.api.delete(&format!("/v1/projects/{a}")).await;
    assert_eq!(status, 202, "{deleting}");
    stack.api.job_completes(&deleting).await;
    let mut admin = redis::Client::open(server.admin_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let user: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(text(&a_login["username"]))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(user, redis::Value::Nil);
    let left: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert!(redis_as(&a_login).await.is_err());
}

async fn mysql_as(credentials: &Value) -> Result<sqlx::MySqlConnection, sqlx::Error> {
    use sqlx::Connection as _;
    sqlx::MySqlConnection::connect(text(&credentials["connection_string"])).await
}

/// The MySQL error number of `result`'s error, if it failed with one.
fn mysql_error<T>(result: Result<T, sqlx::Error>) -> Option<String> {
    match result {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.to_string()),
        Err(e) => Some(e.to_string()),
    }
}

#[tokio::test]
async fn a_mysql_project_keeps_to_its_database_and_can_be_stopped_started_and_deleted() {
    use sqlx::{Connection as _, Executor as _};
    let server = capy_testkit::mariadb().unwrap();
    let stack = Stack::start().await;
    let access = register(&stack, "local-mysql", "mysql", &server.admin_url()).await;
    assert_eq!(access["reachable"], true, "{access}");
    assert_eq!(access["can_create_roles"], true, "{access}");

    let a = stack
        .run(
            "/v1/projects",
            json!({ "name": "orders", "engine": "mysql" }),
        )
        .await;
    let b = stack
        .run(
            "/v1/projects",
            json!({ "name": "users", "plan": "mysql-small" }),
        )
        .await;
    let (a, b) = (
        text(&a["project"]["id"]).to_string(),
        text(&b["project"]["id"]).to_string(),
    );
    let (a_login, b_login) = (stack.credentials(&a).await, stack.credentials(&b).await);
    assert_eq!(a_login["engine"], "mysql");
    let database = text(&a_login["database"]).to_string();
    let mut tenant = mysql_as(&a_login).await.unwrap();
    tenant.execute("create table t (n int)").await.unwrap();
    tenant.execute("insert into t values (1)").await.unwrap();

    // The other project's user cannot enter it.
    let mut other = mysql_as(&b_login).await.unwrap();
    let refused = mysql_error(
        other
            .execute(format!("select * from `{database}`.t").as_str())
            .await,
    );
    assert!(refused.is_some(), "another project's user read the table");
    let refused = mysql_error(other.execute("create database capy_other").await);
    assert!(refused.is_some(), "a project's user created a database");

    // Stopped: the open session is ended and logins refused; started: back.
    stack
        .run(&format!("/v1/projects/{a}/stop"), json!({}))
        .await;
    assert_eq!(stack.state(&a).await, "stopped");
    assert!(
        tenant.execute("select 1").await.is_err(),
        "the open session survived"
    );
    assert!(
        mysql_as(&a_login).await.is_err(),
        "a stopped user logged in"
    );
    stack
        .run(&format!("/v1/projects/{a}/start"), json!({}))
        .await;
    let mut tenant = mysql_as(&a_login).await.unwrap();
    let (n,): (i32,) = sqlx::query_as("select n from t")
        .fetch_one(&mut tenant)
        .await
        .unwrap();
    assert_eq!(n, 1, "the data stayed while stopped");
    tenant.close().await.unwrap();

    // Deleted: the user and the database are gone.
    let (status, deleting) = stack.api.delete(&format!("/v1/projects/{a}")).await;
    assert_eq!(status, 202, "{deleting}");
    stack.api.job_completes(&deleting).await;
    let mut admin = sqlx::MySqlConnection::connect(&server.admin_url())
        .await
        .unwrap();
    let (users,): (i64,) = sqlx::query_as("select count(*) from mysql.user where user = ?")
        .bind(text(&a_login["username"]))
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let (databases,): (i64,) =
        sqlx::query_as("select count(*) from information_schema.schemata where schema_name = ?")
            .bind(&database)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!((users, databases), (0, 0));
    assert!(mysql_as(&a_login).await.is_err());
}
