//! `project.create`: the project's login role (password, connection limit) and its
//! database, brought to capy's ownership model by
//! [`converge`](super::tenant_database::converge): owned by a NOLOGIN role the tenant
//! cannot become, with the limits and default timeouts only that owner may change, and
//! CONNECT for the project's role alone.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::tenant_database::{converge_alongside, Provision};
use super::{connect, require_cluster, require_project, validate_project, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_CREATE)?;
    let cluster = require_cluster(input, job_type::PROJECT_CREATE)?;
    validate_project(project)?;
    let client = connect(cluster).await?;
    // One connection as the project's own role proves the credentials work, and
    // makes the server build the database's relation cache file now, so the client's
    // first connection does not pay for it (about 10 ms on a new database). It opens
    // beside the admin's own session inside the database, not after it.
    let check_login = async {
        match super::connect_as(cluster, project).await {
            Ok(client) => match client.simple_query("select 1").await {
                Ok(_) => println!("role {}: connects", project.role_name),
                Err(e) => println!("warning: the role's first query failed: {e}"),
            },
            Err(e) => println!("warning: connecting as the role failed: {}", e.message),
        }
    };
    converge_alongside(&client, cluster, project, Provision::Create, check_login).await?;
    println!("project {} is ready", project.id);
    Ok(())
}
