//! What a project's name and settings may be, for create and PATCH alike.

use capy_shared::ident;

use crate::error::{ApiError, ApiResult};

pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<i32> = 1..=1000;
/// [`name`], as the OpenAPI document states it.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$";
/// [`label`], as the OpenAPI document states it (the same as clusters' regions).
pub const LABEL_PATTERN: &str = "^[a-z0-9_-]{1,32}$";

fn bad<T>(message: impl Into<String>) -> ApiResult<T> {
    Err(ApiError::BadRequest(message.into()))
}

pub fn name(name: &str) -> ApiResult<()> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        bad("name must be 1 to 63 characters: letters, digits, '-' and '_', starting with a letter or digit")
    }
}

/// Regions and environments: short lowercase labels, as clusters' regions are.
pub fn label(field: &str, value: Option<&str>) -> ApiResult<()> {
    let valid = |v: &str| {
        (1..=32).contains(&v.len())
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
    };
    match value {
        Some(v) if !valid(v) => bad(format!(
            "{field} must be 1 to 32 characters: lowercase letters, digits, '-' and '_'"
        )),
        _ => Ok(()),
    }
}

pub fn max_connections(value: Option<i32>) -> ApiResult<()> {
    match value {
        Some(n) if !MAX_CONNECTIONS_RANGE.contains(&n) => bad(format!(
            "max_connections must be between {} and {}",
            MAX_CONNECTIONS_RANGE.start(),
            MAX_CONNECTIONS_RANGE.end()
        )),
        _ => Ok(()),
    }
}

pub fn duration(field: &str, value: Option<&str>) -> ApiResult<()> {
    match value {
        Some(v) if !ident::is_requestable_duration(v) => bad(format!(
            "{field} must be a duration such as \"30s\", \"500ms\", \"5min\" or \"0\" (no limit): \
             at most 9 digits of ms (the default unit), 6 of s, 4 of min, 2 of h or 1 of d"
        )),
        _ => Ok(()),
    }
}

pub fn storage_limit(value: Option<i64>) -> ApiResult<()> {
    match value {
        Some(b) if b < 0 => bad("storage_limit_bytes must not be negative"),
        _ => Ok(()),
    }
}

/// The hours a rotated-out login keeps working.
pub const GRACE_HOURS_RANGE: std::ops::RangeInclusive<i32> = 0..=720;

/// `grace_hours` as sent (any JSON: its own message for every wrong kind); `default`
/// when left out or null.
pub fn grace_hours(value: Option<&serde_json::Value>, default: i32) -> ApiResult<i32> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(default);
    };
    // A whole number however JSON writes it (1 or 1.0), as JSON Schema's integer.
    let whole = value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e9)
            .map(|f| f as i64)
    });
    match whole.and_then(|n| i32::try_from(n).ok()) {
        Some(hours) if GRACE_HOURS_RANGE.contains(&hours) => Ok(hours),
        _ => bad(format!(
            "grace_hours must be a whole number of hours from {} to {} (30 days), not {value}",
            GRACE_HOURS_RANGE.start(),
            GRACE_HOURS_RANGE.end()
        )),
    }
}
