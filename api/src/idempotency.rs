//! `Idempotency-Key` on POST: the first answer to a key is stored and replayed for the
//! same key and the same request; the same key with another request is a 409. Keys are
//! scoped to the caller's credentials (requests without any are not
//! deduplicated) and kept for a day.
//!
//! A request holds its key while it runs (a row without a status, reserved with a
//! fresh token), so a concurrent repeat gets a 409 instead of doing the work twice.
//! Handlers that do work end their transaction with [`Idempotent::commit`], which
//! stores the answer in that same transaction, fenced on the token: the work and its
//! recorded answer commit together or not at all, so no failure between the two can
//! run the request twice, and a request presumed dead (its key taken again after
//! `HOLD`) cannot commit. Answers a handler did not store (refusals before any work)
//! are stored by the layer afterwards. Server errors are not stored: the key is
//! released and the client may retry.

use std::convert::Infallible;

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, BODY_LIMIT_BYTES};
use crate::AppState;

pub const HEADER: &str = "idempotency-key";
const REPLAYED_HEADER: &str = "idempotent-replayed";
/// A key is kept this long; a request holding a key for longer is presumed dead.
const KEEP: &str = "24 hours";
const HOLD: &str = "5 minutes";

/// The key this request holds, put in its extensions by the layer.
#[derive(Debug, Clone)]
struct Reservation {
    scope: Vec<u8>,
    key: String,
    token: Uuid,
}

/// The request's Idempotency-Key reservation, if it carries a key: a handler ends its
/// transaction with [`Idempotent::commit`], so the answer is stored with its work.
#[derive(Debug, Clone, Default)]
pub struct Idempotent(Option<Reservation>);

impl<S: Send + Sync> FromRequestParts<S> for Idempotent {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Self(parts.extensions.get::<Reservation>().cloned()))
    }
}

impl Idempotent {
    /// Commits the handler's transaction `tx` with the answer `status` / `body`,
    /// stored first (in `tx`) for the request's Idempotency-Key, if it has one.
    /// When the key is no longer this request's (it ran past `HOLD` and a repeat took
    /// the key), nothing commits: 409.
    pub async fn commit<T: Serialize>(
        &self,
        state: &AppState,
        mut tx: Transaction<'_, Postgres>,
        status: StatusCode,
        body: T,
    ) -> ApiResult<(StatusCode, Json<T>)> {
        if let Some(reservation) = &self.0 {
            let bytes = serde_json::to_vec(&body)
                .map_err(|e| ApiError::Internal(anyhow::anyhow!("encoding the answer: {e}")))?;
            if !store(&mut tx, state, reservation, status, &bytes).await? {
                return Err(ApiError::Conflict(
                    "this request ran so long that its Idempotency-Key was taken by a repeat; \
                     nothing was done"
                        .into(),
                ));
            }
        }
        tx.commit().await?;
        Ok((status, Json(body)))
    }
}

/// Stores `body` as the answer of the key `reservation` still holds; answers whether
/// it did (false: the key is no longer held by this reservation, or already answered).
async fn store(
    conn: &mut PgConnection,
    state: &AppState,
    reservation: &Reservation,
    status: StatusCode,
    body: &[u8],
) -> sqlx::Result<bool> {
    // Sealed: an answer may carry a secret (a new API key's plaintext).
    let sealed = state.secrets.seal(&String::from_utf8_lossy(body));
    let stored = sqlx::query(
        "update idempotency_keys set status = $4, body = $5
         where scope = $1 and key = $2 and reservation = $3 and status is null",
    )
    .bind(&reservation.scope)
    .bind(&reservation.key)
    .bind(reservation.token)
    .bind(i16::try_from(status.as_u16()).unwrap_or(i16::MAX))
    .bind(&sealed)
    .execute(conn)
    .await?;
    Ok(stored.rows_affected() == 1)
}

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
    let key = key
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or_else(|| {
            ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into())
        })?
        .to_string();
    let scope = Sha256::digest(
        parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default(),
    )
    .to_vec();
    let body = to_bytes(body, BODY_LIMIT_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(BODY_LIMIT_BYTES))?;
    let mut hasher = Sha256::new();
    hasher.update(parts.uri.to_string().as_bytes());
    hasher.update([0]);
    hasher.update(&body);
    let request_hash = hasher.finalize().to_vec();

    let Some(reservation) = reserve(state, &scope, &key, &request_hash).await? else {
        return replay(state, &scope, &key, &request_hash).await;
    };
    parts.extensions.insert(reservation.clone());
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    settle(state, &reservation, response).await
}

/// Takes the key for this request, after forgetting its expired or abandoned use;
/// `None` when another request holds it or answered it.
async fn reserve(
    state: &AppState,
    scope: &[u8],
    key: &str,
    request_hash: &[u8],
) -> Result<Option<Reservation>, ApiError> {
    sqlx::query(&format!(
        "delete from idempotency_keys where scope = $1 and key = $2
           and (created_at < now() - interval '{KEEP}'
                or (status is null and created_at < now() - interval '{HOLD}'))"
    ))
    .bind(scope)
    .bind(key)
    .execute(&state.pool)
    .await?;
    let token = Uuid::new_v4();
    let taken = sqlx::query(
        "insert into idempotency_keys (scope, key, request_hash, reservation)
         values ($1, $2, $3, $4)
         on conflict do nothing",
    )
    .bind(scope)
    .bind(key)
    .bind(request_hash)
    .bind(token)
    .execute(&state.pool)
    .await?
    .rows_affected()
        == 1;
    Ok(taken.then(|| Reservation {
        scope: scope.to_vec(),
        key: key.to_string(),
        token,
    }))
}

/// After the handler: releases the key when its answer is not to be remembered,
/// otherwise stores the answer unless the handler stored it with its work.
async fn settle(
    state: &AppState,
    reservation: &Reservation,
    response: Response,
) -> Result<Response, ApiError> {
    let status = response.status();
    // Server errors and refusals that depend on the moment (auth, rate limits) are
    // not remembered: the client may retry with the same key. (A handler that stored
    // its answer with its work left no reservation to release.)
    let remember = !status.is_server_error()
        && status != StatusCode::UNAUTHORIZED
        && status != StatusCode::TOO_MANY_REQUESTS;
    if !remember {
        sqlx::query(
            "delete from idempotency_keys
             where scope = $1 and key = $2 and reservation = $3 and status is null",
        )
        .bind(&reservation.scope)
        .bind(&reservation.key)
        .bind(reservation.token)
        .execute(&state.pool)
        .await?;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("reading the response: {e}")))?;
    // An answer the handler did not store with work (a refusal before any): now.
    let mut conn = state.pool.acquire().await?;
    store(&mut conn, state, reservation, status, &body).await?;
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
