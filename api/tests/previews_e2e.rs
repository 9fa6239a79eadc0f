#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Preview databases end to end, through the REST API only, as a user would: the API
//! and workers as real processes, the parent's tenant holding a transaction open
//! while its preview is cloned, the preview's own login writing to it, previews
//! expiring by their TTL (a minute here) with three workers sweeping, and a project's
//! delete taking its previews first.

mod common;

use std::time::{Duration, Instant};

use capy_testkit::ProcessStack;
use common::http::{connect, text, try_connect, Api};
use common::TestApp;
use serde_json::{json, Value};

struct Stack {
    app: TestApp,
    api: Api,
    _processes: ProcessStack,
}

impl Stack {
    async fn start(workers: usize, extra: &[(&'static str, &str)]) -> Self {
        let app = TestApp::new().await;
        let mut env = vec![
            ("CAPY_RETRY_BASE_DELAY_MS", "50".to_string()),
            ("CAPY_POLL_INTERVAL_MS", "100".to_string()),
            ("CAPY_PERIODIC_INTERVAL_MS", "50".to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let processes = ProcessStack::start(&app.db.url, workers, &env)
            .await
            .unwrap();
        Self {
            api: Api::new(&processes.api_url, &app.key),
            app,
            _processes: processes,
        }
    }

    /// POSTs a preview of `project` and waits for its create job; answers the preview.
    async fn preview(&self, project: &str, body: Value) -> Value {
        let (status, answer) = self
            .api
            .post(&format!("/v1/projects/{project}/preview-databases"), body)
            .await;
        assert_eq!(status, 202, "{answer}");
        let job = self.api.job_completes(&answer).await;
        assert_eq!(job["type"], "project.preview_create", "{job}");
        assert_eq!(job["preview_database_id"], answer["preview"]["id"], "{job}");
        assert_eq!(job["project_id"].as_str(), Some(project), "{job}");
        let id = text(&answer["preview"]["id"]);
        let preview = self.api.get(&format!("/v1/preview-databases/{id}")).await["preview"].clone();
        assert_eq!(preview["state"], "ready", "{preview}");
        preview
    }

    /// The preview's own connection string (its login and password).
    async fn preview_url(&self, preview: &Value) -> String {
        let id = text(&preview["id"]);
        let connections = self
            .api
            .get(&format!("/v1/preview-databases/{id}/connections"))
            .await;
        text(&connections["connection_string"]).to_string()
    }

    /// The admin's session on the cluster the previews live on.
    async fn admin(&self) -> tokio_postgres::Client {
        let cluster = capy_testkit::cluster().unwrap();
        connect(&cluster.admin_url_for("postgres")).await
    }

    /// Whether database `name` and role `name` exist on the cluster.
    async fn on_cluster(&self, name: &str) -> (bool, bool) {
        let admin = self.admin().await;
        let row = admin
            .query_one(
                "select exists (select 1 from pg_database where datname = $1),
                        exists (select 1 from pg_roles where rolname = $1)",
                &[&name],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let mut url = url::Url::parse(url).unwrap();
    url.set_path(&format!("/{database}"));
    url.to_string()
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// SQLSTATE 42501: the login has no CONNECT on the database.
async fn assert_refused(url: &str, what: &str) {
    match try_connect(url).await {
        Ok(_) => panic!("{what} connected"),
        Err(error) => assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{what}: {error}"
        ),
    }
}

/// The parent's tenant holds a transaction open (with rows it has not committed) while
/// its preview is cloned: the transaction commits afterwards, the preview has the rows
/// as of the clone, writes do not cross, neither login enters the other's database, a
/// reset brings the parent's data back, and deleting the parent deletes its preview
/// first.
#[tokio::test]
async fn a_clone_leaves_the_parent_alone_and_goes_with_it() {
    let stack = Stack::start(2, &[]).await;
    let parent = stack.api.ready_project("parent").await;
    let tenant = stack.api.tenant(&parent).await;
    tenant
        .batch_execute(
            "create table items (id bigint primary key, body text not null);
             comment on table items is 'the parent''s items';
             insert into items select g, 'row ' || g from generate_series(1, 1000) g",
        )
        .await
        .unwrap();
    let open = stack.api.tenant(&parent).await;
    open.batch_execute("begin; insert into items values (1001, 'uncommitted')")
        .await
        .unwrap();

    let started = Instant::now();
    let preview = stack
        .preview(&parent, json!({ "mode": "clone", "name": "pr-42" }))
        .await;
    println!("clone of 1,000 rows usable after {:?}", started.elapsed());
    open.batch_execute("commit").await.unwrap();
    assert_eq!(count(&tenant, "select count(*) from items").await, 1001);

    let preview_url = stack.preview_url(&preview).await;
    let inside = connect(&preview_url).await;
    assert_eq!(count(&inside, "select count(*) from items").await, 1000);
    assert_eq!(
        count(
            &inside,
            "select count(*) from items where body = 'uncommitted'"
        )
        .await,
        0
    );
    let owner: String = inside
        .query_one(
            "select tableowner::text from pg_tables where tablename = 'items'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        owner,
        text(&preview["role_name"]),
        "the preview's login owns its copy"
    );
    inside
        .batch_execute("insert into items values (5000, 'preview only')")
        .await
        .unwrap();
    assert_eq!(
        count(&tenant, "select count(*) from items where id = 5000").await,
        0
    );

    let parent_project = stack.api.get(&format!("/v1/projects/{parent}")).await["project"].clone();
    let parent_database = text(&parent_project["database_name"]);
    assert_ne!(
        text(&preview["role_name"]),
        text(&parent_project["role_name"])
    );
    assert_refused(
        &with_database(&preview_url, parent_database),
        "the preview's login in the parent's database",
    )
    .await;
    let parent_credentials = stack
        .api
        .get(&format!("/v1/projects/{parent}/credentials"))
        .await;
    assert_refused(
        &with_database(
            text(&parent_credentials["connection_string"]),
            text(&preview["database_name"]),
        ),
        "the parent's login in the preview's database",
    )
    .await;

    reset_brings_the_parent_back(&stack, &preview, &preview_url).await;
    deleting_the_parent_deletes_the_preview_first(&stack, &parent, &preview).await;
}

async fn reset_brings_the_parent_back(stack: &Stack, preview: &Value, preview_url: &str) {
    let id = text(&preview["id"]);
    let (status, answer) = stack
        .api
        .post(&format!("/v1/preview-databases/{id}/reset"), json!({}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let job = stack.api.job_completes(&answer).await;
    assert_eq!(job["type"], "project.preview_reset");
    let inside = connect(preview_url).await;
    assert_eq!(count(&inside, "select count(*) from items").await, 1001);
    assert_eq!(
        count(&inside, "select count(*) from items where id = 5000").await,
        0
    );
}

async fn deleting_the_parent_deletes_the_preview_first(
    stack: &Stack,
    parent: &str,
    preview: &Value,
) {
    let (status, answer) = stack.api.delete(&format!("/v1/projects/{parent}")).await;
    assert_eq!(status, 202, "{answer}");
    stack.api.job_completes(&answer).await;
    let id = text(&preview["id"]);
    let (status, _) = stack
        .api
        .request(
            reqwest::Method::GET,
            &format!("/v1/preview-databases/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 404, "a deleted project's preview is gone");
    assert_eq!(
        stack.on_cluster(text(&preview["database_name"])).await,
        (false, false),
        "the preview's database and login are dropped"
    );
    let order: Vec<String> = sqlx::query_scalar(
        "select type || ':' || state from jobs
         where project_id = $1 and type in ('project.preview_delete', 'project.delete')
         order by seq",
    )
    .bind(parent.parse::<uuid::Uuid>().unwrap())
    .fetch_all(&stack.app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        order,
        [
            "project.preview_delete:completed",
            "project.delete:completed"
        ],
        "the preview's delete is queued before the project's"
    );
}

/// A preview with a one-hour TTL, where the test setting makes an hour a minute, is
/// deleted once by three workers sweeping every second; one extended meanwhile stays.
#[tokio::test]
async fn an_expired_preview_is_deleted_once() {
    let stack = Stack::start(
        3,
        &[
            ("CAPY_PREVIEW_TTL_HOUR_SECONDS", "60"),
            ("CAPY_PREVIEW_SWEEP_SECONDS", "1"),
        ],
    )
    .await;
    let parent = stack.api.ready_project("expiring").await;
    let short = stack
        .preview(&parent, json!({ "mode": "empty", "ttl_hours": 1 }))
        .await;
    let kept = stack
        .preview(&parent, json!({ "mode": "empty", "ttl_hours": 1 }))
        .await;
    let kept_id = text(&kept["id"]);
    let (status, extended) = stack
        .api
        .post(
            &format!("/v1/preview-databases/{kept_id}/extend"),
            json!({ "ttl_hours": 30 }),
        )
        .await;
    assert_eq!(status, 200, "{extended}");

    let short_id = text(&short["id"]);
    // The parent's queue is held (a job of its resource stays claimed) from before the
    // preview expires until a few sweeps have seen it expired: they must queue its
    // delete once, not once per sweep.
    let blocker = hold_the_parents_queue(&stack, &parent).await;
    wait_for_state(&stack, short_id, "deleting").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    sqlx::query("update jobs set state = 'completed', completed_at = now() where id = $1")
        .bind(blocker)
        .execute(&stack.app.db.pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (status, body) = stack
            .api
            .request(
                reqwest::Method::GET,
                &format!("/v1/preview-databases/{short_id}"),
                None,
            )
            .await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "not deleted in time: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        stack.on_cluster(text(&short["database_name"])).await,
        (false, false)
    );
    // Let the sweeps run a few more slots: still one delete.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deletes: Vec<(String, Option<String>)> = sqlx::query_as(
        "select state, claimed_by from jobs where preview_database_id = $1 and type = 'project.preview_delete'",
    )
    .bind(short_id.parse::<uuid::Uuid>().unwrap())
    .fetch_all(&stack.app.db.pool)
    .await
    .unwrap();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].0, "completed");
    let (sweeps, sweepers): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct claimed_by) from jobs where type = 'capy.preview_expire'",
    )
    .fetch_one(&stack.app.db.pool)
    .await
    .unwrap();
    println!("{sweeps} preview sweeps ran on {sweepers} workers");
    assert!(sweeps > 5, "the sweep runs every second: {sweeps} sweeps");
    let kept_now = stack
        .api
        .get(&format!("/v1/preview-databases/{kept_id}"))
        .await["preview"]
        .clone();
    assert_eq!(kept_now["state"], "ready", "{kept_now}");
    assert_eq!(
        stack.on_cluster(text(&kept["database_name"])).await,
        (true, true)
    );
}

/// Inserts a claimed job of `parent`'s resource with a long lease: the parent's later
/// jobs (its previews' deletes) wait until the test finishes it. Answers its id.
async fn hold_the_parents_queue(stack: &Stack, parent: &str) -> uuid::Uuid {
    let parent: uuid::Uuid = parent.parse().unwrap();
    sqlx::query_scalar(
        "insert into jobs (id, type, state, organization_id, project_id, cluster_id,
                           locked_resource, max_attempts, attempts, claimed_at, claimed_by,
                           lease_expires_at)
         select gen_random_uuid(), 'capy.noop', 'claimed', organization_id, id, cluster_id,
                'project:' || id, 1, 1, now(), 'test-blocker', now() + interval '1 hour'
         from projects where id = $1
         returning id",
    )
    .bind(parent)
    .fetch_one(&stack.app.db.pool)
    .await
    .unwrap()
}

/// Waits until preview `id` is in `state`.
async fn wait_for_state(stack: &Stack, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let preview =
            stack.api.get(&format!("/v1/preview-databases/{id}")).await["preview"].clone();
        if preview["state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "never {state}: {preview}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
