//! Cursor pagination for every list: `?limit=N&cursor=…` in, `next_cursor` out. A
//! cursor is the last row's sort key, base64url-encoded so clients treat it as opaque.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Rows per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageParams {
    pub fn limit(&self) -> ApiResult<i64> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            ))),
        }
    }

    /// The sort key the page starts after, if a cursor was given.
    pub fn after<T: std::str::FromStr>(&self) -> ApiResult<Option<T>> {
        // An empty cursor is no cursor: the first page.
        let Some(cursor) = self.cursor.as_deref().filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        URL_SAFE_NO_PAD
            .decode(cursor)
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|key| key.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::BadRequest("invalid cursor: pass next_cursor of a previous page".into())
            })
    }
}

/// A list's filters: the query parameters it takes besides `limit` and `cursor`.
pub trait Filter: DeserializeOwned {
    const PARAMS: &'static [&'static str];
}

/// A list filtered by organization only (projects, API keys).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OrganizationFilter {
    /// Platform admins: one organization's objects (all when left out). Organization
    /// keys always list their own.
    pub organization_id: Option<uuid::Uuid>,
}

impl Filter for OrganizationFilter {
    const PARAMS: &'static [&'static str] = &["organization_id"];
}

/// A list without filters.
#[derive(Debug, Deserialize)]
pub struct NoFilter {}

impl Filter for NoFilter {
    const PARAMS: &'static [&'static str] = &[];
}

/// A list's query string: its filters and the page. A parameter the list does not take
/// is refused (400), so a misspelt filter never silently lists everything.
pub struct Listing<F>(pub F, pub PageParams);

impl<S: Send + Sync, F: Filter> FromRequestParts<S> for Listing<F> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        for (name, _) in url::form_urlencoded::parse(query.as_bytes()) {
            if !["limit", "cursor"].contains(&name.as_ref()) && !F::PARAMS.contains(&name.as_ref())
            {
                let takes = F::PARAMS
                    .iter()
                    .chain(&["limit", "cursor"])
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter '{name}'; this list takes {takes}"
                )));
            }
        }
        let Query(filter) = Query::<F>::try_from_uri(&parts.uri)?;
        let Query(page) = Query::<PageParams>::try_from_uri(&parts.uri)?;
        Ok(Self(filter, page))
    }
}

/// Cuts the `limit + 1` rows a query fetched down to a page, with the cursor of the
/// next page when there is one.
pub fn page<T, K: ToString>(
    mut rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> K,
) -> (Vec<T>, Option<String>) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() <= limit {
        return (rows, None);
    }
    rows.truncate(limit);
    let next = rows
        .last()
        .map(|row| URL_SAFE_NO_PAD.encode(key(row).to_string()));
    (rows, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_round_trips_its_cursor() {
        let (rows, next) = page(vec![5, 4, 3], 2, |n| *n);
        assert_eq!(rows, vec![5, 4]);
        let params = PageParams {
            limit: Some(2),
            cursor: next,
        };
        assert_eq!(params.after::<i32>().unwrap(), Some(4));
        let (rows, next) = page(vec![3], 2, |n| *n);
        assert_eq!((rows, next), (vec![3], None));
    }

    #[test]
    fn bad_limits_and_cursors_are_refused() {
        let bad = |limit, cursor: &str| PageParams {
            limit,
            cursor: Some(cursor.into()),
        };
        assert!(bad(Some(0), "").limit().is_err());
        assert!(bad(Some(201), "").limit().is_err());
        assert!(bad(None, "not base64!").after::<i32>().is_err());
        assert!(bad(None, &URL_SAFE_NO_PAD.encode("x"))
            .after::<i32>()
            .is_err());
    }
}
