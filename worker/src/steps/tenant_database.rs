//! The one routine that brings a project's roles and database to capy's ownership
//! model, called by `project.create` and `project.update` alike. Running it again, or on
//! a project made by an older capy (a database owned by the tenant's own login), moves
//! it to the model below and changes nothing else.
//!
//! The model: the database is owned by `<role>_owner`, a per-project NOLOGIN role the
//! tenant is not a member of (so it can neither log in as it nor `SET ROLE` to it). Only
//! a database's owner (or a superuser) may `ALTER DATABASE` it, so the tenant cannot lift
//! its connection limit, re-allow connections the storage check refused, or change the
//! database's default timeouts. The tenant's login gets CONNECT, TEMPORARY and CREATE on
//! its database (CREATE lets it make schemas and install *trusted* extensions by
//! PostgreSQL's own rules) and owns schema `public`; what it made stays its own.
//!
//! Why an owner role of its own rather than the cluster admin: the admin then owns no
//! tenant's objects, a project's ownership is dropped with the project, and an
//! operator (or a later capy) may act as the owner with `SET ROLE` for that one
//! database without holding the admin's rights.
//!
//! The tenant role is INHERIT: inheritance only matters for roles it is a member of, and
//! it is a member of none (it cannot be: NOCREATEROLE, and converge revokes the owner
//! role from it); NOINHERIT would not stop `SET ROLE` to a role it was granted anyway.

use std::future::Future;

use capy_shared::ident::{is_valid_identifier, is_valid_role_name, quote_ident, quote_literal};
use capy_shared::step::{StepCluster, StepProject};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::{
    connect_database, execute, exists, pooler_lookup, StepError, DATABASE_EXISTS, ROLE_EXISTS,
};

/// Whether converge may create what is missing (`project.create`) or only fixes what
/// exists (`project.update`: a missing role or database is an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provision {
    Create,
    Update,
}

/// The project's names, validated and quoted for SQL text.
struct Names<'a> {
    project: &'a StepProject,
    owner_name: String,
    role: String,
    owner: String,
    database: String,
    /// The cluster's pooler lookup role (validated), if it has a pooler.
    pooler: Option<&'a str>,
}

impl<'a> Names<'a> {
    fn new(project: &'a StepProject, pooler: Option<&'a str>) -> Result<Self, StepError> {
        let owner_name = owner_role_name(&project.database_name)?;
        if let Some(role) = pooler {
            if !is_valid_role_name(role) {
                return Err(StepError::permanent(format!(
                    "invalid pooler_auth_user {role:?}"
                )));
            }
        }
        Ok(Self {
            project,
            role: quote_ident(&project.role_name),
            owner: quote_ident(&owner_name),
            database: quote_ident(&project.database_name),
            owner_name,
            pooler,
        })
    }
}

/// The name of the NOLOGIN role that owns the project's database: `<database>_owner`.
/// (The project's first login has the database's name; a rotation changes the login,
/// never the owner.)
pub fn owner_role_name(database_name: &str) -> Result<String, StepError> {
    let name = format!("{database_name}_owner");
    if is_valid_identifier(&name) {
        Ok(name)
    } else {
        Err(StepError::permanent(format!(
            "invalid owner role name {name:?}"
        )))
    }
}

/// Whether a database of `size` bytes may take connections under `limit`: the storage
/// check's rule, which converge keeps (it never re-allows a database over its limit).
pub fn storage_allows(size: i64, limit: Option<i64>) -> bool {
    limit.is_none_or(|limit| size <= limit)
}

/// Brings the project's roles and database to the model above. `client` is the
/// cluster admin's session; `cluster` is reached again for the project's database.
/// The cluster's pooler lookup role, if it has one, gets CONNECT on the database and
/// the lookup function inside it ([`pooler_lookup`]).
pub async fn converge(
    client: &Client,
    cluster: &StepCluster,
    project: &StepProject,
    provision: Provision,
) -> Result<(), StepError> {
    converge_alongside(client, cluster, project, provision, std::future::ready(())).await
}

/// [`converge`], running `alongside` at the same time as the work inside the database
/// (a session of its own to the database, which may open once converge allows
/// connections), or after the rest when connections stay refused.
pub async fn converge_alongside(
    client: &Client,
    cluster: &StepCluster,
    project: &StepProject,
    provision: Provision,
    alongside: impl Future<Output = ()>,
) -> Result<(), StepError> {
    let pooler = cluster.pooler_auth_user.as_deref();
    let names = Names::new(project, pooler)?;
    if let Some(role) = pooler {
        pooler_lookup::check_role(client, role).await?;
    }
    if provision == Provision::Update {
        // Settings are applied to what project.create made; nothing is created here.
        require_provisioned(client, project).await?;
    }
    converge_owner_role(client, &names).await?;
    converge_tenant_role(client, &names, provision).await?;
    ensure_database(client, &names, provision).await?;
    converge_database(client, &names).await?;
    converge_database_acl(client, &names).await?;
    if converge_connections(client, &names).await? == Connections::Allowed {
        let inside = async {
            let inside = converge_schema(cluster, &names).await?;
            if let Some(role) = pooler {
                pooler_lookup::install(&inside, role).await?;
            }
            Ok::<_, StepError>(())
        };
        tokio::join!(inside, alongside).0?;
    } else {
        // Nobody gets in, the admin included; the next update that allows
        // connections again (a claim, or a lifted limit) gives schema public over.
        println!("schema public: left as it is while connections are refused");
        alongside.await;
    }
    Ok(())
}

async fn converge_owner_role(client: &Client, names: &Names<'_>) -> Result<(), StepError> {
    let attributes =
        "NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS";
    let (verb, done) = if exists(client, ROLE_EXISTS, &names.owner_name).await? {
        ("ALTER", "exists, NOLOGIN")
    } else {
        ("CREATE", "created, NOLOGIN")
    };
    execute(
        client,
        &format!("{verb} ROLE {} {attributes}", names.owner),
        "making the database's owner role",
    )
    .await?;
    println!("owner role {}: {done}", names.owner_name);
    Ok(())
}

/// The tenant's login: its limits and no attribute that lifts one. On create it gets its
/// password (as a SCRAM verifier); an update leaves the password alone.
async fn converge_tenant_role(
    client: &Client,
    names: &Names<'_>,
    provision: Provision,
) -> Result<(), StepError> {
    let project = names.project;
    let role_exists = exists(client, ROLE_EXISTS, &project.role_name).await?;
    if !role_exists && provision == Provision::Update {
        return Err(not_provisioned("role", &project.role_name));
    }
    let password = (provision == Provision::Create).then_some(project.password.as_str());
    configure_login(client, project, &project.role_name, password, role_exists).await
}

/// Makes or fixes a login `role_name` of the project (its own, or the new one a
/// rotation makes) with the tenant's limits and attributes, and the password given (as
/// a SCRAM verifier; `None` leaves it alone). The login is a member of no role that
/// owns the database.
pub async fn converge_login(
    client: &Client,
    project: &StepProject,
    role_name: &str,
    password: Option<&str>,
) -> Result<(), StepError> {
    let role_exists = exists(client, ROLE_EXISTS, role_name).await?;
    configure_login(client, project, role_name, password, role_exists).await
}

/// [`converge_login`] once whether the login exists is known.
async fn configure_login(
    client: &Client,
    project: &StepProject,
    role_name: &str,
    password: Option<&str>,
    role_exists: bool,
) -> Result<(), StepError> {
    if !is_valid_identifier(role_name) {
        return Err(StepError::permanent(format!(
            "invalid role name {role_name:?}"
        )));
    }
    let role = quote_ident(role_name);
    let replication = if project.replication {
        "REPLICATION"
    } else {
        "NOREPLICATION"
    };
    // A stopped project's logins stay refused whatever converges them.
    let login = if project.stopped { "NOLOGIN" } else { "LOGIN" };
    let mut attributes = format!(
        "{login} NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT {replication} NOBYPASSRLS \
         CONNECTION LIMIT {}",
        project.max_connections
    );
    if let Some(password) = password {
        // The server stores a SCRAM verifier; the plain password never reaches its logs.
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        attributes.push_str(&format!(" PASSWORD {}", quote_literal(&verifier)));
    }
    let verb = if role_exists { "ALTER" } else { "CREATE" };
    execute(
        client,
        &format!("{verb} ROLE {role} {attributes}"),
        "configuring the role",
    )
    .await?;
    println!(
        "role {role_name}: {}, connection limit {}{}",
        if verb == "CREATE" {
            "created"
        } else {
            "exists"
        },
        project.max_connections,
        if project.stopped { ", stopped" } else { "" }
    );
    let owner_name = owner_role_name(&project.database_name)?;
    revoke_owner_membership(client, role_name, &owner_name).await
}

/// The tenant must not be able to `SET ROLE` to the owner, by any grant.
async fn revoke_owner_membership(
    client: &Client,
    role: &str,
    owner: &str,
) -> Result<(), StepError> {
    if !is_member(client, role, owner).await? {
        return Ok(());
    }
    execute(
        client,
        &format!("REVOKE {} FROM {}", quote_ident(owner), quote_ident(role)),
        "revoking the owner role from the tenant",
    )
    .await?;
    if is_member(client, role, owner).await? {
        return Err(StepError::permanent(format!(
            "role {role} is still a member of {owner} through another role; revoke it by hand"
        )));
    }
    println!("role {role}: no longer a member of {owner}");
    Ok(())
}

/// Whether `role` is a member of `group`, directly or through other roles.
async fn is_member(client: &Client, role: &str, group: &str) -> Result<bool, StepError> {
    client
        .query_typed_opt(
            "select 1 where pg_has_role($1::text::name, $2::text::name, 'MEMBER')",
            &[(&role, Type::TEXT), (&group, Type::TEXT)],
        )
        .await
        .map(|row| row.is_some())
        .map_err(|e| StepError::from_db("reading the role's memberships", &e))
}

async fn ensure_database(
    client: &Client,
    names: &Names<'_>,
    provision: Provision,
) -> Result<(), StepError> {
    let name = &names.project.database_name;
    if exists(client, DATABASE_EXISTS, name).await? {
        println!("database {name}: exists");
        return Ok(());
    }
    if provision == Provision::Update {
        return Err(not_provisioned("database", name));
    }
    // CREATE DATABASE cannot run in a transaction block, so it runs alone. From
    // template0, which nobody can connect to or change (template1 may hold what a
    // tenant planted while PUBLIC could reach it), and closed until its grants are
    // capy's: converge allows connections last, so a create that fails half-way
    // leaves no database any other login may enter.
    execute(
        client,
        &format!(
            "CREATE DATABASE {} OWNER {} TEMPLATE template0 ALLOW_CONNECTIONS false",
            names.database, names.owner
        ),
        "creating the database",
    )
    .await?;
    println!("database {name}: created");
    Ok(())
}

/// Owner, limit and default timeouts: what only the owner may change. RESET ALL first:
/// a setting the tenant made while an older capy let it own the database (`role`,
/// `standard_conforming_strings`) does not outlive the move.
async fn converge_database(client: &Client, names: &Names<'_>) -> Result<(), StepError> {
    let project = names.project;
    let database = &names.database;
    execute(
        client,
        &format!(
            "ALTER DATABASE {database} OWNER TO {owner};
             ALTER DATABASE {database} RESET ALL;
             ALTER DATABASE {database} IS_TEMPLATE false;
             ALTER DATABASE {database} CONNECTION LIMIT {limit};
             ALTER DATABASE {database} SET statement_timeout = {statement};
             ALTER DATABASE {database} SET idle_in_transaction_session_timeout = {idle};",
            owner = names.owner,
            limit = project.max_connections,
            statement = quote_literal(&project.statement_timeout),
            idle = quote_literal(&project.idle_transaction_timeout),
        ),
        "configuring the database",
    )
    .await?;
    println!(
        "database {}: owned by {}, connection limit {}, statement_timeout {}, idle_in_transaction_session_timeout {}",
        project.database_name,
        names.owner_name,
        project.max_connections,
        project.statement_timeout,
        project.idle_transaction_timeout
    );
    Ok(())
}

/// Only the tenant (and the owner) may connect, and the pooler's lookup role (CONNECT
/// alone): every other grant on the database, PUBLIC's included (and any an older
/// owner-tenant made), is revoked. The login a rotation replaced keeps its grants until
/// it is retired. One transaction, so the pooler never loses CONNECT.
async fn converge_database_acl(client: &Client, names: &Names<'_>) -> Result<(), StepError> {
    let mut logins = vec![names.project.role_name.clone()];
    logins.extend(names.project.previous_role_name.clone());
    let rows = client
        .query_typed(
            "select distinct r.rolname::text
             from pg_database d,
                  aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                  left join pg_roles r on r.oid = a.grantee
             where d.datname = $1 and a.grantee <> d.datdba
               and not coalesce(r.rolname::text = any($2), false)",
            &[
                (&names.project.database_name, Type::TEXT),
                (&logins, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(|e| StepError::from_db("reading the database's grants", &e))?;
    let database = &names.database;
    let mut sql = format!("REVOKE ALL ON DATABASE {database} FROM PUBLIC;");
    for row in &rows {
        // A null name is PUBLIC (grantee 0), revoked above.
        if let Some(grantee) = row.get::<_, Option<String>>(0) {
            sql.push_str(&format!(
                "REVOKE ALL ON DATABASE {database} FROM {} CASCADE;",
                quote_ident(&grantee)
            ));
        }
    }
    sql.push_str(&format!(
        "REVOKE GRANT OPTION FOR ALL ON DATABASE {database} FROM {role} CASCADE;
         GRANT CONNECT, TEMPORARY, CREATE ON DATABASE {database} TO {role};",
        role = names.role
    ));
    if let Some(pooler) = names.pooler {
        sql.push_str(&format!(
            "GRANT CONNECT ON DATABASE {database} TO {};",
            quote_ident(pooler)
        ));
    }
    execute(client, &sql, "granting the database to the role alone").await?;
    println!(
        "database {}: CONNECT, TEMPORARY, CREATE for {} alone",
        names.project.database_name, names.project.role_name
    );
    Ok(())
}

/// Whether a database takes connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connections {
    Allowed,
    Refused,
}

/// Allows connections unless the database is over its storage limit: a database the
/// storage check refused stays refused.
async fn converge_connections(
    client: &Client,
    names: &Names<'_>,
) -> Result<Connections, StepError> {
    let project = names.project;
    let row = client
        .query_typed_one(
            "select case when $2::bigint is null then 0 else pg_database_size(datname) end,
                    datallowconn
             from pg_database where datname = $1",
            &[
                (&project.database_name, Type::TEXT),
                (&project.storage_limit_bytes, Type::INT8),
            ],
        )
        .await
        .map_err(|e| StepError::from_db("measuring the database", &e))?;
    let (size, allowed): (i64, bool) = (row.get(0), row.get(1));
    let allow = storage_allows(size, project.storage_limit_bytes);
    if allow != allowed {
        execute(
            client,
            &format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
                names.database
            ),
            "allowing or refusing connections",
        )
        .await?;
    }
    let (state, connections) = if allow {
        ("connections allowed", Connections::Allowed)
    } else {
        (
            "over its storage limit; connections stay refused",
            Connections::Refused,
        )
    };
    println!("database {}: {state}", project.database_name);
    Ok(connections)
}

/// Inside the database: the tenant owns schema `public` (if it still exists). The
/// session's search_path is pg_catalog alone, so nothing the tenant made in its
/// database (a schema named after the admin, an operator) can stand in for a catalog
/// object in what the admin runs there.
/// Answers the admin's session inside the database, for what else converge does there.
async fn converge_schema(cluster: &StepCluster, names: &Names<'_>) -> Result<Client, StepError> {
    let project = names.project;
    // Its search_path (pg_catalog, then pg_temp) is set from the session's start.
    let inside = connect_database(cluster, &project.database_name, "project's database").await?;
    let owner: Option<String> = inside
        .query_typed_opt(
            "select pg_catalog.pg_get_userbyid(nspowner)::text from pg_catalog.pg_namespace
             where nspname operator(pg_catalog.=) 'public'",
            &[],
        )
        .await
        .map_err(|e| StepError::from_db("reading schema public", &e))?
        .map(|row| row.get(0));
    match owner {
        None => println!("schema public: dropped by the tenant; nothing to own"),
        Some(owner) if owner == project.role_name => {
            println!("schema public: owned by {}", project.role_name)
        }
        // The login a rotation replaced still owns it until it is retired (its
        // successor is a member of it); the retire gives it over.
        Some(owner) if project.previous_role_name.as_ref() == Some(&owner) => {
            println!("schema public: owned by the previous login {owner}")
        }
        Some(_) => {
            execute(
                &inside,
                &format!("ALTER SCHEMA public OWNER TO {}", names.role),
                "giving schema public to the role",
            )
            .await?;
            println!("schema public: now owned by {}", project.role_name);
        }
    }
    Ok(inside)
}

async fn require_provisioned(client: &Client, project: &StepProject) -> Result<(), StepError> {
    if !exists(client, ROLE_EXISTS, &project.role_name).await? {
        return Err(not_provisioned("role", &project.role_name));
    }
    if !exists(client, DATABASE_EXISTS, &project.database_name).await? {
        return Err(not_provisioned("database", &project.database_name));
    }
    Ok(())
}

fn not_provisioned(what: &str, name: &str) -> StepError {
    StepError::permanent(format!(
        "{what} {name} does not exist: the project is not provisioned"
    ))
}
