//! The preview steps against the test process's private cluster: the real `capy-step`
//! binary with a StepInput on its stdin (the parent as its project, the preview as a
//! login and a database of its own), each tenant acting through its own login, and
//! the catalogs read afterwards.

// Helpers outside #[test] functions panic on failure too: they are test code.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use capy_shared::model::job_type;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use uuid::Uuid;

const EXIT_PERMANENT: i32 = 1;

/// A login and the database of the same name: a parent project or a preview.
struct Tenant {
    id: Uuid,
    name: String,
    password: String,
    max_connections: i32,
}

impl Tenant {
    fn parent() -> Self {
        Self {
            id: Uuid::new_v4(),
            name: format!("capy_{}", Uuid::new_v4().simple()),
            password: format!("pw-{}", Uuid::new_v4().simple()),
            max_connections: 5,
        }
    }

    /// A preview, named as the API names it.
    fn preview() -> Self {
        let id = Uuid::new_v4();
        Self {
            id,
            name: capy_shared::previews::database_name(id),
            password: format!("pv-{}", Uuid::new_v4().simple()),
            max_connections: 3,
        }
    }

    fn step_project(&self) -> Value {
        json!({
            "id": self.id, "database_name": self.name, "role_name": self.name,
            "password": self.password, "max_connections": self.max_connections,
            "statement_timeout": "30s", "idle_transaction_timeout": "1min",
            "storage_limit_bytes": null,
        })
    }
}

/// A step to run: its job type, the parent, the preview (for a preview's job), args.
struct Job<'a> {
    job_type: &'a str,
    parent: &'a Tenant,
    preview: Option<&'a Tenant>,
    args: Value,
    /// The untrusted extensions the cluster's operator allows.
    allowed_extensions: &'a [&'a str],
}

impl<'a> Job<'a> {
    fn project(job_type: &'a str, parent: &'a Tenant) -> Self {
        Self {
            job_type,
            parent,
            preview: None,
            args: json!({}),
            allowed_extensions: &[],
        }
    }

    fn preview(job_type: &'a str, parent: &'a Tenant, preview: &'a Tenant, mode: &str) -> Self {
        Self {
            job_type,
            parent,
            preview: Some(preview),
            args: json!({"mode": mode}),
            allowed_extensions: &[],
        }
    }

    fn input(&self) -> Value {
        let now = chrono::Utc::now();
        json!({
            "job": {
                "id": Uuid::now_v7(), "type": self.job_type, "state": "claimed",
                "organization_id": Uuid::new_v4(), "project_id": self.parent.id,
                "cluster_id": Uuid::nil(),
                "preview_database_id": self.preview.map(|p| p.id),
                "attempts": 1, "max_attempts": 3, "run_at": now, "claimed_at": now,
                "claimed_by": "test", "started_at": now, "completed_at": null, "error": null,
                "last_exit_code": null, "last_stdout": null, "last_stderr": null,
                "locked_resource": format!("project:{}", self.parent.id),
                "retry_classification": null, "args": self.args, "cancel_requested_at": null,
                "created_at": now, "updated_at": now,
            },
            "project": self.parent.step_project(),
            "preview": self.preview.map(Tenant::step_project),
            "cluster": {
                "id": Uuid::nil(), "name": "test-cluster", "admin_url": admin_url(),
                "allowed_extensions": self.allowed_extensions,
            },
        })
    }

    /// Runs `capy-step`; checks that its output shows no password.
    async fn run(&self) -> Output {
        let stdin = serde_json::to_vec(&self.input()).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_capy-step"))
            .env("CAPY_JOB_TYPE", self.job_type)
            .env("CAPY_ATTEMPT", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(&stdin).await.unwrap();
        drop(pipe);
        let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("capy-step did not finish within 120 s")
            .unwrap();
        let output = Output {
            code: output
                .status
                .code()
                .expect("capy-step was killed by a signal"),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        let mut secrets = vec![self.parent.password.clone(), admin_password()];
        secrets.extend(self.preview.map(|p| p.password.clone()));
        for secret in secrets {
            for text in [&output.stdout, &output.stderr] {
                assert!(
                    !text.contains(&secret),
                    "{} printed a password",
                    self.job_type
                );
            }
        }
        output
    }
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    fn result(&self) -> Value {
        capy_shared::step::parse_result(&self.stdout).expect("a result line")
    }

    fn last_error(&self) -> &str {
        self.stderr.lines().last().unwrap_or_default()
    }
}

fn admin_url() -> String {
    capy_testkit::cluster().unwrap().admin_url_for("postgres")
}

fn admin_password() -> String {
    let config: tokio_postgres::Config = admin_url().parse().unwrap();
    String::from_utf8(config.get_password().unwrap().to_vec()).unwrap()
}

async fn connect(
    config: tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn admin(dbname: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
    config.dbname(dbname);
    connect(config).await.unwrap()
}

/// `tenant`'s own login, in database `dbname`.
async fn login(
    tenant: &Tenant,
    dbname: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
    config
        .user(&tenant.name)
        .password(&tenant.password)
        .dbname(dbname);
    connect(config).await
}

/// `tenant`'s own login, in its own database.
async fn as_tenant(tenant: &Tenant) -> tokio_postgres::Client {
    login(tenant, &tenant.name).await.unwrap()
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn exists(sql: &str, name: &str) -> bool {
    admin("postgres")
        .await
        .query_opt(sql, &[&name])
        .await
        .unwrap()
        .is_some()
}

async fn database_exists(name: &str) -> bool {
    exists("select 1 from pg_database where datname = $1", name).await
}

async fn role_exists(name: &str) -> bool {
    exists("select 1 from pg_roles where rolname = $1", name).await
}

async fn create_parent(parent: &Tenant) {
    Job::project(job_type::PROJECT_CREATE, parent)
        .run()
        .await
        .assert_code(0);
}

/// The parent's data: two extensions the tenant installs itself (trusted), a comment,
/// two schemas, rows.
async fn fill(parent: &Tenant) {
    as_tenant(parent)
        .await
        .batch_execute(
            "create extension pgcrypto;
             create extension citext;
             create table orders (id int primary key, h bytea default digest('x', 'sha256'),
                                  email citext);
             insert into orders (id, email) select g, 'User' || g || '@Example.com'
               from generate_series(1, 100) g;
             comment on table orders is 'the orders';
             create schema app;
             create table app.items (id bigserial primary key, name text not null);
             insert into app.items (name) select 'item ' || g from generate_series(1, 7) g;",
        )
        .await
        .unwrap();
}

async fn clone(parent: &Tenant, preview: &Tenant, mode: &str) -> Output {
    let output = Job::preview(job_type::PREVIEW_CREATE, parent, preview, mode)
        .run()
        .await;
    output.assert_code(0);
    output
}

/// The SQLSTATE of a failed connection attempt.
fn refused_code(result: Result<tokio_postgres::Client, tokio_postgres::Error>) -> String {
    match result {
        Ok(_) => panic!("the login connected"),
        Err(e) => e.code().map(|c| c.code().to_string()).unwrap_or_default(),
    }
}

#[tokio::test]
async fn a_clone_leaves_the_parent_and_its_open_transaction_untouched() {
    let parent = Tenant::parent();
    let preview = Tenant::preview();
    create_parent(&parent).await;
    fill(&parent).await;
    // An open session of the parent, inside a transaction that wrote and has not
    // committed.
    let session = as_tenant(&parent).await;
    session
        .batch_execute(
            "begin; insert into orders (id) select generate_series(1001, 1010);
             update app.items set name = 'renamed' where id = 1",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let output = clone(&parent, &preview, "clone").await;
    eprintln!("clone of a small database: {:?} in all", started.elapsed());
    eprintln!("result: {}", output.result());
    assert_eq!(output.result()["mode"], "clone");
    assert_eq!(output.result()["tables"], 2);
    // The parent's transaction goes on and commits.
    session.batch_execute("commit").await.unwrap();
    assert_eq!(count(&session, "select count(*) from orders").await, 110);

    let copy = as_tenant(&preview).await;
    assert_eq!(count(&copy, "select count(*) from orders").await, 100);
    assert_eq!(
        count(
            &copy,
            "select count(*) from app.items where name = 'item 1'"
        )
        .await,
        1
    );
    let row = copy
        .query_one(
            "select obj_description('orders'::regclass, 'pg_class'),
                    (select count(*) from orders where email = 'user7@example.com'),
                    (select h = digest('x', 'sha256') from orders where id = 1),
                    (select tableowner::text from pg_tables where tablename = 'orders')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("the orders")
    );
    assert_eq!(row.get::<_, i64>(1), 1, "citext compares without case");
    assert!(row.get::<_, bool>(2), "pgcrypto's digest works");
    assert_eq!(row.get::<_, String>(3), preview.name);

    // The preview's writes stay in the preview.
    copy.batch_execute("insert into orders (id) values (5000); delete from app.items")
        .await
        .unwrap();
    let parent_now = as_tenant(&parent).await;
    assert_eq!(
        count(&parent_now, "select count(*) from orders where id = 5000").await,
        0
    );
    assert_eq!(
        count(&parent_now, "select count(*) from app.items").await,
        7
    );

    // Neither login reaches the other's database.
    assert_eq!(refused_code(login(&preview, &parent.name).await), "42501");
    assert_eq!(refused_code(login(&parent, &preview.name).await), "42501");
    let limit: i32 = admin("postgres")
        .await
        .query_one(
            "select rolconnlimit from pg_roles where rolname = $1",
            &[&preview.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(limit, preview.max_connections);
}

#[tokio::test]
async fn an_empty_preview_has_the_schema_alone() {
    let parent = Tenant::parent();
    let preview = Tenant::preview();
    create_parent(&parent).await;
    fill(&parent).await;
    let started = Instant::now();
    let output = clone(&parent, &preview, "empty").await;
    eprintln!("empty preview of a small database: {:?}", started.elapsed());
    assert_eq!(output.result()["mode"], "empty");
    assert_eq!(output.result()["tables"], 2);
    let copy = as_tenant(&preview).await;
    assert_eq!(count(&copy, "select count(*) from orders").await, 0);
    assert_eq!(count(&copy, "select count(*) from app.items").await, 0);
    // The sequence starts afresh; the column's defaults and types are there.
    let id: i64 = copy
        .query_one(
            "insert into app.items (name) values ('first') returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 1);
    copy.batch_execute("insert into orders (id, email) values (1, 'A@b.c')")
        .await
        .unwrap();
    assert_eq!(
        count(
            &copy,
            "select count(*) from orders where email = 'a@B.C' and h is not null"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn create_again_and_reset_start_over_from_the_parent() {
    let parent = Tenant::parent();
    let preview = Tenant::preview();
    create_parent(&parent).await;
    fill(&parent).await;
    // A retried create copies once, not twice.
    for _ in 0..2 {
        clone(&parent, &preview, "clone").await;
    }
    let copy = as_tenant(&preview).await;
    assert_eq!(count(&copy, "select count(*) from orders").await, 100);
    copy.batch_execute(
        "delete from orders where id > 10; create table scratch (v int);
         insert into app.items (name) values ('mine')",
    )
    .await
    .unwrap();
    as_tenant(&parent)
        .await
        .batch_execute("insert into orders (id) select generate_series(101, 150)")
        .await
        .unwrap();

    for _ in 0..2 {
        let started = Instant::now();
        Job::preview(job_type::PREVIEW_RESET, &parent, &preview, "clone")
            .run()
            .await
            .assert_code(0);
        eprintln!("reset of a small database: {:?}", started.elapsed());
    }
    // The session open before the reset was ended with the old database.
    assert!(copy.simple_query("select 1").await.is_err());
    let copy = as_tenant(&preview).await;
    assert_eq!(count(&copy, "select count(*) from orders").await, 150);
    assert_eq!(count(&copy, "select count(*) from app.items").await, 7);
    assert_eq!(
        count(
            &copy,
            "select count(*) from pg_tables where tablename = 'scratch'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn delete_removes_the_preview_and_nothing_else() {
    let parent = Tenant::parent();
    let preview = Tenant::preview();
    create_parent(&parent).await;
    fill(&parent).await;
    clone(&parent, &preview, "clone").await;
    let open = as_tenant(&preview).await;
    let owner = format!("{}_owner", preview.name);
    assert!(role_exists(&owner).await);
    for _ in 0..2 {
        Job::preview(job_type::PREVIEW_DELETE, &parent, &preview, "clone")
            .run()
            .await
            .assert_code(0);
        assert!(!database_exists(&preview.name).await);
        assert!(!role_exists(&preview.name).await);
        assert!(!role_exists(&owner).await);
    }
    assert!(open.simple_query("select 1").await.is_err());
    // The parent is untouched.
    let parent_now = as_tenant(&parent).await;
    assert_eq!(count(&parent_now, "select count(*) from orders").await, 100);
    // A preview whose create never ran is deleted too: there was nothing.
    let never_made = Tenant::preview();
    Job::preview(job_type::PREVIEW_DELETE, &parent, &never_made, "clone")
        .run()
        .await
        .assert_code(0);
}

/// Another tenant grants the preview's roles privileges on its own objects (any login
/// may: the names are in pg_roles), which would keep DROP ROLE from succeeding: the
/// delete revokes them where they are and drops the roles all the same.
#[tokio::test]
async fn grants_from_another_tenant_do_not_pin_the_previews_roles() {
    let parent = Tenant::parent();
    let preview = Tenant::preview();
    create_parent(&parent).await;
    fill(&parent).await;
    clone(&parent, &preview, "clone").await;
    let owner = format!("{}_owner", preview.name);
    as_tenant(&parent)
        .await
        .batch_execute(&format!(
            "grant select on orders to \"{login}\";
             grant select on orders to \"{owner}\";
             alter default privileges grant select on tables to \"{login}\";",
            login = preview.name
        ))
        .await
        .unwrap();
    Job::preview(job_type::PREVIEW_DELETE, &parent, &preview, "clone")
        .run()
        .await
        .assert_code(0);
    assert!(!database_exists(&preview.name).await);
    assert!(!role_exists(&preview.name).await);
    assert!(!role_exists(&owner).await);
    // The other tenant keeps its table.
    assert_eq!(
        count(&as_tenant(&parent).await, "select count(*) from orders").await,
        100
    );
}

/// The parent's tenant owns functions that a CHECK constraint and an index call while
/// rows are restored: they run with the preview login's rights alone, so they gain
/// nothing (as the admin they would create a superuser).
#[tokio::test]
async fn a_hostile_parent_gains_nothing() {
    let parent = Tenant::parent();
    let preview = Tenant::preview();
    create_parent(&parent).await;
    let intruder = format!("intruder_{}", Uuid::new_v4().simple());
    as_tenant(&parent)
        .await
        .batch_execute(&format!(
            "create function public.sneaky(v int) returns boolean language plpgsql as $$
             begin
               begin reset role; exception when others then null; end;
               begin execute 'create role {intruder}_check superuser login password ''x''';
               exception when others then null; end;
               return v > 0;
             end $$;
             create function public.sneaky_key(v int) returns int language plpgsql
             immutable as $$
             begin
               begin execute 'create role {intruder}_index superuser';
               exception when others then null; end;
               return v;
             end $$;
             create table guarded (v int check (public.sneaky(v)));
             insert into guarded values (1), (2), (3);
             create index on guarded (public.sneaky_key(v));"
        ))
        .await
        .unwrap();
    clone(&parent, &preview, "clone").await;
    for role in [format!("{intruder}_check"), format!("{intruder}_index")] {
        assert!(
            !role_exists(&role).await,
            "the parent's function created role {role}"
        );
    }
    let copy = as_tenant(&preview).await;
    assert_eq!(count(&copy, "select count(*) from guarded").await, 3);
}

/// An untrusted extension the operator allows lives in the admin's locked schema; the
/// preview gets it there too, and the copy (run as the tenant) does not trip on it.
#[tokio::test]
async fn an_operator_allowed_extension_is_cloned() {
    let parent = Tenant::parent();
    let preview = Tenant::preview();
    let allowed = ["pgstattuple"];
    create_parent(&parent).await;
    let mut enable = Job::project(job_type::PROJECT_EXTENSION_ENABLE, &parent);
    enable.args = json!({"name": "pgstattuple"});
    enable.allowed_extensions = &allowed;
    enable.run().await.assert_code(0);
    fill(&parent).await;
    let mut job = Job::preview(job_type::PREVIEW_CREATE, &parent, &preview, "clone");
    job.allowed_extensions = &allowed;
    job.run().await.assert_code(0);
    let copy = as_tenant(&preview).await;
    assert_eq!(count(&copy, "select count(*) from orders").await, 100);
    let schema: String = copy
        .query_one(
            "select extnamespace::regnamespace::text from pg_extension
             where extname = 'pgstattuple'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, "extensions");
}

/// A preview step only ever drops what a preview's own names name: input naming the
/// parent's database is refused before anything is touched.
#[tokio::test]
async fn a_preview_named_like_its_parent_is_refused() {
    let parent = Tenant::parent();
    create_parent(&parent).await;
    fill(&parent).await;
    let impostor = Tenant {
        id: Uuid::new_v4(),
        name: parent.name.clone(),
        password: format!("pv-{}", Uuid::new_v4().simple()),
        max_connections: 3,
    };
    for job_type in [
        job_type::PREVIEW_CREATE,
        job_type::PREVIEW_RESET,
        job_type::PREVIEW_DELETE,
    ] {
        let output = Job::preview(job_type, &parent, &impostor, "clone")
            .run()
            .await;
        output.assert_code(EXIT_PERMANENT);
        assert!(
            output.last_error().contains("must be named capy_pv_"),
            "{job_type}: {}",
            output.stderr
        );
    }
    let parent_now = as_tenant(&parent).await;
    assert_eq!(count(&parent_now, "select count(*) from orders").await, 100);

    // A create without a mode is refused too.
    let preview = Tenant::preview();
    let mut job = Job::preview(job_type::PREVIEW_CREATE, &parent, &preview, "clone");
    job.args = json!({});
    let output = job.run().await;
    output.assert_code(EXIT_PERMANENT);
    assert!(
        output.last_error().contains("args.mode"),
        "{}",
        output.stderr
    );
}

/// What the preview's login cannot restore (a CHECK that holds only for the parent's
/// login) fails the create for good, with pg_restore's words; a retry would fail alike.
#[tokio::test]
async fn a_copy_the_preview_login_cannot_restore_fails_for_good() {
    let parent = Tenant::parent();
    let preview = Tenant::preview();
    create_parent(&parent).await;
    as_tenant(&parent)
        .await
        .batch_execute(&format!(
            "create function mine() returns boolean language sql
               as $$ select current_user::text = '{}' $$;
             create table t (v int check (mine()));
             insert into t select generate_series(1, 100000);",
            parent.name
        ))
        .await
        .unwrap();
    let output = Job::preview(job_type::PREVIEW_CREATE, &parent, &preview, "clone")
        .run()
        .await;
    output.assert_code(EXIT_PERMANENT);
    assert!(
        output.stderr.contains("violates check constraint"),
        "{}",
        output.stderr
    );
    assert!(
        output.last_error().contains("pg_restore failed"),
        "{}",
        output.stderr
    );
    // Nothing of it was committed: the restore is one transaction.
    assert_eq!(
        count(
            &as_tenant(&preview).await,
            "select count(*) from pg_tables where tablename = 't'"
        )
        .await,
        0
    );
}
