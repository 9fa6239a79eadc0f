#![allow(clippy::unwrap_used)] // test code: a failed set-up should panic
//! Extensions only as safe as the tenant may have them (issue 10): trusted ones are the
//! tenant's own, untrusted ones are refused unless the cluster's operator allows them,
//! and then they are locked away in a schema the tenant cannot write. The tenant is
//! played with its own login; the API and two workers run as real processes.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use capy_shared::queue::{self, NewJob};
use capy_testkit::ProcessStack;
use common::TestApp;
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use uuid::Uuid;

/// The tenant is not told which cluster its project is on: clusters are the operator's.
const REFUSAL: &str =
    "extension file_fdw is not trusted; an operator can allow it on the project's cluster";

async fn enable_jobs(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from jobs where type = 'project.extension_enable'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

fn listed<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {list}"))
}

async fn allow(app: &TestApp, key: &str, names: Value) -> (StatusCode, Value) {
    app.call(
        "PUT",
        &format!("/v1/clusters/{}/allowed-extensions", app.cluster_id),
        Some(key),
        Some(&json!({ "names": names }).to_string()),
    )
    .await
}

/// Through the router alone (no worker runs): refusals queue nothing.
#[tokio::test]
async fn untrusted_extensions_are_refused_with_the_reason_until_the_operator_allows_them() {
    let app = TestApp::new().await;
    let (status, body) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"policy"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let path = format!(
        "/v1/projects/{}/extensions",
        body["project"]["id"].as_str().unwrap()
    );
    let enable_file_fdw = r#"{"name":"file_fdw"}"#;

    let (status, body) = app
        .call("POST", &path, Some(&app.key), Some(enable_file_fdw))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], REFUSAL);
    assert_eq!(enable_jobs(&app).await, 0, "a refused extension was queued");

    let (status, list) = app
        .call("GET", &format!("{path}?limit=100"), Some(&app.key), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let file_fdw = listed(&list, "file_fdw");
    assert_eq!(
        (&file_fdw["trusted"], &file_fdw["allowed"]),
        (&json!(false), &json!(false))
    );
    assert_eq!(
        file_fdw["reason"],
        "untrusted; not on the cluster's allow-list"
    );
    let pgcrypto = listed(&list, "pgcrypto");
    assert_eq!(
        (&pgcrypto["allowed"], &pgcrypto["reason"]),
        (&json!(true), &Value::Null)
    );

    // Only a platform admin sets the allow-list, with valid names, on a known cluster.
    let (status, body) = allow(&app, &app.key, json!(["file_fdw"])).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = allow(&app, &app.admin_key, json!(["File_FDW"])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = app
        .call(
            "PUT",
            &format!("/v1/clusters/{}/allowed-extensions", Uuid::new_v4()),
            Some(&app.admin_key),
            Some(r#"{"names":["file_fdw"]}"#),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = app
        .call("POST", &path, Some(&app.key), Some(enable_file_fdw))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    let (status, body) = allow(&app, &app.admin_key, json!(["file_fdw", "file_fdw"])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cluster"]["allowed_extensions"], json!(["file_fdw"]));
    let (_, shown) = app
        .call(
            "GET",
            &format!("/v1/clusters/{}", app.cluster_id),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(shown["cluster"]["allowed_extensions"], json!(["file_fdw"]));
    let (_, list) = app
        .call("GET", &format!("{path}?limit=100"), Some(&app.key), None)
        .await;
    let file_fdw = listed(&list, "file_fdw");
    assert_eq!(
        (&file_fdw["allowed"], &file_fdw["reason"]),
        (&json!(true), &Value::Null)
    );
    let (status, body) = app
        .call("POST", &path, Some(&app.key), Some(enable_file_fdw))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // The job carries only the name: the step reads the allow-list itself.
    assert_eq!(
        body["job"]["args"],
        json!({"name": "file_fdw", "version": null})
    );

    // An empty list allows none again.
    let (status, body) = allow(&app, &app.admin_key, json!([])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .call("POST", &path, Some(&app.key), Some(enable_file_fdw))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], REFUSAL);
    assert_eq!(enable_jobs(&app).await, 1);
}

/// The API and two workers as processes; the tenant connects with its own login.
struct Stack {
    app: TestApp,
    url: String,
    http: reqwest::Client,
    _processes: ProcessStack,
}

impl Stack {
    async fn start() -> Self {
        let app = TestApp::new().await;
        let env = [("CAPY_RETRY_BASE_DELAY_MS", "50".to_string())];
        let processes = ProcessStack::start(&app.db.url, 2, &env).await.unwrap();
        Self {
            url: processes.api_url.clone(),
            app,
            http: reqwest::Client::new(),
            _processes: processes,
        }
    }

    async fn request(&self, method: &str, path: &str, key: &str, body: Value) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.url))
            .bearer_auth(key);
        if method != reqwest::Method::GET && method != reqwest::Method::DELETE {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// Long-polls the job until it is `completed` or `failed`.
    async fn wait_for_job(&self, job_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self
                .request(
                    "GET",
                    &format!("/v1/jobs/{job_id}?wait=10"),
                    &self.app.key,
                    Value::Null,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let job = body["job"].clone();
            if job["state"] == "completed" || job["state"] == "failed" {
                return job;
            }
            assert!(Instant::now() < deadline, "job still running: {job}");
        }
    }

    /// Sends a request answered 202 with a job; answers that job once it has ended.
    async fn job(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, answer) = self.request(method, path, &self.app.key, body).await;
        assert_eq!(status, 202, "{answer}");
        self.wait_for_job(answer["job"]["id"].as_str().unwrap())
            .await
    }

    /// A provisioned project: its id, its role, and a session as that role.
    async fn tenant(&self, name: &str) -> (String, String, tokio_postgres::Client) {
        let job = self
            .job("POST", "/v1/projects", json!({ "name": name }))
            .await;
        assert_eq!(job["state"], "completed", "{job}");
        let id = job["project_id"].as_str().unwrap().to_string();
        let (status, connections) = self
            .request(
                "GET",
                &format!("/v1/projects/{id}/connections"),
                &self.app.key,
                Value::Null,
            )
            .await;
        assert_eq!(status, 200, "{connections}");
        let url = connections["direct_url"].as_str().unwrap();
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let role = connections["username"].as_str().unwrap().to_string();
        (id, role, client)
    }

    async fn allow(&self, names: Value) {
        let (status, body) = self
            .request(
                "PUT",
                &format!("/v1/clusters/{}/allowed-extensions", self.app.cluster_id),
                &self.app.admin_key,
                json!({ "names": names }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// The extension's schema and owner, as the tenant sees them.
async fn extension(tenant: &tokio_postgres::Client, name: &str) -> Option<(String, String)> {
    tenant
        .query_opt(
            "select extnamespace::regnamespace::text, pg_get_userbyid(extowner)::text
             from pg_extension where extname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1)))
}

/// Runs `sql` as the tenant and expects PostgreSQL to refuse it for lack of privilege.
async fn refused(tenant: &tokio_postgres::Client, sql: &str) {
    match tenant.batch_execute(sql).await {
        Ok(()) => panic!("the tenant ran {sql:?}"),
        Err(e) => assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql:?}: {e:?}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_extensions_are_the_tenants_and_allowed_untrusted_ones_are_locked_away() {
    let stack = Stack::start().await;
    let (id, role, tenant) = stack.tenant("owner").await;
    let path = format!("/v1/projects/{id}/extensions");

    let job = stack
        .job("POST", &path, json!({ "name": "pgcrypto" }))
        .await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(
        extension(&tenant, "pgcrypto").await,
        Some(("public".to_string(), role.clone())),
        "pgcrypto is not the tenant's own"
    );
    tenant
        .query_one("select digest('x', 'sha256')", &[])
        .await
        .unwrap();

    stack.allow(json!(["file_fdw"])).await;
    let job = stack
        .job("POST", &path, json!({ "name": "file_fdw" }))
        .await;
    assert_eq!(job["state"], "completed", "{job}");
    let (schema, owner) = extension(&tenant, "file_fdw").await.unwrap();
    assert_eq!(schema, "extensions", "file_fdw is not in the locked schema");
    assert_ne!(owner, role);

    // The tenant may use the locked schema, but neither write it nor undo the extension.
    let (usage, create): (bool, bool) = {
        let row = tenant
            .query_one(
                "select has_schema_privilege('extensions', 'USAGE'),
                        has_schema_privilege('extensions', 'CREATE')",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((usage, create), (true, false));
    refused(&tenant, "create table extensions.planted (x int)").await;
    refused(
        &tenant,
        "create function extensions.planted() returns int language sql as 'select 1'",
    )
    .await;
    refused(&tenant, "drop extension file_fdw").await;
    refused(&tenant, "alter extension file_fdw set schema public").await;
    refused(&tenant, "drop schema extensions cascade").await;
    refused(&tenant, "alter schema extensions rename to mine").await;
    assert_eq!(
        extension(&tenant, "file_fdw").await.map(|e| e.0).as_deref(),
        Some("extensions")
    );

    // Disabling works for both: the tenant's own as the tenant, the locked one by the admin.
    for name in ["pgcrypto", "file_fdw"] {
        let job = stack
            .job("DELETE", &format!("{path}/{name}"), Value::Null)
            .await;
        assert_eq!(job["state"], "completed", "{job}");
        assert_eq!(extension(&tenant, name).await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_refuses_what_the_operator_did_not_allow_and_a_schema_the_tenant_made() {
    let stack = Stack::start().await;
    let (id, _, tenant) = stack.tenant("bypass").await;
    let project_id: Uuid = id.parse().unwrap();

    // A job queued around the API, whose args claim an approval: the step reads the
    // allow-list itself, finds file_fdw untrusted and not allowed, and fails for good.
    let mut tx = stack.app.db.pool.begin().await.unwrap();
    let job = queue::enqueue(
        &mut tx,
        &NewJob {
            job_type: "project.extension_enable".into(),
            organization_id: Some(stack.app.organization_id),
            project_id: Some(project_id),
            preview_database_id: None,
            cluster_id: Some(stack.app.cluster_id),
            locked_resource: Some(format!("project:{project_id}")),
            max_attempts: 3,
            args: json!({"name": "file_fdw", "allowed": true, "allowed_extensions": ["file_fdw"]}),
            run_at: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let job = stack.wait_for_job(&job.id.to_string()).await;
    assert_eq!(
        (
            &job["state"],
            &job["retry_classification"],
            &job["attempts"]
        ),
        (&json!("failed"), &json!("permanent"), &json!(1)),
        "{job}"
    );
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("is not trusted and not on the allow-list of the project's cluster"),
        "{job}"
    );
    assert_eq!(extension(&tenant, "file_fdw").await, None);

    // Allowed now, but the tenant made a schema "extensions" first, with a function in
    // it: the admin never installs into it.
    stack.allow(json!(["file_fdw"])).await;
    tenant
        .batch_execute(
            "create schema extensions;
             create function extensions.planted() returns int language sql as 'select 1'",
        )
        .await
        .unwrap();
    let job = stack
        .job(
            "POST",
            &format!("/v1/projects/{id}/extensions"),
            json!({ "name": "file_fdw" }),
        )
        .await;
    assert_eq!(
        (&job["state"], &job["retry_classification"]),
        (&json!("failed"), &json!("permanent")),
        "{job}"
    );
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("schema \"extensions\" in database"),
        "{job}"
    );
    assert_eq!(extension(&tenant, "file_fdw").await, None);
}

/// The API's rule reads the flags of the version asked for (a cached catalog row here,
/// as the access check records it), and the OpenAPI document carries the name rule.
#[tokio::test]
async fn the_api_judges_the_version_asked_for_and_documents_the_name_rule() {
    let app = TestApp::new().await;
    let (status, body) = app
        .call(
            "POST",
            "/v1/projects",
            Some(&app.key),
            Some(r#"{"name":"versions"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let path = format!(
        "/v1/projects/{}/extensions",
        body["project"]["id"].as_str().unwrap()
    );
    // Reading the list records the catalog, with every version's flags.
    let (status, _) = app.call("GET", &path, Some(&app.key), None).await;
    assert_eq!(status, StatusCode::OK);
    let flags: (bool, bool) = sqlx::query_as(
        "select trusted, superuser from cluster_extension_versions
         where cluster_id = $1 and name = 'file_fdw' and version = '1.0'",
    )
    .bind(app.cluster_id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(flags, (false, true));
    // A version of file_fdw whose control file would need no superuser.
    sqlx::query(
        "insert into cluster_extension_versions (cluster_id, name, version, trusted, superuser)
         values ($1, 'file_fdw', '0.9', false, false)",
    )
    .bind(app.cluster_id)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let post = |body: &'static str| app.call("POST", &path, Some(&app.key), Some(body));
    let (status, body) = post(r#"{"name":"file_fdw","version":"0.9"}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = post(r#"{"name":"file_fdw","version":"1.0"}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], REFUSAL);
    let (status, body) = post(r#"{"name":"file_fdw"}"#).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!(REFUSAL))
    );
    let (status, body) = post(r#"{"name":"pgcrypto","version":"9.9"}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["error"],
        "the project's cluster does not offer version '9.9' of the extension 'pgcrypto'"
    );
    assert_eq!(enable_jobs(&app).await, 1);

    let (status, doc) = app.call("GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let schemas = &doc["components"]["schemas"];
    let rule = json!({"pattern": "^[a-z0-9_-]{1,63}$", "minLength": 1, "maxLength": 63});
    for name in [
        &schemas["EnableExtension"]["properties"]["name"],
        &schemas["AllowedExtensions"]["properties"]["names"]["items"],
    ] {
        for (key, value) in rule.as_object().unwrap() {
            assert_eq!(&name[key], value, "{key} of {name}");
        }
    }
    assert_eq!(
        schemas["AllowedExtensions"]["properties"]["names"]["maxItems"],
        200
    );
}

/// The earthdistance extension is not trusted and requires cube, which is: the tenant
/// gets cube into a schema of its own choosing, and the admin must not then run
/// earthdistance's script with that schema on its search_path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_runs_no_script_next_to_what_the_tenant_chose() {
    let stack = Stack::start().await;
    let (id, role, tenant) = stack.tenant("planter").await;
    let path = format!("/v1/projects/{id}/extensions");
    stack.allow(json!(["earthdistance", "file_fdw"])).await;

    // cube in public, which the tenant owns: it plants a function there, then closes
    // its own CREATE so that the schema looks locked.
    let job = stack.job("POST", &path, json!({ "name": "cube" })).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(
        extension(&tenant, "cube").await,
        Some(("public".to_string(), role.clone()))
    );
    tenant
        .batch_execute(&format!(
            "create function public.cube(numeric) returns cube language sql
               as 'select null::public.cube';
             revoke create on schema public from {role}, public"
        ))
        .await
        .unwrap();
    let closed: bool = tenant
        .query_one("select not has_schema_privilege('public', 'CREATE')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(closed);
    let job = stack
        .job("POST", &path, json!({ "name": "earthdistance" }))
        .await;
    assert_eq!(
        (&job["state"], &job["retry_classification"]),
        (&json!("failed"), &json!("permanent")),
        "{job}"
    );
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("requires extension \"cube\", installed in schema \"public\""),
        "{job}"
    );
    assert_eq!(extension(&tenant, "earthdistance").await, None);

    // The locked schema exists once an allowed extension went there; PostgreSQL lets
    // the tenant put a trusted extension into it all the same (no CREATE needed).
    let job = stack
        .job("POST", &path, json!({ "name": "file_fdw" }))
        .await;
    assert_eq!(job["state"], "completed", "{job}");
    tenant
        .batch_execute("drop function public.cube(numeric); drop extension cube")
        .await
        .unwrap();
    tenant
        .batch_execute("create extension cube schema extensions")
        .await
        .unwrap();
    assert_eq!(
        extension(&tenant, "cube").await,
        Some(("extensions".to_string(), role.clone()))
    );
    let job = stack
        .job("POST", &path, json!({ "name": "earthdistance" }))
        .await;
    assert_eq!(
        (&job["state"], &job["retry_classification"]),
        (&json!("failed"), &json!("permanent")),
        "{job}"
    );
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "holds extensions the cluster's admin did not install: cube (owned by {role})"
        )),
        "{job}"
    );
    assert_eq!(extension(&tenant, "earthdistance").await, None);

    // Where the admin put cube itself, in the locked schema, earthdistance goes next to it.
    tenant.batch_execute("drop extension cube").await.unwrap();
    let database: String = tenant
        .query_one("select current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    let url = capy_testkit::cluster().unwrap().admin_url_for(&database);
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute("create extension cube schema extensions")
        .await
        .unwrap();
    let job = stack
        .job("POST", &path, json!({ "name": "earthdistance" }))
        .await;
    assert_eq!(job["state"], "completed", "{job}");
    let (schema, owner) = extension(&tenant, "earthdistance").await.unwrap();
    assert_eq!(schema, "extensions");
    assert_ne!(owner, role);
}
