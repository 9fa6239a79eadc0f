//! Where the client's settings come from: flags, their environment variables, and the
//! `capy.env` file that `deploy/local/up` (`capy-api bootstrap`) writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::{Args, Parser};

use crate::commands::Command;
use crate::output::OutputFormat;

/// The file the local stack writes its URL and keys to, inside its data folder.
pub const ENV_FILE_NAME: &str = "capy.env";
/// The local stack's default data folder (`deploy/local/up --data-dir`).
pub const LOCAL_DATA_DIR: &str = ".capy";

#[derive(Debug, Parser)]
#[command(
    name = "capy",
    version,
    about = "The command-line client of capy, a control plane for managed PostgreSQL",
    after_help = "Without --api-url and --api-key, capy reads CAPY_API_URL and CAPY_API_KEY \
                  (CAPY_ADMIN_KEY for clusters and organizations) from the capy.env file the \
                  local stack writes: --env-file, else ./capy.env, else .capy/capy.env in this \
                  folder or the nearest parent that has one."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The API's base URL, such as http://127.0.0.1:8080.
    #[arg(long, env = "CAPY_API_URL", global = true)]
    pub api_url: Option<String>,
    /// The API key (`capy_live_…`). Prefer the environment: argv is visible to others.
    #[arg(long, env = "CAPY_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// A platform admin key, used first by `clusters` and `orgs create`.
    #[arg(long, env = "CAPY_ADMIN_KEY", global = true, hide_env_values = true)]
    pub admin_key: Option<String>,
    /// The env file to read the URL and keys from when they are not given.
    #[arg(long, env = "CAPY_ENV_FILE", global = true)]
    pub env_file: Option<PathBuf>,
    /// `human` (tables and key: value) or `json` (the API's answer, one document).
    #[arg(long, short = 'o', env = "CAPY_OUTPUT", global = true, value_enum,
          default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

/// A configuration or usage mistake: reported like clap's own, with exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage_error(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// Which key a command needs: an organization's, or a platform admin's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Organization,
    Admin,
}

/// What a command runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_url: String,
    pub api_key: String,
}

impl GlobalArgs {
    /// The URL and key: flags and environment first, then the env file. For an admin
    /// command the admin key is tried first at each level, otherwise the API key.
    pub fn resolve(&self, kind: KeyKind) -> anyhow::Result<Config> {
        let explicit_url = non_empty(self.api_url.as_deref());
        let explicit_key = pick(
            kind,
            non_empty(self.api_key.as_deref()),
            non_empty(self.admin_key.as_deref()),
        );
        let file = if explicit_url.is_some() && explicit_key.is_some() {
            None
        } else {
            self.env_file()?
        };
        let from_file = |name: &str| {
            file.as_ref()
                .and_then(|(_, vars)| non_empty(vars.get(name).map(String::as_str)))
        };
        let file_hint = match &file {
            Some((path, _)) => format!(" ({} has none)", path.display()),
            None => String::new(),
        };
        let api_url = explicit_url
            .or_else(|| from_file("CAPY_API_URL"))
            .ok_or_else(|| {
                usage_error(format!(
                    "no API URL: pass --api-url or set CAPY_API_URL{file_hint}, or run \
                     deploy/local/up, which writes {LOCAL_DATA_DIR}/{ENV_FILE_NAME}"
                ))
            })?;
        let api_key = explicit_key
            .or_else(|| pick(kind, from_file("CAPY_API_KEY"), from_file("CAPY_ADMIN_KEY")))
            .ok_or_else(|| {
                usage_error(format!(
                    "no API key: pass --api-key or set CAPY_API_KEY{file_hint}"
                ))
            })?;
        let api_url = api_url.trim_end_matches('/').to_string();
        if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
            return Err(usage_error(format!(
                "the API URL must start with http:// or https://, not '{api_url}'"
            )));
        }
        Ok(Config { api_url, api_key })
    }

    /// The env file named by `--env-file` (which must exist), or the first one found.
    fn env_file(&self) -> anyhow::Result<Option<(PathBuf, HashMap<String, String>)>> {
        if let Some(path) = &self.env_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                usage_error(format!("cannot read the env file {}: {e}", path.display()))
            })?;
            return Ok(Some((path.clone(), parse_env_file(&text))));
        }
        let Ok(cwd) = std::env::current_dir() else {
            return Ok(None);
        };
        for path in candidates(&cwd) {
            if let Ok(text) = std::fs::read_to_string(&path) {
                return Ok(Some((path, parse_env_file(&text))));
            }
        }
        Ok(None)
    }
}

fn non_empty(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
}

fn pick(kind: KeyKind, api: Option<String>, admin: Option<String>) -> Option<String> {
    match kind {
        KeyKind::Organization => api.or(admin),
        KeyKind::Admin => admin.or(api),
    }
}

/// `./capy.env`, then `.capy/capy.env` in this folder and each parent.
fn candidates(cwd: &Path) -> Vec<PathBuf> {
    std::iter::once(cwd.join(ENV_FILE_NAME))
        .chain(
            cwd.ancestors()
                .map(|dir| dir.join(LOCAL_DATA_DIR).join(ENV_FILE_NAME)),
        )
        .collect()
}

/// `KEY=VALUE` lines, as a shell would source them: comments, blank lines, `export `
/// and surrounding quotes are allowed.
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| {
            let key = key.trim().trim_start_matches("export ").trim();
            let value = value.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
                .unwrap_or(value);
            (key.to_string(), unquoted.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clap's own checks of every subcommand: no flag a subcommand defines clashes
    /// with a global one (`--output` is the output format everywhere).
    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    fn args(api_key: Option<&str>, admin_key: Option<&str>, env_file: PathBuf) -> GlobalArgs {
        GlobalArgs {
            api_url: None,
            api_key: api_key.map(String::from),
            admin_key: admin_key.map(String::from),
            env_file: Some(env_file),
            output: OutputFormat::Human,
        }
    }

    #[test]
    fn env_files_parse_like_a_shell_sources_them() {
        let vars = parse_env_file(
            "# comment\nCAPY_API_URL=http://127.0.0.1:8080\nexport CAPY_API_KEY=\"k1\"\n\nX='y'\n",
        );
        assert_eq!(vars["CAPY_API_URL"], "http://127.0.0.1:8080");
        assert_eq!(vars["CAPY_API_KEY"], "k1");
        assert_eq!(vars["X"], "y");
    }

    #[test]
    fn explicit_keys_win_and_admin_commands_prefer_the_admin_key() {
        let dir = std::env::temp_dir().join(format!("capy-cli-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(ENV_FILE_NAME);
        std::fs::write(
            &file,
            "CAPY_API_URL=http://h:1/\nCAPY_API_KEY=org\nCAPY_ADMIN_KEY=adm\n",
        )
        .unwrap();
        let org = args(None, None, file.clone())
            .resolve(KeyKind::Organization)
            .unwrap();
        assert_eq!(
            (org.api_url.as_str(), org.api_key.as_str()),
            ("http://h:1", "org")
        );
        let admin = args(None, None, file.clone())
            .resolve(KeyKind::Admin)
            .unwrap();
        assert_eq!(admin.api_key, "adm");
        let explicit = args(Some("mine"), None, file.clone())
            .resolve(KeyKind::Admin)
            .unwrap();
        assert_eq!(explicit.api_key, "mine");
        let missing = args(None, None, dir.join("nope.env")).resolve(KeyKind::Organization);
        assert!(missing.unwrap_err().downcast_ref::<UsageError>().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_stack_s_file_is_looked_for_in_parents() {
        let found = candidates(Path::new("/a/b"));
        assert_eq!(found[0], Path::new("/a/b/capy.env"));
        assert!(found.contains(&PathBuf::from("/a/.capy/capy.env")));
    }
}
