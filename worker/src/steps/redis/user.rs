//! The ACL user of a Redis project: the one rule of what it may do.
//!
//! `+@all -@dangerous` leaves the data commands on the project's own keys and channels
//! (`~p:<id>:*`, `&p:<id>:*`, checked by Redis for every key and channel a command
//! names, scripts included). `@dangerous` (see `ACL CAT dangerous`) already takes away
//! the server's administration: FLUSHALL, FLUSHDB, CONFIG, ACL, DEBUG, MONITOR,
//! SHUTDOWN, MODULE, SAVE/BGSAVE/BGREWRITEAOF, REPLICAOF/SLAVEOF, CLUSTER, FAILOVER,
//! MIGRATE, RESTORE, SORT (its BY/GET patterns read other keys), KEYS, INFO, SLOWLOG,
//! LATENCY, CLIENT LIST/KILL/PAUSE, SWAPDB, PFDEBUG. The explicit denials repeat those
//! the brief names (a future Redis might move one out of @dangerous) and add what
//! @dangerous misses but would let a tenant leave its prefix or hurt the others,
//! each found by trying it as a tenant on Redis 7.0:
//! - other logical databases, outside what a project delete cleans: SELECT, MOVE,
//!   COPY (its DB option), SWAPDB;
//! - other tenants' key names or their number, which Redis does not filter by key
//!   rules: SCAN, RANDOMKEY, DBSIZE, KEYS, CLIENT TRACKING (BCAST sends every key's
//!   invalidation), PUBSUB (CHANNELS, NUMSUB: other tenants' channels), MEMORY
//!   (STATS, DOCTOR);
//! - state shared by all tenants: SCRIPT FLUSH, SCRIPT KILL, SCRIPT DEBUG (SYNC blocks
//!   the server), FUNCTION (libraries are global: FLUSH, DELETE, LOAD REPLACE) and
//!   FCALL/FCALL_RO (they call those global libraries).
//!
//! CLIENT is denied whole and only its own-connection subcommands given back, so a
//! new subcommand stays refused. What stays possible and is not isolated: memory use
//! (Redis has no per-user limit), a long script or blocking command slowing everyone,
//! and connections (Redis has no per-user connection limit, so `max_connections` is
//! not applied). The password is sent as its SHA-256 (`#…`): it never reaches the
//! server in clear, nor its logs.

use sha2::{Digest as _, Sha256};

use super::{failed, AdminConnection, StepError, Tenant};

/// Commands and subcommands denied after `+@all -@dangerous`, as explained above.
#[rustfmt::skip]
const DENIED: &[&str] = &[
    // Other logical databases.
    "-select", "-move", "-copy", "-swapdb",
    // Other tenants' key and channel names, or their number.
    "-scan", "-randomkey", "-dbsize", "-keys", "-pubsub", "-memory",
    // State shared by all tenants.
    "-script|flush", "-script|kill", "-script|debug", "-function", "-fcall", "-fcall_ro",
    // Already in @dangerous (Redis 7.0), denied by name in case that changes.
    "-flushall", "-flushdb", "-config", "-acl", "-debug", "-monitor", "-shutdown",
    "-module", "-save", "-bgsave", "-bgrewriteaof", "-replicaof", "-slaveof", "-cluster",
    "-failover", "-migrate", "-restore", "-sort", "-sort_ro", "-latency", "-pfdebug",
    "-info", "-slowlog",
    // CLIENT: only what concerns the caller's own connection.
    "-client", "+client|id", "+client|getname", "+client|setname", "+client|info",
    "+client|reply",
];

/// The arguments of `ACL SETUSER <user> …` that make the user exactly what the module
/// comment says. `reset` first: whatever the user had is dropped, so a re-run
/// converges and an old rule never survives.
fn rules(tenant: &Tenant<'_>, on: bool) -> Vec<String> {
    let password_hash = hex::encode(Sha256::digest(tenant.project.password.as_bytes()));
    let mut rules = vec![
        "reset".to_string(),
        if on { "on" } else { "off" }.to_string(),
        format!("#{password_hash}"),
        format!("~{}*", tenant.prefix),
        format!("&{}*", tenant.prefix),
        "+@all".to_string(),
        "-@dangerous".to_string(),
    ];
    rules.extend(DENIED.iter().map(|rule| rule.to_string()));
    rules
}

/// Makes the project's ACL user what [`rules`] says, enabled or not (Redis 7 applies
/// the whole `ACL SETUSER` or nothing). A disabled user's open sessions are ended too.
pub async fn apply(
    admin: &mut AdminConnection,
    tenant: &Tenant<'_>,
    on: bool,
) -> Result<(), StepError> {
    if tenant.project.password.is_empty() {
        return Err(StepError::permanent("the project has no password"));
    }
    let result: Result<String, redis::RedisError> = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(tenant.user)
        .arg(rules(tenant, on))
        .query_async(&mut admin.connection)
        .await;
    if let Err(e) = result {
        let mut error = failed(admin, "setting the project's ACL user", &e);
        if e.to_string().contains("Unknown command") {
            error.message.push_str(" (capy needs Redis 7.0 or newer)");
        }
        return Err(error);
    }
    println!(
        "user {}: rules set, {}",
        tenant.user,
        if on { "enabled" } else { "disabled" }
    );
    if !on {
        let ended = super::end_sessions(admin, tenant.user).await?;
        println!("user {}: {ended} open sessions ended", tenant.user);
    }
    Ok(())
}

/// Disables `user` without touching its rules (a delete's first move).
pub async fn disable(admin: &mut AdminConnection, user: &str) -> Result<(), StepError> {
    let result: Result<String, redis::RedisError> = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg("off")
        .query_async(&mut admin.connection)
        .await;
    result.map_err(|e| failed(admin, "disabling the project's ACL user", &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_hold_no_password_and_deny_after_allowing() {
        let project = capy_shared::step::StepProject {
            id: uuid::Uuid::nil(),
            database_name: String::new(),
            role_name: "capy_x".into(),
            password: "secret-pw".into(),
            max_connections: 1,
            statement_timeout: String::new(),
            idle_transaction_timeout: String::new(),
            storage_limit_bytes: None,
            replication: false,
            previous_role_name: None,
            pending_login: None,
            stopped: false,
        };
        let tenant = Tenant {
            project: &project,
            user: "capy_x",
            prefix: "p:1:".into(),
        };
        let rules = rules(&tenant, true);
        assert!(!rules.iter().any(|r| r.contains("secret-pw")));
        assert_eq!(rules[0], "reset");
        let all = rules.iter().position(|r| r == "+@all").unwrap();
        let select = rules.iter().position(|r| r == "-select").unwrap();
        assert!(all < select, "a denial before +@all would be undone");
        assert!(rules.contains(&"~p:1:*".to_string()));
    }
}
