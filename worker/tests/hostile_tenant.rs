//! The hostile tenant: real API and worker processes on the test cluster, projects made
//! through the API, and the tenant's own login (its `direct_url`) trying every way out
//! of its database and every way to lift a limit capy sets. Each refusal is checked for
//! the SQLSTATE PostgreSQL gives it; every hole found is listed at once.

// Helpers outside #[test] functions panic on failure too: they are test code.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use capy_api::admin::{self, ClusterSpec, KeyGrant};
use capy_shared::crypto::SecretBox;
use capy_testkit::{cluster, fresh_database, ProcessStack, TestDatabase, TEST_SECRET_KEY};
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use uuid::Uuid;

/// The migration that moves projects made before the new ownership model.
const MIGRATION: &str = include_str!("../../migrations/20261129000001_tenant_ownership.sql");

/// capy running: a control database, the API and one worker, the test cluster
/// registered through the API (which closes PUBLIC's CONNECT), an organization's key.
struct Capy {
    db: TestDatabase,
    stack: ProcessStack,
    http: reqwest::Client,
    admin_key: String,
    key: String,
}

/// A project as its tenant sees it.
struct Tenant {
    id: String,
    role: String,
    database: String,
    config: tokio_postgres::Config,
}

impl Capy {
    async fn start(worker_env: &[(&str, String)]) -> Self {
        let db = fresh_database().await.unwrap();
        let stack = ProcessStack::start(&db.url, 1, worker_env).await.unwrap();
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
        let capy = Self {
            db,
            stack,
            http: reqwest::Client::new(),
            admin_key,
            key,
        };
        let url = cluster().unwrap().admin_url_for("postgres");
        let body = json!({"name": "local", "region": "local", "url": url, "ssl_mode": "disable"});
        let (status, registered) = capy
            .call("POST", "/v1/clusters", &capy.admin_key, Some(body))
            .await;
        assert_eq!(status, 201, "{registered}");
        assert_eq!(registered["access"]["reachable"], true, "{registered}");
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
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until job `id` has completed.
    async fn completed(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let path = format!("/v1/jobs/{id}?wait=5");
            let (status, job) = self.call("GET", &path, &self.admin_key, None).await;
            assert_eq!(status, 200, "{job}");
            match job["job"]["state"]
                .as_str()
                .unwrap_or_else(|| panic!("{job}"))
            {
                "completed" => return,
                "failed" | "cancelled" => panic!("job {id} ended: {job}"),
                _ => assert!(Instant::now() < deadline, "job {id} still {job}"),
            }
        }
    }

    /// A project made through the API, once its job completed.
    async fn project(&self, name: &str) -> Tenant {
        let body = json!({"name": name, "max_connections": 5, "statement_timeout": "30s"});
        let (status, created) = self
            .call("POST", "/v1/projects", &self.key, Some(body))
            .await;
        assert_eq!(status, 202, "{created}");
        self.completed(created["job"]["id"].as_str().unwrap()).await;
        let id = created["project"]["id"].as_str().unwrap().to_string();
        let path = format!("/v1/projects/{id}/connections");
        let (status, connections) = self.call("GET", &path, &self.key, None).await;
        assert_eq!(status, 200, "{connections}");
        Tenant::from_url(id, connections["direct_url"].as_str().unwrap())
    }
}

impl Tenant {
    fn from_url(id: String, url: &str) -> Self {
        let config: tokio_postgres::Config = url.parse().unwrap();
        Self {
            id,
            role: config.get_user().unwrap().to_string(),
            database: config.get_dbname().unwrap().to_string(),
            config,
        }
    }

    /// The tenant's own login, in database `dbname`.
    async fn connect_to(&self, dbname: &str) -> Result<Client, tokio_postgres::Error> {
        let mut config = self.config.clone();
        config.dbname(dbname);
        connect(config).await
    }

    async fn session(&self) -> Client {
        self.connect_to(&self.database).await.unwrap()
    }
}

async fn connect(config: tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The cluster's admin, in database `dbname`.
async fn admin(dbname: &str) -> Client {
    let mut config: tokio_postgres::Config = cluster()
        .unwrap()
        .admin_url_for("postgres")
        .parse()
        .unwrap();
    config.dbname(dbname);
    connect(config).await.unwrap()
}

/// The holes found so far: each expected refusal that did not happen as expected.
#[derive(Default)]
struct Holes(Vec<String>);

impl Holes {
    /// `sql`, run by the tenant, must fail with `code`.
    async fn refused(&mut self, client: &Client, sql: &str, code: &SqlState) {
        match client.batch_execute(sql).await {
            Ok(()) => self.0.push(format!("ALLOWED: {sql}")),
            Err(e) if e.code() == Some(code) => {}
            Err(e) => self.0.push(format!(
                "{sql}: expected SQLSTATE {}, got {}",
                code.code(),
                describe(&e)
            )),
        }
    }

    /// The tenant's login must not get into database `dbname`.
    async fn no_entry(&mut self, tenant: &Tenant, dbname: &str, code: &SqlState) {
        match tenant.connect_to(dbname).await {
            Ok(_) => self
                .0
                .push(format!("ALLOWED: {} connects to {dbname}", tenant.role)),
            Err(e) if e.code() == Some(code) => {}
            Err(e) => self.0.push(format!(
                "connecting {} to {dbname}: expected SQLSTATE {}, got {}",
                tenant.role,
                code.code(),
                describe(&e)
            )),
        }
    }

    fn assert_none(&self) {
        assert!(
            self.0.is_empty(),
            "{} hole(s):\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

const DENIED: &SqlState = &SqlState::INSUFFICIENT_PRIVILEGE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_lift_its_limits_or_reach_beyond_its_database() {
    let capy = Capy::start(&[]).await;
    let a = capy.project("a").await;
    let b = capy.project("b").await;
    let mut holes = Holes::default();
    let session = a.session().await;
    lift_limits(&mut holes, &session, &a).await;
    gain_privileges(&mut holes, &session, &a, &b).await;
    reach_out(&mut holes, &session, &a, &b, &capy.db.name).await;
    holes.assert_none();
}

/// Every limit capy sets on the database and the role.
async fn lift_limits(holes: &mut Holes, session: &Client, a: &Tenant) {
    let (db, role) = (&a.database, &a.role);
    for sql in [
        format!("ALTER DATABASE {db} CONNECTION LIMIT -1"),
        format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"),
        format!("ALTER DATABASE {db} SET statement_timeout = 0"),
        format!("ALTER DATABASE {db} SET idle_in_transaction_session_timeout = 0"),
        format!("ALTER DATABASE {db} RESET ALL"),
        format!("ALTER DATABASE {db} OWNER TO {role}"),
        format!("ALTER DATABASE {db} IS_TEMPLATE true"),
        format!("ALTER ROLE {role} CONNECTION LIMIT -1"),
        format!("ALTER ROLE {role} CREATEDB"),
        format!("ALTER ROLE {role} CREATEROLE"),
        format!("ALTER ROLE {role} SUPERUSER"),
        format!("ALTER ROLE {role} REPLICATION"),
        format!("ALTER ROLE {role} BYPASSRLS"),
    ] {
        holes.refused(session, &sql, DENIED).await;
    }
    // Whatever the tenant tried, the limits are as capy set them.
    let row = admin("postgres")
        .await
        .query_one(
            "select d.datconnlimit, r.rolconnlimit, d.datallowconn,
                    pg_get_userbyid(d.datdba)::text
             from pg_database d, pg_roles r where d.datname = $1 and r.rolname = $2",
            &[&a.database, &a.role],
        )
        .await
        .unwrap();
    let found: (i32, i32, bool, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    if found != (5, 5, true, format!("{}_owner", a.role)) {
        holes.0.push(format!(
            "limits or owner changed: (datconnlimit, rolconnlimit, datallowconn, owner) = {found:?}"
        ));
    }
}

/// Other roles, superuser powers, server files and programs, untrusted extensions.
async fn gain_privileges(holes: &mut Holes, session: &Client, a: &Tenant, b: &Tenant) {
    let owner = format!("{}_owner", a.role);
    session
        .batch_execute(
            "CREATE TABLE loot (line text);
             CREATE FUNCTION on_ddl() RETURNS event_trigger LANGUAGE plpgsql
                 AS 'BEGIN END';",
        )
        .await
        .unwrap();
    for sql in [
        format!("SET ROLE {owner}"),
        format!("SET ROLE {}", b.role),
        "SET ROLE postgres".to_string(),
        "SET SESSION AUTHORIZATION postgres".to_string(),
        "CREATE ROLE evil LOGIN".to_string(),
        "CREATE DATABASE evil".to_string(),
        format!("GRANT {owner} TO {}", a.role),
        format!("GRANT pg_read_server_files TO {}", a.role),
        format!("GRANT pg_execute_server_program TO {}", a.role),
        format!("GRANT pg_read_all_data TO {}", a.role),
        "COPY (SELECT 1) TO PROGRAM 'id'".to_string(),
        "COPY loot FROM '/etc/passwd'".to_string(),
        "COPY loot TO '/tmp/capy-hostile'".to_string(),
        "SELECT pg_read_file('/etc/passwd')".to_string(),
        "SELECT pg_ls_dir('.')".to_string(),
        "SELECT lo_import('/etc/passwd')".to_string(),
        "SELECT rolpassword FROM pg_authid".to_string(),
        "ALTER SYSTEM SET max_connections = 10000".to_string(),
        "SET session_replication_role = replica".to_string(),
        "LOAD 'file_fdw'".to_string(),
        "CREATE EVENT TRIGGER spy ON ddl_command_start EXECUTE FUNCTION on_ddl()".to_string(),
    ] {
        holes.refused(session, &sql, DENIED).await;
    }
    untrusted_extensions(holes, session).await;
}

async fn untrusted_extensions(holes: &mut Holes, session: &Client) {
    let offered: Vec<String> = session
        .query(
            "select name::text from pg_available_extensions
             where name in ('file_fdw', 'dblink', 'postgres_fdw', 'adminpack', 'pageinspect')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        offered.len() >= 2,
        "the cluster offers too few untrusted extensions to try: {offered:?}"
    );
    for name in offered {
        let sql = format!("CREATE EXTENSION \"{name}\"");
        holes.refused(session, &sql, DENIED).await;
    }
}

/// Other databases, other tenants' data, sessions and password verifiers.
async fn reach_out(holes: &mut Holes, session: &Client, a: &Tenant, b: &Tenant, control: &str) {
    for dbname in [b.database.as_str(), "postgres", "template1", control] {
        holes.no_entry(a, dbname, DENIED).await;
    }
    holes
        .no_entry(a, "template0", &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
        .await;
    physical_replication(holes, a);
    // Not as the owner role either: it cannot log in.
    let mut as_owner = a.config.clone();
    as_owner.user(format!("{}_owner", a.role));
    if connect(as_owner).await.is_ok() {
        holes.0.push("ALLOWED: login as the owner role".into());
    }

    // B's data, session and role.
    let b_session = b.session().await;
    b_session
        .batch_execute("CREATE TABLE secret (v text); INSERT INTO secret VALUES ('b-only')")
        .await
        .unwrap();
    let b_pid: i32 = b_session
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    for sql in [
        format!("SELECT pg_terminate_backend({b_pid})"),
        format!("SELECT pg_cancel_backend({b_pid})"),
        format!("ALTER ROLE {} PASSWORD 'taken'", b.role),
        format!("ALTER ROLE {} CONNECTION LIMIT 0", b.role),
        format!("DROP ROLE {}", b.role),
        format!("DROP DATABASE {}", b.database),
        format!("ALTER DATABASE {} CONNECTION LIMIT 0", b.database),
    ] {
        holes.refused(session, &sql, DENIED).await;
    }
    let query: Option<String> = session
        .query_one(
            "select query from pg_stat_activity where pid = $1",
            &[&b_pid],
        )
        .await
        .unwrap()
        .get(0);
    if query.as_deref() != Some("<insufficient privilege>") {
        holes
            .0
            .push(format!("A reads B's session's query: {query:?}"));
    }
    // A grant A makes on its database (no grant option: a warning) lets B in nowhere.
    let _ = session
        .batch_execute(&format!(
            "GRANT CONNECT ON DATABASE {} TO PUBLIC, {}",
            a.database, b.role
        ))
        .await;
    holes.no_entry(b, &a.database, DENIED).await;
    b_session.query_one("select 1", &[]).await.unwrap();
}

/// A replication connection (the walsender, which streams the whole cluster's WAL)
/// needs REPLICATION, which a project's role lacks unless logical replication was asked
/// for (see the README). tokio-postgres cannot open one; psql can.
fn physical_replication(holes: &mut Holes, a: &Tenant) {
    let psql = capy_testkit::postgres_bin_dir().unwrap().join("psql");
    let test_cluster = cluster().unwrap();
    let output = std::process::Command::new(psql)
        .arg(format!(
            "host={} port={} user={} dbname={} replication=true",
            test_cluster.host(),
            test_cluster.port,
            a.role,
            a.database
        ))
        .args(["-c", "IDENTIFY_SYSTEM"])
        .env(
            "PGPASSWORD",
            String::from_utf8(a.config.get_password().unwrap().to_vec()).unwrap(),
        )
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // pg_hba.conf keeps physical replication to the admin ("no pg_hba.conf entry for
    // replication connection"); past it, PostgreSQL 15 says "must be superuser or
    // replication role to start walsender", 16 and later "permission denied to start
    // WAL sender".
    let refused = [
        "pg_hba.conf entry for replication connection",
        "start walsender",
        "start WAL sender",
    ]
    .iter()
    .any(|m| stderr.contains(m));
    if output.status.success() || !refused {
        holes.0.push(format!(
            "a replication connection as {}: {} {stderr}",
            a.role, output.status
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_builds_its_app_itself_including_trusted_extensions() {
    let capy = Capy::start(&[]).await;
    let a = capy.project("app").await;
    let session = a.session().await;
    session
        .batch_execute(
            "CREATE SCHEMA app;
             CREATE TABLE app.orders (id bigserial PRIMARY KEY, total numeric NOT NULL);
             CREATE SEQUENCE app.invoice_no;
             CREATE FUNCTION app.double(x numeric) RETURNS numeric LANGUAGE sql
                 AS 'SELECT x * 2';
             CREATE VIEW app.big AS SELECT * FROM app.orders WHERE total > 100;
             CREATE TABLE notes (body text);
             INSERT INTO app.orders (total) VALUES (120);
             CREATE TEMPORARY TABLE scratch (x int);
             CREATE EXTENSION pgcrypto;",
        )
        .await
        .unwrap();
    let row = session
        .query_one(
            "select app.double(total)::text, nextval('app.invoice_no'),
                    encode(digest('x', 'sha256'), 'hex')
             from app.big",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "240");
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(
        row.get::<_, String>(2),
        "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    );
    // What it made is its own; so is schema public.
    let owners: Vec<String> = session
        .query(
            "select distinct pg_get_userbyid(relowner)::text from pg_class c
             join pg_namespace n on n.oid = c.relnamespace where n.nspname in ('app', 'public')
             union select pg_get_userbyid(nspowner)::text from pg_namespace
             where nspname in ('app', 'public')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(owners, vec![a.role.clone()]);
    // A session may set its own timeouts: capy's are defaults, not limits (README).
    session
        .batch_execute(&format!(
            "SET statement_timeout = 0; ALTER ROLE {} SET statement_timeout = 0",
            a.role
        ))
        .await
        .unwrap();
    drop(session);

    // Deleting the project drops its database and both roles.
    let path = format!("/v1/projects/{}", a.id);
    let (status, deleted) = capy.call("DELETE", &path, &capy.key, None).await;
    assert_eq!(status, 202, "{deleted}");
    capy.completed(deleted["job"]["id"].as_str().unwrap()).await;
    let left: i64 = admin("postgres")
        .await
        .query_one(
            "select (select count(*) from pg_roles where rolname::text in ($1::text, $1::text || '_owner'))
                  + (select count(*) from pg_database where datname = $2)",
            &[&a.role, &a.database],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left, 0,
        "the project's roles or database survived its deletion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_databases_storage_ban_holds_against_the_tenant_and_updates() {
    let env = [("CAPY_INSTANT_STORAGE_CHECK_SECONDS", "1".to_string())];
    let capy = Capy::start(&env).await;
    let url = format!("{}/v1/databases", capy.stack.api_url);
    let response = capy
        .http
        .post(url)
        .json(&json!({"ref": "hostile-test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let tenant = Tenant::from_url(
        created["id"].as_str().unwrap().to_string(),
        created["connection_string"].as_str().unwrap(),
    );
    let session = tenant.session().await;
    session.query_one("select 1", &[]).await.unwrap();
    // As if it had grown past its limit: the next storage check bans it.
    sqlx::query("update projects set storage_limit_bytes = 1 where database_name = $1")
        .bind(&tenant.database)
        .execute(&capy.db.pool)
        .await
        .unwrap();
    wait_for_ban(&tenant.database, true).await;

    let mut holes = Holes::default();
    let refusing = &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE;
    holes.no_entry(&tenant, &tenant.database, refusing).await;
    for dbname in ["postgres", "template1", capy.db.name.as_str()] {
        holes.no_entry(&tenant, dbname, DENIED).await;
    }
    holes.assert_none();

    // A project.update (here the migration's) keeps the ban.
    sqlx::raw_sql(MIGRATION)
        .execute(&capy.db.pool)
        .await
        .unwrap();
    let job: Uuid = sqlx::query_scalar(
        "select j.id from jobs j join projects p on p.id = j.project_id
         where p.database_name = $1 and j.type = 'project.update'",
    )
    .bind(&tenant.database)
    .fetch_one(&capy.db.pool)
    .await
    .unwrap();
    capy.completed(&job.to_string()).await;
    let mut holes = Holes::default();
    holes.no_entry(&tenant, &tenant.database, refusing).await;
    holes.assert_none();

    // Claimed, it has no storage limit: its update lets the tenant back in.
    let path = format!("/v1/databases/{}/claim", tenant.id);
    let (status, claimed) = capy.call("POST", &path, &capy.key, Some(json!({}))).await;
    assert_eq!(status, 200, "{claimed}");
    capy.completed(claimed["job"]["id"].as_str().unwrap()).await;
    let session = tenant.session().await;
    session
        .batch_execute("CREATE TABLE public.after_claim (x int)")
        .await
        .unwrap();
}

/// Waits until the database refuses (`banned`) or takes connections.
async fn wait_for_ban(database: &str, banned: bool) {
    let postgres = admin("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let allowed: bool = postgres
            .query_one(
                "select datallowconn from pg_database where datname = $1",
                &[&database],
            )
            .await
            .unwrap()
            .get(0);
        if allowed != banned {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "database {database}: datallowconn still {allowed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A project as the old `project.create` left it: its database owned by its login.
async fn old_style_project(db: &TestDatabase) -> Tenant {
    let secrets = SecretBox::from_key_text(TEST_SECRET_KEY).unwrap();
    let test_cluster = cluster().unwrap();
    let cluster_id = admin::upsert_cluster(
        &db.pool,
        &secrets,
        &ClusterSpec {
            engine: capy_shared::model::Engine::Postgresql,
            name: "local".into(),
            region: "local".into(),
            admin_url: test_cluster.admin_url_for("postgres"),
            public_host: test_cluster.host().to_string(),
            direct_port: i32::from(test_cluster.port),
            pooled_port: i32::from(test_cluster.port),
            pooled_host: None,
            pooler_auth_user: None,
            ssl_mode: "disable".into(),
            max_projects: None,
            ca_pem: None,
        },
    )
    .await
    .unwrap();
    let organization_id = admin::create_organization(&db.pool, "old").await.unwrap();
    let id = Uuid::now_v7();
    let name = format!("capy_{}", id.simple());
    let password = format!("pw-{}", Uuid::new_v4().simple());
    sqlx::query(
        "insert into projects (id, organization_id, cluster_id, name, slug, region, state,
             database_name, role_name, password_encrypted, max_connections, statement_timeout,
             idle_transaction_timeout)
         values ($1, $2, $3, 'old', 'old', 'local', 'ready', $4, $4, $5, 5, '30s', '60s')",
    )
    .bind(id)
    .bind(organization_id)
    .bind(cluster_id)
    .bind(&name)
    .bind(secrets.seal(&password))
    .execute(&db.pool)
    .await
    .unwrap();
    let postgres = admin("postgres").await;
    for sql in [
        format!("CREATE ROLE {name} LOGIN NOREPLICATION PASSWORD '{password}' CONNECTION LIMIT 5"),
        format!("CREATE DATABASE {name} OWNER {name}"),
        format!(
            "ALTER DATABASE {name} CONNECTION LIMIT 5;
             ALTER DATABASE {name} SET statement_timeout = '30s';
             REVOKE CONNECT, TEMPORARY ON DATABASE {name} FROM PUBLIC;
             GRANT CONNECT, TEMPORARY ON DATABASE {name} TO {name};"
        ),
        // A role of the new model's name, granted to the tenant by someone.
        format!("CREATE ROLE {name}_owner NOLOGIN; GRANT {name}_owner TO {name}"),
    ] {
        postgres.batch_execute(&sql).await.unwrap();
    }
    let url = format!(
        "postgresql://{name}:{password}@{}:{}/{name}",
        test_cluster.host(),
        test_cluster.port
    );
    Tenant::from_url(id.to_string(), &url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_moves_an_old_project_so_its_tenant_can_no_longer_lift_its_limit() {
    let db = fresh_database().await.unwrap();
    let tenant = old_style_project(&db).await;
    let session = tenant.session().await;
    // The old model's hole, as the tenant saw it: it owns its database. It leaves a
    // back door (CONNECT for PUBLIC) and data of its own.
    session
        .batch_execute(&format!(
            "ALTER DATABASE {db} CONNECTION LIMIT -1;
             ALTER DATABASE {db} CONNECTION LIMIT 5;
             GRANT ALL ON DATABASE {db} TO PUBLIC;
             ALTER DATABASE {db} SET standard_conforming_strings = off;
             CREATE TABLE mine (v text); INSERT INTO mine VALUES ('kept');",
            db = tenant.database
        ))
        .await
        .unwrap();
    drop(session);

    sqlx::raw_sql(MIGRATION).execute(&db.pool).await.unwrap();
    let jobs: Vec<(String, Option<Uuid>, String, i32, Value)> =
        sqlx::query_as("select type, project_id, locked_resource, max_attempts, args from jobs")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let project_id: Uuid = tenant.id.parse().unwrap();
    // The job is the project's: its organization and cluster, and an id in time order
    // (UUIDv7, as every job id) so it lists where it belongs.
    let (same_owner, version): (bool, i32) = sqlx::query_as(
        "select j.organization_id = p.organization_id and j.cluster_id = p.cluster_id,
                get_byte(uuid_send(j.id), 6) >> 4
         from jobs j join projects p on p.id = j.project_id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        same_owner,
        "the job lacks the project's organization or cluster"
    );
    assert_eq!(version, 7, "the job's id is not a UUIDv7");
    assert_eq!(
        jobs,
        vec![(
            "project.update".to_string(),
            Some(project_id),
            format!("project:{project_id}"),
            5,
            json!({"reason": "tenant_ownership"})
        )]
    );
    let _stack = ProcessStack::start(&db.url, 1, &[]).await.unwrap();
    common::wait_until_idle(&db.pool, Duration::from_secs(60)).await;
    assert_eq!(
        common::job_states(&db.pool).await,
        vec![("completed".to_string(), 1)]
    );

    let session = tenant.session().await;
    let mut holes = Holes::default();
    for sql in [
        format!("ALTER DATABASE {} CONNECTION LIMIT -1", tenant.database),
        format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", tenant.database),
        format!(
            "ALTER DATABASE {} SET statement_timeout = 0",
            tenant.database
        ),
        format!("SET ROLE {}_owner", tenant.role),
    ] {
        holes.refused(&session, &sql, DENIED).await;
    }
    holes.assert_none();
    let row = session
        .query_one(
            "select v, pg_get_userbyid(c.relowner)::text,
                    has_database_privilege('public', current_database(), 'CONNECT')
             from mine, pg_class c where c.relname = 'mine'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "kept");
    assert_eq!(row.get::<_, String>(1), tenant.role, "its table is its own");
    assert!(!row.get::<_, bool>(2), "PUBLIC keeps the back door");
    // What it set on its database while it owned it is gone: only capy's defaults.
    let settings: Vec<String> = admin("postgres")
        .await
        .query(
            "select unnest(s.setconfig) from pg_db_role_setting s
             join pg_database d on d.oid = s.setdatabase
             where d.datname = $1 and s.setrole = 0 order by 1",
            &[&tenant.database],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        settings.iter().all(|s| s.starts_with("statement_timeout=")
            || s.starts_with("idle_in_transaction_session_timeout=")),
        "the tenant's own database settings outlived the move: {settings:?}"
    );
}
