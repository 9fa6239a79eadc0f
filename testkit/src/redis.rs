//! The private Redis server of a test process: `redis-server` on a free port of
//! 127.0.0.1, in a temporary folder, without persistence, run as an unprivileged user
//! (as root, the `postgres` user, like the test cluster) and ended with the process.
//! Its admin is the ACL user `admin` (all commands, keys and channels); the `default`
//! user is off, so every session must name its user.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::OnceLock;

use anyhow::Context as _;

use crate::cluster::{remove_stale_clusters, wait_until_accepting, ClusterOwner};
use crate::supervisor::{die_with_parent, Supervisor};
use nix::sys::signal::Signal;

/// The admin's ACL user name.
const ADMIN_USER: &str = "admin";

/// A Redis server the tests may use as admin, and restart.
pub struct TestRedis {
    host: String,
    port: u16,
    password: String,
    supervisor: Supervisor,
    dir: PathBuf,
}

static REDIS: OnceLock<Result<TestRedis, String>> = OnceLock::new();

/// The test process's Redis server, started on first use.
pub fn redis() -> anyhow::Result<&'static TestRedis> {
    REDIS
        .get_or_init(|| TestRedis::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the test Redis server is not available: {e}"))
}

impl TestRedis {
    /// `redis://admin:<password>@127.0.0.1:<port>`.
    pub fn admin_url(&self) -> String {
        format!(
            "redis://{ADMIN_USER}:{}@{}:{}",
            self.password, self.host, self.port
        )
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin's password (for tests that look for it in output).
    pub fn admin_password(&self) -> &str {
        &self.password
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// Stops the server (SIGTERM, nothing saved); `start_again` brings it back on the
    /// same port, empty but for its admin: keys and ACL users made by tests are gone.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.supervisor.stop()
    }

    pub fn start_again(&self) -> anyhow::Result<()> {
        self.supervisor.start()?;
        wait_until_accepting(&self.host, self.port)
    }

    fn start() -> anyhow::Result<Self> {
        let server = redis_server_path()?;
        let owner = ClusterOwner::current()?;
        let root = std::env::temp_dir().join(format!(
            "capy-testkit-redis-{}",
            nix::unistd::Uid::current()
        ));
        remove_stale_clusters(&root);
        let dir = root.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("creating the test Redis server's folder")?;
        owner.chown(&dir)?;
        let password = format!("pw{}", uuid::Uuid::new_v4().simple());
        let port = crate::free_port()?;
        let config = write_config(&dir, port, &password)?;
        owner.chown(&config)?;
        let command = ServerCommand {
            server,
            config,
            dir: dir.clone(),
            owner,
        };
        let supervisor = Supervisor::new("redis", Signal::SIGTERM, move || command.spawn())?;
        let redis = Self {
            host: "127.0.0.1".into(),
            port,
            password,
            supervisor,
            dir,
        };
        redis.supervisor.start()?;
        wait_until_accepting(&redis.host, port)?;
        Ok(redis)
    }
}

/// Writes `redis.conf` (mode 600: it holds the admin's password, which must not show
/// in `ps` either) and returns its path.
fn write_config(dir: &Path, port: u16, password: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("redis.conf");
    let text = format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode yes\ndaemonize no\n\
         save \"\"\nappendonly no\ndir {dir}\nlogfile {log}\n\
         user default off\nuser {ADMIN_USER} on >{password} ~* &* +@all\n",
        dir = dir.display(),
        log = dir.join("redis.log").display(),
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .context("writing redis.conf")?;
    file.write_all(text.as_bytes())
        .context("writing redis.conf")?;
    Ok(path)
}

/// `CAPY_REDIS_SERVER`, else `redis-server` on `PATH` (or Debian's /usr/bin).
fn redis_server_path() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("CAPY_REDIS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.exists())
        .context(
            "redis-server was not found: the Redis tests need it (Debian: apt-get install \
             redis-server; 7.0 or newer), or set CAPY_REDIS_SERVER to its path",
        )
}

struct ServerCommand {
    server: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    owner: ClusterOwner,
}

impl ServerCommand {
    fn spawn(&self) -> anyhow::Result<Child> {
        // Its log goes to `logfile`; this catches what it says before reading it.
        let early = std::fs::File::create(self.dir.join("redis-stderr.log"))?;
        let mut command = self.owner.command(&self.server);
        command
            .arg(&self.config)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(early.try_clone()?)
            .stderr(early);
        die_with_parent(&mut command, Signal::SIGKILL);
        command.spawn().context("starting redis-server")
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn admin_logs_in_and_default_user_is_off() {
        let server = super::redis().unwrap();
        let client = ::redis::Client::open(server.admin_url()).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        let pong: String = ::redis::cmd("PING").query_async(&mut admin).await.unwrap();
        assert_eq!(pong, "PONG");
        let url = format!("redis://{}:{}", server.host(), server.port());
        let anonymous = ::redis::Client::open(url).unwrap();
        let mut anonymous = anonymous.get_multiplexed_async_connection().await.unwrap();
        let refused: Result<String, _> = ::redis::cmd("GET")
            .arg("x")
            .query_async(&mut anonymous)
            .await;
        assert!(refused.is_err(), "the default user must be off");
    }
}
