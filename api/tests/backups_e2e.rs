#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Backups, verification, exports and restores end to end, through the REST API only,
//! as a user would: the API and workers as real processes, the tenant writing and
//! reading its rows with its own credentials, archives in a folder store or in S3
//! (moto, capy_testkit::s3). A worker killed mid-upload leaves no object; bad input is
//! refused with a 4xx and queues nothing.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use capy_shared::store::archive_key;
use capy_testkit::{ProcessStack, TestS3};
use common::TestApp;
use serde_json::{json, Value};
use sha2::Digest as _;
use uuid::Uuid;

/// Where the stack keeps its archives.
enum Store {
    Folder(PathBuf),
    S3 { s3: &'static TestS3, prefix: String },
}

impl Store {
    fn folder() -> Self {
        let dir = std::env::temp_dir().join(format!("capy-backups-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self::Folder(dir)
    }

    fn s3() -> Self {
        Self::S3 {
            s3: capy_testkit::s3().unwrap(),
            prefix: format!("e2e-{}", Uuid::new_v4().simple()),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Folder(dir) => vec![("CAPY_BACKUP_STORE", format!("file://{}", dir.display()))],
            Self::S3 { s3, prefix } => s3.env(prefix),
        }
    }

    /// The archive of `backup` of `project`, as stored; `None` when there is none.
    async fn archive(&self, project: &str, backup: &str) -> Option<Vec<u8>> {
        let key = archive_key(project.parse().unwrap(), backup.parse().unwrap());
        match self {
            Self::Folder(dir) => std::fs::read(dir.join(key)).ok(),
            Self::S3 { s3, prefix } => s3.get(&format!("{prefix}/{key}")).await.unwrap(),
        }
    }

    /// The secret a job must never show.
    fn secret(&self) -> Option<&str> {
        match self {
            Self::Folder(_) => None,
            Self::S3 { s3, .. } => Some(&s3.secret_access_key),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Self::Folder(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

struct Stack {
    app: TestApp,
    store: Store,
    url: String,
    http: reqwest::Client,
    processes: ProcessStack,
}

impl Stack {
    async fn start(store: Store, workers: usize) -> Self {
        let app = TestApp::new().await;
        let mut env = vec![
            ("CAPY_RETRY_BASE_DELAY_MS", "50".to_string()),
            ("CAPY_POLL_INTERVAL_MS", "100".to_string()),
            ("CAPY_PERIODIC_INTERVAL_MS", "50".to_string()),
        ];
        env.extend(store.env());
        let processes = ProcessStack::start(&app.db.url, workers, &env)
            .await
            .unwrap();
        Self {
            url: processes.api_url.clone(),
            app,
            store,
            http: reqwest::Client::new(),
            processes,
        }
    }

    async fn request_as(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
        (status, body)
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request_as(&self.app.key, method, path, body).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.request(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Long-polls the job until it is finished (completed, failed or cancelled).
    async fn wait_for_job(&self, job_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let job = self.get(&format!("/v1/jobs/{job_id}?wait=10")).await["job"].clone();
            if ["completed", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
                self.assert_no_secret(&job);
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job still {}: {job}",
                job["state"]
            );
        }
    }

    async fn job_completes(&self, answer: &Value) -> Value {
        let job = self.wait_for_job(text(&answer["job"]["id"])).await;
        assert_eq!(job["state"], "completed", "{job}");
        job
    }

    fn assert_no_secret(&self, value: &Value) {
        if let Some(secret) = self.store.secret() {
            assert!(
                !value.to_string().contains(secret),
                "the store's secret shows: {value}"
            );
        }
    }

    /// Creates a project and waits until it is ready; answers its id.
    async fn ready_project(&self, name: &str) -> String {
        let (status, created) = self.post("/v1/projects", json!({ "name": name })).await;
        assert_eq!(status, 202, "{created}");
        self.job_completes(&created).await;
        text(&created["project"]["id"]).to_string()
    }

    /// The tenant's own connection, with the credentials the API shows it.
    async fn tenant(&self, project: &str) -> tokio_postgres::Client {
        let credentials = self
            .get(&format!("/v1/projects/{project}/credentials"))
            .await;
        connect(text(&credentials["connection_string"])).await
    }

    /// The project's role name.
    async fn role(&self, project: &str) -> String {
        text(&self.get(&format!("/v1/projects/{project}")).await["project"]["role_name"])
            .to_string()
    }

    /// POST a backup and wait until it is completed and its verification ended.
    async fn backup(&self, project: &str) -> Value {
        let (status, answer) = self
            .post(
                &format!("/v1/projects/{project}/backups"),
                json!({ "label": "e2e" }),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["backup"]["state"], "pending", "{answer}");
        let job = self.job_completes(&answer).await;
        assert_eq!(job["type"], "project.backup");
        self.wait_for_verification(text(&answer["backup"]["id"]))
            .await
    }

    async fn wait_for_verification(&self, backup_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let backup = self.get(&format!("/v1/backups/{backup_id}")).await["backup"].clone();
            if backup["verification_state"] != "pending" || backup["state"] == "failed" {
                return backup;
            }
            assert!(Instant::now() < deadline, "not verified in time: {backup}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Restores `backup` of `project`; answers the restore's target project id.
    async fn restore(&self, project: &str, body: Value) -> String {
        let (status, answer) = self
            .post(&format!("/v1/projects/{project}/restores"), body)
            .await;
        assert_eq!(status, 202, "{answer}");
        let job = self.job_completes(&answer).await;
        assert_eq!(job["type"], "project.restore");
        text(&answer["project"]["id"]).to_string()
    }

    async fn approval(&self, project: &str) -> String {
        let (status, approval) = self
            .post(
                &format!("/v1/projects/{project}/approvals"),
                json!({ "action": "project.restore_overwrite" }),
            )
            .await;
        assert_eq!(status, 201, "{approval}");
        text(&approval["token"]).to_string()
    }

    async fn jobs_queued(&self) -> i64 {
        sqlx::query_scalar("select count(*) from jobs")
            .fetch_one(&self.app.db.pool)
            .await
            .unwrap()
    }
}

fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("the tenant cannot connect: {e}"));
    tokio::spawn(connection);
    client
}

/// The rows of `notes` and the table's owner, as the tenant of `project` sees them.
async fn notes(stack: &Stack, project: &str) -> (Vec<String>, String) {
    let tenant = stack.tenant(project).await;
    let rows = tenant
        .query("select body from notes order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let owner = tenant
        .query_one(
            "select tableowner::text from pg_tables where tablename = 'notes'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    (rows, owner)
}

fn expected_notes() -> Vec<String> {
    ["first", "second", "third"].map(String::from).to_vec()
}

/// Backup → verified → the tenant drops its table → restore into a new project → the
/// rows are back, owned by the new project's role → restore over the project with an
/// approval → the rows are back there too. Answers the project and the backup.
async fn backup_verify_and_restore(stack: &Stack) -> (String, Value) {
    let project = stack.ready_project("backed-up").await;
    stack
        .tenant(&project)
        .await
        .batch_execute(
            "create table notes (id int primary key, body text);
             insert into notes values (1, 'first'), (2, 'second'), (3, 'third')",
        )
        .await
        .unwrap();
    let backup = stack.backup(&project).await;
    assert_eq!(backup["state"], "completed", "{backup}");
    assert_eq!(backup["verification_state"], "verified", "{backup}");
    let archive = stack
        .store
        .archive(&project, text(&backup["id"]))
        .await
        .expect("the archive");
    assert_eq!(archive.len() as i64, backup["size_bytes"].as_i64().unwrap());
    assert_eq!(sha256_hex(&archive), text(&backup["sha256"]));
    stack.assert_no_secret(&backup);

    stack
        .tenant(&project)
        .await
        .batch_execute("drop table notes")
        .await
        .unwrap();
    let restored = stack
        .restore(
            &project,
            json!({ "backup_id": backup["id"], "target_kind": "new_project", "name": "restored" }),
        )
        .await;
    assert_ne!(restored, project);
    assert_eq!(
        notes(stack, &restored).await,
        (expected_notes(), stack.role(&restored).await)
    );

    let token = stack.approval(&project).await;
    let over = stack
        .restore(
            &project,
            json!({ "backup_id": backup["id"], "target_kind": "project", "approval_token": token }),
        )
        .await;
    assert_eq!(over, project);
    assert_eq!(
        notes(stack, &project).await,
        (expected_notes(), stack.role(&project).await)
    );
    (project, backup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_in_a_folder_is_verified_and_restored_into_a_new_project_and_over_its_own() {
    let stack = Stack::start(Store::folder(), 2).await;
    backup_verify_and_restore(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_in_s3_is_verified_and_restored_and_an_export_downloads_by_presigned_url() {
    let stack = Stack::start(Store::s3(), 2).await;
    let (project, _) = backup_verify_and_restore(&stack).await;

    let (status, answer) = stack
        .post(&format!("/v1/projects/{project}/exports"), json!({}))
        .await;
    assert_eq!(status, 202, "{answer}");
    stack.job_completes(&answer).await;
    let export_id = text(&answer["export"]["id"]).to_string();
    let export = stack.get(&format!("/v1/exports/{export_id}")).await["export"].clone();
    assert_eq!(export["state"], "completed", "{export}");
    let download = stack
        .get(&format!("/v1/exports/{export_id}/download"))
        .await;
    let url = text(&download["url"]);
    assert!(url.contains("X-Amz-Signature"), "not presigned: {download}");
    assert!(download["expires_at"].is_string(), "{download}");
    stack.assert_no_secret(&download);
    // No capy key: the signature alone authorizes.
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len() as i64, export["size_bytes"].as_i64().unwrap());
    assert_eq!(sha256_hex(&bytes), text(&export["sha256"]));
}

/// Every process whose parent is `pid`, and theirs, from /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // Field 4 (ppid) follows the command name's closing parenthesis.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(parent) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

/// SIGKILL to the worker, every process below it and their process groups (a step runs
/// in a group of its own, with pg_dump in it): nothing gets to clean up.
fn kill_hard(worker: i32) {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::{getpgid, Pid};
    let below = descendants(worker);
    let _ = kill(Pid::from_raw(worker), Signal::SIGKILL);
    for pid in below {
        let pid = Pid::from_raw(pid);
        if let Ok(group) = getpgid(Some(pid)) {
            if group.as_raw() != worker && group != nix::unistd::getpgrp() {
                let _ = killpg(group, Signal::SIGKILL);
            }
        }
        let _ = kill(pid, Signal::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_upload_leaves_no_object_and_no_completed_backup() {
    let mut stack = Stack::start(Store::s3(), 2).await;
    let Store::S3 { s3, prefix } = &stack.store else {
        unreachable!()
    };
    let (s3, prefix) = (*s3, prefix.clone());
    let project = stack.ready_project("big").await;
    // ~200 MB of table, written by the tenant in a few statements.
    let tenant = stack.tenant(&project).await;
    tenant
        .batch_execute(
            "set statement_timeout = 0; create table big (id bigint, a text, b text, c text)",
        )
        .await
        .unwrap();
    for start in (0..1_500_000).step_by(300_000) {
        tenant
            .execute(
                "insert into big select g, md5(g::text), md5((g + 1)::text), md5((g + 2)::text)
                 from generate_series($1::bigint, $1::bigint + 299999) g",
                &[&i64::from(start)],
            )
            .await
            .unwrap();
    }
    drop(tenant);

    let (status, answer) = stack
        .post(&format!("/v1/projects/{project}/backups"), json!({}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let backup_id = text(&answer["backup"]["id"]).to_string();
    let job_id = text(&answer["job"]["id"]).to_string();
    let key = format!(
        "{prefix}/{}",
        archive_key(project.parse().unwrap(), backup_id.parse().unwrap())
    );

    // Claimed, and its multipart upload begun (or a moment passed): kill that worker.
    let deadline = Instant::now() + Duration::from_secs(120);
    let worker = loop {
        let job = stack.get(&format!("/v1/jobs/{job_id}")).await["job"].clone();
        assert_ne!(
            job["state"], "completed",
            "the backup finished before the kill: {job}"
        );
        if let Some(name) = job["claimed_by"]
            .as_str()
            .filter(|_| job["state"] == "claimed")
        {
            let uploading = s3.pending_uploads().unwrap().contains(&key);
            if uploading || Instant::now() + Duration::from_secs(100) > deadline {
                break name
                    .strip_prefix("worker-")
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
                    - 1;
            }
        }
        assert!(Instant::now() < deadline, "never claimed: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_hard(stack.processes.workers[worker].id() as i32);
    let _ = stack.processes.workers[worker].0.wait();

    assert!(
        s3.get(&key).await.unwrap().is_none(),
        "a killed upload surfaced as an object"
    );
    assert!(s3
        .list(&prefix)
        .await
        .unwrap()
        .iter()
        .all(|k| !k.starts_with(&key)));
    let backup = stack.get(&format!("/v1/backups/{backup_id}")).await["backup"].clone();
    assert_eq!(backup["state"], "pending", "{backup}");

    // The other worker takes the job back once the lease is gone: either it completes
    // (and then the archive is whole) or it fails (and there is none).
    let job = stack.wait_for_job(&job_id).await;
    let backup = stack.get(&format!("/v1/backups/{backup_id}")).await["backup"].clone();
    let object = s3.get(&key).await.unwrap();
    if job["state"] == "completed" {
        assert_eq!(backup["state"], "completed", "{backup}");
        let object = object.expect("a completed backup has its archive");
        assert_eq!(object.len() as i64, backup["size_bytes"].as_i64().unwrap());
        assert_eq!(sha256_hex(&object), text(&backup["sha256"]));
    } else {
        assert_eq!(backup["state"], "failed", "{backup}");
        assert!(object.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_restores_and_schedules_are_refused_and_queue_nothing() {
    let stack = Stack::start(Store::folder(), 2).await;
    let project = stack.ready_project("guarded").await;
    stack
        .tenant(&project)
        .await
        .batch_execute("create table notes (id int primary key, body text)")
        .await
        .unwrap();
    let backup = stack.backup(&project).await;
    assert_eq!(backup["verification_state"], "verified", "{backup}");
    let backup_id = text(&backup["id"]).to_string();
    let token = stack.approval(&project).await;
    let over = json!({ "backup_id": backup_id, "target_kind": "project", "approval_token": token });
    let (status, used) = stack
        .post(&format!("/v1/projects/{project}/restores"), over.clone())
        .await;
    assert_eq!(status, 202, "{used}");
    stack.job_completes(&used).await;
    let queued = stack.jobs_queued().await;

    // The token was spent: 409, naming the job it authorized.
    let (status, body) = stack
        .post(&format!("/v1/projects/{project}/restores"), over)
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        text(&body["error"]).contains(text(&used["job"]["id"])),
        "{body}"
    );

    let (status, body) = stack
        .request(
            reqwest::Method::PUT,
            &format!("/v1/projects/{project}/scheduled-backups/default"),
            Some(json!({ "cron_hour": 24, "cron_minute": 0, "is_active": true })),
        )
        .await;
    assert_eq!(status, 422, "{body}");

    // Another organization sees neither the backup nor the project.
    let other_org = capy_api::admin::create_organization(&stack.app.db.pool, "other")
        .await
        .unwrap();
    let other_key = common::new_key(&stack.app.db, other_org).await;
    let (status, body) = stack
        .request_as(
            &other_key,
            reqwest::Method::GET,
            &format!("/v1/backups/{backup_id}"),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = stack
        .request_as(
            &other_key,
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/restores"),
            Some(json!({ "backup_id": backup_id, "target_kind": "new_project" })),
        )
        .await;
    assert_eq!(status, 404, "{body}");

    // A failed backup cannot be restored.
    sqlx::query(
        "update backups set state = 'failed', error = 'marked by the test' where id = $1::uuid",
    )
    .bind(&backup_id)
    .execute(&stack.app.db.pool)
    .await
    .unwrap();
    let (status, body) = stack
        .post(
            &format!("/v1/projects/{project}/restores"),
            json!({ "backup_id": backup_id, "target_kind": "new_project" }),
        )
        .await;
    assert_eq!(status, 409, "{body}");

    assert_eq!(
        stack.jobs_queued().await,
        queued,
        "a refused request queued a job"
    );
    let schedules: i64 =
        sqlx::query_scalar("select count(*) from periodic_jobs where name like $1")
            .bind(format!("project:{project}:%"))
            .fetch_one(&stack.app.db.pool)
            .await
            .unwrap();
    assert_eq!(schedules, 0);
}

/// Makes periodic job `name` due now, as if the clock had reached its slot.
async fn reach_slot(stack: &Stack, name: &str) {
    sqlx::query("update periodic_jobs set next_run_at = now() where name = $1")
        .bind(name)
        .execute(&stack.app.db.pool)
        .await
        .unwrap();
}

async fn scheduled_backups(stack: &Stack, project: &str) -> Vec<Value> {
    let listed = stack.get(&format!("/v1/projects/{project}/backups")).await;
    listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["schedule_name"] == "default")
        .cloned()
        .collect()
}

/// Waits until the project has `count` scheduled backups, all completed.
async fn wait_for_scheduled(stack: &Stack, project: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let backups = scheduled_backups(stack, project).await;
        if backups.len() >= count && backups.iter().all(|b| b["state"] == "completed") {
            return backups;
        }
        assert!(Instant::now() < deadline, "scheduled backups: {backups:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A daily schedule with three workers: each slot the clock reaches makes one backup
/// (never one per worker); retention then deletes the oldest, from the store too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_once_per_slot_with_three_workers_and_retention_deletes_from_the_store() {
    let stack = Stack::start(Store::folder(), 3).await;
    let project = stack.ready_project("scheduled").await;
    let (status, schedule) = stack
        .request(
            reqwest::Method::PUT,
            &format!("/v1/projects/{project}/scheduled-backups/default"),
            Some(json!({ "cron_hour": 3, "cron_minute": 15, "is_active": true, "retention_days": 2 })),
        )
        .await;
    assert_eq!(status, 200, "{schedule}");
    let name = capy_shared::periodic::backup_schedule_name(project.parse().unwrap(), "default");
    for slot in 1..=2 {
        reach_slot(&stack, &name).await;
        let backups = wait_for_scheduled(&stack, &project, slot).await;
        // The other workers had a second and more to fire the same slot again.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            scheduled_backups(&stack, &project).await.len(),
            slot,
            "{backups:?}"
        );
    }
    let after = stack
        .get(&format!("/v1/projects/{project}/scheduled-backups/default"))
        .await;
    assert!(after["last_job_id"].is_string(), "{after}");
    let next: chrono::DateTime<chrono::Utc> =
        after["next_run_at"].as_str().unwrap().parse().unwrap();
    assert!(
        next > chrono::Utc::now(),
        "the next slot lies ahead: {after}"
    );

    // Retention: the older backup's time is up; the sweep deletes it, archive included.
    let backups = scheduled_backups(&stack, &project).await;
    let (old, kept) = (
        text(&backups[1]["id"]).to_string(),
        text(&backups[0]["id"]).to_string(),
    );
    assert!(stack.store.archive(&project, &old).await.is_some());
    sqlx::query("update backups set expires_at = now() - interval '1 second' where id = $1")
        .bind(Uuid::parse_str(&old).unwrap())
        .execute(&stack.app.db.pool)
        .await
        .unwrap();
    reach_slot(&stack, "capy:backup_expire").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let backup = stack.get(&format!("/v1/backups/{old}")).await["backup"].clone();
        if backup["state"] == "deleted" {
            break;
        }
        assert!(Instant::now() < deadline, "not deleted: {backup}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        stack.store.archive(&project, &old).await.is_none(),
        "the archive is gone"
    );
    assert!(
        stack.store.archive(&project, &kept).await.is_some(),
        "the newer one stays"
    );
}
