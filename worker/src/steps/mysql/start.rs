//! `project.start`: unlocks the user a stop locked. Running it again changes nothing.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;
use sqlx::Connection as _;

use super::{account, connect, execute, user_exists, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (project, cluster) = super::target(input, job_type::PROJECT_START)?;
    let mut connection = connect(cluster).await?;
    let user = &project.role_name;
    if !user_exists(&mut connection, user).await? {
        return Err(StepError::permanent(format!(
            "the project's user {user} does not exist on cluster '{}'",
            cluster.name
        )));
    }
    execute(
        &mut connection,
        &format!("ALTER USER {} ACCOUNT UNLOCK", account(user)),
        "unlocking the user",
    )
    .await?;
    println!("user {user}: unlocked");
    let _ = connection.close().await;
    println!("project {} is started", project.id);
    Ok(())
}
