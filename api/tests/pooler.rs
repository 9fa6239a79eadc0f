//! The pooled endpoint: the test cluster behind the test process's PgBouncer
//! (transaction pooling, SCRAM through `auth_query` and `capy_pooler.lookup`), capy-api
//! and capy-worker as real processes, the cluster registered with its pooler.

// Helpers outside #[test] functions panic on failure too: they are test code.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use capy_api::admin::{self, KeyGrant};
use capy_testkit::{cluster, fresh_database, pooler, ProcessStack, TestDatabase, POOLER_AUTH_USER};
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

struct Capy {
    _db: TestDatabase,
    stack: ProcessStack,
    http: reqwest::Client,
    key: String,
    cluster: Value,
}

/// A project as its tenant sees it.
struct Tenant {
    id: String,
    role: String,
    database: String,
    direct_url: String,
    pooled_url: String,
}

impl Capy {
    /// capy with the test cluster registered with the pooler as `pooler_auth_user`.
    async fn start(pooler_auth_user: &str) -> Self {
        let pooler = pooler().unwrap();
        let db = fresh_database().await.unwrap();
        let env = [("CAPY_RETRY_BASE_DELAY_MS", "50".to_string())];
        let stack = ProcessStack::start(&db.url, 2, &env).await.unwrap();
        let admin_grant = KeyGrant {
            name: "admin".into(),
            is_admin: true,
            ..KeyGrant::default()
        };
        let (_, admin_key) = admin::create_api_key(&db.pool, &admin_grant).await.unwrap();
        let organization_id = admin::create_organization(&db.pool, "acme").await.unwrap();
        let grant = KeyGrant {
            name: "acme".into(),
            organization_id: Some(organization_id),
            ..KeyGrant::default()
        };
        let (_, key) = admin::create_api_key(&db.pool, &grant).await.unwrap();
        let mut capy = Self {
            _db: db,
            stack,
            http: reqwest::Client::new(),
            key,
            cluster: Value::Null,
        };
        let body = json!({
            "name": "local", "region": "local", "ssl_mode": "disable",
            "url": cluster().unwrap().admin_url_for("postgres"),
            "pooled_host": pooler.host(), "pooled_port": pooler.port,
            "pooler_auth_user": pooler_auth_user,
        });
        let (status, registered) = capy
            .call("POST", "/v1/clusters", &admin_key, Some(body))
            .await;
        assert_eq!(status, 201, "{registered}");
        capy.cluster = registered["cluster"].clone();
        capy
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.stack.api_url);
        let mut request = self
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// Sends a request answering 202 with a job; answers the finished job.
    async fn run_job(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.call(method, path, &self.key, body).await;
        assert!([200, 202].contains(&status), "{status} {answer}");
        self.wait_job(answer["job"]["id"].as_str().unwrap()).await
    }

    async fn create(&self, name: &str) -> Tenant {
        let (status, answer) = self
            .call(
                "POST",
                "/v1/projects",
                &self.key,
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        let id = answer["project"]["id"].as_str().unwrap().to_string();
        let job = self.wait_job(answer["job"]["id"].as_str().unwrap()).await;
        assert_eq!(job["state"], "completed", "{job}");
        let (status, urls) = self
            .call(
                "GET",
                &format!("/v1/projects/{id}/connections"),
                &self.key,
                None,
            )
            .await;
        assert_eq!(status, 200, "{urls}");
        Tenant {
            role: answer["project"]["role_name"].as_str().unwrap().into(),
            database: answer["project"]["database_name"].as_str().unwrap().into(),
            direct_url: urls["direct_url"].as_str().unwrap().into(),
            pooled_url: urls["pooled_url"].as_str().unwrap().into(),
            id,
        }
    }

    async fn wait_job(&self, job_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = self
                .call(
                    "GET",
                    &format!("/v1/jobs/{job_id}?wait=10"),
                    &self.key,
                    None,
                )
                .await;
            let job = body["job"].clone();
            if job["state"] == "completed" || job["state"] == "failed" {
                return job;
            }
            assert!(Instant::now() < deadline, "job still running: {job}");
        }
    }
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The cluster admin inside `database`, acting as the lookup role.
async fn as_lookup_role(database: &str) -> Client {
    let admin = connect(&cluster().unwrap().admin_url_for(database))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("SET ROLE {POOLER_AUTH_USER}"))
        .await
        .unwrap();
    admin
}

async fn lookup(client: &Client, role: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT usename::text, passwd FROM capy_pooler.lookup($1)",
            &[&role],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_url_points_at_the_pooler_and_logs_the_tenant_in_through_auth_query() {
    let capy = Capy::start(POOLER_AUTH_USER).await;
    let pooler = pooler().unwrap();
    assert_eq!(capy.cluster["pooler_auth_user"], POOLER_AUTH_USER);
    assert_eq!(capy.cluster["pooled_port"], pooler.port);
    let tenant = capy.create("pooled").await;
    let pooled = url::Url::parse(&tenant.pooled_url).unwrap();
    assert_eq!(pooled.port(), Some(pooler.port), "{}", tenant.pooled_url);
    assert_ne!(tenant.pooled_url, tenant.direct_url);

    // psql, as a user would.
    let output = std::process::Command::new("psql")
        .args(["-X", "-At", "-c", "select current_user, current_database()"])
        .arg(&tenant.pooled_url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "psql: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        pooler.log()
    );
    let seen = String::from_utf8_lossy(&output.stdout);
    assert_eq!(seen.trim(), format!("{}|{}", tenant.role, tenant.database));

    // A transaction through the pooler: the server connection is the client's until
    // COMMIT.
    let mut client = connect(&tenant.pooled_url).await.unwrap();
    client
        .batch_execute("create table t (n int)")
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("insert into t select generate_series(1, 10)", &[])
        .await
        .unwrap();
    let inside: i64 = tx
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    assert_eq!(inside, 10);
    let seen = client
        .simple_query("select current_user")
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        });
    assert_eq!(seen.as_deref(), Some(tenant.role.as_str()));

    // A wrong password is refused by the pooler.
    let mut wrong = pooled.clone();
    wrong.set_password(Some("not-the-password")).unwrap();
    assert!(connect(wrong.as_str()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_through_the_pooler_all_get_answers_at_a_limit_of_twenty() {
    let capy = Capy::start(POOLER_AUTH_USER).await;
    let tenant = capy.create("crowd").await;

    // Through the pooler, 200 clients connected at once all get answers.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let tasks: Vec<_> = (0..200)
        .map(|n: i32| {
            let url = tenant.pooled_url.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let client = connect(&url).await;
                barrier.wait().await;
                let client = client.map_err(|e| format!("client {n}: connect: {e}"))?;
                // The simple protocol: PgBouncer 1.18 in transaction mode keeps no
                // named prepared statement from one transaction to the next.
                let answer = client
                    .simple_query(&format!("select {n} + 1, pg_sleep(0.01)"))
                    .await
                    .map_err(|e| format!("client {n}: query: {e:?}"))?
                    .into_iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            row.get(0).map(str::to_string)
                        }
                        _ => None,
                    });
                (answer == Some((n + 1).to_string()))
                    .then_some(())
                    .ok_or(format!("client {n}: answered {answer:?}"))
            })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        if let Err(e) = task.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 200 failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        pooler().unwrap().log()
    );

    // Directly, the same project refuses sessions past its limit of 20 (the pooler
    // holds a few of them).
    let mut direct = Vec::new();
    let mut refused = 0;
    for _ in 0..25 {
        match connect(&tenant.direct_url).await {
            Ok(client) => direct.push(client),
            Err(_) => refused += 1,
        }
    }
    assert!(refused >= 5, "only {refused} of 25 direct sessions refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_cannot_touch_the_lookup_function_and_it_leaks_no_other_verifier() {
    let capy = Capy::start(POOLER_AUTH_USER).await;
    let tenant = capy.create("hostile").await;
    let other = capy.create("neighbour").await;
    let own = connect(&tenant.direct_url).await.unwrap();
    let attempts = [
        "CREATE OR REPLACE FUNCTION capy_pooler.lookup(p text) RETURNS TABLE (usename name, passwd text) \
         LANGUAGE sql AS $$ SELECT 'x'::name, 'y' $$",
        "CREATE FUNCTION capy_pooler.lookup(p name) RETURNS TABLE (usename name, passwd text) \
         LANGUAGE sql AS $$ SELECT 'x'::name, 'y' $$",
        "ALTER FUNCTION capy_pooler.lookup(text) SECURITY INVOKER",
        "ALTER FUNCTION capy_pooler.lookup(text) RENAME TO gone",
        "DROP FUNCTION capy_pooler.lookup(text)",
        "DROP SCHEMA capy_pooler CASCADE",
        "ALTER SCHEMA capy_pooler RENAME TO gone",
        "CREATE TABLE capy_pooler.t (n int)",
        "GRANT USAGE ON SCHEMA capy_pooler TO PUBLIC",
        "SELECT * FROM capy_pooler.lookup('postgres')",
    ];
    let mut holes = Vec::new();
    for sql in attempts {
        match own.batch_execute(sql).await {
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
            other => holes.push(format!("{sql}: {other:?}")),
        }
    }
    let own_call = format!("SELECT * FROM capy_pooler.lookup('{}')", tenant.role);
    if own.batch_execute(&own_call).await.is_ok() {
        holes.push("the tenant ran the lookup function".into());
    }
    assert!(holes.is_empty(), "holes: {holes:#?}");

    // The lookup role sees the project's login, and nobody else's.
    let lookup_role = as_lookup_role(&tenant.database).await;
    let found = lookup(&lookup_role, &tenant.role).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].1.starts_with("SCRAM-SHA-256$"));
    for role in [
        "postgres",
        POOLER_AUTH_USER,
        &other.role,
        &format!("{}_owner", tenant.role),
    ] {
        assert_eq!(lookup(&lookup_role, role).await, vec![], "{role}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatted_schema_is_replaced_and_converge_runs_twice() {
    let capy = Capy::start(POOLER_AUTH_USER).await;
    let tenant = capy.create("squat").await;
    // As if the tenant had made the schema before capy installed its own.
    let admin = connect(&cluster().unwrap().admin_url_for(&tenant.database))
        .await
        .unwrap();
    admin
        .batch_execute("DROP SCHEMA capy_pooler CASCADE")
        .await
        .unwrap();
    let own = connect(&tenant.direct_url).await.unwrap();
    own.batch_execute(
        "CREATE SCHEMA capy_pooler;
         CREATE FUNCTION capy_pooler.lookup(p text) RETURNS TABLE (usename name, passwd text)
             LANGUAGE sql AS $$ SELECT 'x'::name, 'y' $$;
         GRANT USAGE ON SCHEMA capy_pooler TO PUBLIC;",
    )
    .await
    .unwrap();
    let path = format!("/v1/projects/{}", tenant.id);
    for timeout in ["41s", "42s"] {
        let job = capy
            .run_job("PATCH", &path, Some(json!({"statement_timeout": timeout})))
            .await;
        assert_eq!(job["state"], "completed", "{job}");
    }
    let row = admin
        .query_one(
            "select pg_get_userbyid(n.nspowner)::text, pg_get_userbyid(p.proowner)::text,
                    p.prosecdef, n.nspacl::text
             from pg_namespace n join pg_proc p on p.pronamespace = n.oid
             where n.nspname = 'capy_pooler'",
            &[],
        )
        .await
        .unwrap();
    let (schema_owner, function_owner, definer, acl): (String, String, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        (schema_owner.as_str(), function_owner.as_str()),
        ("postgres", "postgres")
    );
    assert!(definer);
    // PUBLIC's entry is the one with an empty grantee: `{=U/…` or `,=U/…`.
    assert!(
        !acl.contains("{=") && !acl.contains(",="),
        "PUBLIC still has a right: {acl}"
    );
    assert_eq!(
        lookup(&as_lookup_role(&tenant.database).await, &tenant.role)
            .await
            .len(),
        1
    );

    // An overload owned by the tenant in capy's schema (as a race could leave): the
    // next converge drops the schema and makes it again.
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION capy_pooler.lookup(p name) RETURNS TABLE (usename name, passwd text)
                 LANGUAGE sql AS $$ SELECT 'x'::name, 'y' $$;
             ALTER FUNCTION capy_pooler.lookup(name) OWNER TO {}",
            tenant.role
        ))
        .await
        .unwrap();
    let job = capy
        .run_job("PATCH", &path, Some(json!({"statement_timeout": "43s"})))
        .await;
    assert_eq!(job["state"], "completed", "{job}");
    let functions: i64 = admin
        .query_one(
            "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname = 'capy_pooler'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(functions, 1, "the tenant's overload is still there");
    let client = connect(&tenant.pooled_url).await.unwrap();
    client.batch_execute("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_project_ends_its_pooled_sessions() {
    let capy = Capy::start(POOLER_AUTH_USER).await;
    let tenant = capy.create("doomed").await;
    let session = connect(&tenant.pooled_url).await.unwrap();
    session.batch_execute("select 1").await.unwrap();
    let job = capy
        .run_job("DELETE", &format!("/v1/projects/{}", tenant.id), None)
        .await;
    assert_eq!(job["state"], "completed", "{job}");
    // PgBouncer 1.18 holds a client whose server is gone until query_wait_timeout
    // (10 s in the test pooler), then closes it; both checks wait together.
    let started = Instant::now();
    let (old, new) = tokio::join!(
        session.batch_execute("select 1"),
        connect(&tenant.pooled_url)
    );
    assert!(
        old.is_err(),
        "the pooled session still answers after the delete"
    );
    assert!(
        new.is_err(),
        "a new pooled login was let in after the delete"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "ending the sessions took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_lookup_role_fails_the_job_with_a_clear_message() {
    let capy = Capy::start("capy_no_such_pooler").await;
    let (status, answer) = capy
        .call(
            "POST",
            "/v1/projects",
            &capy.key,
            Some(json!({"name": "orphan"})),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let job = capy.wait_job(answer["job"]["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "a missing role is not retried: {job}");
    let error = job["error"].as_str().unwrap_or_default().to_string()
        + job["last_stderr"].as_str().unwrap_or_default();
    assert!(
        error.contains("pooler_auth_user \"capy_no_such_pooler\" does not exist"),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pooler_auth_user_is_refused_at_registration() {
    let db = fresh_database().await.unwrap();
    let stack = ProcessStack::start(&db.url, 0, &[]).await.unwrap();
    let grant = KeyGrant {
        name: "admin".into(),
        is_admin: true,
        ..KeyGrant::default()
    };
    let (_, admin_key) = admin::create_api_key(&db.pool, &grant).await.unwrap();
    let http = reqwest::Client::new();
    for (field, value) in [
        ("pooler_auth_user", json!("pg_signal_backend")),
        ("pooler_auth_user", json!("Capy\"; drop role x; --")),
        ("pooler_auth_user", json!("")),
        ("pooled_host", json!("bad host/")),
    ] {
        let mut body = json!({
            "name": "c", "region": "local",
            "url": cluster().unwrap().admin_url_for("postgres"),
        });
        body[field] = value.clone();
        let response = http
            .post(format!("{}/v1/clusters", stack.api_url))
            .bearer_auth(&admin_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 400, "{field} = {value}: {answer}");
        assert!(answer.to_string().contains(field), "{answer}");
    }
}

#[test]
fn the_documented_pooler_auth_user_pattern_is_what_the_server_takes() {
    let doc = serde_json::to_value(capy_api::openapi()).unwrap();
    let schema = &doc["components"]["schemas"]["RegisterCluster"]["properties"];
    let pattern =
        regex::Regex::new(schema["pooler_auth_user"]["pattern"].as_str().unwrap()).unwrap();
    assert!(schema["pooled_host"]["pattern"].is_string());
    let long = "a".repeat(63);
    let too_long = "a".repeat(64);
    for sample in [
        "capy_pooler",
        "p",
        "pg",
        "pgb",
        "pgbouncer",
        "pg_",
        "pg_x",
        "pa",
        "p_g",
        "pg1",
        "a1_",
        "1a",
        "_a",
        "Capy",
        "capy-pooler",
        "",
        &long,
        &too_long,
        "z",
        "q",
        "o",
    ] {
        assert_eq!(
            pattern.is_match(sample),
            admin::is_valid_pooler_auth_user(sample),
            "{sample:?}"
        );
    }
}
