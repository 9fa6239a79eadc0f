//! The test process's PgBouncer in front of its cluster, as capy's pooled endpoint runs
//! in production: transaction pooling, SCRAM, and tenants looked up with `auth_query`
//! through `capy_pooler.lookup` (which project jobs install in each project database)
//! as the lookup role [`POOLER_AUTH_USER`], the only role in its auth_file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, OnceLock};

use anyhow::{bail, Context as _};

use crate::cluster::{postgres_bin_dir, ClusterOwner, TestCluster};

/// The lookup role the test pooler logs in as; register the cluster with it.
pub const POOLER_AUTH_USER: &str = "capy_pooler";

/// What PgBouncer runs to look a client's role up (the function capy installs).
pub const AUTH_QUERY: &str = "SELECT usename, passwd FROM capy_pooler.lookup($1)";

/// A PgBouncer on the loopback interface, stopped when the test process exits.
pub struct TestPooler {
    host: String,
    pub port: u16,
    dir: PathBuf,
}

static POOLER: OnceLock<Result<TestPooler, String>> = OnceLock::new();
static TLS_ONLY_POOLER: OnceLock<Result<TestPooler, String>> = OnceLock::new();

/// The test process's pooler in front of [`crate::cluster`], started on first use
/// (creating the lookup role on the cluster). It offers clients TLS with the cluster's
/// certificate and takes plaintext; it reaches the cluster over verified TLS.
pub fn pooler() -> anyhow::Result<&'static TestPooler> {
    started(&POOLER, crate::cluster, "allow")
}

/// A pooler in front of [`crate::tls_only_cluster`] that refuses clients without TLS.
pub fn tls_only_pooler() -> anyhow::Result<&'static TestPooler> {
    started(&TLS_ONLY_POOLER, crate::tls_only_cluster, "require")
}

fn started(
    cell: &'static OnceLock<Result<TestPooler, String>>,
    cluster: fn() -> anyhow::Result<&'static TestCluster>,
    client_sslmode: &'static str,
) -> anyhow::Result<&'static TestPooler> {
    cell.get_or_init(|| {
        cluster()
            .and_then(|c| TestPooler::start(c, client_sslmode))
            .map_err(|e| format!("{e:#}"))
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("the test PgBouncer is not available: {e}"))
}

/// TLS settings of a pooler: what it shows clients, and how it checks the server.
pub struct PoolerTls {
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// `disable`, `allow`, `prefer`, `require`, `verify-ca` or `verify-full`.
    pub client_sslmode: String,
    /// The CA the server's certificate is checked against.
    pub server_ca: Option<PathBuf>,
    pub server_sslmode: String,
}

/// What a pgbouncer.ini says.
pub struct PoolerConfig<'a> {
    pub listen_port: u16,
    pub server_host: &'a str,
    pub server_port: u16,
    pub auth_file: &'a Path,
    pub dir: &'a Path,
    /// `None`: plaintext on both sides.
    pub tls: Option<&'a PoolerTls>,
}

/// The one pgbouncer.ini capy's tests (and bench) run: every database of the cluster,
/// transaction pooling, SCRAM with `auth_query` through the lookup role, room for many
/// clients on few server connections. A client waits at most 10 s for a server
/// connection (`query_wait_timeout`): that is also how long the sessions of a deleted
/// project's database linger before PgBouncer closes them.
pub fn pgbouncer_ini(config: &PoolerConfig<'_>) -> String {
    let mut ini = format!(
        "[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
pool_mode = transaction
auth_type = scram-sha-256
auth_file = {auth_file}
auth_user = {POOLER_AUTH_USER}
auth_query = {AUTH_QUERY}
max_client_conn = 1000
default_pool_size = 5
query_wait_timeout = 10
ignore_startup_parameters = extra_float_digits,options
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
",
        server_host = config.server_host,
        server_port = config.server_port,
        listen_port = config.listen_port,
        auth_file = config.auth_file.display(),
        dir = config.dir.display(),
    );
    if let Some(tls) = config.tls {
        ini.push_str(&format!(
            "client_tls_sslmode = {}\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\n\
             server_tls_sslmode = {}\n",
            tls.client_sslmode,
            tls.client_cert.display(),
            tls.client_key.display(),
            tls.server_sslmode,
        ));
        if let Some(ca) = &tls.server_ca {
            ini.push_str(&format!("server_tls_ca_file = {}\n", ca.display()));
        }
    }
    ini
}

impl TestPooler {
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Where its log is, for a failing test to print.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    fn start(cluster: &TestCluster, client_sslmode: &str) -> anyhow::Result<Self> {
        let owner = ClusterOwner::current()?;
        // Inside the process's own folder, removed with it once the process is gone.
        let dir = std::env::temp_dir()
            .join(format!("capy-testkit-{}", nix::unistd::Uid::current()))
            .join(std::process::id().to_string())
            .join(format!("pooler-{}", cluster.port));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("creating the test pooler's folder")?;
        owner.chown(&dir)?;
        let password = format!("pw{}", uuid::Uuid::new_v4().simple());
        create_lookup_role(&cluster.admin_url_for("postgres"), &password)?;
        let auth_file = dir.join("userlist.txt");
        std::fs::write(
            &auth_file,
            format!("\"{POOLER_AUTH_USER}\" \"{password}\"\n"),
        )?;
        restrict(&auth_file)?;
        owner.chown(&auth_file)?;
        let port = crate::free_port()?;
        let ini = dir.join("pgbouncer.ini");
        let tls = cluster.certificates().map(|c| PoolerTls {
            client_cert: c.server_cert_path.clone(),
            client_key: c.server_key_path.clone(),
            client_sslmode: client_sslmode.into(),
            server_ca: Some(c.ca_path.clone()),
            server_sslmode: "verify-full".into(),
        });
        std::fs::write(
            &ini,
            pgbouncer_ini(&PoolerConfig {
                listen_port: port,
                server_host: cluster.host(),
                server_port: cluster.port,
                auth_file: &auth_file,
                dir: &dir,
                tls: tls.as_ref(),
            }),
        )?;
        owner.chown(&ini)?;
        let mut command = owner.command(Path::new(&pgbouncer_path()));
        command.arg(&ini);
        supervise(command, "pgbouncer")?;
        crate::cluster::wait_until_accepting("127.0.0.1", port)?;
        Ok(Self {
            host: "127.0.0.1".into(),
            port,
            dir,
        })
    }
}

/// `CAPY_PGBOUNCER`, else Debian's /usr/sbin/pgbouncer, else `pgbouncer` on PATH.
fn pgbouncer_path() -> String {
    std::env::var("CAPY_PGBOUNCER").unwrap_or_else(|_| {
        if Path::new("/usr/sbin/pgbouncer").exists() {
            "/usr/sbin/pgbouncer".into()
        } else {
            "pgbouncer".into()
        }
    })
}

fn restrict(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Creates (or gives a new password to) the lookup role: LOGIN and nothing more.
fn create_lookup_role(admin_url: &str, password: &str) -> anyhow::Result<()> {
    let url = url::Url::parse(admin_url)?;
    let psql = postgres_bin_dir()
        .map(|dir| dir.join("psql"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"));
    let sql = format!(
        "SELECT format('CREATE ROLE {POOLER_AUTH_USER}')
         WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{POOLER_AUTH_USER}') \\gexec
         ALTER ROLE {POOLER_AUTH_USER} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
             PASSWORD '{password}';"
    );
    let output = Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(url.host_str().unwrap_or("127.0.0.1"))
        .arg("-p")
        .arg(url.port().unwrap_or(5432).to_string())
        .arg("-U")
        .arg(url.username())
        .arg("-d")
        .arg("postgres")
        .env("PGPASSWORD", url.password().unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(sql.as_bytes())?;
            }
            child.wait_with_output()
        })
        .context("running psql to create the lookup role")?;
    if !output.status.success() {
        bail!(
            "creating the lookup role failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs a server (`what`: the pooler, the S3 server) from a thread that waits on it for
/// the process's life: the parent-death signal goes when that thread ends, i.e. when
/// the test process exits.
#[allow(unsafe_code)]
pub(crate) fn supervise(mut command: Command, what: &str) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
    // the parent; it runs in the child between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("capy-test-{what}"))
        .spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(()));
                let _ = child.wait();
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .with_context(|| format!("starting the {what} supervisor thread"))?;
    rx.recv()
        .with_context(|| format!("the {what} supervisor is gone"))?
        .with_context(|| format!("starting the {what} server"))
}
