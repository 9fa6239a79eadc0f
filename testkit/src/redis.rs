//! The private Redis server of a test process: `redis-server` on a free port of
//! 127.0.0.1, in a temporary folder, without persistence, run as an unprivileged user
//! (as root, the `postgres` user, like the test cluster) and ended with the process.
//! Its admin is the ACL user `admin` (all commands, keys and channels); the `default`
//! user is off, so every session must name its user.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;

use anyhow::Context as _;

use crate::cluster::{wait_until_accepting, ClusterOwner};

/// The admin's ACL user name.
const ADMIN_USER: &str = "admin";

/// A Redis server the tests may use as admin, and restart.
pub struct TestRedis {
    host: String,
    port: u16,
    password: String,
    supervisor: mpsc::Sender<Control>,
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
        self.control(Control::Stop)
    }

    pub fn start_again(&self) -> anyhow::Result<()> {
        self.control(Control::Start)?;
        wait_until_accepting(&self.host, self.port)
    }

    fn control(&self, command: Control) -> anyhow::Result<()> {
        let (reply_tx, reply_rx) = mpsc::channel();
        let gone = || anyhow::anyhow!("the Redis supervisor is gone");
        self.supervisor.send(command).map_err(|_| gone())?;
        self.supervisor
            .send(Control::Reply(reply_tx))
            .map_err(|_| gone())?;
        reply_rx
            .recv()
            .map_err(|_| gone())?
            .map_err(anyhow::Error::msg)
    }

    fn start() -> anyhow::Result<Self> {
        let server = redis_server_path()?;
        let owner = ClusterOwner::current()?;
        let root = std::env::temp_dir().join(format!(
            "capy-testkit-redis-{}",
            nix::unistd::Uid::current()
        ));
        remove_stale_servers(&root);
        let dir = root.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("creating the test Redis server's folder")?;
        owner.chown(&dir)?;
        let password = format!("pw{}", uuid::Uuid::new_v4().simple());
        let port = crate::free_port()?;
        let config = write_config(&dir, port, &password)?;
        owner.chown(&config)?;
        let supervisor = supervise(ServerCommand {
            server,
            config,
            dir: dir.clone(),
            owner,
        })?;
        let redis = Self {
            host: "127.0.0.1".into(),
            port,
            password,
            supervisor,
            dir,
        };
        redis.control(Control::Start)?;
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

enum Control {
    Start,
    Stop,
    Reply(mpsc::Sender<Result<(), String>>),
}

struct ServerCommand {
    server: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    owner: ClusterOwner,
}

/// Runs the server from a thread that lives as long as the process (see the test
/// cluster's `supervise`: the parent-death signal follows the spawning thread).
fn supervise(server: ServerCommand) -> anyhow::Result<mpsc::Sender<Control>> {
    let (tx, rx) = mpsc::channel::<Control>();
    std::thread::Builder::new()
        .name("capy-test-redis".into())
        .spawn(move || {
            let mut child: Option<Child> = None;
            let mut last: Result<(), String> = Ok(());
            for command in rx {
                match command {
                    Control::Start if child.is_none() => match server.spawn() {
                        Ok(c) => {
                            child = Some(c);
                            last = Ok(());
                        }
                        Err(e) => last = Err(format!("{e:#}")),
                    },
                    Control::Start => last = Ok(()),
                    Control::Stop => {
                        if let Some(mut c) = child.take() {
                            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                            let _ = c.wait();
                        }
                        last = Ok(());
                    }
                    Control::Reply(reply) => {
                        let _ = reply.send(std::mem::replace(&mut last, Ok(())));
                    }
                }
            }
        })
        .context("starting the Redis supervisor thread")?;
    Ok(tx)
}

impl ServerCommand {
    #[allow(unsafe_code)]
    fn spawn(&self) -> anyhow::Result<Child> {
        use std::os::unix::process::CommandExt as _;
        // Its log goes to `logfile`; this catches what it says before reading it.
        let early = std::fs::File::create(self.dir.join("redis-stderr.log"))?;
        let mut command = self.owner.command(&self.server);
        command
            .arg(&self.config)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(early.try_clone()?)
            .stderr(early);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory
        // of the parent; it runs in the child between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        command.spawn().context("starting redis-server")
    }
}

/// Removes the folders of servers whose test process has exited.
fn remove_stale_servers(root: &Path) {
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
