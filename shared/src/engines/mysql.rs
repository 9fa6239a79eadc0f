//! mysql: admin access check (to be written).

use super::EngineAccess;

/// Checks `admin_url` (never printed) and reports what the admin may do.
pub async fn check_access(_admin_url: &str) -> EngineAccess {
    EngineAccess {
        error_kind: Some("other".into()),
        error: Some("not written yet".into()),
        ..EngineAccess::default()
    }
}
