//! Running capy's own binaries as real processes in tests.

use std::path::PathBuf;
use std::process::Child;

use anyhow::Context as _;

/// A free TCP port on the loopback interface.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The path of a workspace binary (`capy-api`, `capy-worker`, `capy-step`) in the
/// target folder of the running test or binary; `cargo test --workspace` builds them.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a binary from target/<profile>/.
    let mut profile_dir = exe.parent().context("locating the target folder")?;
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().context("locating the target folder")?;
    }
    let path = profile_dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    Ok(path)
}

/// A child process killed when the guard is dropped (so a failing test leaves none).
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The API and its workers as real processes on one control database.
pub struct ProcessStack {
    pub api_url: String,
    pub api: ChildGuard,
    pub workers: Vec<ChildGuard>,
}

impl ProcessStack {
    /// Starts `capy-api serve` on a free port and `workers` workers named
    /// `worker-1`…, each with `env` added (the API too: each process reads only the
    /// variables it knows); waits until the API is ready.
    pub async fn start(
        database_url: &str,
        workers: usize,
        worker_env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let base = |program: &str| -> anyhow::Result<std::process::Command> {
            let mut command = std::process::Command::new(bin_path(program)?);
            command
                .env(
                    "RUST_LOG",
                    std::env::var("CAPY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .env("CAPY_DATABASE_URL", database_url)
                .env("CAPY_SECRET_KEY", crate::TEST_SECRET_KEY)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            Ok(command)
        };
        let mut api = base("capy-api")?;
        api.arg("serve")
            .envs(worker_env.iter().map(|(k, v)| (*k, v)));
        let api = ChildGuard(
            api.env("CAPY_LISTEN", format!("127.0.0.1:{port}"))
                .spawn()
                .context("starting capy-api")?,
        );
        let workers = (1..=workers)
            .map(|n| {
                let mut command = base("capy-worker")?;
                command.env("CAPY_WORKER_ID", format!("worker-{n}"));
                for (key, value) in worker_env {
                    command.env(key, value);
                }
                Ok(ChildGuard(command.spawn().context("starting capy-worker")?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let api_url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "capy-api did not come up on {api_url}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(Self {
            api_url,
            api,
            workers,
        })
    }
}
