#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! End to end: the API and two workers as real processes against a private cluster.

mod common;

use std::time::{Duration, Instant};

use capy_testkit::{free_port, ProcessStack};
use common::TestApp;
use serde_json::{json, Value};

struct Stack {
    app: TestApp,
    url: String,
    http: reqwest::Client,
    _processes: ProcessStack,
}

impl Stack {
    async fn start(app: TestApp, worker_env: &[(&str, String)]) -> Self {
        let mut env = vec![("CAPY_RETRY_BASE_DELAY_MS", "50".to_string())];
        env.extend(worker_env.iter().cloned());
        let processes = ProcessStack::start(&app.db.url, 2, &env).await.unwrap();
        Self {
            url: processes.api_url.clone(),
            app,
            http: reqwest::Client::new(),
            _processes: processes,
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.app.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn create_project(&self, name: &str) -> (String, String) {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/v1/projects",
                Some(json!({"name": name, "statement_timeout": "42s"})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        (
            body["project"]["id"].as_str().unwrap().to_string(),
            body["job"]["id"].as_str().unwrap().to_string(),
        )
    }

    /// One `GET /v1/jobs/{id}?wait=N`: the job, and how long its answer took.
    async fn long_poll(&self, job_id: &str, seconds: u64) -> (Value, Duration) {
        let asked = Instant::now();
        let (status, body) = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/jobs/{job_id}?wait={seconds}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (body["job"].clone(), asked.elapsed())
    }

    /// Long-polls the job until it is `completed` or `failed`.
    async fn wait_for_job(&self, job_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (job, _) = self.long_poll(job_id, 10).await;
            if job["state"] == "completed" || job["state"] == "failed" {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job still {} after 60 s: {job}",
                job["state"]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a request that answers `status` with a job, and waits for that job to
    /// complete.
    async fn run_job(&self, method: reqwest::Method, path: &str, body: Option<Value>, status: u16) {
        let (answered, body) = self.request(method, path, body).await;
        assert_eq!(answered, status, "{body}");
        let job = self.wait_for_job(body["job"]["id"].as_str().unwrap()).await;
        assert_eq!(job["state"], "completed", "{job}");
    }

    async fn project(&self, id: &str) -> Value {
        let (status, body) = self
            .request(reqwest::Method::GET, &format!("/v1/projects/{id}"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        body["project"].clone()
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_is_provisioned_and_its_role_connects_only_to_its_own_database() {
    let stack = Stack::start(TestApp::new().await, &[]).await;
    let (project_id, job_id) = stack.create_project("first").await;
    let job = stack.wait_for_job(&job_id).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["attempts"], 1);
    assert!(
        ["worker-1", "worker-2"].contains(&job["claimed_by"].as_str().unwrap()),
        "{job}"
    );
    assert!(
        job["started_at"].is_string()
            && job["completed_at"].is_string()
            && job["claimed_at"].is_string()
    );
    assert_eq!(job["last_exit_code"], 0);
    assert!(job["retry_classification"].is_null());
    let stdout = job["last_stdout"].as_str().unwrap();
    assert!(
        stdout.contains("created") && stdout.contains("is ready"),
        "{stdout}"
    );

    let project = stack.project(&project_id).await;
    assert_eq!(project["state"], "ready");
    assert_eq!(project["latest_job_id"], job["id"]);

    let (status, connections) = stack
        .request(
            reqwest::Method::GET,
            &format!("/v1/projects/{project_id}/connections"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{connections}");
    let direct_url = connections["direct_url"].as_str().unwrap();
    let password = url::Url::parse(direct_url)
        .unwrap()
        .password()
        .unwrap()
        .to_string();
    assert!(
        !stdout.contains(&password),
        "the step's stdout shows the password"
    );
    assert!(!job.to_string().contains(&password));
    assert_eq!(connections["username"], project["role_name"]);

    let client = connect(direct_url).await.unwrap();
    let row = client
        .query_one("select current_user::text, current_database()::text, current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        project["role_name"].as_str().unwrap()
    );
    assert_eq!(
        row.get::<_, String>(1),
        project["database_name"].as_str().unwrap()
    );
    assert_eq!(row.get::<_, String>(2), "42s");
    client
        .batch_execute("create table notes (body text); insert into notes values ('hi')")
        .await
        .unwrap();

    // The attempts endpoint shows the one attempt, as the job does.
    let (status, attempts) = stack
        .request(
            reqwest::Method::GET,
            &format!("/v1/jobs/{job_id}/attempts"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{attempts}");
    let attempts = attempts["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["exit_code"], 0);
    assert_eq!(attempts[0]["worker"], job["claimed_by"]);
    assert_eq!(attempts[0]["stdout"], job["last_stdout"]);
    assert!(attempts[0]["finished_at"].is_string());

    // The attempt record agrees with the job.
    let (attempts, worker, exit_code, finished): (i64, String, Option<i32>, bool) = sqlx::query_as(
        "select count(*) over (), worker, exit_code, finished_at is not null from job_attempt_history where job_id = $1::uuid",
    )
    .bind(&job_id)
    .fetch_one(&stack.app.db.pool)
    .await
    .unwrap();
    assert_eq!((attempts, exit_code, finished), (1, Some(0), true));
    assert_eq!(worker, job["claimed_by"].as_str().unwrap());

    // A second project: each role is shut out of the other's database.
    let (other_id, other_job) = stack.create_project("second").await;
    assert_eq!(stack.wait_for_job(&other_job).await["state"], "completed");
    let other = stack.project(&other_id).await;
    let mut intruder_url = url::Url::parse(direct_url).unwrap();
    intruder_url.set_path(other["database_name"].as_str().unwrap());
    let Err(refused) = connect(intruder_url.as_str()).await else {
        panic!("the role must not connect to another project's database");
    };
    let db_error = refused.as_db_error().expect("refused by the server");
    assert!(
        db_error.message().contains("permission denied"),
        "{db_error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_fails_the_job_with_its_stderr_and_errors_the_project() {
    let dead_port = free_port().unwrap();
    let cluster_url =
        format!("postgres://postgres:not-this-one-secret@127.0.0.1:{dead_port}/postgres");
    let stack = Stack::start(TestApp::new_with_cluster_url(Some(cluster_url)).await, &[]).await;
    let (project_id, job_id) = stack.create_project("doomed").await;
    let job = stack.wait_for_job(&job_id).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["retry_classification"], "transient");
    assert_eq!(
        job["attempts"], 5,
        "transient failures are retried up to max_attempts"
    );
    assert_eq!(job["last_exit_code"], 75);
    let stderr = job["last_stderr"].as_str().unwrap();
    assert!(
        stderr.contains("could not connect to the cluster 'local'"),
        "{stderr}"
    );
    assert!(!job.to_string().contains("not-this-one-secret"));

    let (_, attempts) = stack
        .request(
            reqwest::Method::GET,
            &format!("/v1/jobs/{job_id}/attempts"),
            None,
        )
        .await;
    let attempts = attempts["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 5);
    assert!(attempts.iter().all(|a| a["classification"] == "transient"
        && a["stderr"].as_str().unwrap().contains("could not connect")));

    let project = stack.project(&project_id).await;
    assert_eq!(project["state"], "error");
    assert!(
        project["last_error"]
            .as_str()
            .unwrap()
            .contains("could not connect"),
        "{project}"
    );

    let classes: Vec<(i32, Option<String>, Option<i32>)> = sqlx::query_as(
        "select attempt, classification, exit_code from job_attempt_history where job_id = $1::uuid order by attempt",
    )
    .bind(&job_id)
    .fetch_all(&stack.app.db.pool)
    .await
    .unwrap();
    assert_eq!(classes.len(), 5);
    assert!(classes
        .iter()
        .all(|(_, class, code)| class.as_deref() == Some("transient") && *code == Some(75)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_not_retried() {
    let step = "echo provisioning >&1; echo 'quota exceeded for this tenant' >&2; exit 3";
    let stack = Stack::start(
        TestApp::new().await,
        &[("CAPY_STEP_COMMANDS", format!("project.create={step}"))],
    )
    .await;
    let (project_id, job_id) = stack.create_project("refused").await;
    let job = stack.wait_for_job(&job_id).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["retry_classification"], "permanent");
    assert_eq!(job["last_exit_code"], 3);
    assert_eq!(job["last_stdout"], "provisioning\n");
    assert_eq!(job["error"], "quota exceeded for this tenant");
    let project = stack.project(&project_id).await;
    assert_eq!(project["state"], "error");
    assert_eq!(project["last_error"], "quota exceeded for this tenant");
}

/// The lifecycle, on the real cluster through real workers: create → enable
/// pgcrypto → use it as the project's own role → PATCH max_connections (seen in
/// pg_database) → disable → delete → database and role gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_lives_its_whole_life_on_the_cluster() {
    let stack = Stack::start(TestApp::new().await, &[]).await;
    let admin = connect(&capy_testkit::cluster().unwrap().admin_url_for("postgres"))
        .await
        .unwrap();
    let (project_id, create_job) = stack.create_project("lifecycle").await;
    // Queued at once, behind the create on the same project: it waits, never fails.
    let (status, body) = stack
        .request(
            reqwest::Method::POST,
            &format!("/v1/projects/{project_id}/extensions"),
            Some(json!({"name": "pgcrypto"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let enable_job = body["job"]["id"].as_str().unwrap().to_string();
    assert_eq!(stack.wait_for_job(&create_job).await["state"], "completed");
    let job = stack.wait_for_job(&enable_job).await;
    assert_eq!(job["state"], "completed", "{job}");

    let (status, connections) = stack
        .request(
            reqwest::Method::GET,
            &format!("/v1/projects/{project_id}/connections"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{connections}");
    let direct_url = connections["direct_url"].as_str().unwrap().to_string();
    let own = connect(&direct_url).await.unwrap();
    let digest: String = own
        .query_one("select encode(digest('capy', 'sha256'), 'hex')", &[])
        .await
        .unwrap()
        .get(0);
    use sha2::Digest as _;
    assert_eq!(digest, hex::encode(sha2::Sha256::digest(b"capy")));
    let (_, listed) = stack
        .request(
            reqwest::Method::GET,
            &format!("/v1/projects/{project_id}/extensions"),
            None,
        )
        .await;
    let pgcrypto = listed["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "pgcrypto")
        .unwrap()
        .clone();
    assert_eq!(pgcrypto["enabled"], true, "{pgcrypto}");
    drop(own);

    stack
        .run_job(
            reqwest::Method::PATCH,
            &format!("/v1/projects/{project_id}"),
            Some(json!({"max_connections": 7})),
            200,
        )
        .await;
    let database = stack.project(&project_id).await["database_name"]
        .as_str()
        .unwrap()
        .to_string();
    let limit: i32 = admin
        .query_one(
            "select datconnlimit from pg_database where datname = $1",
            &[&database],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(limit, 7);

    stack
        .run_job(
            reqwest::Method::DELETE,
            &format!("/v1/projects/{project_id}/extensions/pgcrypto"),
            None,
            202,
        )
        .await;
    let own = connect(&direct_url).await.unwrap();
    let installed = own
        .query_opt("select 1 from pg_extension where extname = 'pgcrypto'", &[])
        .await
        .unwrap();
    assert!(installed.is_none(), "pgcrypto is still installed");

    // Delete while the project's own session is open: it is ended.
    stack
        .run_job(
            reqwest::Method::DELETE,
            &format!("/v1/projects/{project_id}"),
            None,
            202,
        )
        .await;
    assert!(own.query_one("select 1", &[]).await.is_err());
    let left: i64 = admin
        .query_one(
            "select (select count(*) from pg_database where datname = $1)
                  + (select count(*) from pg_roles where rolname = $1)",
            &[&database],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the database or role is still on the cluster");
    let (status, _) = stack
        .request(
            reqwest::Method::GET,
            &format!("/v1/projects/{project_id}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
}

/// A long poll answers when the workers announce the job's change, not at its next
/// look: here the API looks again only every hour, so any `?wait=20` that ran to its
/// deadline would show a change that was not announced.
#[tokio::test]
async fn long_polls_answer_on_the_workers_announcements() {
    let stack = Stack::start(
        TestApp::new().await,
        &[("CAPY_JOB_WAIT_FALLBACK_MS", "3600000".to_string())],
    )
    .await;
    let (_, job_id) = stack.create_project("announced").await;
    let mut seen = Vec::new();
    loop {
        let (job, took) = stack.long_poll(&job_id, 20).await;
        let state = job["state"].as_str().unwrap().to_string();
        assert!(
            took < Duration::from_secs(15),
            "a wait ran to its deadline in state {state} (seen before: {seen:?})"
        );
        seen.push(state.clone());
        if state == "completed" || state == "failed" {
            break;
        }
    }
    assert_eq!(seen.last().unwrap(), "completed", "{seen:?}");
}
