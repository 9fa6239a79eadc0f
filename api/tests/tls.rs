#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic
//! TLS end to end, against a cluster that refuses every TCP connection without TLS and
//! logs each connection with its TLS state: the control database (sqlx, verify-full),
//! the API's check-access and every step (tokio-postgres with rustls) and the tenant's
//! own psql session all run encrypted; a certificate that names another host, or that
//! another CA signed, is refused with its own `error_kind`.

mod common;

use std::time::{Duration, Instant};

use capy_testkit::{
    tls_only_cluster, tls_only_pooler, ProcessStack, TestCertificates, TestCluster,
    POOLER_AUTH_USER,
};
use common::TestApp;
use serde_json::{json, Value};

struct Stack {
    app: TestApp,
    cluster: &'static TestCluster,
    url: String,
    http: reqwest::Client,
    _processes: ProcessStack,
}

impl Stack {
    async fn start() -> Self {
        let cluster = tls_only_cluster().unwrap();
        let app = TestApp::new_on(cluster, None).await;
        let ca_path = cluster
            .certificates()
            .unwrap()
            .ca_path
            .display()
            .to_string();
        // The control database through sqlx, verified like a production one.
        let control_url = format!(
            "{}?sslmode=verify-full&sslrootcert={ca_path}",
            app.db.url.replace("127.0.0.1", "localhost")
        );
        let env = [("CAPY_RETRY_BASE_DELAY_MS", "50".to_string())];
        let processes = ProcessStack::start(&control_url, 2, &env).await.unwrap();
        Self {
            url: processes.api_url.clone(),
            app,
            cluster,
            http: reqwest::Client::new(),
            _processes: processes,
        }
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Registers the cluster under `name` with `host` in its URL (the connection goes to
    /// 127.0.0.1 through `hostaddr` whatever the name) and `query` appended.
    async fn register(
        &self,
        name: &str,
        host: &str,
        query: &str,
        ca_pem: Option<&str>,
    ) -> (u16, Value) {
        self.register_with(name, host, query, ca_pem, json!({}))
            .await
    }

    /// As [`Self::register`], with `extra` fields merged into the body.
    async fn register_with(
        &self,
        name: &str,
        host: &str,
        query: &str,
        ca_pem: Option<&str>,
        extra: Value,
    ) -> (u16, Value) {
        let base = self.cluster.admin_url_for("postgres");
        let url = format!(
            "{}?hostaddr=127.0.0.1{query}",
            base.replace("@127.0.0.1:", &format!("@{host}:"))
        );
        let mut body = json!({"name": name, "url": url, "region": name, "ssl_mode": "verify-full"});
        if let Some(pem) = ca_pem {
            body["ca_pem"] = json!(pem);
        }
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let admin = self.app.admin_key.clone();
        self.request("POST", "/v1/clusters", &admin, Some(body))
            .await
    }

    async fn wait_for_job(&self, job_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let key = self.app.key.clone();
            let (status, body) = self
                .request("GET", &format!("/v1/jobs/{job_id}?wait=10"), &key, None)
                .await;
            assert_eq!(status, 200, "{body}");
            let job = body["job"].clone();
            if job["state"] == "completed" || job["state"] == "failed" {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} never finished: {job}"
            );
        }
    }

    async fn completed(&self, answer: (u16, Value)) -> Value {
        let (status, body) = answer;
        assert_eq!(status, 202, "{body}");
        let job = self.wait_for_job(body["job"]["id"].as_str().unwrap()).await;
        assert_eq!(job["state"], "completed", "{job}");
        body
    }
}

fn ca_pem(cluster: &TestCluster) -> String {
    cluster.certificates().unwrap().ca_pem.clone()
}

/// Runs psql with `url` and `PGSSLROOTCERT`; answers its stdout, or its stderr as Err.
fn psql(url: &str, ca_path: &std::path::Path, sql: &str) -> Result<String, String> {
    let output = std::process::Command::new("psql")
        .env("PGSSLROOTCERT", ca_path)
        .env("PGCONNECT_TIMEOUT", "10")
        .args([url, "-XAtqc", sql])
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).to_string())
    }
}

/// Every connection the server authorised, as logged.
fn authorized_connections(cluster: &TestCluster) -> Vec<String> {
    std::fs::read_to_string(cluster.log_path().unwrap())
        .unwrap()
        .lines()
        .filter(|line| line.contains("connection authorized"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_whole_path_runs_over_verified_tls() {
    let stack = Stack::start().await;
    let ca = ca_pem(stack.cluster);
    let ca_path = stack.cluster.certificates().unwrap().ca_path.clone();

    let pooler = tls_only_pooler().unwrap();
    let extra = json!({
        "pooled_host": "localhost",
        "pooled_port": pooler.port,
        "pooler_auth_user": POOLER_AUTH_USER,
    });
    let (status, body) = stack
        .register_with("tls", "localhost", "&sslmode=verify-full", Some(&ca), extra)
        .await;
    assert_eq!(status, 201, "{body}");
    let access = &body["access"];
    assert_eq!(access["reachable"], true, "{access}");
    assert_eq!(access["tls"], true, "{access}");
    assert_eq!(access["tls_verified"], true, "{access}");
    assert_eq!(access["ssl_mode"], "verify-full", "{access}");
    let cluster_id = body["cluster"]["id"].as_str().unwrap().to_string();

    // The CA is served without a key, as PEM.
    let served = stack
        .http
        .get(format!("{}/v1/clusters/{cluster_id}/ca.pem", stack.url))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.text().await.unwrap(), ca);

    let key = stack.app.key.clone();
    let created = stack
        .completed(
            stack
                .request(
                    "POST",
                    "/v1/projects",
                    &key,
                    Some(json!({"name": "secure", "cluster_id": cluster_id})),
                )
                .await,
        )
        .await;
    let project_id = created["project"]["id"].as_str().unwrap().to_string();
    stack
        .completed(
            stack
                .request(
                    "POST",
                    &format!("/v1/projects/{project_id}/extensions"),
                    &key,
                    Some(json!({"name": "pgcrypto"})),
                )
                .await,
        )
        .await;

    // The tenant's connection string carries verify-full, and psql verifies with the CA.
    let (status, connections) = stack
        .request(
            "GET",
            &format!("/v1/projects/{project_id}/connections"),
            &key,
            None,
        )
        .await;
    assert_eq!(status, 200, "{connections}");
    let direct = connections["direct_url"].as_str().unwrap();
    assert!(direct.contains("sslmode=verify-full"), "{direct}");
    let direct = direct.replace("@127.0.0.1:", "@localhost:");
    let ssl = psql(
        &direct,
        &ca_path,
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert_eq!(ssl.as_deref(), Ok("t"), "psql over verify-full: {ssl:?}");
    // The same URL under another name for the host fails verification.
    let wrong_host = direct.replace("@localhost:", "@127.0.0.2:");
    assert!(psql(&wrong_host, &ca_path, "select 1").is_err());
    // The pooled endpoint too: PgBouncer shows the server's certificate to tenants.
    let pooled = connections["pooled_url"].as_str().unwrap();
    assert!(
        pooled.contains(&format!("@localhost:{}", pooler.port)),
        "{pooled}"
    );
    let user = psql(pooled, &ca_path, "select current_user");
    assert_eq!(
        user.as_deref(),
        Ok(connections["username"].as_str().unwrap()),
        "pooled psql: {user:?}"
    );

    // Rotation over TLS: both logins work during the grace, through either endpoint.
    stack
        .completed(
            stack
                .request(
                    "POST",
                    &format!("/v1/projects/{project_id}/credentials/rotate"),
                    &key,
                    Some(json!({"grace_hours": 1})),
                )
                .await,
        )
        .await;
    let (status, credentials) = stack
        .request(
            "GET",
            &format!("/v1/projects/{project_id}/credentials"),
            &key,
            None,
        )
        .await;
    assert_eq!(status, 200, "{credentials}");
    assert_eq!(credentials["ssl_mode"], "verify-full", "{credentials}");
    for url in [
        credentials["connection_string"]
            .as_str()
            .unwrap()
            .replace("@127.0.0.1:", "@localhost:"),
        credentials["pooled_connection_string"]
            .as_str()
            .unwrap()
            .to_string(),
        direct.clone(),
    ] {
        let ssl = psql(
            &url,
            &ca_path,
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        );
        assert!(ssl.is_ok(), "{ssl:?}");
    }

    stack
        .completed(
            stack
                .request("DELETE", &format!("/v1/projects/{project_id}"), &key, None)
                .await,
        )
        .await;

    // Every connection capy and the tenant made was encrypted: the server refuses the
    // others, and says so for each one it took.
    let plain = format!(
        "{}?sslmode=disable",
        stack.cluster.admin_url_for("postgres")
    );
    let refused = psql(&plain, &ca_path, "select 1").unwrap_err();
    assert!(refused.contains("no encryption"), "{refused}");
    let authorized = authorized_connections(stack.cluster);
    let steps = authorized
        .iter()
        .filter(|l| l.contains("application_name=capy-step"))
        .count();
    let checks = authorized
        .iter()
        .filter(|l| l.contains("application_name=capy-check-access"))
        .count();
    let control = authorized
        .iter()
        .filter(|l| l.contains("application_name=capy "))
        .count();
    assert!(
        steps >= 4 && checks >= 1 && control >= 2,
        "steps {steps}, checks {checks}, control {control}"
    );
    let unencrypted: Vec<_> = authorized
        .iter()
        .filter(|l| !l.contains("SSL enabled"))
        .collect();
    assert!(
        unencrypted.is_empty(),
        "sessions without TLS: {unencrypted:#?}"
    );
}

#[tokio::test]
async fn a_certificate_for_another_host_or_from_another_ca_is_refused() {
    let stack = Stack::start().await;
    let ca = ca_pem(stack.cluster);

    let (status, body) = stack
        .register(
            "elsewhere",
            "db.example.com",
            "&sslmode=verify-full",
            Some(&ca),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let access = &body["access"];
    assert_eq!(access["reachable"], false, "{access}");
    assert_eq!(access["error_kind"], "tls_name_mismatch", "{access}");
    let elsewhere = body["cluster"]["id"].as_str().unwrap().to_string();

    // A step refuses it too, permanently, and says why.
    let key = stack.app.key.clone();
    let (status, created) = stack
        .request(
            "POST",
            "/v1/projects",
            &key,
            Some(json!({"name": "mismatch", "cluster_id": elsewhere})),
        )
        .await;
    assert_eq!(status, 202, "{created}");
    let job = stack
        .wait_for_job(created["job"]["id"].as_str().unwrap())
        .await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(
        job["attempts"], 1,
        "a certificate problem is not retried: {job}"
    );
    assert!(
        job["error"].as_str().unwrap().contains("tls_name_mismatch"),
        "{job}"
    );

    // verify-ca checks the chain and not the name: it connects, and says the name did
    // not verify.
    let (status, body) = stack
        .register(
            "chain-only",
            "db.example.com",
            "&sslmode=verify-ca",
            Some(&ca),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["access"]["reachable"], true, "{body}");
    assert_eq!(body["access"]["tls_verified"], false, "{body}");

    let other_ca = TestCertificates::create(&tempdir()).unwrap();
    let (status, body) = stack
        .register("other-ca", "localhost", "", Some(&other_ca.ca_pem))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["access"]["ssl_mode"], "verify-full",
        "a CA means verify: {body}"
    );
    assert_eq!(
        body["access"]["error_kind"], "tls_untrusted_certificate",
        "{body}"
    );

    // require encrypts without verifying, and reports what it found.
    let (status, body) = stack
        .register("unverified", "localhost", "&sslmode=require", None)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["access"]["reachable"], true, "{body}");
    assert_eq!(body["access"]["tls"], true, "{body}");
    assert_eq!(body["access"]["tls_verified"], false, "{body}");
}

#[tokio::test]
async fn bad_tls_settings_are_refused_with_400() {
    let stack = Stack::start().await;
    let cases = [
        ("&sslmode=verify_full", None, "sslmode must be one of"),
        ("&sslrootcert=/etc/ssl/ca.pem", None, "ca_pem"),
        (
            "",
            Some("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"),
            "ca_pem",
        ),
        ("", Some("hello"), "ca_pem holds no PEM certificate"),
        (
            "&sslmode=verify-ca",
            None,
            "verify-ca needs the cluster's CA certificate",
        ),
    ];
    for (query, pem, expected) in cases {
        let (status, body) = stack.register("bad", "localhost", query, pem).await;
        assert_eq!(status, 400, "{query} {pem:?}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(expected),
            "{query} {pem:?}: {body}"
        );
    }
    // A CA bundle with its private key pasted in is refused: the PEM is public.
    let certificates = stack.cluster.certificates().unwrap();
    let key = std::fs::read_to_string(&certificates.server_key_path).unwrap();
    let with_key = format!("{}{key}", certificates.ca_pem);
    let (status, body) = stack
        .register("keyed", "localhost", "", Some(&with_key))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("certificates only"),
        "{body}"
    );
    // A pooled host that makes no connection string.
    let (status, body) = stack
        .register_with("v6", "localhost", "", None, json!({"pooled_host": "::1"}))
        .await;
    assert_eq!(status, 400, "{body}");
    // A cluster without a CA has no ca.pem to serve.
    let local = stack.app.cluster_id;
    let answer = stack
        .http
        .get(format!("{}/v1/clusters/{local}/ca.pem", stack.url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("capy-tls-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
