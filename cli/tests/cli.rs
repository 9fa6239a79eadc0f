#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed set-up should panic
//! The `capy` binary against a running stack: capy-api and two workers as real
//! processes on a fresh control database, provisioning on the test cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use capy_api::admin::{self, ClusterSpec, KeyGrant};
use capy_shared::crypto::SecretBox;
use capy_testkit::{
    cluster, free_port, fresh_database, ProcessStack, TestDatabase, TEST_SECRET_KEY,
};
use serde_json::Value;

/// How long one `capy` run may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The API and workers run from the target folder: build them once, so the tests never
/// run stale binaries (`cargo test -p capy-cli` alone does not build them).
fn build_stack_binaries() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/cli-…
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let profile = profile_dir.file_name().unwrap().to_str().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "capy-api",
                "-p",
                "capy-worker",
                "--bins",
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile {
            "debug" => {}
            "release" => {
                build.arg("--release");
            }
            other => {
                build.args(["--profile", other]);
            }
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building capy-api and capy-worker failed");
    });
}

struct Stack {
    _db: TestDatabase,
    url: String,
    key: String,
    admin_key: String,
    /// An empty folder to run `capy` in, so no capy.env is found by accident.
    cwd: PathBuf,
    _processes: ProcessStack,
}

impl Stack {
    /// A control database with an organization, its key, an admin key and the test
    /// cluster as `local` (region `local`); `broken_region` also registers, as the only
    /// cluster of that region, one whose admin URL points at a closed port.
    async fn start(broken_region: Option<&str>) -> Self {
        build_stack_binaries();
        let db = fresh_database().await.unwrap();
        let secrets = SecretBox::from_key_text(TEST_SECRET_KEY).unwrap();
        let organization_id = admin::create_organization(&db.pool, "acme").await.unwrap();
        let grant = |name: &str, organization_id, is_admin| KeyGrant {
            name: name.into(),
            organization_id,
            is_admin,
            ..KeyGrant::default()
        };
        let (_, key) = admin::create_api_key(&db.pool, &grant("cli", Some(organization_id), false))
            .await
            .unwrap();
        let (_, admin_key) = admin::create_api_key(&db.pool, &grant("admin", None, true))
            .await
            .unwrap();
        let test_cluster = cluster().unwrap();
        let spec = |name: &str, region: &str, admin_url: String| ClusterSpec {
            engine: capy_shared::model::Engine::Postgresql,
            name: name.into(),
            region: region.into(),
            admin_url,
            public_host: test_cluster.host().to_string(),
            direct_port: i32::from(test_cluster.port),
            pooled_port: i32::from(test_cluster.port),
            pooled_host: None,
            pooler_auth_user: None,
            ssl_mode: "disable".into(),
            max_projects: None,
            ca_pem: None,
        };
        let local = spec("local", "local", test_cluster.admin_url_for("postgres"));
        admin::upsert_cluster(&db.pool, &secrets, &local)
            .await
            .unwrap();
        if let Some(region) = broken_region {
            let dead_port = free_port().unwrap();
            let url =
                format!("postgres://postgres:not-this-one-secret@127.0.0.1:{dead_port}/postgres");
            admin::upsert_cluster(&db.pool, &secrets, &spec("broken", region, url))
                .await
                .unwrap();
        }
        let env = [("CAPY_RETRY_BASE_DELAY_MS", "50".to_string())];
        let processes = ProcessStack::start(&db.url, 2, &env).await.unwrap();
        let cwd = std::env::temp_dir().join(format!("capy-cli-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&cwd).unwrap();
        Self {
            url: processes.api_url.clone(),
            _db: db,
            key,
            admin_key,
            cwd,
            _processes: processes,
        }
    }

    /// Runs `capy ARGS` with the organization's key.
    fn capy(&self, args: &[&str]) -> Run {
        self.capy_with(&self.url, &self.key, args)
    }

    fn capy_with(&self, url: &str, key: &str, args: &[&str]) -> Run {
        run(capy_command(&self.cwd)
            .env("CAPY_API_URL", url)
            .env("CAPY_API_KEY", key)
            .args(args))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.cwd);
    }
}

/// `capy` with an environment of its own: nothing inherited can change what it does.
fn capy_command(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capy"));
    command
        .env_clear()
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "capy failed: {self:#?}");
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }

    /// The value of a `key: value` line of the human output.
    #[track_caller]
    fn field(&self, key: &str) -> String {
        self.stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no '{key}:' line: {self:#?}"))
    }
}

/// Runs a command to its end, or kills it after [`RUN_LIMIT`].
fn run(command: &mut Command) -> Run {
    let mut child = command.spawn().expect("starting capy");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "capy ran past {RUN_LIMIT:?}; stderr: {}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The job id of the plain `job <id>: <state>` lines `--wait` prints.
#[track_caller]
fn job_id_of(run: &Run) -> String {
    run.stderr
        .lines()
        .find_map(|line| line.strip_prefix("job "))
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no 'job <id>:' line: {run:#?}"))
        .to_string()
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_is_created_waited_for_shown_listed_and_connected_to() {
    let stack = Stack::start(None).await;

    let created = stack
        .capy(&[
            "projects",
            "create",
            "shop",
            "--max-connections",
            "7",
            "--wait",
        ])
        .ok();
    let job_id = job_id_of(&created);
    let lines: Vec<&str> = created.stderr.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("job {job_id}: pending").as_str()),
        "the first line is the job as queued: {created:#?}"
    );
    assert_eq!(
        lines.last().copied(),
        Some(format!("job {job_id}: completed").as_str()),
        "{created:#?}"
    );
    assert!(
        !created.stderr.contains('\u{1b}') && !created.stderr.contains('\r'),
        "no spinner when stderr is not a terminal: {created:#?}"
    );
    assert_eq!(created.field("state"), "ready");
    assert_eq!(created.field("max_connections"), "7");
    let project_id = created.field("id");

    let shown = stack
        .capy(&["projects", "show", &project_id, "--output", "json"])
        .ok()
        .json();
    assert_eq!(shown["project"]["id"], project_id.as_str());
    assert_eq!(shown["project"]["state"], "ready");
    assert_eq!(shown["project"]["latest_job_id"], job_id.as_str());

    let listed = stack
        .capy(&["projects", "list", "--output", "json"])
        .ok()
        .json();
    let ids: Vec<&str> = listed["projects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(ids, [project_id.as_str()], "{listed}");
    let table = stack.capy(&["projects", "list"]).ok();
    assert!(table.stdout.starts_with("ID "), "{table:#?}");
    assert!(table.stdout.contains(&project_id) && table.stdout.contains("ready"));

    // The connection string the client prints connects, as the project's own role.
    let connections = stack.capy(&["projects", "connections", &project_id]).ok();
    let client = connect(&connections.field("direct_url")).await;
    let row = client
        .query_one(
            "select current_user::text, current_setting('statement_timeout')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        shown["project"]["role_name"].as_str().unwrap()
    );
    assert_eq!(row.get::<_, String>(1), "1min");
    drop(client);

    // --wait with --output json: one document, the final job and the project.
    let second = stack
        .capy(&[
            "projects", "create", "shop-two", "--wait", "--output", "json",
        ])
        .ok();
    let answer = second.json();
    assert_eq!(answer["job"]["state"], "completed", "{answer}");
    assert_eq!(answer["project"]["state"], "ready", "{answer}");
    assert!(second.stderr.contains(": completed"), "{second:#?}");

    // Extensions: enabled by a job, then listed as enabled.
    stack
        .capy(&["extensions", "enable", &project_id, "pgcrypto", "--wait"])
        .ok();
    let extensions = stack
        .capy(&["extensions", "list", &project_id, "--output", "json"])
        .ok()
        .json();
    let pgcrypto = extensions["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "pgcrypto")
        .unwrap_or_else(|| panic!("pgcrypto is not listed: {extensions}"));
    assert_eq!(pgcrypto["enabled"], true, "{pgcrypto}");

    // Jobs: filtered, and every page followed.
    let jobs = stack
        .capy(&["jobs", "list", "--project", &project_id, "--output", "json"])
        .ok()
        .json();
    let types: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["type"].as_str())
        .collect();
    assert_eq!(
        types,
        ["project.extension_enable", "project.create"],
        "{jobs}"
    );
    let one_page = stack
        .capy(&["jobs", "list", "--limit", "1", "--output", "json"])
        .ok()
        .json();
    assert_eq!(one_page["jobs"].as_array().unwrap().len(), 1);
    assert!(one_page["next_cursor"].is_string(), "{one_page}");
    let all = stack
        .capy(&["jobs", "list", "--limit", "1", "--all", "--output", "json"])
        .ok()
        .json();
    assert_eq!(all["jobs"].as_array().unwrap().len(), 3, "{all}");
    assert!(all["next_cursor"].is_null());
    let completed = stack
        .capy(&[
            "jobs",
            "list",
            "--state",
            "completed",
            "--type",
            "project.create",
        ])
        .ok();
    assert_eq!(
        completed.stdout.lines().count(),
        3,
        "header and two jobs: {completed:#?}"
    );

    let me = stack.capy(&["me", "--output", "json"]).ok().json();
    assert_eq!(me["admin"], false, "{me}");
    assert!(me["scopes"].as_array().unwrap().contains(&"write".into()));

    // A successful job's logs: the attempt's header and its stdout.
    let logs = stack.capy(&["jobs", "logs", &job_id]).ok();
    assert!(
        logs.stdout.contains("=== attempt 1: worker worker-")
            && logs.stdout.contains("exit code 0, succeeded")
            && logs.stdout.contains("--- stdout"),
        "{logs:#?}"
    );

    // Deleted with --wait: the project leaves the list.
    stack
        .capy(&["projects", "delete", &project_id, "--wait"])
        .ok();
    let gone = stack.capy(&["projects", "show", &project_id]);
    assert_eq!(gone.code, Some(1), "{gone:#?}");
    assert!(
        gone.stderr.starts_with("error: ") && gone.stderr.contains("(HTTP 404)"),
        "{gone:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_exits_non_zero_and_its_logs_show_every_attempt() {
    let stack = Stack::start(Some("broken")).await;

    let created = stack
        .capy(&[
            "projects", "create", "doomed", "--region", "broken", "--wait",
        ])
        .ok_or_failure();
    assert_eq!(created.code, Some(1), "{created:#?}");
    let job_id = job_id_of(&created);
    assert!(
        created.stderr.contains(&format!("job {job_id}: failed"))
            && created.stderr.contains(&format!(
                "error: job {job_id} (project.create) failed after 5 attempt(s)"
            ))
            && created.stderr.contains("could not connect to the cluster"),
        "the job's error and its last stderr are printed: {created:#?}"
    );
    assert!(
        created
            .stderr
            .starts_with(&format!("job {job_id}: pending\n")),
        "each change is a plain line: {created:#?}"
    );
    assert!(created.stdout.is_empty(), "{created:#?}");
    assert!(!created.stderr.contains("not-this-one-secret"));

    let logs = stack.capy(&["jobs", "logs", &job_id]).ok();
    for attempt in 1..=5 {
        assert!(
            logs.stdout
                .contains(&format!("=== attempt {attempt}: worker worker-")),
            "attempt {attempt} is missing: {logs:#?}"
        );
    }
    assert_eq!(
        logs.stdout.matches("exit code 75, transient").count(),
        5,
        "{logs:#?}"
    );
    assert_eq!(logs.stdout.matches("--- stderr").count(), 5, "{logs:#?}");
    assert!(
        logs.stdout.contains("could not connect to the cluster"),
        "{logs:#?}"
    );

    let as_json = stack
        .capy(&["jobs", "logs", &job_id, "--output", "json"])
        .ok()
        .json();
    assert_eq!(as_json["attempts"].as_array().unwrap().len(), 5);
    let job = stack
        .capy(&["jobs", "show", &job_id, "--output", "json"])
        .ok()
        .json();
    assert_eq!(job["job"]["state"], "failed");
    assert_eq!(job["job"]["last_exit_code"], 75);

    // --follow on a job still running prints each attempt as it finishes, then ends.
    let queued = stack
        .capy(&[
            "projects",
            "create",
            "doomed-too",
            "--region",
            "broken",
            "--output",
            "json",
        ])
        .ok()
        .json();
    let second_job = queued["job"]["id"].as_str().unwrap();
    let followed = stack.capy(&["jobs", "logs", second_job, "--follow"]).ok();
    assert_eq!(
        followed.stdout.matches("=== attempt ").count(),
        5,
        "{followed:#?}"
    );
    assert!(
        followed
            .stderr
            .contains(&format!("job {second_job}: failed")),
        "{followed:#?}"
    );

    // Retrying the provisioning queues it again; it fails again, the same way.
    let project_id = queued["project"]["id"].as_str().unwrap();
    let retried = stack
        .capy(&[
            "projects",
            "retry-provisioning",
            project_id,
            "--wait",
            "--output",
            "json",
        ])
        .ok_or_failure();
    assert_eq!(retried.code, Some(1), "{retried:#?}");
    assert_eq!(retried.json()["job"]["state"], "failed", "{retried:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_unreachable_apis_and_missing_settings_are_reported() {
    let stack = Stack::start(None).await;

    let bad_key = stack.capy_with(
        &stack.url,
        "capy_live_not_a_real_key",
        &["projects", "list"],
    );
    assert_eq!(bad_key.code, Some(1), "{bad_key:#?}");
    assert!(
        bad_key.stderr.starts_with("error: ") && bad_key.stderr.trim_end().ends_with("(HTTP 401)"),
        "{bad_key:#?}"
    );
    assert!(bad_key.stdout.is_empty());

    // An organization's key may not manage clusters: 403, and the key is never printed.
    let forbidden = stack.capy(&["clusters", "list"]);
    assert_eq!(forbidden.code, Some(1), "{forbidden:#?}");
    assert!(forbidden.stderr.contains("(HTTP 403)"), "{forbidden:#?}");
    assert!(!forbidden.stderr.contains(&stack.key));

    let closed = format!("http://127.0.0.1:{}", free_port().unwrap());
    let unreachable = stack.capy_with(&closed, &stack.key, &["me"]);
    assert_eq!(unreachable.code, Some(1), "{unreachable:#?}");
    assert!(
        unreachable
            .stderr
            .contains(&format!("cannot reach the capy API at {closed}"))
            && unreachable
                .stderr
                .to_lowercase()
                .contains("connection refused"),
        "{unreachable:#?}"
    );

    let unconfigured = run(capy_command(&stack.cwd).arg("me"));
    assert_eq!(unconfigured.code, Some(2), "{unconfigured:#?}");
    assert!(
        unconfigured.stderr.contains("no API URL"),
        "{unconfigured:#?}"
    );

    let usage = stack.capy(&["projects", "create"]);
    assert_eq!(usage.code, Some(2), "{usage:#?}");

    // The env file the local stack writes: found in .capy/ of a parent folder; admin
    // commands take its admin key.
    let data_dir = stack.cwd.join(".capy");
    std::fs::create_dir_all(data_dir.join("nested")).unwrap();
    std::fs::write(
        data_dir.join("capy.env"),
        format!(
            "CAPY_API_URL={}\nCAPY_ADMIN_KEY={}\nCAPY_API_KEY={}\n",
            stack.url, stack.admin_key, stack.key
        ),
    )
    .unwrap();
    let from_file = run(capy_command(&data_dir.join("nested")).args(["me", "--output", "json"]));
    assert_eq!(from_file.ok().json()["admin"], false);
    let clusters = run(capy_command(&stack.cwd).args(["clusters", "list", "--output", "json"]))
        .ok()
        .json();
    assert_eq!(clusters["clusters"][0]["name"], "local", "{clusters}");
    let shown = run(capy_command(&stack.cwd).args(["clusters", "list"])).ok();
    assert!(!shown.stdout.contains(&stack.admin_key));
}

impl Run {
    /// A run that ended by itself, successfully or not (not killed by a signal).
    #[track_caller]
    fn ok_or_failure(self) -> Self {
        assert!(self.code.is_some(), "capy was killed: {self:#?}");
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_shown_as_fields_and_rotated() {
    let stack = Stack::start(None).await;
    let created = stack
        .capy(&["projects", "create", "rotated", "--wait"])
        .ok();
    let project_id = created.field("id");

    let shown = stack.capy(&["projects", "credentials", &project_id]).ok();
    let old_user = shown.field("username");
    assert_eq!(old_user, created.field("role_name"));
    assert_eq!(shown.field("database"), created.field("database_name"));
    assert!(!shown.field("password").is_empty(), "{shown:#?}");
    let client = connect(&shown.field("connection_string")).await;
    client
        .batch_execute("create table kept (n int); insert into kept values (1)")
        .await
        .unwrap();
    drop(client);

    let refused = stack.capy(&[
        "projects",
        "rotate-credentials",
        &project_id,
        "--grace-hours",
        "721",
    ]);
    assert_ne!(refused.code, Some(0), "{refused:#?}");
    assert!(refused.stderr.contains("grace_hours"), "{refused:#?}");

    let rotated = stack
        .capy(&[
            "projects",
            "rotate-credentials",
            &project_id,
            "--grace-hours",
            "2",
            "--wait",
        ])
        .ok();
    let job_id = job_id_of(&rotated);
    assert!(
        rotated.stderr.contains(&format!("job {job_id}: completed")),
        "{rotated:#?}"
    );
    let now = stack
        .capy(&["projects", "credentials", &project_id, "--output", "json"])
        .ok()
        .json();
    assert_ne!(now["username"], old_user.as_str(), "{now}");
    assert_eq!(now["previous_username"], old_user.as_str(), "{now}");
    let client = connect(now["connection_string"].as_str().unwrap()).await;
    let count: i64 = client
        .query_one("select count(*) from kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
    // The old login still works during its grace.
    connect(&shown.field("connection_string")).await;
}
