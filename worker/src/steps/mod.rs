//! capy's built-in steps, run by the `capy-step` binary. They talk to a target cluster
//! as its admin with tokio-postgres and are idempotent: each reads the catalogs first
//! and does only what is missing, so a retried attempt is safe.

mod project_create;

use std::time::Duration;

use capy_shared::model::job_type;
use capy_shared::step::StepInput;
use tokio_postgres::error::SqlState;

/// A step's failure: whether a retry may succeed, and what to tell the operator.
#[derive(Debug)]
pub struct StepError {
    pub transient: bool,
    pub message: String,
}

impl StepError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            transient: false,
            message: message.into(),
        }
    }

    /// A database error, classified by SQLSTATE: connection errors (08), insufficient
    /// resources (53), operator intervention (57), serialization and deadlock failures
    /// and objects in use are transient; an error without SQLSTATE is a failed
    /// connection, transient too.
    pub fn from_db(context: &str, error: &tokio_postgres::Error) -> Self {
        let transient = match error.code() {
            None => true,
            Some(code) => {
                let code = code.code();
                code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57")
                    || code == SqlState::T_R_SERIALIZATION_FAILURE.code()
                    || code == SqlState::T_R_DEADLOCK_DETECTED.code()
                    || code == SqlState::OBJECT_IN_USE.code()
                    // Two attempts racing to create the same object: the next sees it.
                    || code == SqlState::DUPLICATE_OBJECT.code()
                    || code == SqlState::DUPLICATE_DATABASE.code()
            }
        };
        let detail = match error.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => error.to_string(),
        };
        Self {
            transient,
            message: format!("{context}: {detail}"),
        }
    }
}

/// Runs the built-in step for the input's job type.
pub async fn run(input: &StepInput) -> Result<(), StepError> {
    match input.job.job_type.as_str() {
        job_type::PROJECT_CREATE => project_create::run(input).await,
        other => Err(StepError::permanent(format!(
            "capy-step has no built-in step for job type '{other}'"
        ))),
    }
}

/// Connects to a cluster as its admin. The URL is never printed.
pub async fn connect(url: &str, what: &str) -> Result<tokio_postgres::Client, StepError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|_| {
        StepError::permanent(format!("the {what} URL is not a valid PostgreSQL URL"))
    })?;
    config
        .connect_timeout(Duration::from_secs(10))
        .application_name("capy-step");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| StepError::from_db(&format!("could not connect to the {what}"), &e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
