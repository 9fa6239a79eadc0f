//! `project.start`: unlocks the user a stop locked. Running it again changes nothing.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;
use sqlx::Connection as _;

use super::{connect, set_account_lock, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (project, cluster) = super::target(input, job_type::PROJECT_START)?;
    let mut connection = connect(cluster).await?;
    set_account_lock(&mut connection, project, cluster, false).await?;
    let _ = connection.close().await;
    println!("project {} is started", project.id);
    Ok(())
}
