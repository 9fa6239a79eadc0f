//! `project.create` and `project.update`: makes the project's ACL user what
//! `user::rules` says (enabled, or disabled with its sessions ended while the project
//! is stopped), then logs in as it once to prove the password works.

use capy_shared::step::StepInput;

use super::{admin, log_in_as, tenant, user, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (tenant, cluster) = tenant(input, &input.job.job_type)?;
    let mut admin = admin(cluster).await?;
    let on = !tenant.project.stopped;
    user::apply(&mut admin, &tenant, on).await?;
    if on {
        log_in_as(&admin, &tenant).await?;
        println!("user {}: logged in", tenant.user);
    }
    println!(
        "project {} has keys and channels {}*",
        tenant.project.id, tenant.prefix
    );
    Ok(())
}
