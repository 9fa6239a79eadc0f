//! Shared set-up of the API's tests: a fresh control database with an organization, a
//! key, and the test cluster registered as a target.

#![allow(dead_code, clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use capy_api::admin::{self, ClusterSpec, KeyGrant};
use capy_api::job_changes::{JobChanges, FALLBACK_LOOK};
use capy_api::{router, ApiSettings, AppState};
use capy_shared::crypto::SecretBox;
use capy_shared::instant::{self, Entry, InstantLimits};
use capy_testkit::{cluster, fresh_database_on, TestCluster, TestDatabase, TEST_SECRET_KEY};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;
use uuid::Uuid;

pub mod http;

pub struct TestApp {
    pub db: TestDatabase,
    pub state: AppState,
    pub organization_id: Uuid,
    pub key: String,
    pub admin_key: String,
    pub cluster_id: Uuid,
}

pub fn secrets() -> SecretBox {
    SecretBox::from_key_text(TEST_SECRET_KEY).unwrap()
}

impl TestApp {
    /// A control database with one organization and key, and the test cluster
    /// registered as `local` (region `local`); `cluster_url` overrides its admin URL.
    pub async fn new_with_cluster_url(cluster_url: Option<String>) -> Self {
        Self::new_on(cluster().unwrap(), cluster_url).await
    }

    /// As [`Self::new_with_cluster_url`], with the control database and cluster `local`
    /// on `test_cluster`.
    pub async fn new_on(test_cluster: &TestCluster, cluster_url: Option<String>) -> Self {
        let db = fresh_database_on(test_cluster).await.unwrap();
        let state = AppState {
            pool: db.pool.clone(),
            secrets: secrets(),
            settings: ApiSettings::default(),
            instant_limiter: Default::default(),
            // A folder of its own: restores and backups are refused without a store.
            backup_store: Some(temp_store()),
            job_changes: JobChanges::listen(db.pool.clone(), FALLBACK_LOOK),
        };
        let organization_id = admin::create_organization(&db.pool, "acme").await.unwrap();
        let key = new_key(&db, organization_id).await;
        let (_, admin_key) = admin::create_api_key(
            &db.pool,
            &KeyGrant {
                name: "admin".into(),
                is_admin: true,
                ..KeyGrant::default()
            },
        )
        .await
        .unwrap();
        let cluster_id = admin::upsert_cluster(
            &db.pool,
            &state.secrets,
            &ClusterSpec {
                engine: capy_shared::model::Engine::Postgresql,
                name: "local".into(),
                region: "local".into(),
                admin_url: cluster_url.unwrap_or_else(|| test_cluster.admin_url_for("postgres")),
                public_host: test_cluster.host().to_string(),
                direct_port: i32::from(test_cluster.port),
                pooled_port: i32::from(test_cluster.port),
                pooled_host: None,
                pooler_auth_user: None,
                ssl_mode: "disable".into(),
                max_projects: None,
                ca_pem: None,
            },
        )
        .await
        .unwrap();
        Self {
            db,
            state,
            organization_id,
            key,
            admin_key,
            cluster_id,
        }
    }

    /// `count` ready pool entries of instant databases, made by hand (for tests where
    /// no worker runs).
    pub async fn ready_pool(&self, count: usize) {
        for _ in 0..count {
            let mut tx = self.db.pool.begin().await.unwrap();
            instant::create(
                &mut tx,
                &self.state.secrets,
                self.cluster_id,
                Entry::Pool,
                InstantLimits::default(),
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        sqlx::query("update projects set state = 'ready' where instant_status = 'pool'")
            .execute(&self.db.pool)
            .await
            .unwrap();
    }

    pub async fn new() -> Self {
        Self::new_with_cluster_url(None).await
    }

    /// Sends a request through the router (no port); answers status and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let response = router(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{method} {path}: body is not JSON: {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, json)
    }
}

impl TestApp {
    /// Creates project `name` through the router with the organization's key (its
    /// `project.create` job queued); answers `{job, project}`.
    pub async fn create_project(&self, name: &str) -> Value {
        let body = serde_json::json!({ "name": name }).to_string();
        let (status, created) = self
            .call("POST", "/v1/projects", Some(&self.key), Some(&body))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{created}");
        created
    }
}

pub async fn new_key(db: &TestDatabase, organization_id: Uuid) -> String {
    admin::create_api_key(
        &db.pool,
        &KeyGrant {
            name: "test".into(),
            organization_id: Some(organization_id),
            ..KeyGrant::default()
        },
    )
    .await
    .unwrap()
    .1
}

/// A backup store in a fresh temporary folder.
pub fn temp_store() -> capy_shared::store::BackupStore {
    let folder = std::env::temp_dir().join(format!("capy-store-{}", Uuid::new_v4().simple()));
    let config = capy_shared::store::StoreConfig {
        url: Some(format!("file://{}", folder.display())),
        ..capy_shared::store::StoreConfig::default()
    };
    capy_shared::store::BackupStore::open(&config).unwrap()
}
