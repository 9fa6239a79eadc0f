//! `project.start`: enables the project's ACL user again, its rules re-applied (so a
//! start also repairs a user changed or lost meanwhile), and logs in as it once. A
//! failed login turns the user off again before the job fails: the project shows
//! `stopped` until a start completes, and so must it be.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::{admin, log_in_as, tenant, user, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (tenant, cluster) = tenant(input, job_type::PROJECT_START)?;
    let mut admin = admin(cluster).await?;
    user::apply(&mut admin, &tenant, true).await?;
    if let Err(error) = log_in_as(&admin, &tenant).await {
        user::apply(&mut admin, &tenant, false).await?;
        return Err(error);
    }
    println!("project {} is started", tenant.project.id);
    Ok(())
}
