//! `project.stop`: disables the project's ACL user (its rules re-applied with `off`),
//! then ends its open sessions, which a disabled user keeps otherwise. Its keys stay.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::{admin, tenant, user, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (tenant, cluster) = tenant(input, job_type::PROJECT_STOP)?;
    let mut admin = admin(cluster).await?;
    user::apply(&mut admin, &tenant, false).await?;
    println!("project {} is stopped", tenant.project.id);
    Ok(())
}
