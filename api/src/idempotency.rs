//! `Idempotency-Key` on POST: the first answer to a key is stored and replayed for the
//! same key and the same request; the same key with another request is a 409. Keys are
//! scoped to the caller's credentials (requests without any are not
//! deduplicated) and kept for a day.
//!
//! A request holds its key while it runs (a row without a status), so a concurrent
//! repeat gets a 409 instead of doing the work twice. Server errors are not stored:
//! the key is released and the client may retry.

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use axum::extract::FromRequestParts as _;

use crate::auth::Principal;
use crate::error::{ApiError, BODY_LIMIT_BYTES};
use crate::AppState;

pub const HEADER: &str = "idempotency-key";
const REPLAYED_HEADER: &str = "idempotent-replayed";
/// A key is kept this long; a request holding a key for longer is presumed dead.
const KEEP: &str = "24 hours";
const HOLD: &str = "5 minutes";

#[derive(sqlx::FromRow)]
struct Stored {
    request_hash: Vec<u8>,
    status: Option<i16>,
    body: Option<Vec<u8>>,
}

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(HEADER) else {
        return next.run(request).await;
    };
    // Without credentials there is no caller to scope the key to, and two strangers
    // must never share one.
    if !request
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION)
    {
        return next.run(request).await;
    }
    match handle(&state, key.clone(), request, next).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &AppState,
    key: HeaderValue,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // A revoked or expired key gets no replay of what it did while it was live.
    let (mut parts, body) = request.into_parts();
    let principal = Principal::from_request_parts(&mut parts, state).await?;
    // The handler takes it from here instead of looking the key up again.
    parts.extensions.insert(principal);
    let request = Request::from_parts(parts, body);
    let key = key
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or_else(|| {
            ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into())
        })?
        .to_string();
    let scope = Sha256::digest(
        request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default(),
    )
    .to_vec();
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, BODY_LIMIT_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(BODY_LIMIT_BYTES))?;
    let mut hasher = Sha256::new();
    hasher.update(parts.uri.to_string().as_bytes());
    hasher.update([0]);
    hasher.update(&body);
    let request_hash = hasher.finalize().to_vec();

    // Forget this key's expired or abandoned use, then try to take it.
    sqlx::query(&format!(
        "delete from idempotency_keys where scope = $1 and key = $2
           and (created_at < now() - interval '{KEEP}'
                or (status is null and created_at < now() - interval '{HOLD}'))"
    ))
    .bind(&scope)
    .bind(&key)
    .execute(&state.pool)
    .await?;
    let taken = sqlx::query(
        "insert into idempotency_keys (scope, key, request_hash) values ($1, $2, $3)
         on conflict do nothing",
    )
    .bind(&scope)
    .bind(&key)
    .bind(&request_hash)
    .execute(&state.pool)
    .await?
    .rows_affected()
        == 1;
    if !taken {
        return replay(state, &scope, &key, &request_hash).await;
    }

    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    let status = response.status();
    // Server errors and refusals that depend on the moment (auth, rate limits) are
    // not remembered: the client may retry with the same key.
    let remember = !status.is_server_error()
        && status != StatusCode::UNAUTHORIZED
        && status != StatusCode::TOO_MANY_REQUESTS;
    if !remember {
        sqlx::query("delete from idempotency_keys where scope = $1 and key = $2")
            .bind(&scope)
            .bind(&key)
            .execute(&state.pool)
            .await?;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("reading the response: {e}")))?;
    // Sealed: an answer may carry a secret (a new API key's plaintext).
    let sealed = state.secrets.seal(&String::from_utf8_lossy(&body));
    sqlx::query("update idempotency_keys set status = $3, body = $4 where scope = $1 and key = $2")
        .bind(&scope)
        .bind(&key)
        .bind(i16::try_from(status.as_u16()).unwrap_or(i16::MAX))
        .bind(&sealed)
        .execute(&state.pool)
        .await?;
    Ok(Response::from_parts(parts, Body::from(body)))
}

async fn replay(
    state: &AppState,
    scope: &[u8],
    key: &str,
    request_hash: &[u8],
) -> Result<Response, ApiError> {
    let stored: Option<Stored> = sqlx::query_as(
        "select request_hash, status, body from idempotency_keys where scope = $1 and key = $2",
    )
    .bind(scope)
    .bind(key)
    .fetch_optional(&state.pool)
    .await?;
    let Some(stored) = stored else {
        return Err(ApiError::Conflict(
            "a request with this Idempotency-Key has just ended; send it again".into(),
        ));
    };
    if stored.request_hash != request_hash {
        return Err(ApiError::Conflict(
            "this Idempotency-Key was used with another request".into(),
        ));
    }
    let (Some(status), Some(sealed)) = (stored.status, stored.body) else {
        return Err(ApiError::Conflict(
            "a request with this Idempotency-Key is still running".into(),
        ));
    };
    let body = state
        .secrets
        .open(&sealed)
        .map_err(|e| ApiError::Internal(e.into()))?;
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    Ok(response)
}
