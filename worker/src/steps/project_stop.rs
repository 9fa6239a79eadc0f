//! `project.stop`: every login of the project (its own, the previous one in its grace,
//! a pending one) stops taking new sessions (`NOLOGIN`), then their open sessions, in
//! any database, are ended. The database and its data stay. A re-run finds the logins
//! already refused and ends whatever session is left.

use capy_shared::ident::quote_ident;
use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::credentials_retire::end_sessions;
use super::project_delete::existing_logins;
use super::{connect, execute, require_cluster, require_project, validate_names, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_STOP)?;
    let cluster = require_cluster(input, job_type::PROJECT_STOP)?;
    validate_names(project)?;
    let client = connect(cluster).await?;
    let logins = existing_logins(&client, project).await?;
    // All refused first, so no login opens a session while another's are being ended.
    for login in &logins {
        execute(
            &client,
            &format!("ALTER ROLE {} NOLOGIN", quote_ident(login)),
            "refusing the role's logins",
        )
        .await?;
        println!("role {login}: logins refused");
    }
    for login in &logins {
        end_sessions(&client, login).await?;
    }
    println!("project {} is stopped", project.id);
    Ok(())
}
