//! `project.stop`: locks the user, so no new session logs in, then ends the open ones.
//! Running it again finds the account locked and no session, and succeeds.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;
use sqlx::Connection as _;

use super::{connect, kill_sessions, set_account_lock, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (project, cluster) = super::target(input, job_type::PROJECT_STOP)?;
    let mut connection = connect(cluster).await?;
    // Locked first: a session killed after it cannot log in again.
    set_account_lock(&mut connection, project, cluster, true).await?;
    kill_sessions(&mut connection, &project.role_name).await?;
    let _ = connection.close().await;
    println!("project {} is stopped", project.id);
    Ok(())
}
