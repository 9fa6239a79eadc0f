//! Per-phase timelines of `provision` and `instant`: what the client saw (epoch ms),
//! the job's own timestamps (`created_at`, `claimed_at`, `completed_at`) and the
//! server log's sessions (see [`crate::serverlog`]), one clock for all (one machine).
//! The server log stamps whole milliseconds: phases read from it are ±1 ms each.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::serverlog::Session;
use crate::stats::{median, round2};

/// One POST → completed as the client saw it (epoch ms).
#[derive(Debug, Clone)]
pub struct ClientTrace {
    pub job_id: Uuid,
    pub sent_ms: f64,
    pub answered_ms: f64,
    pub seen_ms: f64,
}

/// A job's own timestamps (epoch ms).
#[derive(Debug, Clone, Copy)]
pub struct JobTimes {
    pub created_ms: f64,
    pub claimed_ms: f64,
    pub completed_ms: f64,
}

pub async fn job_times(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<HashMap<Uuid, JobTimes>> {
    let rows: Vec<(Uuid, f64, Option<f64>, Option<f64>)> = sqlx::query_as(
        "select id, (extract(epoch from created_at) * 1000)::float8,
                (extract(epoch from claimed_at) * 1000)::float8,
                (extract(epoch from completed_at) * 1000)::float8
         from jobs where id = any($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, created_ms, claimed, completed)| {
            Some((
                id,
                JobTimes {
                    created_ms,
                    claimed_ms: claimed?,
                    completed_ms: completed?,
                },
            ))
        })
        .collect())
}

/// Samples by phase, in the order phases were first added.
#[derive(Default)]
pub struct Phases {
    order: Vec<String>,
    samples: HashMap<String, Vec<f64>>,
}

impl Phases {
    pub fn add(&mut self, name: &str, ms: f64) {
        if !self.samples.contains_key(name) {
            self.order.push(name.to_string());
        }
        self.samples.entry(name.to_string()).or_default().push(ms);
    }

    /// `[[phase, p50 ms, mean ms], …]` in order.
    pub fn figures(&self) -> Value {
        let rows: Vec<Value> = self
            .order
            .iter()
            .map(|name| {
                let mut v = self.samples[name].clone();
                let mean = v.iter().sum::<f64>() / v.len() as f64;
                json!([name, round2(median(&mut v)), round2(mean)])
            })
            .collect();
        Value::Array(rows)
    }
}

/// The sessions that began within `[from, to]` (the log's stamps are whole
/// milliseconds: one that began in `from`'s millisecond counts).
pub fn sessions_within(sessions: &[Session], from: f64, to: f64) -> Vec<&Session> {
    sessions
        .iter()
        .filter(|s| s.received_ms >= from.floor() && s.received_ms <= to)
        .collect()
}

/// Adds one provisioning run's phases: the client's trace, the job's timestamps, and
/// within the attempt the step's admin session (database `postgres`) and its check as
/// the project's role (any other database but `control_db`).
pub fn add_provision_run(
    phases: &mut Phases,
    statements: &mut Phases,
    trace: &ClientTrace,
    job: &JobTimes,
    sessions: &[Session],
    control_db: &str,
) -> Option<()> {
    let within = sessions_within(sessions, job.claimed_ms, job.completed_ms);
    let admin = within.iter().find(|s| s.database == "postgres")?;
    let tenant = within
        .iter()
        .find(|s| s.database != "postgres" && s.database != control_db)?;
    let authorized = admin.authorized_ms?;
    let sql_done = admin.last_statement_ms()?;
    let tenant_done = tenant.ended_ms.or(tenant.authorized_ms)?;
    // The admin session closes as the step's work ends (its client is dropped last).
    let step_done = admin.ended_ms.unwrap_or(tenant_done).max(tenant_done);
    add_chain(
        phases,
        &[
            ("POST sent", trace.sent_ms),
            ("job created_at (enqueue tx began)", job.created_ms),
            ("claimed_at", job.claimed_ms),
            ("step's connection received", admin.received_ms),
            ("authorized", authorized),
            ("last admin statement done", sql_done),
            ("connection as the project's role done", tenant_done),
            ("admin session closed (step's work ended)", step_done),
            ("completed_at (outcome tx began)", job.completed_ms),
            ("client sees completed", trace.seen_ms),
        ],
    );
    phases.add(
        "(side) POST sent → answered",
        trace.answered_ms - trace.sent_ms,
    );
    phases.add(
        "(total) POST sent → client sees completed",
        trace.seen_ms - trace.sent_ms,
    );
    let statement_ms: f64 = admin.statements.iter().map(|s| s.duration_ms).sum();
    phases.add("(within SQL) sum of statement durations", statement_ms);
    add_statement_kinds(statements, &admin.statements);
    Some(())
}

/// Adds the phase between each two consecutive events `(name, epoch ms)`.
pub fn add_chain(phases: &mut Phases, events: &[(&str, f64)]) {
    for pair in events.windows(2) {
        let ((from, at), (to, end)) = (pair[0], pair[1]);
        phases.add(&format!("{from} → {to}"), end - at);
    }
}

/// Adds each statement kind's total duration in one session.
pub fn add_statement_kinds(statements: &mut Phases, list: &[crate::serverlog::Statement]) {
    let mut by_kind: BTreeMap<&str, f64> = BTreeMap::new();
    for statement in list {
        *by_kind.entry(statement.kind.as_str()).or_default() += statement.duration_ms;
    }
    for (kind, ms) in by_kind {
        statements.add(kind, ms);
    }
}

/// Adds one psql run's phases: from its spawn to its exit (`[from, to]`, epoch ms).
pub fn add_psql_run(
    phases: &mut Phases,
    statements: &mut Phases,
    from: f64,
    to: f64,
    sessions: &[Session],
) -> Option<()> {
    let session = sessions_within(sessions, from, to)
        .into_iter()
        .find(|s| s.database == "postgres")?;
    let authorized = session.authorized_ms?;
    let sql_done = session.last_statement_ms()?;
    add_chain(
        phases,
        &[
            ("psql spawned", from),
            ("connection received", session.received_ms),
            ("authorized", authorized),
            ("last statement done", sql_done),
            (
                "psql exited (after its sessions inside the new database)",
                to,
            ),
        ],
    );
    phases.add("(total) spawn → exit", to - from);
    let statement_ms: f64 = session.statements.iter().map(|s| s.duration_ms).sum();
    phases.add("(within SQL) sum of statement durations", statement_ms);
    add_statement_kinds(statements, &session.statements);
    Some(())
}
