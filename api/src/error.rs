//! The API's error type: each variant maps to a status code and a `{"error": "…"}`
//! body; internal details are logged, never sent.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the control database is unavailable; try again shortly")]
    Unavailable,
    /// A concurrent change to the same records won (a deadlock or serialization
    /// failure the database resolved by ending this transaction): nothing was done.
    #[error("a concurrent change to the same records won; nothing was done, try again")]
    Contended,
    /// A target cluster this call needs did not answer.
    #[error("{0}")]
    ClusterUnavailable(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable | Self::ClusterUnavailable(_) | Self::Contended => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Logs what the answer hides: an internal error's cause, an unavailable database.
    pub(crate) fn log(&self) {
        match self {
            Self::Internal(source) => {
                tracing::error!(error = format!("{source:#}"), "internal error")
            }
            Self::Unavailable => tracing::warn!("control database unavailable"),
            Self::Contended => tracing::warn!("a request lost a deadlock or serialization race"),
            _ => {}
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        let mut response = (self.status(), body).into_response();
        if matches!(
            self,
            Self::Unavailable | Self::ClusterUnavailable(_) | Self::Contended
        ) {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("2"));
        }
        response
    }
}

impl ApiError {
    /// An error from code that answers `anyhow`: a control-database failure inside it
    /// is still a 503.
    pub fn from_anyhow(error: anyhow::Error) -> Self {
        match error.downcast::<sqlx::Error>() {
            Ok(sql) => sql.into(),
            Err(other) => Self::Internal(other),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable
            }
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) =>
            {
                Self::Unavailable
            }
            // deadlock_detected, serialization_failure: retryable, the request changed nothing.
            sqlx::Error::Database(db)
                if db.code().is_some_and(|c| c == "40P01" || c == "40001") =>
            {
                Self::Contended
            }
            _ => Self::Internal(error.into()),
        }
    }
}

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::PayloadTooLarge(BODY_LIMIT_BYTES);
        }
        let message = match &rejection {
            JsonRejection::MissingJsonContentType(_) => {
                "expected a JSON body with Content-Type: application/json".to_string()
            }
            JsonRejection::JsonSyntaxError(_) => {
                format!("malformed JSON: {}", source_text(&rejection))
            }
            JsonRejection::JsonDataError(_) => {
                format!("invalid request body: {}", source_text(&rejection))
            }
            _ => rejection.body_text(),
        };
        Self::BadRequest(message)
    }
}

impl From<PathRejection> for ApiError {
    fn from(_: PathRejection) -> Self {
        Self::BadRequest("malformed id in the path: ids are UUIDs".into())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest(format!("invalid query string: {}", source_text(&rejection)))
    }
}

/// The innermost cause's message (serde's "unknown field `x`, expected …").
fn source_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

pub type ApiResult<T> = Result<T, ApiError>;
