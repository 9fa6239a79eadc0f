//! `project.delete`: locks the user (no new session), ends its sessions, drops its
//! database, then the user. Whatever is already gone is skipped, so a re-run or a run
//! after a partial one succeeds.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;
use sqlx::Connection as _;

use super::{account, connect, execute, kill_sessions, quote_ident, user_exists, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (project, cluster) = super::target(input, job_type::PROJECT_DELETE)?;
    let mut connection = connect(cluster).await?;
    let user = &project.role_name;
    let database = &project.database_name;
    if user_exists(&mut connection, user).await? {
        execute(
            &mut connection,
            &format!("ALTER USER IF EXISTS {} ACCOUNT LOCK", account(user)),
            "locking the user",
        )
        .await?;
        println!("user {user}: locked");
        // Its sessions would hold the database's metadata locks and block the drop.
        kill_sessions(&mut connection, user).await?;
    }
    execute(
        &mut connection,
        &format!("DROP DATABASE IF EXISTS {}", quote_ident(database)),
        "dropping the database",
    )
    .await?;
    println!("database {database}: gone");
    execute(
        &mut connection,
        &format!("DROP USER IF EXISTS {}", account(user)),
        "dropping the user",
    )
    .await?;
    println!("user {user}: gone");
    let _ = connection.close().await;
    println!("project {} is deleted", project.id);
    Ok(())
}
