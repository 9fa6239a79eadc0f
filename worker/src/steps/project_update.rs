//! `project.update`: re-applies the project's recorded settings (connection limits of
//! its role and database, the database's statement and idle-transaction timeouts) and
//! capy's ownership model, through the same
//! [`converge`](super::tenant_database::converge) as `project.create`, so it also moves
//! a project made by an older capy (a database owned by the tenant) to the new model.
//! It allows connections unless the database is over its storage limit (a claimed
//! instant database has none). Nothing is created here; running it again changes
//! nothing.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::tenant_database::{converge, Provision};
use super::{connect, require_cluster, require_project, validate_project, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_UPDATE)?;
    let cluster = require_cluster(input, job_type::PROJECT_UPDATE)?;
    validate_project(project)?;
    let client = connect(&cluster.admin_url, &format!("cluster '{}'", cluster.name)).await?;
    converge(
        &client,
        &cluster.admin_url,
        project,
        cluster.pooler_auth_user.as_deref(),
        Provision::Update,
    )
    .await?;
    println!("project {}: settings applied", project.id);
    Ok(())
}
