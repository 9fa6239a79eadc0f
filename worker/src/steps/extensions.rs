//! `project.extension_enable` / `project.extension_disable` inside the project's
//! database, only for extensions the cluster offers (`pg_available_extensions`). The
//! job's args are `{"name": "<extension>", "version": "<optional>"}`.
//!
//! Who runs `CREATE EXTENSION` follows PostgreSQL's own rules ("Security Considerations
//! for Extensions"), read again here from the cluster's catalog: the step trusts no
//! value a tenant could set.
//! - A trusted extension is created as the tenant would create it: the admin session
//!   takes the project's role (`SET LOCAL ROLE`), so PostgreSQL's trusted-extension
//!   rules apply and the tenant owns the extension.
//! - An untrusted one only when the cluster's operator allows it (the allow-list the
//!   worker reads from the control database): the admin creates it in the schema
//!   [`LOCKED_SCHEMA`], which the admin owns and the tenant may only use, with no
//!   schema the tenant writes on the search_path while the extension's script runs.

use capy_shared::ident::{quote_ident, quote_literal};
use capy_shared::model::job_type;
use capy_shared::step::{StepCluster, StepInput, StepProject};
use serde_json::Value;

use super::{
    connect, connect_database, execute, exists, require_cluster, require_project, validate_names,
    StepError, DATABASE_EXISTS,
};

const INSTALLED_VERSION: &str = "select extversion from pg_extension where extname = $1";

/// Where allowed untrusted extensions go: owned by the cluster's admin, the tenant has
/// USAGE only.
pub const LOCKED_SCHEMA: &str = "extensions";

/// Where trusted extensions go unless their control file names a schema.
const TENANT_SCHEMA: &str = "public";

/// What the cluster offers for one version of an extension.
struct Offer {
    version: String,
    trusted: bool,
    /// Whether its control file says only a superuser may install it.
    superuser: bool,
    /// The schema the control file fixes, if any.
    schema: Option<String>,
    requires: Vec<String>,
}

/// Who creates (and updates) the extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Installer {
    /// The project's role, under PostgreSQL's trusted-extension rules.
    Tenant,
    /// The cluster's admin, into [`LOCKED_SCHEMA`] (an operator-allowed untrusted one).
    LockedAdmin,
}

pub async fn enable(input: &StepInput) -> Result<(), StepError> {
    let what = job_type::PROJECT_EXTENSION_ENABLE;
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_names(project)?;
    let (name, version) = parse_args(&input.job.args, what)?;

    // What the cluster offers, read from the admin's own database.
    let admin = connect(cluster).await?;
    let offer = read_offer(&admin, cluster, &name, version.as_deref()).await?;
    require_database(&admin, project, cluster).await?;
    drop(admin);
    let mut client = connect_project_database(project, cluster).await?;
    install(
        &mut client,
        cluster,
        project,
        &name,
        version.is_some(),
        &offer,
    )
    .await
}

/// Makes sure extension `name` (at `version`, else the default) is installed in the
/// database `client` (an admin session) is in, by the installer PostgreSQL's rules and
/// the operator's allow-list choose, exactly as [`enable`] would. `admin` is the
/// admin's session in its own database, which reads what the cluster offers. Used by
/// the restore steps for the extensions a backup's manifest lists.
pub async fn ensure(
    admin: &tokio_postgres::Client,
    client: &mut tokio_postgres::Client,
    cluster: &StepCluster,
    project: &StepProject,
    name: &str,
    version: Option<&str>,
) -> Result<(), StepError> {
    if !is_valid_extension_name(name) || !version.is_none_or(is_valid_version) {
        return Err(StepError::permanent(format!(
            "invalid extension name or version {name:?} {version:?}"
        )));
    }
    let offer = read_offer(admin, cluster, name, version).await?;
    install(client, cluster, project, name, version.is_some(), &offer).await
}

/// Creates the extension of `offer` (and updates it to the offered version when one
/// was asked for) in the database `client` is in.
async fn install(
    client: &mut tokio_postgres::Client,
    cluster: &StepCluster,
    project: &StepProject,
    name: &str,
    pinned: bool,
    offer: &Offer,
) -> Result<(), StepError> {
    let installer = choose_installer(offer, cluster, name)?;
    let before = installed_version(client, name).await?;
    let mut create = format!("CREATE EXTENSION IF NOT EXISTS {}", quote_ident(name));
    if pinned {
        create.push_str(&format!(" VERSION {}", quote_literal(&offer.version)));
    }
    match installer {
        Installer::Tenant => {
            if offer.schema.is_none() {
                create.push_str(&format!(" SCHEMA {}", quote_ident(TENANT_SCHEMA)));
            }
            as_tenant(client, project, &create, "creating the extension").await?;
        }
        Installer::LockedAdmin => {
            create.push_str(&format!(" SCHEMA {}", quote_ident(LOCKED_SCHEMA)));
            as_locked_admin(client, project, offer, &create).await?;
        }
    }
    match &before {
        None => println!("extension {name}: created ({})", installer.describe()),
        Some(current) => println!("extension {name}: already installed at version {current}"),
    }
    if pinned {
        update_to(client, project, offer, installer, name).await?;
    }
    let installed = installed_version(client, name).await?.ok_or_else(|| {
        StepError::permanent(format!(
            "extension {name:?} is not in pg_extension after CREATE EXTENSION"
        ))
    })?;
    println!(
        "extension {name}: version {installed} installed in database {}",
        project.database_name
    );
    Ok(())
}

impl Installer {
    fn describe(self) -> &'static str {
        match self {
            Self::Tenant => "trusted: created as the project's role, which owns it",
            Self::LockedAdmin => {
                "untrusted, allowed by the operator: created by the admin in schema extensions"
            }
        }
    }
}

/// The offer for `version` (the default version when none is asked for); a permanent
/// error when the cluster lacks the extension or that version.
async fn read_offer(
    admin: &tokio_postgres::Client,
    cluster: &StepCluster,
    name: &str,
    version: Option<&str>,
) -> Result<Offer, StepError> {
    let row = admin
        .query_opt(
            "select v.version, v.trusted, v.superuser, v.schema::text,
                    coalesce(v.requires::text[], '{}')
             from pg_available_extensions a
             join pg_available_extension_versions v on v.name = a.name
             where a.name = $1 and v.version = coalesce($2, a.default_version)",
            &[&name, &version],
        )
        .await
        .map_err(|e| StepError::from_db("reading the catalogs", &e))?;
    if let Some(row) = row {
        return Ok(Offer {
            version: row.get(0),
            trusted: row.get(1),
            superuser: row.get(2),
            schema: row.get(3),
            requires: row.get(4),
        });
    }
    if !exists(
        admin,
        "select 1 from pg_available_extensions where name = $1",
        name,
    )
    .await?
    {
        return Err(StepError::permanent(format!(
            "extension {name:?} is not available on cluster '{}' (it is not in pg_available_extensions)",
            cluster.name
        )));
    }
    let versions: Vec<String> = admin
        .query(
            "select version from pg_available_extension_versions where name = $1 order by version",
            &[&name],
        )
        .await
        .map_err(|e| StepError::from_db("reading the catalogs", &e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Err(StepError::permanent(format!(
        "version {:?} of extension {name:?} is not available on cluster '{}' (available: {})",
        version.unwrap_or_default(),
        cluster.name,
        versions.join(", ")
    )))
}

/// Trusted, or not needing a superuser at all (`superuser = false`): the tenant.
/// Otherwise the locked admin path, only when the operator's allow-list names it and
/// its control file does not fix another schema. The job's error reaches the tenant,
/// which is not told the cluster's name.
fn choose_installer(
    offer: &Offer,
    cluster: &StepCluster,
    name: &str,
) -> Result<Installer, StepError> {
    if offer.trusted || !offer.superuser {
        return Ok(Installer::Tenant);
    }
    if !cluster.allowed_extensions.iter().any(|n| n == name) {
        return Err(StepError::permanent(format!(
            "extension {name:?} (version {}) is not trusted and not on the allow-list of the project's cluster: \
             it needs a superuser to install; an operator can allow it there",
            offer.version
        )));
    }
    match &offer.schema {
        Some(schema) if schema != LOCKED_SCHEMA => Err(StepError::permanent(format!(
            "extension {name:?} must be installed in schema {schema:?} (its control file says so); \
             capy installs an untrusted extension only into the schema {LOCKED_SCHEMA:?}, which the tenant cannot write"
        ))),
        _ => Ok(Installer::LockedAdmin),
    }
}

/// Runs `sql` in one transaction as the project's role (`SET LOCAL ROLE`), so what the
/// tenant may not do, this does not do either.
async fn as_tenant(
    client: &mut tokio_postgres::Client,
    project: &StepProject,
    sql: &str,
    what: &str,
) -> Result<(), StepError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| StepError::from_db(what, &e))?;
    tx.batch_execute(&format!(
        "SET LOCAL ROLE {}; {sql}",
        quote_ident(&project.role_name)
    ))
    .await
    .map_err(|e| StepError::from_db(what, &e))?;
    tx.commit().await.map_err(|e| StepError::from_db(what, &e))
}

/// Runs `sql` (an untrusted extension's CREATE or UPDATE) as the admin in one
/// transaction: the locked schema is made (or checked to be) the admin's with USAGE
/// only for the tenant and no extension of anyone else in it, and every extension it
/// requires lives in the locked schema or `pg_catalog`, so PostgreSQL puts no schema
/// the tenant writes on the script's search_path. The session keeps
/// [`super::ADMIN_SEARCH_PATH`] throughout. The locked schema is checked again after
/// the script, before the commit: an extension the tenant put there meanwhile (its
/// transaction committed while the script ran) undoes the install. PostgreSQL holds no
/// lock the admin could take first to keep the tenant's `CREATE EXTENSION … SCHEMA`
/// out for the whole transaction.
async fn as_locked_admin(
    client: &mut tokio_postgres::Client,
    project: &StepProject,
    offer: &Offer,
    sql: &str,
) -> Result<(), StepError> {
    let what = "creating the extension in the locked schema";
    let err = |e: tokio_postgres::Error| StepError::from_db(what, &e);
    let schema = quote_ident(LOCKED_SCHEMA);
    let role = quote_ident(&project.role_name);
    let tx = client.transaction().await.map_err(err)?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema};"))
        .await
        .map_err(err)?;
    check_locked_schema(&tx, project).await?;
    check_requirements(&tx, offer).await?;
    tx.batch_execute(&format!(
        "REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
         GRANT USAGE ON SCHEMA {schema} TO {role};
         {sql};"
    ))
    .await
    .map_err(err)?;
    check_locked_schema(&tx, project).await?;
    tx.commit().await.map_err(err)
}

/// What the locked schema holds, as the admin (`session_user`) sees it.
const LOCKED_SCHEMA_STATE: &str = "select pg_get_userbyid(n.nspowner)::text,
        n.nspowner = r.oid,
        has_schema_privilege($2::name, n.oid, 'CREATE'),
        array(select e.extname::text || ' (owned by ' || pg_get_userbyid(e.extowner) || ')'
              from pg_extension e
              where e.extnamespace = n.oid and e.extowner <> r.oid
              order by e.extname)
     from pg_namespace n, pg_roles r
     where n.nspname = $1 and r.rolname = session_user";

/// The locked schema must be the admin's own, the tenant must not create in it, and
/// every extension in it must be the admin's: a schema of that name the tenant made
/// first is refused, never adopted, and so is one where the tenant put a trusted
/// extension of its choosing (`CREATE EXTENSION … SCHEMA extensions` needs no CREATE
/// on the schema).
async fn check_locked_schema(
    tx: &tokio_postgres::Transaction<'_>,
    project: &StepProject,
) -> Result<(), StepError> {
    let row = tx
        .query_one(LOCKED_SCHEMA_STATE, &[&LOCKED_SCHEMA, &project.role_name])
        .await
        .map_err(|e| StepError::from_db("reading the locked schema", &e))?;
    let (owner, admin_owns, tenant_creates, foreign): (String, bool, bool, Vec<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let database = &project.database_name;
    if !admin_owns {
        return Err(StepError::permanent(format!(
            "schema {LOCKED_SCHEMA:?} in database {database} is owned by {owner:?}, not the cluster's admin: \
             an untrusted extension goes only into a schema the tenant cannot write (drop or rename that schema)"
        )));
    }
    if tenant_creates {
        return Err(StepError::permanent(format!(
            "the project's role may create objects in schema {LOCKED_SCHEMA:?} of database {database}: \
             revoke CREATE on it before an untrusted extension goes there"
        )));
    }
    if !foreign.is_empty() {
        return Err(StepError::permanent(format!(
            "schema {LOCKED_SCHEMA:?} in database {database} holds extensions the cluster's admin did not install: {}; \
             the admin installs nothing next to them (disable them first)",
            foreign.join(", ")
        )));
    }
    Ok(())
}

/// PostgreSQL puts the schemas of required extensions on the script's search_path:
/// each must be installed already, in the locked schema (whose extensions
/// [`check_locked_schema`] found to be the admin's) or in `pg_catalog`. Whether the
/// tenant can create in a schema right now is not enough: a schema it owns it can
/// fill first and close after.
async fn check_requirements(
    tx: &tokio_postgres::Transaction<'_>,
    offer: &Offer,
) -> Result<(), StepError> {
    for required in &offer.requires {
        let schema: Option<String> = tx
            .query_opt(
                "select n.nspname::text
                 from pg_extension e join pg_namespace n on n.oid = e.extnamespace
                 where e.extname = $1",
                &[required],
            )
            .await
            .map_err(|e| StepError::from_db("reading the required extensions", &e))?
            .map(|row| row.get(0));
        match schema.as_deref() {
            None => {
                return Err(StepError::permanent(format!(
                    "it requires extension {required:?}: enable that first"
                )))
            }
            Some(LOCKED_SCHEMA | "pg_catalog") => {}
            Some(schema) => {
                return Err(StepError::permanent(format!(
                    "it requires extension {required:?}, installed in schema {schema:?}: the admin runs an \
                     extension script only with schema {LOCKED_SCHEMA:?} or pg_catalog on its search_path, \
                     never a schema the tenant owns or writes"
                )))
            }
        }
    }
    Ok(())
}

/// `ALTER EXTENSION … UPDATE TO` the offered version, by the same installer.
async fn update_to(
    client: &mut tokio_postgres::Client,
    project: &StepProject,
    offer: &Offer,
    installer: Installer,
    name: &str,
) -> Result<(), StepError> {
    let current = installed_version(client, name).await?;
    if current.as_deref() == Some(offer.version.as_str()) {
        return Ok(());
    }
    let update = format!(
        "ALTER EXTENSION {} UPDATE TO {}",
        quote_ident(name),
        quote_literal(&offer.version)
    );
    match installer {
        Installer::Tenant => as_tenant(client, project, &update, "updating the extension").await?,
        Installer::LockedAdmin => {
            require_in_locked_schema(client, name).await?;
            as_locked_admin(client, project, offer, &update).await?;
        }
    }
    println!(
        "extension {name}: updated from version {} to {}",
        current.as_deref().unwrap_or("?"),
        offer.version
    );
    Ok(())
}

/// An untrusted extension installed elsewhere (before capy locked them away) is not
/// updated by the admin in place.
async fn require_in_locked_schema(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<(), StepError> {
    let schema: Option<String> = client
        .query_opt(
            "select n.nspname::text from pg_extension e
             join pg_namespace n on n.oid = e.extnamespace where e.extname = $1",
            &[&name],
        )
        .await
        .map_err(|e| StepError::from_db("reading pg_extension", &e))?
        .map(|row| row.get(0));
    match schema {
        Some(schema) if schema != LOCKED_SCHEMA => Err(StepError::permanent(format!(
            "extension {name:?} is installed in schema {schema:?}, not {LOCKED_SCHEMA:?}: \
             the admin does not update an untrusted extension there; disable and enable it again"
        ))),
        _ => Ok(()),
    }
}

pub async fn disable(input: &StepInput) -> Result<(), StepError> {
    let what = job_type::PROJECT_EXTENSION_DISABLE;
    let project = require_project(input, what)?;
    let cluster = require_cluster(input, what)?;
    validate_names(project)?;
    let (name, _) = parse_args(&input.job.args, what)?;

    let admin = connect(cluster).await?;
    require_database(&admin, project, cluster).await?;
    drop(admin);

    let mut client = connect_project_database(project, cluster).await?;
    let Some((version, owner)) = installed_owner(&client, &name).await? else {
        println!(
            "extension {name}: not installed in database {}",
            project.database_name
        );
        return Ok(());
    };
    // No CASCADE: when objects depend on the extension, PostgreSQL's refusal (SQLSTATE
    // 2BP01) is the permanent failure the caller sees.
    let drop = format!("DROP EXTENSION IF EXISTS {}", quote_ident(&name));
    if owner == project.role_name {
        as_tenant(&mut client, project, &drop, "dropping the extension").await?;
    } else {
        // Installed by the admin (an allowed untrusted one, or before capy installed
        // trusted ones as the tenant); dropping runs no extension script.
        execute(&client, &drop, "dropping the extension").await?;
    }
    println!(
        "extension {name}: version {version} dropped from database {} (it was owned by {owner})",
        project.database_name
    );
    Ok(())
}

/// The installed version and the extension's owner, if it is installed.
async fn installed_owner(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<Option<(String, String)>, StepError> {
    client
        .query_opt(
            "select extversion, pg_get_userbyid(extowner)::text from pg_extension where extname = $1",
            &[&name],
        )
        .await
        .map(|row| row.map(|row| (row.get(0), row.get(1))))
        .map_err(|e| StepError::from_db("reading pg_extension", &e))
}

/// `name` (required) and `version` (optional) from the job's args, validated.
fn parse_args(args: &Value, what: &str) -> Result<(String, Option<String>), StepError> {
    let name = match args.get("name") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => {
            return Err(StepError::permanent(format!(
                "{what}: args.name is not a string"
            )))
        }
        None => {
            return Err(StepError::permanent(format!(
                "{what} needs args.name, the extension"
            )))
        }
    };
    if !is_valid_extension_name(&name) {
        return Err(StepError::permanent(format!(
            "invalid extension name {name:?}: 1 to 63 characters of a-z, 0-9, '_' and '-'"
        )));
    }
    let version = match args.get("version") {
        None | Some(Value::Null) => None,
        Some(Value::String(version)) if is_valid_version(version) => Some(version.clone()),
        Some(other) => {
            return Err(StepError::permanent(format!(
                "invalid extension version {other}: 1 to 63 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
            )))
        }
    };
    Ok((name, version))
}

/// Extension names are wider than capy's identifiers (`uuid-ossp`), and always quoted.
fn is_valid_extension_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

fn is_valid_version(version: &str) -> bool {
    (1..=63).contains(&version.len())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn require_database(
    admin: &tokio_postgres::Client,
    project: &StepProject,
    cluster: &StepCluster,
) -> Result<(), StepError> {
    if exists(admin, DATABASE_EXISTS, &project.database_name).await? {
        Ok(())
    } else {
        Err(StepError::permanent(format!(
            "database {} does not exist on cluster '{}': the project is not provisioned",
            project.database_name, cluster.name
        )))
    }
}

async fn connect_project_database(
    project: &StepProject,
    cluster: &StepCluster,
) -> Result<tokio_postgres::Client, StepError> {
    connect_database(
        cluster,
        &project.database_name,
        &format!(
            "database {} of cluster '{}'",
            project.database_name, cluster.name
        ),
    )
    .await
}

async fn installed_version(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<Option<String>, StepError> {
    client
        .query_opt(INSTALLED_VERSION, &[&name])
        .await
        .map(|row| row.map(|row| row.get(0)))
        .map_err(|e| StepError::from_db("reading pg_extension", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions() {
        assert!(is_valid_extension_name("uuid-ossp"));
        assert!(is_valid_extension_name("pg_trgm"));
        assert!(!is_valid_extension_name(""));
        assert!(!is_valid_extension_name("Pgcrypto"));
        assert!(!is_valid_extension_name("x\"; drop"));
        assert!(!is_valid_extension_name(&"a".repeat(64)));
        assert!(is_valid_version("1.3"));
        assert!(is_valid_version("3.4.0-beta1"));
        assert!(!is_valid_version("1.3'"));
        assert!(!is_valid_version(""));
    }

    fn offer(trusted: bool, schema: Option<&str>) -> Offer {
        Offer {
            version: "1.0".into(),
            trusted,
            superuser: true,
            schema: schema.map(str::to_string),
            requires: Vec::new(),
        }
    }

    #[test]
    fn installers() {
        let mut cluster = StepCluster {
            id: uuid::Uuid::nil(),
            name: "c".into(),
            admin_url: String::new(),
            ca_pem: None,
            allowed_extensions: Vec::new(),
            pooler_auth_user: None,
            engine: Default::default(),
        };
        let choose = |offer: &Offer, cluster: &StepCluster| {
            choose_installer(offer, cluster, "file_fdw").map_err(|e| (e.transient, e.message))
        };
        assert_eq!(choose(&offer(true, None), &cluster), Ok(Installer::Tenant));
        // `superuser = false` in the control file: any role with CREATE may install it.
        let plain = Offer {
            superuser: false,
            ..offer(false, None)
        };
        assert_eq!(choose(&plain, &cluster), Ok(Installer::Tenant));
        let refused = choose(&offer(false, None), &cluster).unwrap_err();
        assert!(
            !refused.0 && refused.1.contains("not on the allow-list"),
            "{refused:?}"
        );
        cluster.allowed_extensions = vec!["file_fdw".into()];
        assert_eq!(
            choose(&offer(false, None), &cluster),
            Ok(Installer::LockedAdmin)
        );
        assert_eq!(
            choose(&offer(false, Some(LOCKED_SCHEMA)), &cluster),
            Ok(Installer::LockedAdmin)
        );
        let fixed = choose(&offer(false, Some("public")), &cluster).unwrap_err();
        assert!(
            !fixed.0 && fixed.1.contains("must be installed in schema"),
            "{fixed:?}"
        );
    }

    #[test]
    fn args() {
        let what = "project.extension_enable";
        let (name, version) = parse_args(
            &serde_json::json!({"name": "pgcrypto", "version": null}),
            what,
        )
        .unwrap();
        assert_eq!((name.as_str(), version), ("pgcrypto", None));
        let (_, version) = parse_args(
            &serde_json::json!({"name": "pgcrypto", "version": "1.3"}),
            what,
        )
        .unwrap();
        assert_eq!(version.as_deref(), Some("1.3"));
        assert!(parse_args(&serde_json::json!({}), what).is_err());
        assert!(parse_args(&serde_json::json!({"name": 3}), what).is_err());
        assert!(parse_args(&serde_json::json!({"name": "a", "version": 1}), what).is_err());
    }
}
