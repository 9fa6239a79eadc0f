//! The private PostgreSQL cluster of a test process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::supervisor::{die_with_parent, Supervisor};
use crate::tls::TestCertificates;
use nix::sys::signal::Signal;

/// A PostgreSQL server the tests may use as superuser, and restart.
pub struct TestCluster {
    host: String,
    pub port: u16,
    user: String,
    password: String,
    supervisor: Option<Supervisor>,
    certificates: Option<TestCertificates>,
    log_path: Option<PathBuf>,
}

/// How a test cluster takes TCP connections. Both have `ssl=on` with a private CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// TLS or plaintext, as the client asks.
    TlsOrPlain,
    /// TLS only (`hostnossl … reject`), and every connection logged with its TLS state.
    TlsOnly,
}

static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
static TLS_ONLY_CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// The test process's cluster, started on first use. It offers TLS (so `prefer`
/// encrypts) and takes plaintext.
pub fn cluster() -> anyhow::Result<&'static TestCluster> {
    started(&CLUSTER, Transport::TlsOrPlain)
}

/// A second cluster of the test process that refuses every TCP connection without TLS
/// and logs each connection (`log_connections`) with its TLS state.
pub fn tls_only_cluster() -> anyhow::Result<&'static TestCluster> {
    started(&TLS_ONLY_CLUSTER, Transport::TlsOnly)
}

fn started(
    cell: &'static OnceLock<Result<TestCluster, String>>,
    transport: Transport,
) -> anyhow::Result<&'static TestCluster> {
    cell.get_or_init(|| TestCluster::start(transport).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the test PostgreSQL cluster is not available: {e}"))
}

impl TestCluster {
    /// Superuser URL of database `database`.
    pub fn admin_url_for(&self, database: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            self.user, self.password, self.host, self.port, database
        )
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The private CA and server certificate the cluster serves; None for a cluster
    /// given by `CAPY_TEST_DATABASE_URL`.
    pub fn certificates(&self) -> Option<&TestCertificates> {
        self.certificates.as_ref()
    }

    /// The server's log file.
    pub fn log_path(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    /// Stops the server (fast shutdown); `start_again` brings it back on the same port.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.supervisor()?.stop()
    }

    pub fn start_again(&self) -> anyhow::Result<()> {
        self.supervisor()?.start()?;
        wait_until_accepting(&self.host, self.port)
    }

    fn supervisor(&self) -> anyhow::Result<&Supervisor> {
        self.supervisor
            .as_ref()
            .context("the cluster given by CAPY_TEST_DATABASE_URL cannot be restarted by tests")
    }

    fn start(transport: Transport) -> anyhow::Result<Self> {
        if let Ok(url) = std::env::var("CAPY_TEST_DATABASE_URL") {
            return Self::from_url(&url);
        }
        let bin_dir = postgres_bin_dir()?;
        let owner = ClusterOwner::current()?;
        let root =
            std::env::temp_dir().join(format!("capy-testkit-{}", nix::unistd::Uid::current()));
        remove_stale_clusters(&root);
        let dir = root.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("creating the test cluster's folder")?;
        owner.chown(&dir)?;
        let password = format!("pw{}", uuid::Uuid::new_v4().simple());
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, &password)?;
        owner.chown(&pwfile)?;
        let data = dir.join("data");

        let output = owner
            .command(&bin_dir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-E", "UTF8", "--no-locale", "-N"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        restrict_replication(&data.join("pg_hba.conf"), "postgres")?;
        if transport == Transport::TlsOnly {
            refuse_plaintext(&data.join("pg_hba.conf"))?;
        }
        let certificates = TestCertificates::create(&dir)?;
        for path in [
            &certificates.server_cert_path,
            &certificates.server_key_path,
        ] {
            owner.chown(path)?;
        }
        let port = crate::free_port()?;
        let mut settings = vec![
            "ssl=on".to_string(),
            format!("ssl_cert_file={}", certificates.server_cert_path.display()),
            format!("ssl_key_file={}", certificates.server_key_path.display()),
        ];
        if transport == Transport::TlsOnly {
            settings.push("log_connections=on".into());
        }
        let server = ServerCommand {
            postgres: bin_dir.join("postgres"),
            data,
            socket_dir: dir.clone(),
            port,
            owner,
            settings,
        };
        // SIGINT: a fast shutdown.
        let supervisor = Supervisor::new("postgres", Signal::SIGINT, move || server.spawn())?;
        let cluster = Self {
            host: "127.0.0.1".into(),
            port,
            user: "postgres".into(),
            password,
            supervisor: Some(supervisor),
            certificates: Some(certificates),
            log_path: Some(dir.join("postgres.log")),
        };
        cluster.supervisor()?.start()?;
        wait_until_accepting(&cluster.host, port)?;
        Ok(cluster)
    }

    fn from_url(url: &str) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).context("CAPY_TEST_DATABASE_URL is not a URL")?;
        Ok(Self {
            host: parsed.host_str().unwrap_or("127.0.0.1").to_string(),
            port: parsed.port().unwrap_or(5432),
            user: parsed.username().to_string(),
            password: parsed.password().unwrap_or_default().to_string(),
            supervisor: None,
            certificates: None,
            log_path: None,
        })
    }
}

struct ServerCommand {
    postgres: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    owner: ClusterOwner,
    /// More `-c name=value` settings.
    settings: Vec<String>,
}

impl ServerCommand {
    fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.socket_dir.join("postgres.log"))?;
        let mut command = self.owner.command(&self.postgres);
        command
            .arg("-D")
            .arg(&self.data)
            .arg("-k")
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            // Durability is not under test; speed is welcome.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=400"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command, Signal::SIGQUIT);
        command.spawn().context("starting postgres")
    }
}

/// Keeps physical replication (which streams the whole cluster's WAL) to `admin`:
/// initdb's `replication all` rules become `replication <admin>`. Logical replication
/// connections match the ordinary database rules, so they keep working.
fn restrict_replication(hba: &Path, admin: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(hba).context("reading pg_hba.conf")?;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"replication") && fields.get(2) == Some(&"all") {
            let mut rule = fields.clone();
            rule[2] = admin;
            out.push_str(&rule.join(" "));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    std::fs::write(hba, out).context("writing pg_hba.conf")
}

/// Puts `hostnossl all all all reject` before every rule: a TCP connection without
/// TLS is refused whatever else matches.
fn refuse_plaintext(hba: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(hba).context("reading pg_hba.conf")?;
    std::fs::write(hba, format!("hostnossl all all all reject\n{text}"))
        .context("writing pg_hba.conf")
}

pub(crate) fn wait_until_accepting(host: &str, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect((host, port)).is_ok() {
            // The port opens a moment before the server accepts logins.
            std::thread::sleep(Duration::from_millis(200));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the test cluster did not accept connections on {host}:{port} within 30 s")
}

/// The folder holding initdb and postgres: `CAPY_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout), else `PATH`.
pub fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("CAPY_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").exists())
        .context(
            "PostgreSQL's server binaries (initdb, postgres) were not found: install them \
             (Debian: apt-get install postgresql) or set CAPY_PG_BINDIR",
        )
}

/// PostgreSQL refuses to run as root; as root, the cluster belongs to `postgres`.
#[derive(Clone, Copy)]
pub(crate) struct ClusterOwner {
    ids: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
}

impl ClusterOwner {
    pub(crate) fn current() -> anyhow::Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(Self { ids: None });
        }
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .context("running as root needs a 'postgres' user to own the test cluster")?;
        Ok(Self {
            ids: Some((user.uid, user.gid)),
        })
    }

    pub(crate) fn command(&self, program: &Path) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(program);
        if let Some((uid, gid)) = self.ids {
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
        command
    }

    pub(crate) fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.ids {
            nix::unistd::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }
}

/// Removes clusters left by test processes that have exited.
pub(crate) fn remove_stale_clusters(root: &Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let alive = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
