//! The private MariaDB server of a test process: `mariadb-install-db` into a temporary
//! folder, `mariadbd` on a free loopback port, run as the unprivileged cluster owner
//! (`postgres` when the tests run as root) and killed when the test process exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context as _};

use crate::cluster::{remove_stale_clusters, wait_until_accepting, ClusterOwner};
use crate::supervisor::{die_with_parent, Supervisor};
use nix::sys::signal::Signal;

/// A MariaDB server the tests may use as `root`, and restart.
pub struct TestMariaDb {
    host: String,
    port: u16,
    password: String,
    dir: PathBuf,
    supervisor: Supervisor,
}

static MARIADB: OnceLock<Result<TestMariaDb, String>> = OnceLock::new();

/// The test process's MariaDB server, started on first use.
pub fn mariadb() -> anyhow::Result<&'static TestMariaDb> {
    MARIADB
        .get_or_init(|| TestMariaDb::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the test MariaDB server is not available: {e}"))
}

impl TestMariaDb {
    /// `root`'s URL (password included), with no default database.
    pub fn admin_url(&self) -> String {
        format!(
            "mysql://root:{}@{}:{}/",
            self.password, self.host, self.port
        )
    }

    /// `root`'s password (also in [`Self::admin_url`]).
    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's error log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("mariadbd.log")
    }

    /// Stops the server (a clean shutdown); `start_again` brings it back on the same port.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.supervisor.stop()
    }

    pub fn start_again(&self) -> anyhow::Result<()> {
        self.supervisor.start()?;
        wait_until_accepting(&self.host, self.port)
    }

    fn start() -> anyhow::Result<Self> {
        let mariadbd = mariadb_program("mariadbd")?;
        let install_db = mariadb_program("mariadb-install-db")?;
        let owner = ClusterOwner::current()?;
        let root = std::env::temp_dir().join(format!(
            "capy-testkit-mariadb-{}",
            nix::unistd::Uid::current()
        ));
        remove_stale_clusters(&root);
        let dir = root.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("creating the test MariaDB's folder")?;
        owner.chown(&dir)?;
        install(&owner, &install_db, &dir)?;
        let password = format!("pw{}", uuid::Uuid::new_v4().simple());
        write_init_file(&owner, &dir, &password)?;
        let port = crate::free_port()?;
        let server = ServerCommand {
            mariadbd,
            dir: dir.clone(),
            port,
            owner,
        };
        let database = Self {
            host: "127.0.0.1".into(),
            port,
            password,
            dir,
            supervisor: Supervisor::new("mariadb", Signal::SIGTERM, move || server.spawn())?,
        };
        database.supervisor.start()?;
        wait_until_accepting(&database.host, port)
            .with_context(|| format!("see the server's log {}", database.log_path().display()))?;
        Ok(database)
    }
}

/// `program` in Debian's folders or on `PATH`; names the package when it is missing.
fn mariadb_program(program: &str) -> anyhow::Result<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    [PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]
        .into_iter()
        .chain(path_dirs)
        .map(|dir| dir.join(program))
        .find(|path| path.exists())
        .with_context(|| {
            format!(
                "{program} was not found: the MariaDB tests need MariaDB's server \
                 (Debian: apt-get install mariadb-server)"
            )
        })
}

/// Makes the data folder: system tables only, `root@localhost` without a password
/// (the init file sets it), no test database.
fn install(owner: &ClusterOwner, install_db: &Path, dir: &Path) -> anyhow::Result<()> {
    let output = owner
        .command(install_db)
        .arg("--no-defaults")
        .arg(format!("--datadir={}", dir.join("data").display()))
        .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
        .current_dir(dir)
        .output()
        .context("running mariadb-install-db")?;
    if !output.status.success() {
        bail!(
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// SQL the server runs at each start: gives `root` its password on every host it has,
/// so TCP logins need it (the socket's `root@localhost` too).
fn write_init_file(owner: &ClusterOwner, dir: &Path, password: &str) -> anyhow::Result<()> {
    let mut sql = String::new();
    for host in ["localhost", "127.0.0.1", "::1"] {
        sql.push_str(&format!(
            "ALTER USER IF EXISTS 'root'@'{host}' IDENTIFIED BY '{password}';\n"
        ));
    }
    let path = dir.join("init.sql");
    std::fs::write(&path, sql).context("writing the MariaDB init file")?;
    owner.chown(&path)
}

struct ServerCommand {
    mariadbd: PathBuf,
    dir: PathBuf,
    port: u16,
    owner: ClusterOwner,
}

impl ServerCommand {
    fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.dir.join("mariadbd.out"))?;
        let mut command = self.owner.command(&self.mariadbd);
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!(
                "--socket={}",
                self.dir.join("mariadbd.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mariadbd.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.join("mariadbd.log").display()
            ))
            .arg(format!(
                "--init-file={}",
                self.dir.join("init.sql").display()
            ))
            .arg(format!("--tmpdir={}", self.dir.display()))
            .arg(format!("--port={}", self.port))
            // Logins match on addresses only: a tenant's 'user'@'%' is what 127.0.0.1 finds.
            .args(["--bind-address=127.0.0.1", "--skip-name-resolve"])
            .args(["--max-connections=300", "--performance-schema=OFF"])
            // Durability is not under test; speed is welcome.
            .args([
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=64M",
            ])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command, Signal::SIGKILL);
        command.spawn().context("starting mariadbd")
    }
}
