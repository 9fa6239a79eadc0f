//! What a cluster's pooler (PgBouncer, `auth_type = scram-sha-256`) needs in a project's
//! database to log its tenants in without a password file: PgBouncer logs in as the
//! cluster's lookup role (`pooler_auth_user`) to the database the client asked for and
//! runs `SELECT usename, passwd FROM capy_pooler.lookup($1)`.
//!
//! `capy_pooler` is a schema of the cluster admin's (the tenant has no right on it); its
//! one function is SECURITY DEFINER (it reads `pg_authid`, which only a superuser may)
//! and answers a SCRAM verifier only for a login role that has CONNECT on the database
//! it runs in (the project's logins: both of them during a credential rotation, and one
//! that may replicate logically) and is neither a superuser nor the lookup role itself,
//! so no other role's verifier leaks (physical replication stays with the superuser). Only the lookup role may use the schema and run the function.
//! The lookup role itself (LOGIN, with its password) is the operator's: whoever runs
//! PgBouncer creates it.

use capy_shared::ident::{quote_ident, quote_literal};
use tokio_postgres::Client;

use super::{execute, StepError};

/// The schema holding the lookup function, in every project database.
pub const SCHEMA: &str = "capy_pooler";

/// Checks, on the cluster admin's session, that the lookup role exists, may log in and
/// is no superuser, and that the admin is a superuser (the function reads `pg_authid`
/// with the admin's rights). Failures are permanent: the operator must act.
pub async fn check_role(client: &Client, lookup: &str) -> Result<(), StepError> {
    let row = client
        .query_opt(
            "select r.rolcanlogin, r.rolsuper,
                    (select rolsuper from pg_roles where rolname = current_user)
             from pg_roles r where r.rolname = $1",
            &[&lookup],
        )
        .await
        .map_err(|e| StepError::from_db("reading the pooler's lookup role", &e))?;
    let Some(row) = row else {
        return Err(StepError::permanent(format!(
            "the cluster's pooler_auth_user {lookup:?} does not exist: create it on the \
             cluster (CREATE ROLE {lookup} LOGIN PASSWORD '…', the password PgBouncer's \
             auth_file holds), or register the cluster without pooler_auth_user"
        )));
    };
    let (login, superuser, admin_super): (bool, bool, Option<bool>) =
        (row.get(0), row.get(1), row.get(2));
    if !login || superuser {
        return Err(StepError::permanent(format!(
            "the cluster's pooler_auth_user {lookup:?} must be a LOGIN role that is not a \
             superuser"
        )));
    }
    if admin_super != Some(true) {
        return Err(StepError::permanent(
            "the pooler's lookup function reads pg_authid: the cluster's admin must be a \
             superuser when the cluster has a pooler_auth_user",
        ));
    }
    Ok(())
}

/// Installs (or brings back to the model above) schema `capy_pooler` and its function
/// in the database `inside` is connected to, as the cluster admin. A schema of that
/// name holding anything the admin does not own (a tenant made it first) is dropped
/// with what is in it. Runs as one transaction; running it again changes nothing.
pub async fn install(inside: &Client, lookup: &str) -> Result<(), StepError> {
    let mut sql = String::from("BEGIN;");
    if schema_is_clean(inside).await? == Some(false) {
        // Not capy's alone: whatever is in it could stand in for the function.
        sql.push_str("DROP SCHEMA capy_pooler CASCADE;");
        println!("schema capy_pooler: held objects of another role; dropped");
    }
    sql.push_str(&install_sql(lookup));
    sql.push_str(&revoke_others_sql(inside, lookup).await?);
    sql.push_str("COMMIT;");
    execute(inside, &sql, "installing the pooler's lookup function").await?;
    // A tenant's CREATE SCHEMA committed between the check and the install would have
    // been taken over with what it held: the retry drops it.
    if schema_is_clean(inside).await? != Some(true) {
        return Err(StepError {
            transient: true,
            message: "schema capy_pooler changed while it was installed; retrying".into(),
        });
    }
    println!("schema capy_pooler: lookup function for {lookup}");
    Ok(())
}

/// Whether schema `capy_pooler` and everything in it belong to the admin (`None`: no
/// such schema). The admin session's search_path is pg_catalog first, so the
/// operators below are the catalog's.
async fn schema_is_clean(inside: &Client) -> Result<Option<bool>, StepError> {
    inside
        .query_opt(
            "select n.nspowner = me.oid
                and not exists (select 1 from pg_proc p
                                where p.pronamespace = n.oid and p.proowner <> me.oid)
                and not exists (select 1 from pg_class c
                                where c.relnamespace = n.oid and c.relowner <> me.oid)
                and not exists (select 1 from pg_type t
                                where t.typnamespace = n.oid and t.typowner <> me.oid)
                and not exists (select 1 from pg_operator o
                                where o.oprnamespace = n.oid and o.oprowner <> me.oid)
             from pg_namespace n, (select oid from pg_roles where rolname = current_user) me
             where n.nspname = $1",
            &[&SCHEMA],
        )
        .await
        .map(|row| row.map(|r| r.get(0)))
        .map_err(|e| StepError::from_db("reading schema capy_pooler", &e))
}

/// The schema, the function and their grants to the lookup role alone.
fn install_sql(lookup: &str) -> String {
    let role = quote_ident(lookup);
    let name = quote_literal(lookup);
    format!(
        "CREATE SCHEMA IF NOT EXISTS capy_pooler;
         ALTER SCHEMA capy_pooler OWNER TO CURRENT_USER;
         REVOKE ALL ON SCHEMA capy_pooler FROM PUBLIC;
         GRANT USAGE ON SCHEMA capy_pooler TO {role};
         CREATE OR REPLACE FUNCTION capy_pooler.lookup(p_usename text)
             RETURNS TABLE (usename name, passwd text)
             LANGUAGE sql STABLE STRICT SECURITY DEFINER
             SET search_path = pg_catalog, pg_temp
         AS $capy$
             SELECT a.rolname, a.rolpassword
             FROM pg_catalog.pg_authid a
             WHERE a.rolname OPERATOR(pg_catalog.=) p_usename
               AND a.rolname OPERATOR(pg_catalog.<>) {name}
               AND a.rolcanlogin AND NOT a.rolsuper
               AND a.rolpassword OPERATOR(pg_catalog.~~) 'SCRAM-SHA-256$%'
               AND (a.rolvaliduntil IS NULL
                    OR a.rolvaliduntil OPERATOR(pg_catalog.>) pg_catalog.now())
               AND pg_catalog.has_database_privilege(a.oid, pg_catalog.current_database(),
                                                     'CONNECT')
         $capy$;
         ALTER FUNCTION capy_pooler.lookup(text) OWNER TO CURRENT_USER;
         REVOKE ALL ON FUNCTION capy_pooler.lookup(text) FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION capy_pooler.lookup(text) TO {role};"
    )
}

/// Revokes what any role but the owner and `lookup` holds on the schema or function (a
/// lookup role the cluster named before, say).
async fn revoke_others_sql(inside: &Client, lookup: &str) -> Result<String, StepError> {
    let rows = inside
        .query(
            "select distinct 'SCHEMA capy_pooler', r.rolname::text
             from pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
                  join pg_catalog.pg_roles r on r.oid operator(pg_catalog.=) a.grantee
             where n.nspname operator(pg_catalog.=) 'capy_pooler'
               and a.grantee operator(pg_catalog.<>) n.nspowner
               and r.rolname operator(pg_catalog.<>) $1
             union
             select distinct 'FUNCTION capy_pooler.lookup(text)', r.rolname::text
             from pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
                  join pg_catalog.pg_roles r on r.oid operator(pg_catalog.=) a.grantee
             where p.oid operator(pg_catalog.=)
                   pg_catalog.to_regprocedure('capy_pooler.lookup(text)')
               and a.grantee operator(pg_catalog.<>) p.proowner
               and r.rolname operator(pg_catalog.<>) $1",
            &[&lookup],
        )
        .await
        .map_err(|e| StepError::from_db("reading the lookup function's grants", &e))?;
    Ok(rows
        .iter()
        .map(|row| {
            let (object, grantee): (&str, String) = (row.get(0), row.get(1));
            format!(
                "REVOKE ALL ON {object} FROM {} CASCADE;",
                quote_ident(&grantee)
            )
        })
        .collect())
}
