//! A REST client for the end-to-end tests that run the API as a real process: requests
//! as a key, long-polled jobs, and the tenant's own PostgreSQL connections.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The API at `url`, called with `key` unless a request names another.
pub struct Api {
    pub url: String,
    pub key: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str, key: &str) -> Self {
        Self {
            url: url.to_string(),
            key: key.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// Status and JSON body (a body that is not JSON comes back as `{"raw": text}`).
    pub async fn request_as(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
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
        let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
        (status, body)
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request_as(&self.key, method, path, body).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// GET that must answer 200.
    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.request(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Long-polls the job until it is finished (completed, failed or cancelled).
    pub async fn wait_for_job(&self, job_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let job = self.get(&format!("/v1/jobs/{job_id}?wait=10")).await["job"].clone();
            if ["completed", "failed", "cancelled"].contains(&text(&job["state"])) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job still {}: {job}",
                job["state"]
            );
        }
    }

    /// Waits for `answer["job"]` and asserts it completed.
    pub async fn job_completes(&self, answer: &Value) -> Value {
        let job = self.wait_for_job(text(&answer["job"]["id"])).await;
        assert_eq!(job["state"], "completed", "{job}");
        job
    }

    /// Creates a project and waits until it is ready; answers its id.
    pub async fn ready_project(&self, name: &str) -> String {
        let (status, created) = self.post("/v1/projects", json!({ "name": name })).await;
        assert_eq!(status, 202, "{created}");
        self.job_completes(&created).await;
        text(&created["project"]["id"]).to_string()
    }

    /// The tenant's own connection to project `project`, with the credentials the API
    /// shows it.
    pub async fn tenant(&self, project: &str) -> tokio_postgres::Client {
        let credentials = self
            .get(&format!("/v1/projects/{project}/credentials"))
            .await;
        connect(text(&credentials["connection_string"])).await
    }
}

pub fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

/// Connects to `url` (no TLS, as the test cluster allows); panics if it cannot.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect: {e}"))
}

/// Connects to `url`, or answers why not.
pub async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}
