//! What a project's name and settings may be, for create and PATCH alike.

use capy_shared::ident;

use crate::error::{ApiError, ApiResult};

pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<i32> = 1..=1000;

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

/// Regions and environments: short lowercase labels.
pub fn label(field: &str, value: Option<&str>) -> ApiResult<()> {
    let valid = |v: &str| {
        (1..=32).contains(&v.len())
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match value {
        Some(v) if !valid(v) => bad(format!(
            "{field} must be 1 to 32 characters: lowercase letters, digits and '-'"
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
        Some(v) if !ident::is_valid_duration(v) => bad(format!(
            "{field} must be a duration such as \"30s\", \"500ms\", \"5min\" or \"0\" (no limit)"
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
