//! The worker ↔ step contract. A step is an executable run once per attempt, in its own
//! process group, with a [`StepInput`] as JSON on stdin and `CAPY_JOB_ID`,
//! `CAPY_JOB_TYPE` and `CAPY_ATTEMPT` in its environment. It exits 0 on success,
//! [`EXIT_TEMPFAIL`] for a failure worth retrying, anything else for a permanent one.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::Job;

/// EX_TEMPFAIL from sysexits.h: a transient failure, retried with backoff.
pub const EXIT_TEMPFAIL: i32 = 75;

pub const ENV_JOB_ID: &str = "CAPY_JOB_ID";
pub const ENV_JOB_TYPE: &str = "CAPY_JOB_TYPE";
pub const ENV_ATTEMPT: &str = "CAPY_ATTEMPT";

/// A step may report a result: one stdout line of this prefix followed by JSON. The
/// last such line counts; a job's outcome reads it (e.g. a backup's size and checksum).
pub const RESULT_PREFIX: &str = "capy-result ";

/// The result a step reported on `stdout`, if any (the last [`RESULT_PREFIX`] line).
pub fn parse_result(stdout: &str) -> Option<serde_json::Value> {
    stdout
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(RESULT_PREFIX))
        .and_then(|json| serde_json::from_str(json).ok())
}

/// Prints `result` as the step's result line (see [`RESULT_PREFIX`]).
pub fn print_result(result: &serde_json::Value) {
    println!("{RESULT_PREFIX}{result}");
}

/// What a step reads on stdin. It holds secrets, so it has no `Debug`.
#[derive(Serialize, Deserialize)]
pub struct StepInput {
    pub job: Job,
    pub project: Option<StepProject>,
    pub cluster: Option<StepCluster>,
    /// The backup store, for the jobs that read or write archives (backups, exports,
    /// verifications, restores, deletions); `None` for the others.
    #[serde(default)]
    pub store: Option<crate::store::StoreConfig>,
    /// The preview database of a preview's job (`job.preview_database_id`), as a login
    /// and a database of its own; `project` is then its parent.
    #[serde(default)]
    pub preview: Option<StepProject>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct StepProject {
    pub id: Uuid,
    pub database_name: String,
    pub role_name: String,
    pub password: String,
    pub max_connections: i32,
    pub statement_timeout: String,
    pub idle_transaction_timeout: String,
    pub storage_limit_bytes: Option<i64>,
    /// The role may replicate (logical replication).
    #[serde(default)]
    pub replication: bool,
    /// The login a rotation replaced, until its grace ends and it is retired.
    #[serde(default)]
    pub previous_role_name: Option<String>,
    /// The login a rotation is making (`project.rotate_credentials`), with its password.
    #[serde(default)]
    pub pending_login: Option<StepLogin>,
    /// The project is stopped: its logins stay refused (a step that converges them
    /// must not let them in again).
    #[serde(default)]
    pub stopped: bool,
}

/// A login role and its password.
#[derive(Clone, Serialize, Deserialize)]
pub struct StepLogin {
    pub role_name: String,
    pub password: String,
}

#[derive(Serialize, Deserialize)]
pub struct StepCluster {
    pub id: Uuid,
    pub name: String,
    /// The cluster's superuser URL, password included.
    pub admin_url: String,
    /// Untrusted extensions the cluster's operator allows, read from the control
    /// database when the attempt starts (never from the job's args).
    #[serde(default)]
    pub allowed_extensions: Vec<String>,
    /// The CA certificate (PEM) the cluster's server certificate must chain to.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// The role the cluster's PgBouncer runs `auth_query` as: project steps install
    /// `capy_pooler.lookup` for it in the project's database. `None`: no pooler.
    #[serde(default)]
    pub pooler_auth_user: Option<String>,
    #[serde(default)]
    pub engine: crate::model::Engine,
}

impl StepInput {
    /// The secrets inside this input, for scrubbing a step's output.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let Some(project) = &self.project {
            secrets.push(project.password.clone());
            secrets.extend(project.pending_login.as_ref().map(|l| l.password.clone()));
        }
        if let Some(preview) = &self.preview {
            secrets.push(preview.password.clone());
        }
        if let Some(cluster) = &self.cluster {
            secrets.push(cluster.admin_url.clone());
            // The password as written in the URL (percent-encoded) and as decoded.
            if let Ok(url) = url::Url::parse(&cluster.admin_url) {
                secrets.extend(url.password().map(str::to_string));
            }
            secrets.extend(crate::redact::url_password(&cluster.admin_url));
        }
        if let Some(store) = &self.store {
            secrets.extend(store.secrets());
        }
        secrets
    }
}
