//! The private cluster's own record of what happened: with `log_connections`,
//! `log_disconnections` and, for sessions of the admin role to the `postgres` database
//! (the steps' and psql's, not the control plane's), every statement with its duration,
//! each line stamped with epoch milliseconds and the backend's pid. Only statement
//! kinds (their first words) are read back, never their text.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use capy_testkit::cluster;

/// A statement a session ran: when it ended, how long it took, its first words.
#[derive(Debug, Clone)]
pub struct Statement {
    pub end_ms: f64,
    pub duration_ms: f64,
    pub kind: String,
}

/// One backend's session, as the server logged it.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub received_ms: f64,
    pub authorized_ms: Option<f64>,
    pub ended_ms: Option<f64>,
    pub user: String,
    pub database: String,
    pub statements: Vec<Statement>,
}

impl Session {
    /// When its last statement ended (else when it was authorized).
    pub fn last_statement_ms(&self) -> Option<f64> {
        self.statements
            .last()
            .map(|s| s.end_ms)
            .or(self.authorized_ms)
    }
}

pub struct ServerLog {
    path: PathBuf,
}

impl ServerLog {
    /// Turns the logging on; `None` for a cluster given by URL, whose settings are not
    /// the bench's to change.
    pub async fn enable() -> anyhow::Result<Option<Self>> {
        let cluster = cluster()?;
        let Some(path) = cluster.log_path() else {
            return Ok(None);
        };
        let (client, connection) =
            tokio_postgres::connect(&cluster.admin_url_for("postgres"), tokio_postgres::NoTls)
                .await
                .context("connecting to turn the server log on")?;
        tokio::spawn(connection);
        for sql in [
            "alter system set log_connections = on",
            "alter system set log_disconnections = on",
            "alter system set log_line_prefix = '%n [%p] '",
            "alter role current_user in database postgres set log_min_duration_statement = 0",
            "select pg_reload_conf()",
        ] {
            client
                .batch_execute(sql)
                .await
                .context("turning the server log on")?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        Ok(Some(Self {
            path: path.to_path_buf(),
        }))
    }

    /// Every session in the log, in the order they began.
    pub fn sessions(&self) -> anyhow::Result<Vec<Session>> {
        let text = std::fs::read_to_string(&self.path).context("reading the server log")?;
        let mut open: HashMap<u32, Session> = HashMap::new();
        let mut done = Vec::new();
        for line in text.lines() {
            let Some((at_ms, pid, message)) = split_line(line) else {
                continue;
            };
            if message.starts_with("connection received:") {
                if let Some(previous) = open.remove(&pid) {
                    done.push(previous);
                }
                open.insert(pid, Session::received(at_ms));
            } else if let Some(session) = open.get_mut(&pid) {
                if session.read(at_ms, message) {
                    done.extend(open.remove(&pid));
                }
            }
        }
        done.extend(open.into_values());
        done.sort_by(|a, b| a.received_ms.total_cmp(&b.received_ms));
        Ok(done)
    }
}

impl Session {
    fn received(at_ms: f64) -> Self {
        Self {
            received_ms: at_ms,
            ..Self::default()
        }
    }

    /// Takes one logged message; true when the session ended with it.
    fn read(&mut self, at_ms: f64, message: &str) -> bool {
        if let Some(rest) = message.strip_prefix("connection authorized: ") {
            self.authorized_ms = Some(at_ms);
            self.user = field(rest, "user=").unwrap_or_default();
            self.database = field(rest, "database=").unwrap_or_default();
        } else if message.starts_with("disconnection:") {
            self.ended_ms = Some(at_ms);
            return true;
        } else if let Some(rest) = message.strip_prefix("duration: ") {
            if let Some(statement) = statement(at_ms, rest) {
                self.statements.push(statement);
            }
        }
        false
    }
}

/// `<epoch s.ms> [<pid>] LOG:  <message>` → (ms, pid, message).
fn split_line(line: &str) -> Option<(f64, u32, &str)> {
    let (stamp, rest) = line.split_once(" [")?;
    let (pid, rest) = rest.split_once("] ")?;
    let message = rest.strip_prefix("LOG:  ")?;
    Some((
        stamp.parse::<f64>().ok()? * 1000.0,
        pid.parse().ok()?,
        message,
    ))
}

fn field(text: &str, name: &str) -> Option<String> {
    let start = text.find(name)? + name.len();
    Some(text[start..].split_whitespace().next()?.to_string())
}

/// `0.123 ms  statement: CREATE DATABASE …` (or `execute <unnamed>: …`); the parse
/// and bind steps of the extended protocol are left out (their execute follows).
fn statement(at_ms: f64, rest: &str) -> Option<Statement> {
    let (duration, rest) = rest.split_once(" ms  ")?;
    let (how, sql) = rest.split_once(": ")?;
    if how.starts_with("parse") || how.starts_with("bind") {
        return None;
    }
    let kind = sql
        .split_whitespace()
        .take(2)
        .map(str::to_uppercase)
        .collect::<Vec<_>>()
        .join(" ");
    Some(Statement {
        end_ms: at_ms,
        duration_ms: duration.parse().ok()?,
        kind,
    })
}
