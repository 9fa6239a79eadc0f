#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Credential rotation end to end: `capy-api` and a `capy-worker` as real processes
//! (their logs captured) against the private cluster. During a grace both logins
//! connect and use what the old one made; once the retire job ran the old one is
//! refused and the new one owns it all; a second rotation during a grace retires the
//! oldest; a delete drops every login; no password reaches a job, an attempt or a log.
//! Bad input and not-ready projects are refused in-process.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use capy_testkit::{bin_path, free_port, ChildGuard, TEST_SECRET_KEY};
use common::TestApp;
use serde_json::{json, Value};

const RETIRE: &str = "project.retire_credentials";

/// The API and one worker, each logging (debug) to a file of its own.
struct Stack {
    app: TestApp,
    url: String,
    http: reqwest::Client,
    logs: Vec<PathBuf>,
    processes: Vec<ChildGuard>,
}

impl Stack {
    async fn start(app: TestApp) -> Self {
        let port = free_port().unwrap();
        let mut logs = Vec::new();
        let mut spawn = |program: &str, env: &[(&str, String)]| {
            let log = std::env::temp_dir().join(format!("capy-rotation-{port}-{program}.log"));
            let file = std::fs::File::create(&log).unwrap();
            logs.push(log);
            let mut command = std::process::Command::new(bin_path(program).unwrap());
            command
                .env("RUST_LOG", "debug")
                .env("CAPY_DATABASE_URL", &app.db.url)
                .env("CAPY_SECRET_KEY", TEST_SECRET_KEY)
                .envs(env.iter().map(|(k, v)| (*k, v)))
                .stdin(std::process::Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file);
            if program == "capy-api" {
                command.arg("serve");
            }
            ChildGuard(command.spawn().unwrap())
        };
        let api = spawn("capy-api", &[("CAPY_LISTEN", format!("127.0.0.1:{port}"))]);
        let worker = spawn(
            "capy-worker",
            &[
                ("CAPY_WORKER_ID", "worker-1".to_string()),
                ("CAPY_POLL_INTERVAL_MS", "100".to_string()),
                ("CAPY_RETRY_BASE_DELAY_MS", "50".to_string()),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "capy-api did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            app,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            logs,
            processes: vec![api, worker],
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

    async fn wait_for_job(&self, job_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let path = format!("/v1/jobs/{job_id}?wait=10");
            let (status, body) = self.request(reqwest::Method::GET, &path, None).await;
            assert_eq!(status, 200, "{body}");
            let job = body["job"].clone();
            if ["completed", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job still {}: {job}",
                job["state"]
            );
        }
    }

    /// Sends a request answered with a job; answers the job once it completed.
    async fn run_job(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.request(method, path, body).await;
        assert!(status == 200 || status == 202, "{path}: {status} {answer}");
        let job = self
            .wait_for_job(answer["job"]["id"].as_str().unwrap())
            .await;
        assert_eq!(job["state"], "completed", "{job}");
        job
    }

    async fn credentials(&self, project_id: &str) -> Value {
        let path = format!("/v1/projects/{project_id}/credentials");
        let (status, body) = self.request(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn rotate(&self, project_id: &str, grace_hours: i64) -> (Value, Value) {
        let path = format!("/v1/projects/{project_id}/credentials/rotate");
        let job = self
            .run_job(
                reqwest::Method::POST,
                &path,
                Some(json!({ "grace_hours": grace_hours })),
            )
            .await;
        assert_eq!(job["type"], "project.rotate_credentials");
        assert_eq!(job["args"], json!({ "grace_hours": grace_hours }));
        (job, self.credentials(project_id).await)
    }

    /// The pending retire job of login `role`: its id and how far ahead it is due.
    async fn retire_job(&self, role: &str) -> (String, f64) {
        sqlx::query_as(
            "select id::text, extract(epoch from run_at - now())::float8 from jobs
             where type = $1 and args->>'role' = $2",
        )
        .bind(RETIRE)
        .bind(role)
        .fetch_one(&self.app.db.pool)
        .await
        .unwrap()
    }

    /// Makes the retire job of `role` due now (the grace has passed) and waits for it.
    async fn retire_now(&self, role: &str) -> Value {
        let (id, _) = self.retire_job(role).await;
        sqlx::query("update jobs set run_at = now() where id = $1::uuid")
            .bind(&id)
            .execute(&self.app.db.pool)
            .await
            .unwrap();
        let job = self.wait_for_job(&id).await;
        assert_eq!(job["state"], "completed", "{job}");
        job
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn text(value: &Value) -> String {
    value.as_str().unwrap().to_string()
}

/// Connects with `credentials`, writes a row to `notes` and answers the row count.
async fn write_and_count(credentials: &Value, note: &str) -> i64 {
    let client = connect(&text(&credentials["connection_string"]))
        .await
        .unwrap_or_else(|e| panic!("{} cannot connect: {e}", credentials["username"]));
    client
        .execute("insert into notes values ($1)", &[&note])
        .await
        .unwrap();
    client
        .query_one("select count(*) from notes", &[])
        .await
        .unwrap()
        .get(0)
}

async fn assert_refused(credentials: &Value) {
    let refused = connect(&text(&credentials["connection_string"])).await;
    assert!(
        refused.is_err(),
        "login {} still connects",
        credentials["username"]
    );
}

/// The roles on the cluster named after the project's database.
async fn logins_on_cluster(admin: &tokio_postgres::Client, database: &str) -> Vec<String> {
    admin
        .query(
            "select rolname::text from pg_roles where starts_with(rolname, $1) order by 1",
            &[&database],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_old_login_for_its_grace_then_retires_it() {
    let stack = Stack::start(TestApp::new().await).await;
    let admin = connect(&capy_testkit::cluster().unwrap().admin_url_for("postgres"))
        .await
        .unwrap();
    let (status, created) = stack
        .request(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"name": "rotating"})),
        )
        .await;
    assert_eq!(status, 202, "{created}");
    let project_id = text(&created["project"]["id"]);
    let database = text(&created["project"]["database_name"]);
    assert_eq!(
        stack.wait_for_job(&text(&created["job"]["id"])).await["state"],
        "completed"
    );

    // The credentials as fields, in one with the connection strings.
    let first = stack.credentials(&project_id).await;
    let url = url::Url::parse(&text(&first["connection_string"])).unwrap();
    assert_eq!(url.username(), text(&first["username"]));
    assert_eq!(url.password().unwrap(), text(&first["password"]));
    assert_eq!(url.host_str().unwrap(), text(&first["host"]));
    assert_eq!(
        i64::from(url.port().unwrap()),
        first["port"].as_i64().unwrap()
    );
    assert_eq!(url.path(), format!("/{}", text(&first["database"])));
    assert_eq!(first["database"], json!(database));
    assert_eq!(first["ssl_mode"], "disable");
    assert!(first["pooled_connection_string"].is_string(), "{first}");
    assert!(first.get("previous_username").is_none(), "{first}");
    let owner = connect(&text(&first["connection_string"])).await.unwrap();
    owner
        .batch_execute("create table notes (body text); insert into notes values ('first')")
        .await
        .unwrap();

    // Grace of an hour: both logins work and use the old login's table.
    let (job, second) = stack.rotate(&project_id, 1).await;
    assert!(text(&job["last_stdout"]).contains("connects"), "{job}");
    assert_ne!(second["username"], first["username"]);
    assert_ne!(second["password"], first["password"]);
    assert_eq!(second["username"], json!(format!("{database}_r1")));
    assert_eq!(second["previous_username"], first["username"]);
    assert!(
        !second.to_string().contains(&text(&first["password"])),
        "{second}"
    );
    let expires =
        chrono::DateTime::parse_from_rfc3339(&text(&second["previous_expires_at"])).unwrap();
    let ahead = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    assert!((3500..=3600).contains(&ahead), "expires in {ahead} s");
    assert_eq!(write_and_count(&first, "old login").await, 2);
    assert_eq!(write_and_count(&second, "new login").await, 3);
    let (_, due_in) = stack.retire_job(&text(&first["username"])).await;
    assert!(
        (3500.0..=3600.0).contains(&due_in),
        "retire due in {due_in} s"
    );
    // Nobody keeps the old login alive by cancelling its retire.
    let (retire_id, _) = stack.retire_job(&text(&first["username"])).await;
    let (status, body) = stack
        .request(
            reqwest::Method::POST,
            &format!("/v1/jobs/{retire_id}/cancel"),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");

    // The hour passes: the old login is refused, its open session ended; the new one
    // owns the table.
    stack.retire_now(&text(&first["username"])).await;
    assert_refused(&first).await;
    assert!(
        owner.query_one("select 1", &[]).await.is_err(),
        "the old session lives"
    );
    assert_eq!(write_and_count(&second, "after the grace").await, 4);
    let new = connect(&text(&second["connection_string"])).await.unwrap();
    let table_owner: String = new
        .query_one(
            "select tableowner::text from pg_tables where tablename = 'notes'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(table_owner, text(&second["username"]));
    drop(new);
    assert!(stack
        .credentials(&project_id)
        .await
        .get("previous_username")
        .is_none());

    // Grace 0, asked twice with one Idempotency-Key: one rotation; the old login is
    // refused once its retire job ran.
    let rotate = format!("{}/v1/projects/{project_id}/credentials/rotate", stack.url);
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let response = stack
            .http
            .post(&rotate)
            .bearer_auth(&stack.app.key)
            .header("idempotency-key", "rotate-to-third")
            .json(&json!({"grace_hours": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let replayed = response.headers().contains_key("idempotent-replayed");
        let body: Value = response.json().await.unwrap();
        jobs.push((text(&body["job"]["id"]), replayed));
    }
    assert_eq!(jobs[0].0, jobs[1].0, "{jobs:?}");
    assert_eq!((jobs[0].1, jobs[1].1), (false, true));
    assert_eq!(stack.wait_for_job(&jobs[0].0).await["state"], "completed");
    let third = stack.credentials(&project_id).await;
    let retired = stack
        .wait_for_job(&stack.retire_job(&text(&second["username"])).await.0)
        .await;
    assert_eq!(retired["state"], "completed", "{retired}");
    assert_refused(&second).await;
    assert_eq!(write_and_count(&third, "grace 0").await, 5);

    // A rotation during a grace retires the oldest login first: never three logins.
    let (_, fourth) = stack.rotate(&project_id, 1).await;
    let (_, fifth) = stack.rotate(&project_id, 1).await;
    assert_refused(&third).await;
    assert_eq!(fifth["previous_username"], fourth["username"]);
    assert_eq!(write_and_count(&fourth, "fourth").await, 6);
    assert_eq!(write_and_count(&fifth, "fifth").await, 7);
    let owner_role = format!("{database}_owner");
    let expected = vec![
        owner_role.clone(),
        text(&fourth["username"]),
        text(&fifth["username"]),
    ];
    let mut expected = expected;
    expected.sort();
    assert_eq!(logins_on_cluster(&admin, &database).await, expected);
    // The retire job of the login already retired is a no-op; the previous stays.
    stack.retire_now(&text(&third["username"])).await;
    assert_eq!(
        stack.credentials(&project_id).await["previous_username"],
        fourth["username"]
    );
    assert_eq!(write_and_count(&fourth, "still in its grace").await, 8);

    // A delete drops both logins (and the owner role).
    stack
        .run_job(
            reqwest::Method::DELETE,
            &format!("/v1/projects/{project_id}"),
            None,
        )
        .await;
    assert!(logins_on_cluster(&admin, &database).await.is_empty());
    let (waiting, _) = stack.retire_job(&text(&fourth["username"])).await;
    let (status, waiting) = stack
        .request(reqwest::Method::GET, &format!("/v1/jobs/{waiting}"), None)
        .await;
    assert_eq!(status, 200, "{waiting}");
    assert_eq!(waiting["job"]["state"], "cancelled", "{waiting}");

    let passwords: Vec<String> = [&first, &second, &third, &fourth, &fifth]
        .iter()
        .map(|c| text(&c["password"]))
        .collect();
    assert_no_password_anywhere(stack, &project_id, &passwords).await;
}

/// No password in any job's args, outcome or attempts, nor in the processes' logs.
async fn assert_no_password_anywhere(mut stack: Stack, project_id: &str, passwords: &[String]) {
    let recorded: Vec<String> = sqlx::query_scalar(
        "select concat_ws(' ', type, args::text, last_stdout, last_stderr, error) from jobs
         where project_id = $1::uuid
         union all
         select concat_ws(' ', a.stdout, a.stderr, a.error) from job_attempt_history a
         join jobs j on j.id = a.job_id where j.project_id = $1::uuid",
    )
    .bind(project_id)
    .fetch_all(&stack.app.db.pool)
    .await
    .unwrap();
    let retire_jobs: i64 =
        sqlx::query_scalar("select count(*) from jobs where project_id = $1::uuid and type = $2")
            .bind(project_id)
            .bind(RETIRE)
            .fetch_one(&stack.app.db.pool)
            .await
            .unwrap();
    assert_eq!(retire_jobs, 4, "one retire job per rotation");
    assert!(recorded.len() > 10, "{recorded:?}");
    for password in passwords {
        assert!(
            !recorded.iter().any(|r| r.contains(password.as_str())),
            "a password is in a job's record"
        );
    }
    for process in &mut stack.processes {
        process.0.kill().unwrap();
        process.0.wait().unwrap();
    }
    for log in &stack.logs {
        let text = std::fs::read_to_string(log).unwrap();
        std::fs::remove_file(log).unwrap();
        assert!(
            text.len() > 1000,
            "{} logged nothing: {text}",
            log.display()
        );
        for password in passwords {
            assert!(
                !text.contains(password.as_str()),
                "a password is in {}",
                log.display()
            );
        }
    }
}

#[tokio::test]
async fn bad_grace_hours_and_projects_not_ready_are_refused() {
    let app = TestApp::new().await;
    let created = app.create_project("early").await;
    let id = text(&created["project"]["id"]);
    let rotate = format!("/v1/projects/{id}/credentials/rotate");
    for bad in [
        "-1",
        "721",
        "1.5",
        r#""x""#,
        "true",
        "[]",
        "99999999999999999999",
    ] {
        let body = format!(r#"{{"grace_hours":{bad}}}"#);
        let (status, answer) = app.call("POST", &rotate, Some(&app.key), Some(&body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {answer}");
        let message = text(&answer["error"]);
        assert!(
            message.contains("grace_hours") && message.contains("0 to 720"),
            "{message}"
        );
    }
    let (status, answer) = app
        .call(
            "POST",
            &rotate,
            Some(&app.key),
            Some(r#"{"grace_hours":1,"extra":1}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    // Still provisioning: 409 on both.
    let (status, answer) = app.call("POST", &rotate, Some(&app.key), Some("{}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let credentials = format!("/v1/projects/{id}/credentials");
    let (status, answer) = app.call("GET", &credentials, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");

    // Ready: a rotation is queued (default grace 24 h; the new login in the row, not
    // in the args); a second one while it is in flight is a 409.
    sqlx::query("update projects set state = 'ready' where id = $1::uuid")
        .bind(&id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, answer) = app.call("POST", &rotate, Some(&app.key), Some("{}")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["job"]["args"], json!({"grace_hours": 24}));
    assert_eq!(
        answer["job"]["locked_resource"],
        json!(format!("project:{id}"))
    );
    let (pending, sealed): (String, Vec<u8>) = sqlx::query_as(
        "select pending_role_name, pending_password_encrypted from projects where id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        pending,
        format!("{}_r1", text(&created["project"]["database_name"]))
    );
    let password = common::secrets().open(&sealed).unwrap();
    assert!(!answer.to_string().contains(&password));
    let (status, again) = app
        .call(
            "POST",
            &rotate,
            Some(&app.key),
            Some(r#"{"grace_hours":2}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(
        text(&again["error"]).contains("already in progress"),
        "{again}"
    );
    let (status, shown) = app.call("GET", &credentials, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert!(
        !shown.to_string().contains(&password),
        "the pending password is shown"
    );
}
