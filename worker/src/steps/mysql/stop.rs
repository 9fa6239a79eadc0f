//! `project.stop`: locks the user, so no new session logs in, then ends the open ones.
//! Running it again finds the account locked and no session, and succeeds.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;
use sqlx::Connection as _;

use super::{account, connect, execute, kill_sessions, user_exists, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (project, cluster) = super::target(input, job_type::PROJECT_STOP)?;
    let mut connection = connect(cluster).await?;
    let user = &project.role_name;
    if !user_exists(&mut connection, user).await? {
        return Err(StepError::permanent(format!(
            "the project's user {user} does not exist on cluster '{}'",
            cluster.name
        )));
    }
    // Locked first: a session killed after it cannot log in again.
    execute(
        &mut connection,
        &format!("ALTER USER {} ACCOUNT LOCK", account(user)),
        "locking the user",
    )
    .await?;
    println!("user {user}: locked");
    kill_sessions(&mut connection, user).await?;
    let _ = connection.close().await;
    println!("project {} is stopped", project.id);
    Ok(())
}
