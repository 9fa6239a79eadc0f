//! `capy-api bootstrap`: the first admin key, organization, key and cluster of a new
//! installation, written to an env file; a second run reuses what is still live.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context as _;
use capy_shared::crypto::SecretBox;
use capy_shared::redact;
use sqlx::PgPool;

use crate::admin::{self, ClusterSpec, KeyGrant};
use crate::config::BootstrapArgs;

pub async fn run(pool: &PgPool, args: &BootstrapArgs) -> anyhow::Result<()> {
    let secrets = SecretBox::from_key_text(&args.secret_key)?;
    let existing = read_env_file(&args.env_file);

    let admin_key = match existing.get("CAPY_ADMIN_KEY") {
        Some(key) if admin::api_key_is_live(pool, key).await? => key.clone(),
        _ => {
            let grant = KeyGrant {
                name: "bootstrap admin".into(),
                is_admin: true,
                ..KeyGrant::default()
            };
            admin::create_api_key(pool, &grant).await?.1
        }
    };
    let api_key = match existing.get("CAPY_API_KEY") {
        Some(key) if admin::api_key_is_live(pool, key).await? => key.clone(),
        _ => {
            let organization_id = admin::create_organization(pool, &args.organization).await?;
            let grant = KeyGrant {
                name: "bootstrap".into(),
                organization_id: Some(organization_id),
                ..KeyGrant::default()
            };
            admin::create_api_key(pool, &grant).await?.1
        }
    };

    let url = url::Url::parse(&args.cluster_url).context("the cluster URL is not a URL")?;
    let ca_pem = match &args.cluster_ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading the cluster's CA file {}", path.display()))?;
            capy_shared::tls::parse_ca_pem(&pem)
                .with_context(|| format!("the cluster's CA file {}", path.display()))?;
            Some(pem)
        }
        None => None,
    };
    if let Some(host) = &args.cluster_pooled_host {
        anyhow::ensure!(
            url::Url::parse(&format!("postgresql://{host}:5432/d")).is_ok(),
            "CAPY_BOOTSTRAP_CLUSTER_POOLED_HOST must be a host name or IP address (IPv6 in brackets)"
        );
    }
    if let Some(role) = &args.cluster_pooler_auth_user {
        anyhow::ensure!(
            admin::is_valid_pooler_auth_user(role),
            "CAPY_BOOTSTRAP_CLUSTER_POOLER_AUTH_USER {}",
            admin::POOLER_AUTH_USER_RULE
        );
    }
    let port = i32::from(url.port().unwrap_or(5432));
    let cluster_id = admin::upsert_cluster(
        pool,
        &secrets,
        &ClusterSpec {
            engine: capy_shared::model::Engine::Postgresql,
            name: args.cluster_name.clone(),
            region: args.cluster_region.clone(),
            admin_url: args.cluster_url.clone(),
            public_host: url.host_str().unwrap_or("127.0.0.1").to_string(),
            direct_port: port,
            pooled_port: args.cluster_pooled_port.unwrap_or(port),
            pooled_host: args.cluster_pooled_host.clone(),
            pooler_auth_user: args.cluster_pooler_auth_user.clone(),
            ssl_mode: args.cluster_ssl_mode.clone(),
            ca_pem: ca_pem.clone(),
            max_projects: None,
        },
    )
    .await?;
    // As registering through the API does: the access check, which also closes PUBLIC's
    // CONNECT on the databases capy does not manage.
    let access = crate::cluster_access::check_and_record(
        pool,
        cluster_id,
        &args.cluster_url,
        ca_pem.as_deref(),
    )
    .await?;
    tracing::info!(
        reachable = access.reachable,
        tls = access.tls,
        tls_verified = ?access.tls_verified,
        error_kind = ?access.error_kind,
        public_connect_closed = ?access.public_connect_closed,
        public_connect_open = ?access.public_connect_open,
        "cluster access checked"
    );

    let contents = format!(
        "CAPY_API_URL={}\nCAPY_ADMIN_KEY={admin_key}\nCAPY_API_KEY={api_key}\n",
        args.api_url
    );
    write_private(&args.env_file, &contents)?;
    tracing::info!(
        cluster = args.cluster_name,
        cluster_url = redact::redact_url(&args.cluster_url),
        env_file = %args.env_file.display(),
        "bootstrap done"
    );
    Ok(())
}

fn read_env_file(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Writes a file only its owner can read (it holds keys).
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}
