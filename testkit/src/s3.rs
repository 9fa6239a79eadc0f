//! The test process's S3-compatible object store: moto's server (PyPI `moto[server]`,
//! pinned) from a cached virtualenv, on a free loopback port, as the current user,
//! stopped when the test process exits. One bucket, created at start; tests keep apart
//! by prefix (every backup key names its project and backup anyway).
//!
//! The virtualenv lives in `${CAPY_MOTO_VENV:-${XDG_CACHE_HOME:-~/.cache}/capy/moto-venv}`
//! and is made on first use with `python3 -m venv` (`CAPY_PYTHON` names another
//! interpreter) and pip; a marker written after a complete install says it is usable,
//! so an interrupted install is redone, and a lock keeps two test processes from
//! installing at once.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context as _};
use capy_shared::store::{BackupStore, StoreConfig};
use futures::TryStreamExt as _;

/// The moto release the tests run (a new one may change what passes).
pub const MOTO_VERSION: &str = "5.2.5";

/// moto takes any credentials; these only need to be non-empty and are what a test
/// checks never appears in job output.
const ACCESS_KEY_ID: &str = "capytestaccesskey";
const SECRET_ACCESS_KEY: &str = "capy-test-secret-access-key-not-for-output";

/// A running S3-compatible server and its bucket.
pub struct TestS3 {
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

static S3: OnceLock<Result<TestS3, String>> = OnceLock::new();

/// The test process's S3 server, started on first use (installing moto into its
/// virtualenv when missing, which takes about half a minute once).
pub fn s3() -> anyhow::Result<&'static TestS3> {
    S3.get_or_init(|| TestS3::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the test S3 server is not available: {e}"))
}

impl TestS3 {
    /// The backup store settings for `s3://<bucket>/<prefix>` on this server.
    pub fn store_config(&self, prefix: &str) -> StoreConfig {
        StoreConfig {
            url: Some(format!("s3://{}/{}", self.bucket, prefix.trim_matches('/'))),
            s3_endpoint: Some(self.endpoint.clone()),
            s3_region: "us-east-1".into(),
            s3_access_key_id: Some(self.access_key_id.clone()),
            s3_secret_access_key: Some(self.secret_access_key.clone()),
            s3_session_token: None,
        }
    }

    /// The same settings as the environment capy's processes read.
    pub fn env(&self, prefix: &str) -> Vec<(&'static str, String)> {
        let config = self.store_config(prefix);
        vec![
            ("CAPY_BACKUP_STORE", config.url.unwrap_or_default()),
            ("CAPY_BACKUP_S3_ENDPOINT", self.endpoint.clone()),
            ("CAPY_BACKUP_S3_REGION", config.s3_region),
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
        ]
    }

    /// The store at `prefix`, opened as capy opens it.
    pub fn store(&self, prefix: &str) -> anyhow::Result<BackupStore> {
        Ok(BackupStore::open(&self.store_config(prefix))?)
    }

    /// The keys of the objects under `prefix` (whole keys, bucket-relative), sorted.
    pub async fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let store = self.store("")?;
        let under = object_store::path::Path::from(prefix.trim_matches('/'));
        let mut keys: Vec<String> = store
            .object_store()
            .list(Some(&under))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await?;
        keys.sort();
        Ok(keys)
    }

    /// The bytes of object `key` (bucket-relative), or `None` when there is none.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let store = self.store("")?;
        match store
            .object_store()
            .get(&object_store::path::Path::from(key))
            .await
        {
            Ok(result) => Ok(Some(result.bytes().await?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The keys of the multipart uploads begun and neither completed nor aborted
    /// (ListMultipartUploads; moto takes it unsigned).
    pub fn pending_uploads(&self) -> anyhow::Result<Vec<String>> {
        let (status, body) =
            http_request(&self.endpoint, "GET", &format!("/{}?uploads", self.bucket))?;
        anyhow::ensure!(
            status == 200,
            "ListMultipartUploads answered {status}: {body}"
        );
        Ok(body
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next())
            .map(str::to_string)
            .collect())
    }

    fn start() -> anyhow::Result<Self> {
        let python = moto_venv()?.join("bin").join("python");
        let port = crate::free_port()?;
        let mut command = Command::new(python);
        command
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string());
        crate::pooler::supervise(command, "s3")?;
        crate::cluster::wait_until_accepting("127.0.0.1", port)?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let bucket = "capy-test".to_string();
        let (status, body) = http_request(&endpoint, "PUT", &format!("/{bucket}"))?;
        anyhow::ensure!(
            status == 200,
            "creating the bucket answered {status}: {body}"
        );
        Ok(Self {
            endpoint,
            bucket,
            access_key_id: ACCESS_KEY_ID.into(),
            secret_access_key: SECRET_ACCESS_KEY.into(),
        })
    }
}

/// The virtualenv holding moto, installed when its marker is missing.
fn moto_venv() -> anyhow::Result<PathBuf> {
    let venv = std::env::var_os("CAPY_MOTO_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|cache| cache.join("capy").join("moto-venv"))
        })
        .context("neither CAPY_MOTO_VENV, XDG_CACHE_HOME nor HOME is set")?;
    let marker = venv.join(format!(".capy-moto-{MOTO_VERSION}"));
    if marker.exists() {
        return Ok(venv);
    }
    let parent = venv
        .parent()
        .context("the virtualenv has no parent folder")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let lock = std::fs::File::create(parent.join("moto-venv.lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("locking the moto virtualenv")?;
    if !marker.exists() {
        install_moto(&venv, &marker)?;
    }
    Ok(venv)
}

fn install_moto(venv: &Path, marker: &Path) -> anyhow::Result<()> {
    let python = std::env::var("CAPY_PYTHON").unwrap_or_else(|_| "python3".into());
    let _ = std::fs::remove_dir_all(venv);
    let output = Command::new(&python)
        .args(["-m", "venv"])
        .arg(venv)
        .output()
        .with_context(|| {
            format!("running {python}: python3 is missing (apt-get install python3 python3-venv)")
        })?;
    if !output.status.success() {
        bail!(
            "`{python} -m venv` failed: python3's venv module is missing \
             (apt-get install python3-venv): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let output = Command::new(venv.join("bin").join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("moto[server]=={MOTO_VERSION}"))
        .output()
        .context("running pip")?;
    if !output.status.success() {
        bail!(
            "pip install moto[server]=={MOTO_VERSION} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::write(marker, MOTO_VERSION).context("writing the moto virtualenv's marker")
}

/// One plain HTTP/1.1 request without a body to the loopback server; answers the status
/// and the body. Synchronous, so it runs inside or outside a runtime alike.
fn http_request(endpoint: &str, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let authority = endpoint.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(authority)
        .with_context(|| format!("connecting to {endpoint}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status line")?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
