//! mysql: connecting as a MySQL or MariaDB cluster's admin, and checking what the admin
//! may do. The admin URL is never put in an error or a log line: it holds a password.

use std::str::FromStr as _;
use std::time::{Duration, Instant};

use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError};
use sqlx::{Connection as _, MySqlConnection, Row as _};

use super::EngineAccess;

/// How long connecting and logging in may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// MySQL's error for a refused login (wrong user or password).
pub const ER_ACCESS_DENIED: u16 = 1045;

/// Why connecting failed: `kind` as in [`EngineAccess::error_kind`], and a message
/// without the URL or its password.
#[derive(Debug, Clone)]
pub struct ConnectError {
    pub kind: &'static str,
    pub message: String,
    /// The server's error number, when the server refused.
    pub number: Option<u16>,
}

impl ConnectError {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            number: None,
        }
    }

    /// Whether trying again later may succeed: a server down, unreachable or slow.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            "connection_refused" | "timeout" | "host_not_found" | "other"
        )
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConnectError {}

/// The connect options of `admin_url` (`mysql://` or `mariadb://`, options such as
/// `ssl-mode` kept). The error names no part of the URL.
pub fn admin_options(admin_url: &str) -> Result<MySqlConnectOptions, ConnectError> {
    let invalid = |what: &str| ConnectError::new("invalid_url", format!("the admin URL {what}"));
    let mut url = url::Url::parse(admin_url).map_err(|_| invalid("is not a URL"))?;
    match url.scheme() {
        "mysql" => {}
        "mariadb" => url
            .set_scheme("mysql")
            .map_err(|()| invalid("cannot be read as a mysql:// URL"))?,
        _ => return Err(invalid("must start with mysql:// or mariadb://")),
    }
    MySqlConnectOptions::from_str(url.as_str())
        .map_err(|_| invalid("has an option sqlx cannot read (check ssl-mode and the port)"))
}

/// Connects as the admin of `admin_url` within [`CONNECT_TIMEOUT`].
pub async fn connect_admin(admin_url: &str) -> Result<MySqlConnection, ConnectError> {
    connect(&admin_options(admin_url)?).await
}

/// Connects with `options` within [`CONNECT_TIMEOUT`], naming the cause of a failure.
pub async fn connect(options: &MySqlConnectOptions) -> Result<MySqlConnection, ConnectError> {
    let target = format!("{}:{}", options.get_host(), options.get_port());
    match tokio::time::timeout(CONNECT_TIMEOUT, MySqlConnection::connect_with(options)).await {
        Err(_) => Err(ConnectError::new(
            "timeout",
            format!("timed out connecting to {target}"),
        )),
        Ok(Err(error)) => Err(classify(&error, &target)),
        Ok(Ok(connection)) => Ok(connection),
    }
}

/// The MySQL error number of a server error, if `error` is one.
pub fn error_number(error: &sqlx::Error) -> Option<u16> {
    error
        .as_database_error()
        .and_then(|db| db.try_downcast_ref::<MySqlDatabaseError>())
        .map(MySqlDatabaseError::number)
}

/// Names the cause: a wrong password, an unknown host, a closed port.
fn classify(error: &sqlx::Error, target: &str) -> ConnectError {
    if let Some(db) = error.as_database_error() {
        let number = error_number(error).unwrap_or_default();
        let kind = match number {
            ER_ACCESS_DENIED => "authentication_failed",
            1049 => "database_not_found",
            _ => "other",
        };
        return ConnectError {
            number: Some(number),
            ..ConnectError::new(kind, format!("{} (error {number})", db.message()))
        };
    }
    match error {
        sqlx::Error::Io(io) => classify_io(io, target),
        sqlx::Error::Tls(tls) => {
            ConnectError::new("other", format!("TLS with {target} failed: {tls}"))
        }
        other => ConnectError::new("other", format!("could not connect to {target}: {other}")),
    }
}

fn classify_io(io: &std::io::Error, target: &str) -> ConnectError {
    let text = io.to_string();
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => ConnectError::new(
            "connection_refused",
            format!("connection refused by {target}: is the port right and the server up?"),
        ),
        std::io::ErrorKind::TimedOut => {
            ConnectError::new("timeout", format!("timed out connecting to {target}"))
        }
        _ if text.contains("lookup") || text.contains("resolve") || text.contains("known") => {
            ConnectError::new(
                "host_not_found",
                format!("the host of {target} could not be resolved"),
            )
        }
        _ => ConnectError::new("other", format!("could not connect to {target}: {text}")),
    }
}

/// Checks `admin_url` (never printed) and reports what the admin may do.
pub async fn check_access(admin_url: &str) -> EngineAccess {
    let started = Instant::now();
    let mut report = match read_access(admin_url).await {
        Ok(report) => report,
        Err(error) => EngineAccess {
            reachable: !matches!(
                error.kind,
                "connection_refused" | "timeout" | "host_not_found" | "invalid_url"
            ),
            error_kind: Some(error.kind.to_string()),
            error: Some(error.message),
            ..EngineAccess::default()
        },
    };
    report.latency_ms = (started.elapsed().as_secs_f64() * 1e5).round() / 100.0;
    report
}

async fn read_access(admin_url: &str) -> Result<EngineAccess, ConnectError> {
    let mut connection = connect_admin(admin_url).await?;
    let failed = |what: &str, e: sqlx::Error| ConnectError::new("other", format!("{what}: {e}"));
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&mut connection)
        .await
        .map_err(|e| failed("reading the server's version", e))?;
    let cipher: Option<String> = sqlx::query("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_optional(&mut connection)
        .await
        .map_err(|e| failed("reading the session's TLS state", e))?
        .and_then(|row| row.try_get::<String, _>(1).ok());
    let privileges = global_privileges(&mut connection)
        .await
        .map_err(|e| failed("reading the admin's privileges", e))?;
    let _ = connection.close().await;
    let has = |name: &str| privileges.iter().any(|(p, _)| p == name);
    let grantable = privileges.iter().any(|(_, grantable)| *grantable);
    Ok(EngineAccess {
        reachable: true,
        server_version: Some(version),
        can_create_roles: has("CREATE USER") && grantable,
        can_create_databases: has("CREATE"),
        tls: cipher.is_some_and(|c| !c.is_empty()),
        ..EngineAccess::default()
    })
}

/// The admin's global privileges (on `*.*`) and whether it may grant them, from
/// `information_schema.USER_PRIVILEGES` (privileges held through roles are not seen).
async fn global_privileges(
    connection: &mut MySqlConnection,
) -> Result<Vec<(String, bool)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.USER_PRIVILEGES \
         WHERE GRANTEE = CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), \
         '''@''', SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')",
    )
    .fetch_all(connection)
    .await?;
    rows.iter()
        .map(|row| {
            let privilege: String = row.try_get(0)?;
            let grantable: String = row.try_get(1)?;
            Ok((privilege, grantable == "YES"))
        })
        .collect()
}
