//! `project.delete`: disables the project's ACL user, ends its sessions, deletes it,
//! then deletes its keys: `SCAN … MATCH p:<id>:*` and `UNLINK` batch by batch (never
//! `KEYS`, which blocks the server). Once the user is gone nothing writes under the
//! prefix, so one full pass of the cursor finds every key. A re-run finds no user and
//! no keys and succeeds.

use capy_shared::model::job_type;
use capy_shared::step::StepInput;

use super::{admin, end_sessions, failed, tenant, user, user_exists, AdminConnection, StepError};

/// Keys asked of each `SCAN` (a hint to Redis; each batch is one `UNLINK`).
const SCAN_COUNT: u32 = 1000;

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let (tenant, cluster) = tenant(input, job_type::PROJECT_DELETE)?;
    let mut admin = admin(cluster).await?;
    remove_user(&mut admin, tenant.user).await?;
    let deleted = delete_keys(&mut admin, &tenant.prefix).await?;
    println!("{deleted} keys deleted under {}", tenant.prefix);
    println!("project {} is deleted", tenant.project.id);
    Ok(())
}

/// Disabled first, so that no session opens between the kill and the delete.
async fn remove_user(admin: &mut AdminConnection, user: &str) -> Result<(), StepError> {
    if !user_exists(admin, user).await? {
        println!("user {user}: already gone");
        return Ok(());
    }
    user::disable(admin, user).await?;
    println!("user {user}: disabled");
    let ended = end_sessions(admin, user).await?;
    println!("user {user}: {ended} open sessions ended");
    let _: u64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(user)
        .query_async(&mut admin.connection)
        .await
        .map_err(|e| failed(admin, "deleting the project's ACL user", &e))?;
    println!("user {user}: deleted");
    Ok(())
}

/// Deletes every key under `prefix` (plain text: no wildcard but the final `*`).
async fn delete_keys(admin: &mut AdminConnection, prefix: &str) -> Result<u64, StepError> {
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut admin.connection)
            .await
            .map_err(|e| failed(admin, "listing the project's keys", &e))?;
        if !keys.is_empty() {
            let count: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut admin.connection)
                .await
                .map_err(|e| failed(admin, "deleting the project's keys", &e))?;
            deleted += count;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
