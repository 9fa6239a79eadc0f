//! Response bodies shared by several endpoints, and the error answers every endpoint
//! may give, for the OpenAPI document.

use capy_shared::model::{Job, Project};
use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

/// Every error answer: `{"error": "…"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// The error answers any endpoint may give.
#[allow(dead_code)] // Only read by the OpenAPI generator.
#[derive(IntoResponses)]
pub enum ErrorResponses {
    #[response(status = 400, description = "Bad input: the message says what and why")]
    BadRequest(ErrorBody),
    #[response(
        status = 401,
        description = "Missing, malformed, unknown, revoked or expired API key"
    )]
    Unauthorized(ErrorBody),
    #[response(
        status = 403,
        description = "The key lacks the scope or role this call needs"
    )]
    Forbidden(ErrorBody),
    #[response(
        status = 404,
        description = "No such object, or not visible to this key"
    )]
    NotFound(ErrorBody),
    #[response(status = 405, description = "Method not allowed on this path")]
    MethodNotAllowed(ErrorBody),
    #[response(
        status = 409,
        description = "Conflicts with the object's state, or an Idempotency-Key reused with another request"
    )]
    Conflict(ErrorBody),
    #[response(status = 413, description = "Request body over 64 KiB")]
    PayloadTooLarge(ErrorBody),
    #[response(
        status = 422,
        description = "Well-formed but cannot be done (no cluster has room, unknown extension, …)"
    )]
    Unprocessable(ErrorBody),
    #[response(
        status = 503,
        description = "Control database unavailable; retry after the Retry-After header"
    )]
    Unavailable(ErrorBody),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobBody {
    pub job: Job,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectBody {
    pub project: Project,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobAndProject {
    pub job: Job,
    pub project: Project,
}
