//! `project.start`: enables the project's ACL user again, its rules re-applied (so a
//! start also repairs a user changed or lost meanwhile), and logs in as it once.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::{admin, log_in_as, tenant, user, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (tenant, cluster) = tenant(input, job_type::PROJECT_START)?;
    let mut admin = admin(cluster).await?;
    user::apply(&mut admin, &tenant, true).await?;
    log_in_as(&admin, &tenant).await?;
    println!("project {} is started", tenant.project.id);
    Ok(())
}
