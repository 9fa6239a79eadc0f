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
    let refused = try_connect(&url)
        .await
        .err()
        .expect("a stopped project's login connects");
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
