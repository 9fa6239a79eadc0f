//! Response bodies shared by several endpoints, and the error answers every endpoint
//! may give, for the OpenAPI document.

use capy_shared::ident;
use capy_shared::model::{Job, Project};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{Array, ArrayBuilder, Object, ObjectBuilder, SchemaType, Type};
use utoipa::openapi::{OpenApi, Required};
use utoipa::{IntoResponses, Modify, ToSchema};

use crate::auth::SCOPES;
use crate::routes::projects::{LABEL_PATTERN, NAME_PATTERN};

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

/// An optional integer field (`deserialize_with`, with `default`): it takes a whole
/// number however JSON writes it, `5` or `5.0`, since JSON Schema's `integer` (what the
/// document says) is any number without a fraction.
pub fn whole<'de, D: Deserializer<'de>, T: TryFrom<i64>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    // Below 2^63 in magnitude, so the cast is exact.
    let float = || {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
            .map(|f| f as i64)
    };
    number
        .as_i64()
        .or_else(float)
        .and_then(|n| T::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{number} is not a whole number in range")))
}

/// As [`whole`], telling a field sent as `null` (`Some(None)`) from one left out (`None`).
pub fn present_whole<'de, D: Deserializer<'de>, T: TryFrom<i64>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    whole(deserializer).map(Some)
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters (what
/// `idempotency::layer` checks).
pub const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]{1,255}$";

/// Whitespace as Rust's `str::trim` removes it (Unicode `White_Space`), spelt out so
/// every regex dialect (ECMA, Python, Rust) reads it alike.
macro_rules! white_space {
    () => {
        r"\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    };
}
/// Control characters (`char::is_control`: Unicode `Cc`).
macro_rules! control {
    () => {
        r"\u0000-\u001f\u007f-\u009f"
    };
}

/// Organization and API key names, and an instant database's `ref`: 1 to 100
/// characters once the whitespace around them is trimmed, none of them a control
/// character (what their handlers check, after `trim()`).
pub const DISPLAY_NAME_PATTERN: &str = concat!(
    "^[",
    white_space!(),
    "]*[^",
    white_space!(),
    control!(),
    "](?:[^",
    control!(),
    "]{0,98}[^",
    white_space!(),
    control!(),
    "])?[",
    white_space!(),
    "]*$"
);

fn string(pattern: &str, nullable: bool, description: &str) -> Object {
    let kind = if nullable {
        SchemaType::from_iter([Type::String, Type::Null])
    } else {
        SchemaType::Type(Type::String)
    };
    ObjectBuilder::new()
        .schema_type(kind)
        .pattern(Some(pattern))
        .description(Some(description))
        .build()
}

/// A timeout (`schema_with` of optional duration fields).
pub fn duration() -> Object {
    string(
        ident::DURATION_PATTERN,
        true,
        "A duration: an integer and a unit, `ms` (the default), `s`, `min`, `h` or `d`, \
         such as \"30s\"; \"0\" is no limit. At most 9 digits of ms, 6 of s, 4 of min, 2 of h, \
         1 of d.",
    )
}

const PROJECT_NAME: &str = "1 to 63 letters, digits, '-' and '_', starting with a letter or \
    digit; unique among the organization's projects.";

/// A project's name, required.
pub fn project_name() -> Object {
    string(NAME_PATTERN, false, PROJECT_NAME)
}

/// A project's name, optional.
pub fn project_name_or_null() -> Object {
    string(NAME_PATTERN, true, PROJECT_NAME)
}

/// A region or environment, optional.
pub fn label_or_null() -> Object {
    string(
        LABEL_PATTERN,
        true,
        "1 to 32 lowercase letters, digits, '-' and '_'.",
    )
}

/// An organization's or API key's name.
pub fn display_name() -> Object {
    string(
        DISPLAY_NAME_PATTERN,
        false,
        "1 to 100 characters once trimmed of surrounding whitespace, without control characters.",
    )
}

/// An instant database's `ref`: required, and not blank.
pub fn reference() -> Object {
    string(
        DISPLAY_NAME_PATTERN,
        false,
        "Who is asking (your app's name): 1 to 100 characters once trimmed of surrounding \
         whitespace, without control characters.",
    )
}

/// One of `values`, or null.
pub fn enum_or_null(values: &[&str], description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(values.iter().copied().map(Some).chain([None])))
        .description(Some(description))
        .build()
}

/// A new key's scopes: a non-empty list of [`SCOPES`], or null for all of the creator's.
pub fn scopes() -> Array {
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(SCOPES)),
        )
        .min_items(Some(1))
        .description(Some(
            "Any of `read`, `write`, `credentials:read` (at least one); all of the creator's \
             when left out or null.",
        ))
        .build()
}

/// Adds the `Idempotency-Key` header, with its schema, to every POST (replacing one an
/// operation states itself), so no POST lacks it or states it differently.
pub struct IdempotencyKeyHeader;

impl IdempotencyKeyHeader {
    pub fn parameter() -> Parameter {
        ParameterBuilder::new()
            .name("Idempotency-Key")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "Replays the first answer for a repeated key (kept a day, per API key; \
                 ignored without an Authorization header). 1 to 255 visible ASCII characters.",
            ))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(IDEMPOTENCY_KEY_PATTERN))
                    .min_length(Some(1))
                    .max_length(Some(255)),
            ))
            .build()
    }
}

impl Modify for IdempotencyKeyHeader {
    fn modify(&self, openapi: &mut OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let Some(post) = item.post.as_mut() else {
                continue;
            };
            let parameters = post.parameters.get_or_insert_with(Vec::new);
            parameters.retain(|p| !p.name.eq_ignore_ascii_case("Idempotency-Key"));
            parameters.push(Self::parameter());
        }
    }
}
