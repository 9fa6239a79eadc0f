//! The REST client: bearer auth, `{"error": …}` answers as [`ApiError`], unreachable
//! servers as [`Unreachable`], and cursor pagination.

use std::time::Duration;

use anyhow::Context as _;
use reqwest::Method;
use serde_json::Value;

use crate::config::Config;

/// Long polls ask the API to wait up to 30 s; requests may take a little longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(75);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The page size used when a command reads a whole list.
const FULL_PAGE: &str = "200";

/// An answer of the API that is not a success: `error: <message> (HTTP <status>)`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

/// The API could not be reached at all (refused, unknown host, timeout, …).
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("capy-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: config.api_url.clone(),
            key: config.api_key.clone(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.send(Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        self.send(Method::POST, path, &[], body).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::PATCH, path, &[], Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::PUT, path, &[], Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::DELETE, path, &[], None).await
    }

    /// Every item of a paginated list (`{<field>: [...], next_cursor}`), following
    /// `next_cursor` to the last page; answers the list as one page would.
    pub async fn get_all(
        &self,
        path: &str,
        query: &[(&str, String)],
        field: &str,
    ) -> anyhow::Result<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut page_query = query.to_vec();
            if !page_query.iter().any(|(k, _)| *k == "limit") {
                page_query.push(("limit", FULL_PAGE.to_string()));
            }
            if let Some(cursor) = cursor.take() {
                page_query.push(("cursor", cursor));
            }
            let mut page = self.get(path, &page_query).await?;
            match page.get_mut(field).map(Value::take) {
                Some(Value::Array(page_items)) => items.extend(page_items),
                _ => anyhow::bail!("GET {path}: the answer has no '{field}' list"),
            }
            match page.get("next_cursor").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => cursor = Some(next.to_string()),
                _ => break,
            }
        }
        let mut all = serde_json::Map::new();
        all.insert(field.to_string(), Value::Array(items));
        all.insert("next_cursor".to_string(), Value::Null);
        Ok(Value::Object(all))
    }

    /// Fetches `url` (a signed download URL: no Authorization header, which a
    /// presigned S3 URL would refuse) into `file`, through `<file>.part` so a cut
    /// download never looks whole; answers the bytes written.
    pub async fn download(&self, url: &str, file: &std::path::Path) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt as _;
        // No overall timeout: an archive may take long; a stalled connection still
        // fails on the read timeout.
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(REQUEST_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        let mut response = http
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
                .unwrap_or_else(|| text.chars().take(300).collect());
            return Err(ApiError {
                status: status.as_u16(),
                message: format!("downloading: {message}"),
            }
            .into());
        }
        let mut partial = file.as_os_str().to_owned();
        partial.push(".part");
        let partial = std::path::PathBuf::from(partial);
        let mut out = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("creating {}", partial.display()))?;
        let mut written = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(|e| self.unreachable(&e))? {
            out.write_all(&chunk)
                .await
                .with_context(|| format!("writing {}", partial.display()))?;
            written += chunk.len() as u64;
        }
        out.flush().await?;
        out.sync_all().await?;
        tokio::fs::rename(&partial, file)
            .await
            .with_context(|| format!("moving the download to {}", file.display()))?;
        Ok(written)
    }

    /// GET of an answer that is not JSON (a PEM file), as text.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let bytes = self.send_raw(Method::GET, path, &[], None).await?;
        String::from_utf8(bytes).with_context(|| format!("GET {path}: not text"))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let bytes = self.send_raw(method.clone(), path, query, body).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{method} {path}: the answer is not JSON"))
    }

    /// Sends the request; answers the body of a 2xx, else the API's error.
    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.key)
            .query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.unreachable(&e))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
                .unwrap_or_else(|| {
                    let text = String::from_utf8_lossy(&bytes).trim().to_string();
                    if text.is_empty() {
                        status.canonical_reason().unwrap_or("error").to_string()
                    } else {
                        text.chars().take(300).collect()
                    }
                });
            return Err(ApiError {
                status: status.as_u16(),
                message,
            }
            .into());
        }
        Ok(bytes.to_vec())
    }

    /// Names the URL and the innermost cause (e.g. "Connection refused").
    fn unreachable(&self, error: &reqwest::Error) -> anyhow::Error {
        let mut cause: &dyn std::error::Error = error;
        while let Some(source) = cause.source() {
            cause = source;
        }
        let what = if error.is_timeout() {
            "did not answer in time".to_string()
        } else {
            cause.to_string()
        };
        anyhow::Error::new(Unreachable(format!(
            "cannot reach the capy API at {}: {what} (is it running? set --api-url or CAPY_API_URL)",
            self.base
        )))
    }
}

/// Whether an error may pass if asked again (the API restarting, a 503).
pub fn is_transient(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Unreachable>().is_some()
        || error
            .downcast_ref::<ApiError>()
            .is_some_and(|e| matches!(e.status, 502..=504))
}

/// A value to put in a URL path as one segment, percent-encoded.
pub fn segment(value: &str) -> anyhow::Result<String> {
    if value.is_empty() || value == "." || value == ".." {
        return Err(crate::config::usage_error(format!(
            "'{value}' is not an id or name"
        )));
    }
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(encoded)
}
