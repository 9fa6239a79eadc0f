//! `project.start`: the project's own login, and the previous one while its grace
//! lasts, take sessions again (`LOGIN`). A pending login a failed rotation left stays
//! refused: nobody has been given its password. Running it twice changes nothing.

use capy_shared::ident::quote_ident;
use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::{
    connect, execute, exists, require_cluster, require_project, validate_names, StepError,
    ROLE_EXISTS,
};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_START)?;
    let cluster = require_cluster(input, job_type::PROJECT_START)?;
    validate_names(project)?;
    let client = connect(cluster).await?;
    let logins = std::iter::once(&project.role_name).chain(project.previous_role_name.as_ref());
    for login in logins {
        if !super::is_valid_identifier(login) {
            return Err(StepError::permanent(format!(
                "invalid identifier {login:?}"
            )));
        }
        if !exists(&client, ROLE_EXISTS, login).await? {
            if *login == project.role_name {
                return Err(StepError::permanent(format!(
                    "role {login} does not exist: the project was never provisioned"
                )));
            }
            continue;
        }
        execute(
            &client,
            &format!("ALTER ROLE {} LOGIN", quote_ident(login)),
            "letting the role log in",
        )
        .await?;
        println!("role {login}: logins allowed");
    }
    println!("project {} is started", project.id);
    Ok(())
}
