//! `project.retire_credentials`: drops the login a rotation replaced (`args.role`), once
//! its grace has ended. What it owns in the project's database goes to the project's
//! current login (REASSIGN OWNED), its grants go (DROP OWNED), its sessions end, then
//! the role. A login already gone is skipped, so a re-run (or a retire of a login a
//! later rotation already dropped) succeeds.

use capy_shared::ident::{is_valid_identifier, quote_ident};
use capy_shared::model::job_type;
use capy_shared::step::{StepCluster, StepInput, StepProject};
use tokio_postgres::Client;

use super::{
    connect, connect_database, execute, exists, require_cluster, require_project, validate_names,
    StepError, DATABASE_EXISTS, ROLE_EXISTS,
};

pub async fn run(input: &StepInput) -> Result<(), StepError> {
    let project = require_project(input, job_type::PROJECT_RETIRE_CREDENTIALS)?;
    let cluster = require_cluster(input, job_type::PROJECT_RETIRE_CREDENTIALS)?;
    validate_names(project)?;
    let role = input
        .job
        .args
        .get("role")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| StepError::permanent("the job's args name no role to retire"))?;
    let client = connect(cluster).await?;
    retire_login(&client, cluster, project, role).await?;
    println!("project {}: login {role} retired", project.id);
    Ok(())
}

/// Whether `role` is a login of `project`'s making that may be retired: its database's
/// first login or one a rotation made (`<database>_r<n>`), and neither its current
/// login nor the one a rotation is making.
fn retirable(project: &StepProject, role: &str) -> bool {
    let database = &project.database_name;
    let rotated = role
        .strip_prefix(database.as_str())
        .and_then(|rest| rest.strip_prefix("_r"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    is_valid_identifier(role)
        && (role == database || rotated)
        && role != project.role_name
        && project
            .pending_login
            .as_ref()
            .is_none_or(|login| login.role_name != role)
}

/// Retires `role`, a login of `project` other than its current one: no new sessions,
/// the open ones ended, what it owns given to the current login, then dropped.
pub async fn retire_login(
    client: &Client,
    cluster: &StepCluster,
    project: &StepProject,
    role: &str,
) -> Result<(), StepError> {
    if !retirable(project, role) {
        return Err(StepError::permanent(format!(
            "{role:?} is not a login of project {} that may be retired",
            project.id
        )));
    }
    if !exists(client, ROLE_EXISTS, role).await? {
        println!("login {role}: already gone");
        return Ok(());
    }
    let quoted = quote_ident(role);
    execute(
        client,
        &format!("ALTER ROLE {quoted} NOLOGIN"),
        "disabling the old login",
    )
    .await?;
    end_sessions(client, role).await?;
    if exists(client, DATABASE_EXISTS, &project.database_name).await? {
        let inside =
            connect_database(cluster, &project.database_name, "project's database").await?;
        execute(
            &inside,
            &format!(
                "REASSIGN OWNED BY {quoted} TO {current}; DROP OWNED BY {quoted};",
                current = quote_ident(&project.role_name)
            ),
            "giving the old login's objects to the current one",
        )
        .await?;
        println!(
            "login {role}: what it owned now belongs to {}",
            project.role_name
        );
    }
    drop_owned_elsewhere(client, cluster, role, &project.database_name).await?;
    revoke_foreign_members(client, project).await?;
    execute(
        client,
        &format!("DROP ROLE IF EXISTS {quoted}"),
        "dropping the old login",
    )
    .await?;
    println!("login {role}: dropped");
    Ok(())
}

/// Privileges other tenants granted `role` on their objects (any login may: the names
/// are in pg_roles) would keep DROP ROLE from succeeding: they are revoked in each
/// database that holds one, but `own_database` (which the caller deals with).
pub async fn drop_owned_elsewhere(
    client: &Client,
    cluster: &StepCluster,
    role: &str,
    own_database: &str,
) -> Result<(), StepError> {
    let rows = client
        .query(
            "select distinct d.datname::text from pg_shdepend s
             join pg_database d on d.oid = s.dbid
             join pg_roles r on r.oid = s.refobjid and s.refclassid = 'pg_authid'::regclass
             where r.rolname = $1 and d.datname <> $2 and d.datallowconn",
            &[&role, &own_database],
        )
        .await
        .map_err(|e| StepError::from_db("reading where the role holds privileges", &e))?;
    for row in rows {
        let database: String = row.get(0);
        let inside = connect_database(cluster, &database, "database holding grants").await?;
        execute(
            &inside,
            &format!("DROP OWNED BY {}", quote_ident(role)),
            "revoking what other databases granted the role",
        )
        .await?;
        println!("role {role}: privileges in database {database} revoked");
    }
    Ok(())
}

/// Before PostgreSQL 16 a session may grant membership in its own role: a holder of
/// the old credentials could have made another tenant's login a member of the current
/// one. Only the project's own roles stay members.
async fn revoke_foreign_members(client: &Client, project: &StepProject) -> Result<(), StepError> {
    let rows = client
        .query(
            "select r.rolname::text from pg_auth_members m
             join pg_roles g on g.oid = m.roleid join pg_roles r on r.oid = m.member
             where g.rolname = $1
               and not (r.rolname = $2 or starts_with(r.rolname, $2 || '_'))",
            &[&project.role_name, &project.database_name],
        )
        .await
        .map_err(|e| StepError::from_db("reading the current login's members", &e))?;
    for row in rows {
        let member: String = row.get(0);
        execute(
            client,
            &format!(
                "REVOKE {} FROM {}",
                quote_ident(&project.role_name),
                quote_ident(&member)
            ),
            "revoking a foreign membership in the current login",
        )
        .await?;
        println!(
            "login {}: membership of {member} revoked",
            project.role_name
        );
    }
    Ok(())
}

/// Ends `role`'s sessions, in every database.
pub async fn end_sessions(client: &Client, role: &str) -> Result<(), StepError> {
    let ended: i64 = client
        .query_one(
            "select count(*) filter (where pg_terminate_backend(pid))
             from pg_stat_activity where usename = $1 and pid <> pg_backend_pid()",
            &[&role],
        )
        .await
        .map_err(|e| StepError::from_db("ending the role's sessions", &e))?
        .get(0);
    if ended > 0 {
        println!("role {role}: {ended} session(s) ended");
    }
    Ok(())
}
