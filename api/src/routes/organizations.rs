//! Organizations: created and listed by platform admins; an organization's key sees
//! its own.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{Principal, SCOPE_READ};
use crate::bodies::ErrorResponses;
use crate::error::{ApiError, ApiResult};
use crate::extract;
use crate::idempotency::Idempotent;
use crate::pagination::{self, Listing, NoFilter, PageParams};
use crate::AppState;

#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrganizationBody {
    pub organization: Organization,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrganizationList {
    pub organizations: Vec<Organization>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganization {
    /// 1 to 100 printable characters.
    #[schema(schema_with = crate::bodies::display_name)]
    name: String,
}

/// Creates an organization (platform admins).
#[utoipa::path(post, path = "/v1/organizations", tag = "organizations",
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    request_body = CreateOrganization,
    responses((status = 201, body = OrganizationBody), ErrorResponses))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    extract::Json(body): extract::Json<CreateOrganization>,
) -> ApiResult<(StatusCode, Json<OrganizationBody>)> {
    principal.require_admin()?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "name must be 1 to 100 characters, without control characters".into(),
        ));
    }
    let mut tx = state.pool.begin().await?;
    let organization: Organization = sqlx::query_as(
        "insert into organizations (id, name) values ($1, $2)
         returning id, name, created_at, updated_at",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::CREATED,
            OrganizationBody { organization },
        )
        .await
}

/// Every organization (platform admins), or the caller's own.
#[utoipa::path(get, path = "/v1/organizations", tag = "organizations",
    params(PageParams),
    responses((status = 200, body = OrganizationList), ErrorResponses))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Listing(NoFilter {}, page): Listing<NoFilter>,
) -> ApiResult<Json<OrganizationList>> {
    principal.require_scope(SCOPE_READ)?;
    let limit = page.limit()?;
    let rows: Vec<Organization> = sqlx::query_as(
        "select id, name, created_at, updated_at from organizations
         where ($1 or id = $2) and ($3::uuid is null or id < $3)
         order by id desc limit $4",
    )
    .bind(principal.is_admin)
    .bind(principal.organization_id)
    .bind(page.after::<Uuid>()?)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (organizations, next_cursor) = pagination::page(rows, limit, |o| o.id);
    Ok(Json(OrganizationList {
        organizations,
        next_cursor,
    }))
}
