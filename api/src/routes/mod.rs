//! Every endpoint, registered with its OpenAPI description, so `/openapi.json` is
//! generated from the handlers themselves.

mod api_keys;
mod backups;
mod clusters;
mod databases;
mod exports;
mod health;
mod jobs;
mod me;
mod metrics;
mod organizations;
mod plans;
mod previews;
pub(crate) mod projects;
mod queue;
mod restores;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, Response, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::trace::TraceLayer;
use tracing::Span;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, BODY_LIMIT_BYTES};
use crate::{idempotency, AppState};

#[derive(OpenApi)]
#[openapi(
    info(title = "capy", description = "A control plane for managed PostgreSQL: projects (databases), their extensions, the jobs that provision them, API keys, organizations and clusters."),
    modifiers(&BearerAuth),
    components(schemas(crate::bodies::ErrorBody)),
    security(("bearer" = [])),
    tags(
        (name = "projects", description = "Logical databases on a cluster"),
        (name = "extensions", description = "A project's PostgreSQL extensions"),
        (name = "backups", description = "A project's backups: verified archives, on request or daily"),
        (name = "exports", description = "A project's database as an archive to download"),
        (name = "databases", description = "Instant databases: no key, expire unless claimed"),
        (name = "restores", description = "Restores of backups, and the approvals an overwrite needs"),
        (name = "previews", description = "Preview databases: a project's data copied into a database of its own, deleted when its TTL passes"),
        (name = "plans", description = "The catalogue of plans: per engine, the defaults a project gets"),
        (name = "jobs", description = "The work queued for workers, and its attempts"),
        (name = "api_keys", description = "Keys: organization-wide or narrowed to a project, with scopes"),
        (name = "organizations", description = "Tenants (platform admins)"),
        (name = "clusters", description = "Target PostgreSQL clusters (platform admins)"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("capy_live_…")
                    .build(),
            ),
        );
    }
}

/// Operation ids are the handlers' names, which repeat across modules (`list`,
/// `create`); prefixed with their tag they are unique, as OpenAPI requires.
struct OperationIds;

impl Modify for OperationIds {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
                &mut item.put,
            ];
            for operation in operations.into_iter().flatten() {
                let tag = operation.tags.as_ref().and_then(|t| t.first()).cloned();
                if let (Some(tag), Some(id)) = (tag, operation.operation_id.as_mut()) {
                    *id = format!("{tag}_{id}");
                }
            }
        }
    }
}

/// The routes and the OpenAPI document they make.
pub fn router_and_openapi() -> (Router<AppState>, OpenApiDoc) {
    let (routes, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::scrape))
        .routes(routes!(me::show))
        .routes(routes!(projects::list, projects::create))
        .routes(routes!(projects::show, projects::update, projects::delete))
        .routes(routes!(projects::connections))
        .routes(routes!(projects::credentials))
        .routes(routes!(projects::rotate_credentials))
        .routes(routes!(projects::retry_provisioning))
        .routes(routes!(projects::stop))
        .routes(routes!(projects::start))
        .routes(routes!(
            projects::list_extensions,
            projects::enable_extension
        ))
        .routes(routes!(projects::disable_extension))
        .routes(routes!(backups::list, backups::create))
        .routes(routes!(backups::show, backups::delete))
        .routes(routes!(backups::verify))
        .routes(routes!(backups::get_schedule, backups::put_schedule))
        .routes(routes!(exports::list, exports::create))
        .routes(routes!(exports::show))
        .routes(routes!(exports::download))
        .routes(routes!(exports::file))
        .routes(routes!(restores::create_approval))
        .routes(routes!(restores::create_restore))
        .routes(routes!(previews::list, previews::create))
        .routes(routes!(previews::show, previews::delete))
        .routes(routes!(previews::extend))
        .routes(routes!(previews::reset))
        .routes(routes!(previews::connections))
        .routes(routes!(plans::list))
        .routes(routes!(queue::overview))
        .routes(routes!(jobs::list))
        .routes(routes!(jobs::show))
        .routes(routes!(jobs::attempts))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::retry))
        .routes(routes!(databases::create))
        .routes(routes!(databases::claim))
        .routes(routes!(organizations::list, organizations::create))
        .routes(routes!(api_keys::list, api_keys::create))
        .routes(routes!(api_keys::revoke))
        .routes(routes!(clusters::list, clusters::register))
        .routes(routes!(clusters::show))
        .routes(routes!(clusters::check_access))
        .routes(routes!(clusters::set_allowed_extensions))
        .routes(routes!(clusters::ca_certificate))
        .split_for_parts();
    // After the split: only then does the document hold the handlers' paths.
    OperationIds.modify(&mut openapi);
    crate::bodies::IdempotencyKeyHeader.modify(&mut openapi);
    (routes, openapi)
}

pub fn router(state: AppState) -> Router {
    let (routes, openapi) = router_and_openapi();
    let openapi = Arc::new(openapi);
    routes
        .route("/claim/{id}", get(databases::claim_page))
        .merge(crate::console::routes())
        .route(
            "/openapi.json",
            get(move || async move { Json(openapi.as_ref().clone()) }),
        )
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async {
            (
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(serde_json::json!({"error": "method not allowed"})),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(log_response)
                .on_failure(log_failure),
        )
        .with_state(state)
}

/// A request's span: its method and path, never its query (a signed download URL's
/// signature is in the query).
fn request_span<B>(request: &axum::http::Request<B>) -> Span {
    tracing::debug_span!("request", method = %request.method(), path = request.uri().path())
}

/// How the HTTP trace logs an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseLog {
    /// Every answer below 500, as tower-http does by default.
    Debug,
    /// A 5xx that tells the client when to retry (Retry-After): an expected refusal,
    /// such as 503 at the bound of instant databases, which a burst repeats thousands
    /// of times.
    Refusal,
    /// Any other 5xx: something broke.
    ServerError,
}

fn response_log(status: StatusCode, retry_after: bool) -> ResponseLog {
    match (status.is_server_error(), retry_after) {
        (false, _) => ResponseLog::Debug,
        (true, true) => ResponseLog::Refusal,
        (true, false) => ResponseLog::ServerError,
    }
}

fn log_response<B>(response: &Response<B>, latency: Duration, _span: &Span) {
    let status = response.status().as_u16();
    let latency_ms = latency.as_millis();
    let retry_after = response.headers().contains_key(header::RETRY_AFTER);
    match response_log(response.status(), retry_after) {
        ResponseLog::Debug => tracing::debug!(status, latency_ms, "finished processing request"),
        ResponseLog::Refusal => {
            tracing::info!(status, latency_ms, "request refused with Retry-After")
        }
        ResponseLog::ServerError => tracing::error!(status, latency_ms, "request failed"),
    }
}

/// Errors without an answer (a failed body stream); 5xx answers are [`log_response`]'s.
fn log_failure(failure: ServerErrorsFailureClass, latency: Duration, _span: &Span) {
    if let ServerErrorsFailureClass::Error(error) = failure {
        tracing::error!(error = %error, latency_ms = latency.as_millis(), "request failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_with_retry_after_are_not_logged_as_errors() {
        let log =
            |code: u16, retry_after| response_log(StatusCode::from_u16(code).unwrap(), retry_after);
        assert_eq!(log(503, true), ResponseLog::Refusal);
        assert_eq!(log(429, true), ResponseLog::Debug);
        assert_eq!(log(404, false), ResponseLog::Debug);
        assert_eq!(log(503, false), ResponseLog::ServerError);
        assert_eq!(log(500, false), ResponseLog::ServerError);
        assert_eq!(log(502, true), ResponseLog::Refusal);
    }
}
