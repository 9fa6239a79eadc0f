#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! Tenant isolation, endpoint by endpoint. Organization A has two projects, their jobs
//! and keys; organization B has its own. Every endpoint of the API is walked:
//!
//! 1. with B's key against A's objects: 404 (or a list without them), and no answer
//!    names any of A's ids, names, roles or databases;
//! 2. with a key of A narrowed to project P1 against P2: likewise;
//! 3. with a read-only key of A: every mutating endpoint answers 403 (and a key
//!    without `credentials:read` gets 403 on connections and credentials);
//! 4. with an organization's key: every admin-only endpoint answers 403.
//!
//! The walk is data ([`walk`]); a test checks it covers every path of the OpenAPI
//! document, so a new endpoint without an isolation case fails here.

mod common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::TestApp;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

/// What a call needs of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Read,
    Write,
    Credentials,
    Admin,
}

/// What a call must answer.
#[derive(Debug, Clone, Copy)]
enum Expect {
    NotFound,
    Forbidden,
    Status(u16),
    /// 200 with a list under this field (that names nothing hidden).
    List(&'static str),
    /// 200 with an empty list under this field.
    EmptyList(&'static str),
}

/// One call of the walk. In `template`, `{id}` is the object the path names (a
/// project, preview database, job, API key or cluster, by the path's collection) and `{name}` an
/// extension; in `query` and `body`, `{project}` and `{org}` are the target's, and
/// `{tag}` tells one walk's new objects from another's.
struct Case {
    method: &'static str,
    template: &'static str,
    query: &'static str,
    body: Option<&'static str>,
    need: Need,
    /// With B's key against A's objects.
    foreign: Expect,
    /// With a key of A narrowed to P1, against P2.
    sibling: Expect,
}

const fn case(
    method: &'static str,
    template: &'static str,
    need: Need,
    foreign: Expect,
    sibling: Expect,
) -> Case {
    Case {
        method,
        template,
        query: "",
        body: None,
        need,
        foreign,
        sibling,
    }
}

impl Case {
    const fn query(mut self, query: &'static str) -> Self {
        self.query = query;
        self
    }

    const fn body(mut self, body: &'static str) -> Self {
        self.body = Some(body);
        self
    }

    fn mutating(&self) -> bool {
        self.method != "GET"
    }
}

/// Every authenticated endpoint but `/v1/me`, with what each walk expects.
fn walk() -> Vec<Case> {
    use Expect::*;
    use Need::*;
    vec![
        // Projects.
        case("GET", "/v1/projects", Read, List("projects"), List("projects")),
        case("GET", "/v1/projects", Read, List("projects"), List("projects"))
            .query("organization_id={org}"),
        case("POST", "/v1/projects", Write, Status(202), Forbidden)
            .body(r#"{"name":"probe-project-{tag}"}"#),
        case("GET", "/v1/projects/{id}", Read, NotFound, NotFound),
        case("PATCH", "/v1/projects/{id}", Write, NotFound, NotFound)
            .body(r#"{"max_connections":3}"#),
        case("PATCH", "/v1/projects/{id}", Write, NotFound, NotFound)
            .body(r#"{"name":"probe-rename"}"#),
        case("DELETE", "/v1/projects/{id}", Write, NotFound, NotFound),
        case("GET", "/v1/projects/{id}/connections", Credentials, NotFound, NotFound),
        case("GET", "/v1/projects/{id}/credentials", Credentials, NotFound, NotFound),
        case("POST", "/v1/projects/{id}/credentials/rotate", Write, NotFound, NotFound)
            .body(r#"{"grace_hours":1}"#),
        case("POST", "/v1/projects/{id}/retry-provisioning", Write, NotFound, NotFound),
        case("POST", "/v1/projects/{id}/stop", Write, NotFound, NotFound),
        case("POST", "/v1/projects/{id}/start", Write, NotFound, NotFound),
        // Plans: one catalogue for every caller, naming no tenant's objects.
        case("GET", "/v1/plans", Read, List("plans"), List("plans")),
        // The queue's figures: each key its own (queue_http.rs checks the counts).
        case("GET", "/v1/queue", Read, Status(200), Status(200)),
        case("GET", "/v1/queue", Read, Status(200), Status(200)).query("organization_id={org}"),
        // Extensions.
        case("GET", "/v1/projects/{id}/extensions", Read, NotFound, NotFound),
        case("POST", "/v1/projects/{id}/extensions", Write, NotFound, NotFound)
            .body(r#"{"name":"pgcrypto"}"#),
        case("DELETE", "/v1/projects/{id}/extensions/{name}", Write, NotFound, NotFound),
        // Backups, their schedule, exports.
        case("GET", "/v1/projects/{id}/backups", Read, NotFound, NotFound),
        case("POST", "/v1/projects/{id}/backups", Write, NotFound, NotFound).body("{}"),
        case("GET", "/v1/backups/{id}", Read, NotFound, NotFound),
        case("DELETE", "/v1/backups/{id}", Write, NotFound, NotFound),
        case("POST", "/v1/backups/{id}/verify", Write, NotFound, NotFound),
        case("GET", "/v1/projects/{id}/scheduled-backups/default", Read, NotFound, NotFound),
        case("PUT", "/v1/projects/{id}/scheduled-backups/default", Write, NotFound, NotFound)
            .body(r#"{"cron_hour":1,"cron_minute":2,"is_active":true}"#),
        case("GET", "/v1/projects/{id}/exports", Read, NotFound, NotFound),
        case("POST", "/v1/projects/{id}/exports", Write, NotFound, NotFound).body("{}"),
        case("GET", "/v1/exports/{id}", Read, NotFound, NotFound),
        case("GET", "/v1/exports/{id}/download", Credentials, NotFound, NotFound),
        // Restores and approvals (an unknown backup: the project is refused first).
        case("POST", "/v1/projects/{id}/approvals", Write, NotFound, NotFound)
            .body(r#"{"action":"project.restore_overwrite"}"#),
        case("POST", "/v1/projects/{id}/restores", Write, NotFound, NotFound).body(
            r#"{"backup_id":"00000000-0000-7000-8000-000000000000","target_kind":"new_project"}"#,
        ),
        // Preview databases.
        case("GET", "/v1/projects/{id}/preview-databases", Read, NotFound, NotFound),
        case("POST", "/v1/projects/{id}/preview-databases", Write, NotFound, NotFound)
            .body(r#"{"mode":"empty","name":"probe-{tag}","ttl_hours":1}"#),
        case("GET", "/v1/preview-databases/{id}", Read, NotFound, NotFound),
        case("DELETE", "/v1/preview-databases/{id}", Write, NotFound, NotFound),
        case("POST", "/v1/preview-databases/{id}/extend", Write, NotFound, NotFound)
            .body(r#"{"ttl_hours":2}"#),
        case("POST", "/v1/preview-databases/{id}/reset", Write, NotFound, NotFound),
        case("GET", "/v1/preview-databases/{id}/connections", Credentials, NotFound, NotFound),
        // Jobs.
        case("GET", "/v1/jobs", Read, List("jobs"), List("jobs")),
        case("GET", "/v1/jobs", Read, EmptyList("jobs"), EmptyList("jobs"))
            .query("project_id={project}"),
        case("GET", "/v1/jobs", Read, List("jobs"), List("jobs")).query("organization_id={org}"),
        case("GET", "/v1/jobs", Read, EmptyList("jobs"), EmptyList("jobs"))
            .query("project_id={project}&state=pending&type=project.create"),
        case("GET", "/v1/jobs/{id}", Read, NotFound, NotFound),
        case("GET", "/v1/jobs/{id}", Read, NotFound, NotFound).query("wait=1"),
        case("GET", "/v1/jobs/{id}/attempts", Read, NotFound, NotFound),
        case("POST", "/v1/jobs/{id}/cancel", Write, NotFound, NotFound),
        case("POST", "/v1/jobs/{id}/retry", Write, NotFound, NotFound),
        // API keys.
        case("GET", "/v1/api_keys", Read, List("api_keys"), List("api_keys")),
        case("GET", "/v1/api_keys", Read, List("api_keys"), List("api_keys"))
            .query("organization_id={org}"),
        case("POST", "/v1/api_keys", Write, NotFound, NotFound)
            .body(r#"{"name":"probe-key","project_id":"{project}"}"#),
        case("POST", "/v1/api_keys", Write, NotFound, Status(201))
            .body(r#"{"name":"probe-key","organization_id":"{org}"}"#),
        case("DELETE", "/v1/api_keys/{id}", Write, NotFound, NotFound),
        // Organizations.
        case("GET", "/v1/organizations", Read, List("organizations"), List("organizations")),
        case("POST", "/v1/organizations", Admin, Forbidden, Forbidden)
            .body(r#"{"name":"probe-organization"}"#),
        // Clusters (shared by every organization, managed by platform admins).
        case("GET", "/v1/clusters", Admin, Forbidden, Forbidden),
        case("POST", "/v1/clusters", Admin, Forbidden, Forbidden).body(
            r#"{"name":"probe","region":"eu","url":"postgres://probe:secret@127.0.0.1:1/postgres"}"#,
        ),
        case("GET", "/v1/clusters/{id}", Admin, Forbidden, Forbidden),
        case("POST", "/v1/clusters/{id}/check-access", Admin, Forbidden, Forbidden),
        case("PUT", "/v1/clusters/{id}/allowed-extensions", Admin, Forbidden, Forbidden)
            .body(r#"{"names":["file_fdw"]}"#),
        // Instant databases: claiming another's project (or anything but an unclaimed
        // instant database) is a 404; a project-scoped key may not claim.
        case("POST", "/v1/databases/{id}/claim", Write, NotFound, Forbidden),
    ]
}

/// Endpoints any caller may use without a key; none may name a tenant's objects.
/// A cluster's CA certificate is public, as any CA certificate (tested in tls.rs); an
/// export's file answers only a signed URL (tested in backups_http.rs).
const PUBLIC: [&str; 5] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/clusters/{id}/ca.pem",
    EXPORT_FILE,
];
const EXPORT_FILE: &str = "/v1/exports/{id}/file";
/// `/v1/me` shows only the calling key itself (tested in projects_http.rs);
/// `POST /v1/databases` takes no key and names no one's objects (tested in instant.rs).
const NOT_WALKED: [&str; 2] = ["/v1/me", "/v1/databases"];

/// The objects one walk aims at.
struct Target {
    org: String,
    project: String,
    job: String,
    key: String,
    cluster: String,
    backup: String,
    export: String,
    preview: String,
    tag: String,
}

impl Target {
    fn path(&self, case: &Case) -> String {
        let id = if case.template.starts_with("/v1/projects/")
            || case.template.starts_with("/v1/databases/")
        {
            &self.project
        } else if case.template.starts_with("/v1/jobs/") {
            &self.job
        } else if case.template.starts_with("/v1/api_keys/") {
            &self.key
        } else if case.template.starts_with("/v1/clusters/") {
            &self.cluster
        } else if case.template.starts_with("/v1/backups/") {
            &self.backup
        } else if case.template.starts_with("/v1/exports/") {
            &self.export
        } else if case.template.starts_with("/v1/preview-databases/") {
            &self.preview
        } else {
            assert!(
                !case.template.contains("{id}"),
                "which object does {} name?",
                case.template
            );
            ""
        };
        let path = case
            .template
            .replace("{id}", id)
            .replace("{name}", "pgcrypto");
        let query = self.fill(case.query);
        if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        }
    }

    fn fill(&self, text: &str) -> String {
        text.replace("{project}", &self.project)
            .replace("{org}", &self.org)
            .replace("{tag}", &self.tag)
    }
}

/// What a walk must never see: ids (also without hyphens, as in role and database
/// names), names, role and database names, key prefixes.
#[derive(Default)]
struct Hidden(Vec<String>);

impl Hidden {
    fn id(&mut self, id: &str) {
        self.0.push(id.to_string());
        self.0.push(id.replace('-', ""));
    }

    fn text(&mut self, text: &str) {
        self.0.push(text.to_string());
    }

    /// A project's or a preview database's id, name, role and database.
    fn project(&mut self, project: &Value) {
        self.id(s(&project["id"]));
        for field in ["name", "database_name", "role_name"] {
            self.text(s(&project[field]));
        }
    }

    fn key(&mut self, created: &Value) {
        self.id(s(&created["api_key"]["id"]));
        self.text(s(&created["api_key"]["name"]));
        self.text(s(&created["api_key"]["key_prefix"]));
        self.text(s(&created["key"]));
    }

    fn assert_absent(&self, request: &str, answer: &str) {
        for hidden in &self.0 {
            assert!(
                !answer.contains(hidden.as_str()),
                "{request} leaked '{hidden}': {answer}"
            );
        }
    }
}

fn s(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

fn check(expect: Expect, request: &str, status: StatusCode, body: &Value) {
    let expected = match expect {
        Expect::NotFound => StatusCode::NOT_FOUND,
        Expect::Forbidden => StatusCode::FORBIDDEN,
        Expect::Status(code) => StatusCode::from_u16(code).unwrap(),
        Expect::List(_) | Expect::EmptyList(_) => StatusCode::OK,
    };
    assert_eq!(status, expected, "{request} → {body}");
    match expect {
        Expect::NotFound | Expect::Forbidden => {
            assert!(body["error"].is_string(), "{request} → {body}");
        }
        Expect::List(field) => {
            assert!(body[field].is_array(), "{request} → {body}");
        }
        Expect::EmptyList(field) => {
            assert_eq!(body[field], json!([]), "{request} → {body}");
        }
        Expect::Status(_) => {}
    }
}

/// Organization A (`app.key`): projects P1 and P2 with their jobs, keys; organization
/// B with its key and project; and the narrowed and reduced keys of A.
struct World {
    app: TestApp,
    a_org: String,
    p1: Value,
    p2: Value,
    /// A's jobs of P1, and of P2.
    p1_jobs: Vec<String>,
    p2_jobs: Vec<String>,
    /// A's organization-wide key (besides `app.key`), and a key narrowed to P2.
    a_key: Value,
    p2_key: Value,
    /// A's key narrowed to P1.
    p1_key: String,
    read_only: String,
    no_credentials: String,
    b_org: String,
    b_key: String,
    b_project: String,
    /// A completed backup and export of each of P1 and P2: (project, backup, export).
    archives: Vec<(String, String, String)>,
    /// A preview database of each of P1 and P2 (its job is in that project's jobs).
    p1_preview: Value,
    p2_preview: Value,
}

async fn post(app: &TestApp, key: &str, path: &str, body: Value) -> Value {
    let (status, answer) = app
        .call("POST", path, Some(key), Some(&body.to_string()))
        .await;
    assert!(
        status.is_success(),
        "set-up: POST {path} {body} → {status} {answer}"
    );
    answer
}

impl World {
    async fn new() -> Self {
        let app = TestApp::new().await;
        let a_org = app.organization_id.to_string();
        let key = app.key.clone();
        let created = post(&app, &key, "/v1/projects", json!({"name": "alpha-one"})).await;
        let p1 = created["project"].clone();
        let mut p1_jobs = vec![s(&created["job"]["id"]).to_string()];
        let created = post(&app, &key, "/v1/projects", json!({"name": "alpha-two"})).await;
        let p2 = created["project"].clone();
        let mut p2_jobs = vec![s(&created["job"]["id"]).to_string()];
        // A second job of each project: a settings change.
        for (project, jobs) in [(&p1, &mut p1_jobs), (&p2, &mut p2_jobs)] {
            let (status, changed) = app
                .call(
                    "PATCH",
                    &format!("/v1/projects/{}", s(&project["id"])),
                    Some(&key),
                    Some(r#"{"max_connections":9}"#),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{changed}");
            jobs.push(s(&changed["job"]["id"]).to_string());
        }
        let a_key = post(&app, &key, "/v1/api_keys", json!({"name": "alpha-key"})).await;
        let p2_key = post(
            &app,
            &key,
            "/v1/api_keys",
            json!({"name": "alpha-two-key", "project_id": p2["id"]}),
        )
        .await;
        let p1_key = post(
            &app,
            &key,
            "/v1/api_keys",
            json!({"name": "alpha-one-key", "project_id": p1["id"]}),
        )
        .await;
        let read_only = post(
            &app,
            &key,
            "/v1/api_keys",
            json!({"name": "alpha-reader", "scopes": ["read"]}),
        )
        .await;
        let no_credentials = post(
            &app,
            &key,
            "/v1/api_keys",
            json!({"name": "alpha-writer", "scopes": ["read", "write"]}),
        )
        .await;

        let admin = app.admin_key.clone();
        let b = post(&app, &admin, "/v1/organizations", json!({"name": "bravo"})).await;
        let b_org = s(&b["organization"]["id"]).to_string();
        let b_key = post(
            &app,
            &admin,
            "/v1/api_keys",
            json!({"name": "bravo-key", "organization_id": b_org}),
        )
        .await;
        let b_key = s(&b_key["key"]).to_string();
        let b_project = post(&app, &b_key, "/v1/projects", json!({"name": "bravo-one"})).await;
        let b_project = s(&b_project["project"]["id"]).to_string();
        let mut archives = Vec::new();
        for project in [&p1, &p2] {
            archives.push(archives_of(&app, s(&project["id"])).await);
        }
        let p1_preview = preview_of(&app, &p1, &mut p1_jobs).await;
        let p2_preview = preview_of(&app, &p2, &mut p2_jobs).await;
        Self {
            archives,
            p1_preview,
            p2_preview,
            a_org,
            p1,
            p2,
            p1_jobs,
            p2_jobs,
            a_key,
            p2_key,
            p1_key: s(&p1_key["key"]).to_string(),
            read_only: s(&read_only["key"]).to_string(),
            no_credentials: s(&no_credentials["key"]).to_string(),
            b_org,
            b_key,
            b_project,
            app,
        }
    }

    /// Everything of A that B must never see.
    fn hidden_from_b(&self) -> Hidden {
        let mut hidden = Hidden::default();
        hidden.id(&self.a_org);
        hidden.text("acme");
        hidden.project(&self.p1);
        hidden.project(&self.p2);
        for job in self.p1_jobs.iter().chain(&self.p2_jobs) {
            hidden.id(job);
        }
        hidden.key(&self.a_key);
        hidden.key(&self.p2_key);
        hidden.text(&self.p1_key);
        hidden.text(&self.app.key);
        for (_, backup, export) in &self.archives {
            hidden.id(backup);
            hidden.id(export);
        }
        hidden.project(&self.p1_preview);
        hidden.project(&self.p2_preview);
        hidden
    }

    /// Everything of P2 that a key narrowed to P1 must never see.
    fn hidden_from_p1(&self) -> Hidden {
        let mut hidden = Hidden::default();
        hidden.project(&self.p2);
        for job in &self.p2_jobs {
            hidden.id(job);
        }
        hidden.key(&self.p2_key);
        for (project, backup, export) in &self.archives {
            if project == s(&self.p2["id"]) {
                hidden.id(backup);
                hidden.id(export);
            }
        }
        hidden.project(&self.p2_preview);
        hidden
    }

    fn target(&self, project: &Value, job: &str, key: &Value) -> Target {
        let (_, backup, export) = self
            .archives
            .iter()
            .find(|(p, _, _)| p == s(&project["id"]))
            .unwrap();
        let preview = if project == &self.p1 {
            &self.p1_preview
        } else {
            &self.p2_preview
        };
        Target {
            backup: backup.clone(),
            export: export.clone(),
            preview: s(&preview["id"]).to_string(),
            org: self.a_org.clone(),
            project: s(&project["id"]).to_string(),
            job: job.to_string(),
            key: s(&key["api_key"]["id"]).to_string(),
            cluster: self.app.cluster_id.to_string(),
            tag: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        }
    }

    async fn call(&self, case: &Case, key: &str, target: &Target) -> (String, StatusCode, Value) {
        let path = target.path(case);
        let body = case.body.map(|b| target.fill(b));
        let request = format!("{} {path} {}", case.method, body.as_deref().unwrap_or(""));
        let (status, answer) = self
            .app
            .call(case.method, &path, Some(key), body.as_deref())
            .await;
        (request, status, answer)
    }

    /// A's objects as they are: projects, jobs and keys, to compare after a walk.
    async fn snapshot(&self) -> Vec<String> {
        sqlx::query_scalar(
            "select format('project %s %s %s %s %s', id, name, state, max_connections,
                           deleted_at is null)
             from projects where organization_id = $1
             union all
             select format('job %s %s %s', id, state, attempts) from jobs
             where organization_id = $1
             union all
             select format('key %s %s', id, revoked_at is null) from api_keys
             where organization_id = $1
             union all
             select format('backup %s %s %s', id, state, verification_state) from backups
             where organization_id = $1
             union all
             select format('schedule %s %s %s', name, minute_of_day, is_active)
             from periodic_jobs where organization_id = $1
             union all
             select format('preview %s %s %s %s %s', id, name, state, ttl_expires_at,
                           latest_job_id)
             from preview_databases where organization_id = $1
             order by 1",
        )
        .bind(self.app.organization_id)
        .fetch_all(&self.app.db.pool)
        .await
        .unwrap()
    }
}

/// A preview database of `project`, made ready (its project too: no worker runs here);
/// its job joins `jobs`. Answers the preview.
async fn preview_of(app: &TestApp, project: &Value, jobs: &mut Vec<String>) -> Value {
    sqlx::query("update projects set state = 'ready' where id = $1::uuid")
        .bind(s(&project["id"]))
        .execute(&app.db.pool)
        .await
        .unwrap();
    let name = format!("{}-preview", s(&project["name"]));
    let path = format!("/v1/projects/{}/preview-databases", s(&project["id"]));
    let created = post(app, &app.key, &path, json!({"mode": "clone", "name": name})).await;
    jobs.push(s(&created["job"]["id"]).to_string());
    sqlx::query("update preview_databases set state = 'ready' where id = $1::uuid")
        .bind(s(&created["preview"]["id"]))
        .execute(&app.db.pool)
        .await
        .unwrap();
    created["preview"].clone()
}

/// A completed backup and export of `project` (rows only: no worker runs here), and
/// its default schedule; answers (project, backup, export).
async fn archives_of(app: &TestApp, project: &str) -> (String, String, String) {
    let mut ids = Vec::new();
    for kind in ["backup", "export"] {
        let id = uuid::Uuid::now_v7();
        sqlx::query(
            "insert into backups (id, organization_id, project_id, kind, backup_key,
                                  database_name, state, verification_state)
             select $1, organization_id, id, $3,
                    'projects/' || id || '/backups/' || $1 || '.dump', database_name,
                    'completed', 'verified'
             from projects where id = $2::uuid",
        )
        .bind(id)
        .bind(project)
        .bind(kind)
        .execute(&app.db.pool)
        .await
        .unwrap();
        ids.push(id.to_string());
    }
    let schedule = capy_shared::backups::Schedule {
        minute_of_day: 60,
        is_active: true,
        label: None,
        retention_days: 7,
    };
    let mut conn = app.db.pool.acquire().await.unwrap();
    capy_shared::backups::put_schedule(&mut conn, project.parse().unwrap(), &schedule)
        .await
        .unwrap();
    (project.to_string(), ids.remove(0), ids.remove(0))
}

#[tokio::test]
async fn another_organizations_key_reaches_none_of_our_objects() {
    let world = World::new().await;
    let before = world.snapshot().await;
    let hidden = world.hidden_from_b();
    let target = world.target(&world.p1, &world.p1_jobs[0], &world.a_key);
    for case in walk() {
        let (request, status, answer) = world.call(&case, &world.b_key, &target).await;
        check(case.foreign, &request, status, &answer);
        hidden.assert_absent(&request, &answer.to_string());
    }
    // The same with P2's objects, by another job and key.
    let target = world.target(&world.p2, &world.p2_jobs[1], &world.p2_key);
    for case in walk() {
        let (request, status, answer) = world.call(&case, &world.b_key, &target).await;
        check(case.foreign, &request, status, &answer);
        hidden.assert_absent(&request, &answer.to_string());
    }
    assert_eq!(world.snapshot().await, before, "B changed nothing of A's");

    // B's lists hold B's objects only.
    let (_, listed) = world
        .app
        .call("GET", "/v1/projects", Some(&world.b_key), None)
        .await;
    for project in listed["projects"].as_array().unwrap() {
        assert_eq!(project["organization_id"], world.b_org.as_str(), "{listed}");
    }
    assert!(listed.to_string().contains(&world.b_project), "{listed}");
    let (_, listed) = world
        .app
        .call("GET", "/v1/jobs", Some(&world.b_key), None)
        .await;
    assert!(!listed["jobs"].as_array().unwrap().is_empty(), "{listed}");
    for job in listed["jobs"].as_array().unwrap() {
        assert_eq!(job["organization_id"], world.b_org.as_str(), "{listed}");
    }
    let (_, listed) = world
        .app
        .call("GET", "/v1/organizations", Some(&world.b_key), None)
        .await;
    assert_eq!(
        listed["organizations"],
        json!([listed["organizations"][0].clone()])
    );
    assert_eq!(listed["organizations"][0]["id"], world.b_org.as_str());

    // A name A uses is free for B: a conflict would reveal that A has it.
    let (status, answer) = world
        .app
        .call(
            "POST",
            "/v1/projects",
            Some(&world.b_key),
            Some(r#"{"name":"alpha-one"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
}

#[tokio::test]
async fn a_key_narrowed_to_one_project_reaches_none_of_its_siblings() {
    let world = World::new().await;
    let before = world.snapshot().await;
    let hidden = world.hidden_from_p1();
    for job in &world.p2_jobs {
        let target = world.target(&world.p2, job, &world.p2_key);
        for case in walk() {
            let (request, status, answer) = world.call(&case, &world.p1_key, &target).await;
            check(case.sibling, &request, status, &answer);
            hidden.assert_absent(&request, &answer.to_string());
        }
    }
    // An organization-wide key of A is beyond a project's key too.
    let (status, answer) = world
        .app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{}", s(&world.a_key["api_key"]["id"])),
            Some(&world.p1_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    // Each walk (one per job of P2) created one key, narrowed to P1 (`organization_id`
    // of its own).
    let after = world.snapshot().await;
    assert_eq!(
        after.len(),
        before.len() + world.p2_jobs.len(),
        "{after:#?}"
    );

    let (status, listed) = world
        .app
        .call("GET", "/v1/jobs", Some(&world.p1_key), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let mut seen: Vec<String> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| s(&job["id"]).to_string())
        .collect();
    seen.sort();
    let mut expected = world.p1_jobs.clone();
    expected.sort();
    assert_eq!(seen, expected, "only P1's jobs: {listed}");
    let (_, listed) = world
        .app
        .call("GET", "/v1/projects", Some(&world.p1_key), None)
        .await;
    let projects = listed["projects"].as_array().unwrap();
    assert_eq!(projects.len(), 1, "{listed}");
    assert_eq!(projects[0]["id"], world.p1["id"]);
    let (_, listed) = world
        .app
        .call("GET", "/v1/api_keys", Some(&world.p1_key), None)
        .await;
    for key in listed["api_keys"].as_array().unwrap() {
        assert_eq!(key["project_id"], world.p1["id"], "{listed}");
    }
}

#[tokio::test]
async fn a_read_only_key_changes_nothing_and_credentials_need_their_scope() {
    let world = World::new().await;
    let before = world.snapshot().await;
    let target = world.target(&world.p1, &world.p1_jobs[0], &world.a_key);
    let mut mutating = 0;
    for case in walk() {
        let (request, status, answer) = world.call(&case, &world.read_only, &target).await;
        if case.need == Need::Read {
            assert!(!case.mutating(), "{request}");
            assert_eq!(status, StatusCode::OK, "{request} → {answer}");
        } else {
            mutating += usize::from(case.mutating());
            assert_eq!(status, StatusCode::FORBIDDEN, "{request} → {answer}");
            assert!(answer["error"].is_string(), "{request} → {answer}");
        }
    }
    assert!(
        mutating >= 15,
        "the walk has its mutating calls: {mutating}"
    );
    assert_eq!(
        world.snapshot().await,
        before,
        "a read-only key changed something"
    );

    // Connections need `credentials:read`, whatever else the key may do.
    sqlx::query("update projects set state = 'ready' where id = $1::uuid")
        .bind(s(&world.p1["id"]))
        .execute(&world.app.db.pool)
        .await
        .unwrap();
    let paths = [
        format!("/v1/projects/{}/connections", s(&world.p1["id"])),
        format!("/v1/projects/{}/credentials", s(&world.p1["id"])),
        format!(
            "/v1/preview-databases/{}/connections",
            s(&world.p1_preview["id"])
        ),
    ];
    for path in paths {
        for key in [&world.read_only, &world.no_credentials] {
            let (status, answer) = world.app.call("GET", &path, Some(key), None).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {answer}");
            assert!(!answer.to_string().contains("postgres"), "{answer}");
        }
        let (status, answer) = world
            .app
            .call("GET", &path, Some(&world.app.key), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
    }
}

#[tokio::test]
async fn admin_endpoints_refuse_every_organization_key() {
    let world = World::new().await;
    let target = world.target(&world.p1, &world.p1_jobs[0], &world.a_key);
    let admin_cases: Vec<Case> = walk()
        .into_iter()
        .filter(|c| c.need == Need::Admin)
        .collect();
    assert!(admin_cases.len() >= 5);
    for key in [
        &world.app.key,
        &world.p1_key,
        &world.read_only,
        &world.no_credentials,
        &world.b_key,
    ] {
        for case in &admin_cases {
            let (request, status, answer) = world.call(case, key, &target).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{request} → {answer}");
            assert!(
                !answer.to_string().contains("postgres://"),
                "{request} → {answer}"
            );
        }
    }
    let clusters: i64 = sqlx::query_scalar("select count(*) from clusters")
        .fetch_one(&world.app.db.pool)
        .await
        .unwrap();
    let organizations: i64 = sqlx::query_scalar("select count(*) from organizations")
        .fetch_one(&world.app.db.pool)
        .await
        .unwrap();
    assert_eq!((clusters, organizations), (1, 2));
    // The admin key itself gets through.
    for case in &admin_cases {
        let (request, status, answer) = world.call(case, &world.app.admin_key, &target).await;
        assert!(status.is_success(), "{request} → {status} {answer}");
    }
}

#[tokio::test]
async fn every_endpoint_wants_a_valid_key_and_public_ones_name_no_tenant() {
    let world = World::new().await;
    let target = world.target(&world.p1, &world.p1_jobs[0], &world.a_key);
    let revoked = s(&world.a_key["key"]).to_string();
    let (status, _) = world
        .app
        .call(
            "DELETE",
            &format!("/v1/api_keys/{}", s(&world.a_key["api_key"]["id"])),
            Some(&world.app.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let forged = format!("capy_live_{}", "0".repeat(64));
    for case in walk() {
        for key in [
            None,
            Some("not-a-key"),
            Some(forged.as_str()),
            Some(&revoked),
        ] {
            let path = target.path(&case);
            let body = case.body.map(|b| target.fill(b));
            let (status, answer) = world
                .app
                .call(case.method, &path, key, body.as_deref())
                .await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{} {path} with {key:?} → {answer}",
                case.method
            );
        }
    }

    let mut hidden = world.hidden_from_b();
    hidden.id(&world.b_org);
    hidden.id(&world.b_project);
    // The cluster's CA answers 404 when none is registered: give it one.
    sqlx::query("update clusters set ca_pem = $2 where id = $1")
        .bind(world.app.cluster_id)
        .bind(
            capy_testkit::cluster()
                .unwrap()
                .certificates()
                .unwrap()
                .ca_pem
                .clone(),
        )
        .execute(&world.app.db.pool)
        .await
        .unwrap();
    for template in PUBLIC {
        // An export's file without a signature: refused, naming nothing.
        let (path, expected) = if template == EXPORT_FILE {
            let export = &world.archives[0].2;
            let path = template.replace("{id}", export);
            (format!("{path}?expires=9999999999"), StatusCode::FORBIDDEN)
        } else {
            let path = template.replace("{id}", &world.app.cluster_id.to_string());
            (path, StatusCode::OK)
        };
        let request = Request::builder()
            .method("GET")
            .uri(&path)
            .body(Body::empty())
            .unwrap();
        let response = capy_api::router(world.app.state.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(status, expected, "GET {path} → {text}");
        hidden.assert_absent(&format!("GET {path}"), &text);
    }
}

/// Every path of the OpenAPI document, with each of its methods, has a case in the
/// walk (or is public and checked above); and every case names a real endpoint.
#[test]
fn the_walk_covers_every_endpoint() {
    let openapi = capy_api::openapi();
    let mut documented = BTreeSet::new();
    for (path, item) in &openapi.paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("POST", item.post.is_some()),
            ("PUT", item.put.is_some()),
            ("PATCH", item.patch.is_some()),
            ("DELETE", item.delete.is_some()),
            ("HEAD", item.head.is_some()),
            ("OPTIONS", item.options.is_some()),
            ("TRACE", item.trace.is_some()),
        ];
        for (method, present) in methods {
            if present {
                documented.insert((method.to_string(), path.clone()));
            }
        }
    }
    assert!(documented.len() >= 20, "{documented:?}");
    let walked: BTreeSet<(String, String)> = walk()
        .iter()
        .map(|c| (c.method.to_string(), c.template.to_string()))
        .collect();
    let skipped = |path: &str| PUBLIC.contains(&path) || NOT_WALKED.contains(&path);
    let missing: Vec<_> = documented
        .iter()
        .filter(|(_, path)| !skipped(path))
        .filter(|endpoint| !walked.contains(*endpoint))
        .collect();
    assert!(
        missing.is_empty(),
        "endpoints without an isolation case (add them to walk()): {missing:?}"
    );
    let unknown: Vec<_> = walked.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "cases of no documented endpoint: {unknown:?}"
    );
    for path in PUBLIC.iter().chain(&NOT_WALKED) {
        assert!(
            documented.iter().any(|(_, p)| p == path),
            "{path} is not documented any more: update PUBLIC / NOT_WALKED"
        );
    }
}
