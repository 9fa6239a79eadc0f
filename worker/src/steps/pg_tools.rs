//! pg_dump and pg_restore as child processes of a step: the binaries that match the
//! cluster's major version, and an environment that logs them in (as the admin or as
//! the project's own login) with the cluster's TLS settings. Nothing secret ever goes
//! into argv, which every user of the machine can read in `ps`: the password travels
//! in the child's environment, the CA in a private temporary file.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use capy_shared::step::{StepCluster, StepProject};
use tokio_postgres::config::Host;

use super::StepError;

/// A PostgreSQL client program a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    PgDump,
    PgRestore,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Self::PgDump => "pg_dump",
            Self::PgRestore => "pg_restore",
        }
    }
}

/// The server's `server_version_num` (e.g. 150004).
pub async fn server_version_num(client: &tokio_postgres::Client) -> Result<i32, StepError> {
    let text: String = client
        .query_one("select current_setting('server_version_num')", &[])
        .await
        .map_err(|e| StepError::from_db("reading the server's version", &e))?
        .get(0);
    text.parse()
        .map_err(|_| StepError::permanent(format!("server_version_num {text:?} is not a number")))
}

/// The binary of `tool` for a server of `server_version_num`: Debian's versioned one
/// for the server's major version, else the one on PATH when it is at least as new
/// (pg_dump refuses older servers' successors; pg_restore reads older archives).
pub fn locate(tool: Tool, server_version_num: i32) -> Result<PathBuf, StepError> {
    let major = server_version_num / 10_000;
    let versioned = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/{}", tool.name()));
    if versioned.is_file() {
        return Ok(versioned);
    }
    let on_path = find_on_path(tool.name());
    let found = on_path.as_deref().map(|path| (path, tool_major(path)));
    match found {
        Some((path, Some(found))) if found >= major => Ok(path.to_path_buf()),
        other => {
            let found = match other {
                Some((path, Some(found))) => format!("{} is version {found}", path.display()),
                Some((path, None)) => format!("{} did not tell its version", path.display()),
                None => format!("no {} is on PATH", tool.name()),
            };
            Err(StepError::permanent(format!(
                "{} for PostgreSQL {major} is needed ({found}): install the Debian package \
                 postgresql-client-{major} on the worker",
                tool.name()
            )))
        }
    }
}

/// pg_dump for a server of `server_version_num`, refused unless both are patched
/// against CVE-2024-7348: pg_dump runs as the admin in a tenant's database, where the
/// tenant could swap a sequence for a view of its own function between pg_dump's
/// snapshot and its read of the sequence. Patched pg_dump sets
/// `restrict_nonsystem_relation_kind`, which only patched servers have (an older
/// pg_dump, or an older server, silently goes without).
pub async fn locate_pg_dump(
    client: &tokio_postgres::Client,
    server_version_num: i32,
) -> Result<PathBuf, StepError> {
    let guarded: bool = client
        .query_one(
            "select exists (select 1 from pg_settings where name = 'restrict_nonsystem_relation_kind')",
            &[],
        )
        .await
        .map_err(|e| StepError::from_db("reading the server's settings", &e))?
        .get(0);
    if !guarded {
        return Err(StepError::permanent(format!(
            "the cluster's PostgreSQL (server_version_num {server_version_num}) lacks the fix \
             for CVE-2024-7348 (restrict_nonsystem_relation_kind): pg_dump would run a \
             tenant's code as the admin; update it to 13.16, 14.13, 15.8, 16.4 or later"
        )));
    }
    let path = locate(Tool::PgDump, server_version_num)?;
    match tool_version(&path) {
        Some((major, minor)) if dump_is_patched(major, minor) => Ok(path),
        found => Err(StepError::permanent(format!(
            "{} ({}) lacks the fix for CVE-2024-7348: install a current \
             postgresql-client-{} on the worker",
            path.display(),
            found.map_or("version unknown".into(), |(major, minor)| format!(
                "{major}.{minor}"
            )),
            server_version_num / 10_000
        ))),
    }
}

/// Whether pg_dump `major.minor` sets `restrict_nonsystem_relation_kind`.
pub fn dump_is_patched(major: i32, minor: i32) -> bool {
    match major {
        ..=12 => false,
        13 => minor >= 16,
        14 => minor >= 13,
        15 => minor >= 8,
        16 => minor >= 4,
        _ => true,
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The major version `<tool> --version` prints (`pg_dump (PostgreSQL) 15.4 (Debian …)`).
fn tool_major(path: &Path) -> Option<i32> {
    tool_version(path).map(|(major, _)| major)
}

/// The major and minor version `<tool> --version` prints (a development version such
/// as `17devel` has minor 0).
fn tool_version(path: &Path) -> Option<(i32, i32)> {
    let output = std::process::Command::new(path)
        .arg("--version")
        .env_clear()
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.split(") ").nth(1)?.split_whitespace().next()?;
    parse_version(version)
}

/// `15.4` → (15, 4); `17devel` or `17beta1` → (17, 0).
fn parse_version(version: &str) -> Option<(i32, i32)> {
    let mut numbers = version.split(|c: char| !c.is_ascii_digit());
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

/// Who the child logs in as.
pub enum Login<'a> {
    /// The cluster's admin, from its URL.
    Admin,
    /// The project's own login (its current role and password).
    Project(&'a StepProject),
}

/// A child's libpq environment. Holds the CA file, removed when this is dropped.
pub struct PgEnv {
    vars: Vec<(&'static str, String)>,
    _ca: Option<PrivateFile>,
}

impl PgEnv {
    /// Logs in as `login` to database `dbname` of `cluster`.
    pub fn new(cluster: &StepCluster, dbname: &str, login: Login<'_>) -> Result<Self, StepError> {
        let target = super::target(cluster, "cluster")?;
        let config = &target.config;
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(dir)) => dir.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let (user, password) = match login {
            Login::Admin => (
                config.get_user().unwrap_or_default().to_string(),
                String::from_utf8_lossy(config.get_password().unwrap_or_default()).into_owned(),
            ),
            Login::Project(project) => (project.role_name.clone(), project.password.clone()),
        };
        let mut vars = vec![
            ("PGHOST", host),
            ("PGPORT", port.to_string()),
            ("PGUSER", user),
            ("PGPASSWORD", password),
            ("PGDATABASE", dbname.to_string()),
            ("PGSSLMODE", target.ssl_mode.as_str().to_string()),
            ("PGAPPNAME", "capy-step".to_string()),
            ("PGCONNECT_TIMEOUT", "10".to_string()),
        ];
        let ca = match cluster.ca_pem.as_deref() {
            Some(pem) => Some(PrivateFile::write("ca.pem", pem, "the cluster's CA")?),
            None => None,
        };
        match &ca {
            Some(file) => vars.push(("PGSSLROOTCERT", file.0.display().to_string())),
            // libpq 16+ reads "system" as the operating system's roots, which is what
            // the step's own connections trust without a registered CA.
            None if target.ssl_mode.verifies() => vars.push(("PGSSLROOTCERT", "system".into())),
            None => {}
        }
        Ok(Self { vars, _ca: ca })
    }

    /// A command for `program` with this environment and no inherited `PG*` variable;
    /// its stderr goes to the step's (the worker captures and scrubs it).
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                command.env_remove(name);
            }
        }
        command
            .envs(self.vars.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        command
    }
}

/// A file only this user reads, removed on drop: created anew (a file planted at the
/// name is not followed) with mode 0600. `what` names it in errors.
pub(super) struct PrivateFile(pub(super) PathBuf);

impl PrivateFile {
    pub(super) fn write(suffix: &str, contents: &str, what: &str) -> Result<Self, StepError> {
        let path = std::env::temp_dir().join(format!("capy-{}-{suffix}", uuid::Uuid::new_v4()));
        let failed = |e: std::io::Error| StepError {
            transient: true,
            message: format!("writing {what} to a temporary file: {e}"),
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(failed)?;
        let guard = Self(path);
        file.write_all(contents.as_bytes()).map_err(failed)?;
        Ok(guard)
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts `command`; a program that cannot start is a permanent failure.
pub fn spawn(
    command: &mut tokio::process::Command,
    tool: Tool,
) -> Result<tokio::process::Child, StepError> {
    command
        .spawn()
        .map_err(|e| StepError::permanent(format!("starting {}: {e}", tool.name())))
}

/// Waits for `child`; a non-zero exit is a failure, `transient` as the caller judges.
pub async fn wait(
    child: &mut tokio::process::Child,
    tool: Tool,
    transient: bool,
) -> Result<(), StepError> {
    let status = child.wait().await.map_err(|e| StepError {
        transient: true,
        message: format!("waiting for {}: {e}", tool.name()),
    })?;
    check_status(status, tool, transient)
}

fn check_status(status: ExitStatus, tool: Tool, transient: bool) -> Result<(), StepError> {
    if status.success() {
        return Ok(());
    }
    Err(StepError {
        transient,
        message: format!("{} failed ({status}); its messages are above", tool.name()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_the_cve_2024_7348_fix() {
        assert_eq!(parse_version("15.20"), Some((15, 20)));
        assert_eq!(parse_version("17devel"), Some((17, 0)));
        assert_eq!(parse_version("x"), None);
        assert!(dump_is_patched(15, 8) && dump_is_patched(16, 4) && dump_is_patched(17, 0));
        assert!(!dump_is_patched(15, 7) && !dump_is_patched(14, 12) && !dump_is_patched(12, 22));
    }
}
