//! `project.preview_delete`: the preview's database (dropped WITH FORCE, which ends
//! its sessions), its login and the NOLOGIN role that owned the database, removed as
//! a project's delete removes a project's. What is gone already is skipped, so a
//! re-run succeeds. The parent is not touched.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::{connect, project_delete, require_cluster, require_preview, validate_names, StepError};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let preview = require_preview(input, job_type::PREVIEW_DELETE)?;
    let cluster = require_cluster(input, job_type::PREVIEW_DELETE)?;
    // Only the names: a preview whose settings are off can still be deleted.
    validate_names(preview)?;
    let client = connect(cluster).await?;
    project_delete::remove(&client, cluster, preview).await?;
    println!("preview {} is deleted", preview.id);
    Ok(())
}
