//! redis: connecting as a cluster's admin (the worker's steps reuse it) and the admin
//! access check. capy needs Redis 7.0 or newer (atomic `ACL SETUSER`, channel rules,
//! `ACL DRYRUN`, scripts checked against the caller's key rules).
//!
//! Neither the admin URL nor a password ever reaches an error message: messages name
//! only `host:port` and the server's or the OS's own words.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, ErrorKind, RedisError};

use super::EngineAccess;

/// How long connecting (TCP and `AUTH`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one command may take (a `SCAN` or `UNLINK` batch is far quicker).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection or a command failed, without secrets.
#[derive(Debug, Clone)]
pub struct RedisFailure {
    /// `authentication_failed`, `host_not_found`, `connection_refused`, `timeout`,
    /// `invalid_url` or `other`, as [`EngineAccess::error_kind`].
    pub kind: &'static str,
    pub message: String,
    /// Whether a retry may succeed (the network, a server loading or busy).
    pub transient: bool,
}

/// An admin session, and where it goes (without credentials): projects' users connect
/// to the same address.
pub struct AdminConnection {
    pub connection: MultiplexedConnection,
    pub address: ConnectionAddr,
    /// The admin's ACL user (`default` when the URL names none).
    pub user: String,
}

impl AdminConnection {
    /// `host:port`, for messages.
    pub fn target(&self) -> String {
        describe(&self.address)
    }
}

/// Connects as the admin of `admin_url` (`redis://user:pw@host:port`), in logical
/// database 0 whatever the URL says: projects' users cannot `SELECT`, so their keys
/// are always in database 0, and a delete must look there.
pub async fn connect_admin(admin_url: &str) -> Result<AdminConnection, RedisFailure> {
    let mut info = parse_url(admin_url)?;
    info.redis.db = 0;
    let user = info
        .redis
        .username
        .clone()
        .unwrap_or_else(|| "default".into());
    let address = info.addr.clone();
    let connection = connect(info).await?;
    Ok(AdminConnection {
        connection,
        address,
        user,
    })
}

/// Connects to `address` as ACL user `user` with `password`, in database 0.
pub async fn connect_as(
    address: &ConnectionAddr,
    user: &str,
    password: &str,
) -> Result<MultiplexedConnection, RedisFailure> {
    let info = ConnectionInfo {
        addr: address.clone(),
        redis: redis::RedisConnectionInfo {
            db: 0,
            username: Some(user.to_string()),
            password: Some(password.to_string()),
            ..Default::default()
        },
    };
    connect(info).await
}

fn parse_url(admin_url: &str) -> Result<ConnectionInfo, RedisFailure> {
    let invalid = |message: &str| RedisFailure {
        kind: "invalid_url",
        message: message.to_string(),
        transient: false,
    };
    let url = url::Url::parse(admin_url).map_err(|_| invalid("the admin URL is not a URL"))?;
    match url.scheme() {
        "redis" => {}
        // The workspace builds the redis crate without TLS.
        "rediss" => return Err(invalid("rediss:// (TLS) is not supported yet")),
        _ => return Err(invalid("the admin URL must start with redis://")),
    }
    redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
        invalid(&format!(
            "the admin URL is not a Redis URL ({})",
            e.category()
        ))
    })
}

async fn connect(info: ConnectionInfo) -> Result<MultiplexedConnection, RedisFailure> {
    let target = describe(&info.addr);
    let password = info.redis.password.clone();
    let client = redis::Client::open(info).map_err(|e| classify(&e, &target))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| {
            let mut failure = classify(&e, &target);
            // Belt and braces: no error text of the crate or server should hold it.
            if let Some(password) = password.as_deref().filter(|p| !p.is_empty()) {
                failure.message = failure.message.replace(password, "[redacted]");
            }
            failure
        })
}

fn describe(address: &ConnectionAddr) -> String {
    match address {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "the server".into(),
    }
}

/// Names the cause of `error` on `target` (`host:port`).
pub fn classify(error: &RedisError, target: &str) -> RedisFailure {
    let failure = |kind, message: String, transient| RedisFailure {
        kind,
        message,
        transient,
    };
    if error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("WRONGPASS" | "NOAUTH"))
    {
        let message = format!(
            "authentication failed on {target}: wrong user or password, or the user is disabled"
        );
        return failure("authentication_failed", message, false);
    }
    if error.is_connection_refusal() {
        let message =
            format!("connection refused by {target}: is the port right and the server up?");
        return failure("connection_refused", message, true);
    }
    if error.is_timeout() {
        return failure("timeout", format!("timed out talking to {target}"), true);
    }
    let text = error.to_string();
    if error.is_io_error() && (text.contains("lookup") || text.contains("resolve")) {
        let message = format!("the host of {target} could not be resolved");
        return failure("host_not_found", message, true);
    }
    failure("other", format!("{target}: {text}"), is_transient(error))
}

/// Whether a retry may succeed: the network, a server loading its data or busy with a
/// script, a failover in progress.
pub fn is_transient(error: &RedisError) -> bool {
    error.is_io_error()
        || error.kind() == ErrorKind::BusyLoadingError
        || matches!(
            error.code(),
            Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "READONLY")
        )
}

/// The server's version (`redis_version` of `INFO server`).
pub async fn server_version(connection: &mut MultiplexedConnection) -> Result<String, RedisError> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(connection)
        .await?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_string())
}

/// Whether `version` (`7.0.15`) is 7.0 or newer.
pub fn is_supported_version(version: &str) -> bool {
    version
        .split('.')
        .next()
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major >= 7)
}

/// The commands capy's steps run as the admin, each checked with `ACL DRYRUN` (keys
/// included: `SCAN` and `UNLINK` must reach every project's prefix).
const STEP_COMMANDS: [&[&str]; 5] = [
    &["ACL", "SETUSER", "capy_access_check", "off"],
    &["ACL", "DELUSER", "capy_access_check"],
    &["CLIENT", "KILL", "USER", "capy_access_check"],
    &["SCAN", "0", "MATCH", "p:*", "COUNT", "1000"],
    &["UNLINK", "p:00000000-0000-0000-0000-000000000000:x"],
];

/// Whether `user` may run every command of [`STEP_COMMANDS`]. `ACL DRYRUN` answers
/// `OK` or a sentence saying why not; an admin that may not run `ACL DRYRUN` itself
/// cannot `ACL SETUSER` either (both are `@admin @dangerous`).
async fn may_run_steps(connection: &mut MultiplexedConnection, user: &str) -> bool {
    for command in STEP_COMMANDS {
        let answer: Result<String, RedisError> = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg(user)
            .arg(command)
            .query_async(connection)
            .await;
        if !matches!(answer.as_deref(), Ok("OK")) {
            return false;
        }
    }
    true
}

/// Checks `admin_url` (never printed) and reports what the admin may do.
pub async fn check_access(admin_url: &str) -> EngineAccess {
    let started = Instant::now();
    let elapsed_ms = || started.elapsed().as_secs_f64() * 1000.0;
    let mut admin = match connect_admin(admin_url).await {
        Ok(admin) => admin,
        Err(failure) => {
            return EngineAccess {
                // The server answered: it refused the credentials.
                reachable: failure.kind == "authentication_failed",
                latency_ms: elapsed_ms(),
                error_kind: Some(failure.kind.into()),
                error: Some(failure.message),
                ..EngineAccess::default()
            };
        }
    };
    let version = server_version(&mut admin.connection).await.ok();
    let can_create_roles = may_run_steps(&mut admin.connection, &admin.user).await;
    let mut access = EngineAccess {
        reachable: true,
        server_version: version.clone(),
        can_create_roles,
        can_create_databases: false,
        latency_ms: elapsed_ms(),
        tls: false,
        ..EngineAccess::default()
    };
    if let Some(version) = version.filter(|v| !is_supported_version(v)) {
        access.error_kind = Some("other".into());
        access.error = Some(format!(
            "capy needs Redis 7.0 or newer; {} runs {version}",
            admin.target()
        ));
    }
    access
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(is_supported_version("7.0.15"));
        assert!(is_supported_version("7.2.4"));
        assert!(is_supported_version("8.0.0"));
        assert!(!is_supported_version("6.2.14"));
        assert!(!is_supported_version("unknown"));
    }

    #[tokio::test]
    async fn bad_urls_name_no_secret() {
        for url in [
            "not a url",
            "http://u:secretpw@h:1",
            "rediss://u:secretpw@h:1",
        ] {
            let failure = connect_admin(url).await.err().unwrap();
            assert_eq!(failure.kind, "invalid_url");
            assert!(!failure.message.contains("secretpw"), "{}", failure.message);
        }
    }
}
