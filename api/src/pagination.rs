//! Cursor pagination for every list: `?limit=N&cursor=…` in, `next_cursor` out. A
//! cursor is the last row's sort key as text (an id, an extension's name, an attempt
//! number), so every cursor the OpenAPI document allows is one the server takes.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// The cursor of lists sorted by id: a UUID in its hyphenated form ([`CursorKey`] for
/// `Uuid`). Empty is the first page, as for every cursor.
pub const UUID_CURSOR_PATTERN: &str =
    "^([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})?$";
/// The cursor of lists sorted by a name: any text without control characters.
pub const NAME_CURSOR_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";
/// The cursor of lists sorted by a number (attempts): up to 9 digits.
pub const NUMBER_CURSOR_PATTERN: &str = "^[0-9]{0,9}$";

/// The page of a list sorted by id: `limit` and `cursor`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Rows per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page (the id of its last row).
    #[param(schema_with = uuid_cursor)]
    pub cursor: Option<String>,
}

/// The page of a list sorted by name (extensions), for the OpenAPI document; read as
/// [`PageParams`].
#[allow(dead_code)] // Only read by the OpenAPI generator.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NamePageParams {
    /// Rows per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page (the name of its last row).
    #[param(schema_with = name_cursor)]
    cursor: Option<String>,
}

/// The page of a list sorted by number (attempts), for the OpenAPI document; read as
/// [`PageParams`].
#[allow(dead_code)] // Only read by the OpenAPI generator.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NumberPageParams {
    /// Rows per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page (the number of its last row).
    #[param(schema_with = number_cursor)]
    cursor: Option<String>,
}

fn cursor_schema(pattern: &str, key: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .description(Some(format!(
            "`next_cursor` of the previous page: the {key} of its last row. Empty or left \
             out: the first page."
        )))
        .build()
}

fn uuid_cursor() -> Object {
    cursor_schema(UUID_CURSOR_PATTERN, "id")
}

fn name_cursor() -> Object {
    cursor_schema(NAME_CURSOR_PATTERN, "name")
}

fn number_cursor() -> Object {
    cursor_schema(NUMBER_CURSOR_PATTERN, "number")
}

/// A sort key as a cursor states it; `None` for text the key's pattern refuses.
pub trait CursorKey: Sized {
    fn from_cursor(text: &str) -> Option<Self>;
}

/// [`UUID_CURSOR_PATTERN`]: the hyphenated form only (36 characters).
impl CursorKey for Uuid {
    fn from_cursor(text: &str) -> Option<Self> {
        (text.len() == 36).then(|| Uuid::try_parse(text).ok())?
    }
}

/// [`NAME_CURSOR_PATTERN`].
impl CursorKey for String {
    fn from_cursor(text: &str) -> Option<Self> {
        (!text.chars().any(char::is_control)).then(|| text.to_string())
    }
}

/// [`NUMBER_CURSOR_PATTERN`].
impl CursorKey for i32 {
    fn from_cursor(text: &str) -> Option<Self> {
        let digits = text.len() <= 9 && text.bytes().all(|b| b.is_ascii_digit());
        digits.then(|| text.parse().ok())?
    }
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
    pub fn after<T: CursorKey>(&self) -> ApiResult<Option<T>> {
        // An empty cursor is no cursor: the first page.
        let Some(cursor) = self.cursor.as_deref().filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        T::from_cursor(cursor).map(Some).ok_or_else(|| {
            ApiError::BadRequest("invalid cursor: pass next_cursor of a previous page".into())
        })
    }
}

/// The `type` filter of jobs: a job type such as `project.create`.
pub const JOB_TYPE_PATTERN: &str = "^[a-z0-9_.]{1,63}$";

/// The schema of the `type` filter of jobs.
pub fn job_type_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(JOB_TYPE_PATTERN))
        .description(Some("A job type such as `project.create`."))
        .build()
}

/// Reads the `type` filter of jobs (`deserialize_with`, with `default`): text
/// [`JOB_TYPE_PATTERN`] refuses is a 400, never a query the database fails on (NUL).
pub fn job_type<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(deserializer)?;
    match value {
        Some(t)
            if !(1..=63).contains(&t.len())
                || !t.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.".contains(&b)
                }) =>
        {
            Err(serde::de::Error::custom(
                "a job type is 1 to 63 lowercase letters, digits, '_' and '.'",
            ))
        }
        other => Ok(other),
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
/// next page when there is one (the last row's key, as [`CursorKey`] reads it).
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
    let next = rows.last().map(|row| key(row).to_string());
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
        assert!(bad(None, "not a uuid").after::<Uuid>().is_err());
        let simple = Uuid::nil().simple().to_string();
        assert!(bad(None, &simple).after::<Uuid>().is_err());
        assert!(bad(None, "-1").after::<i32>().is_err());
        assert!(bad(None, "1234567890").after::<i32>().is_err());
        assert!(bad(None, "a\u{0}b").after::<String>().is_err());
        assert_eq!(bad(None, "").after::<i32>().unwrap(), None);
    }

    #[derive(Deserialize)]
    struct JobTypeOnly {
        #[serde(rename = "type", default, deserialize_with = "job_type")]
        _job_type: Option<String>,
    }

    /// Each key type takes exactly what its pattern in the document allows.
    #[test]
    fn cursor_keys_agree_with_their_patterns() {
        let samples = [
            "",
            "0",
            "123456789",
            "1234567890",
            "-1",
            "+1",
            "x",
            "pg_trgm",
            "Ä",
            "a\u{7f}",
            "a\u{85}",
            "a\nb",
            "00000000-0000-0000-0000-000000000000",
            "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B",
            "00000000000000000000000000000000",
            "{00000000-0000-0000-0000-000000000000}",
            "00000000-0000-0000-0000-00000000000g",
        ];
        let matches =
            |pattern: &str, text: &str| regex::Regex::new(pattern).unwrap().is_match(text);
        let page = |c: &str| PageParams {
            limit: None,
            cursor: Some(c.into()),
        };
        for sample in samples {
            let uuid = matches(UUID_CURSOR_PATTERN, sample);
            assert_eq!(page(sample).after::<Uuid>().is_ok(), uuid, "{sample:?}");
            let name = matches(NAME_CURSOR_PATTERN, sample);
            assert_eq!(page(sample).after::<String>().is_ok(), name, "{sample:?}");
            let number = matches(NUMBER_CURSOR_PATTERN, sample);
            assert_eq!(page(sample).after::<i32>().is_ok(), number, "{sample:?}");
        }
    }

    #[test]
    fn the_job_type_filter_agrees_with_its_pattern() {
        let pattern = regex::Regex::new(JOB_TYPE_PATTERN).unwrap();
        let long = "a".repeat(64);
        for sample in [
            "project.create",
            "project.extension_enable",
            "capy.noop",
            "",
            "a\0b",
            "\0",
            "Project.Create",
            "a b",
            "a-b",
            &long[1..],
            &long,
        ] {
            let query = format!(
                "type={}",
                url::form_urlencoded::byte_serialize(sample.as_bytes()).collect::<String>()
            );
            let read = Query::<JobTypeOnly>::try_from_uri(&format!("/?{query}").parse().unwrap());
            assert_eq!(read.is_ok(), pattern.is_match(sample), "{sample:?}");
        }
    }
}
