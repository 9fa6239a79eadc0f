//! What capy knows of the engines other than PostgreSQL: checking a cluster's admin
//! access (used by the API's `check-access` and registration). Their steps live in the
//! worker, one folder per engine.

pub mod mysql;
pub mod redis;

use serde::Serialize;

/// What a check of a MySQL or Redis cluster's admin access found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineAccess {
    pub reachable: bool,
    pub server_version: Option<String>,
    /// MySQL: the admin may `CREATE USER` and grant on databases it creates. Redis: it
    /// may run `ACL SETUSER`.
    pub can_create_roles: bool,
    /// MySQL: the admin may `CREATE DATABASE`. Redis: always false (no databases).
    pub can_create_databases: bool,
    /// Connect, authenticate and read the rights, in milliseconds.
    pub latency_ms: f64,
    /// `authentication_failed`, `host_not_found`, `connection_refused`, `timeout`,
    /// `invalid_url` or `other`, as for PostgreSQL.
    pub error_kind: Option<String>,
    /// Never holds the URL or its password.
    pub error: Option<String>,
    /// Whether the session was encrypted.
    pub tls: bool,
}
