//! The backup store: where backups and exports are kept, through `object_store`. A
//! local folder (`file:///var/lib/capy/backups`) or S3-compatible object storage
//! (`s3://bucket/prefix`, with an endpoint, a region and credentials). The API (signed
//! downloads) and the workers (which hand it to the backup steps) read the same
//! settings. Credentials never appear in logs, answers or step output.

use std::os::unix::fs::DirBuilderExt as _;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::Signer as _;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where backups go, as configured (flags or environment).
#[derive(Clone, Default, Serialize, Deserialize, clap::Args)]
pub struct StoreConfig {
    /// The backup store: `file:///absolute/folder` or `s3://bucket/optional/prefix`.
    /// Unset: backups, exports and restores are refused.
    #[arg(long = "backup-store", env = "CAPY_BACKUP_STORE")]
    pub url: Option<String>,
    /// An S3-compatible endpoint (e.g. `http://127.0.0.1:9000`); unset: AWS.
    #[arg(long = "backup-s3-endpoint", env = "CAPY_BACKUP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(
        long = "backup-s3-region",
        env = "CAPY_BACKUP_S3_REGION",
        default_value = "us-east-1"
    )]
    pub s3_region: String,
    #[arg(
        long = "backup-s3-access-key-id",
        env = "AWS_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    pub s3_access_key_id: Option<String>,
    #[arg(
        long = "backup-s3-secret-access-key",
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub s3_secret_access_key: Option<String>,
    #[arg(
        long = "backup-s3-session-token",
        env = "AWS_SESSION_TOKEN",
        hide_env_values = true
    )]
    pub s3_session_token: Option<String>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .finish_non_exhaustive()
    }
}

impl StoreConfig {
    /// The credentials in this configuration, for scrubbing output (the access key id
    /// too: S3 error bodies name it).
    pub fn secrets(&self) -> Vec<String> {
        [
            &self.s3_access_key_id,
            &self.s3_secret_access_key,
            &self.s3_session_token,
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no backup store is configured (CAPY_BACKUP_STORE)")]
    NotConfigured,
    #[error("the backup store URL must be file:///absolute/folder or s3://bucket/prefix")]
    BadUrl,
    #[error("the backup store: {0}")]
    ObjectStore(#[from] object_store::Error),
}

/// An open backup store.
#[derive(Clone, Debug)]
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    /// The same store when it is S3, which can sign URLs.
    s3: Option<Arc<AmazonS3>>,
    /// Every key lives under it (an S3 URL's path; empty for a folder).
    prefix: String,
}

impl BackupStore {
    /// Opens the configured store; a local folder is created when missing.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let url = config.url.as_deref().ok_or(StoreError::NotConfigured)?;
        let parsed = url::Url::parse(url).map_err(|_| StoreError::BadUrl)?;
        match parsed.scheme() {
            "file" => {
                let folder = parsed.to_file_path().map_err(|()| StoreError::BadUrl)?;
                // Only the user capy runs as reads the tenants' archives.
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&folder)
                    .map_err(|e| {
                        StoreError::ObjectStore(object_store::Error::Generic {
                            store: "LocalFileSystem",
                            source: Box::new(e),
                        })
                    })?;
                let store = LocalFileSystem::new_with_prefix(folder)?;
                Ok(Self {
                    store: Arc::new(store),
                    s3: None,
                    prefix: String::new(),
                })
            }
            "s3" => {
                let bucket = parsed.host_str().ok_or(StoreError::BadUrl)?;
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(&config.s3_region);
                if let Some(endpoint) = &config.s3_endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                if let Some(key) = &config.s3_access_key_id {
                    builder = builder.with_access_key_id(key);
                }
                if let Some(secret) = &config.s3_secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                if let Some(token) = &config.s3_session_token {
                    builder = builder.with_token(token);
                }
                let s3 = Arc::new(builder.build()?);
                Ok(Self {
                    store: s3.clone(),
                    s3: Some(s3),
                    prefix: parsed.path().trim_matches('/').to_string(),
                })
            }
            _ => Err(StoreError::BadUrl),
        }
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object path of `key` (a key from [`archive_key`]) in this store.
    pub fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Whether downloads are signed by the store itself (S3 presigned URLs); else the
    /// API serves them on its own signed route.
    pub fn signs_urls(&self) -> bool {
        self.s3.is_some()
    }

    /// A URL that downloads `key` for `expires_in`, signed by S3; `None` for a folder.
    pub async fn signed_url(
        &self,
        key: &str,
        expires_in: Duration,
    ) -> Result<Option<url::Url>, StoreError> {
        let Some(s3) = &self.s3 else {
            return Ok(None);
        };
        let url = s3
            .signed_url(http::Method::GET, &self.path(key), expires_in)
            .await?;
        Ok(Some(url))
    }
}

/// The key of an archive: one per project and backup, so no two backups share an
/// object and a project's archives are found under one prefix.
pub fn archive_key(project_id: Uuid, backup_id: Uuid) -> String {
    format!("projects/{project_id}/backups/{backup_id}.dump")
}

/// The key of an archive's manifest (tables and row counts), beside it.
pub fn manifest_key(archive_key: &str) -> String {
    format!("{archive_key}.manifest.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_live_under_the_prefix() {
        let config = StoreConfig {
            url: Some("s3://bucket/some/prefix/".into()),
            s3_endpoint: Some("http://127.0.0.1:1".into()),
            s3_access_key_id: Some("id".into()),
            s3_secret_access_key: Some("secret".into()),
            ..StoreConfig::default()
        };
        let store = BackupStore::open(&config).unwrap();
        assert_eq!(store.path("a/b.dump").as_ref(), "some/prefix/a/b.dump");
        assert!(store.signs_urls());
        assert!(!format!("{config:?}").contains("secret"));
        assert_eq!(
            config.secrets(),
            vec!["id".to_string(), "secret".to_string()]
        );
    }

    #[test]
    fn a_folder_store_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let folder = std::env::temp_dir().join(format!("capy-store-{}", Uuid::new_v4()));
        let config = StoreConfig {
            url: Some(format!("file://{}/inner", folder.display())),
            ..StoreConfig::default()
        };
        BackupStore::open(&config).unwrap();
        for dir in [folder.clone(), folder.join("inner")] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        }
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "ftp://x/y",
            "relative/folder",
            "file://host/x",
            "s3:///nobucket",
        ] {
            let config = StoreConfig {
                url: Some(url.into()),
                ..StoreConfig::default()
            };
            assert!(BackupStore::open(&config).is_err(), "{url}");
        }
        assert!(matches!(
            BackupStore::open(&StoreConfig::default()),
            Err(StoreError::NotConfigured)
        ));
    }
}
