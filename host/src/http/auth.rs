//! The admin key. (API keys for plugins are tenants: `crate::tenants`.)

use http::HeaderMap;

use super::errors::ApiError;
use crate::tenants::{bearer, same_key};

/// Check a request to the admin API against the admin key.
pub fn check_admin(headers: &HeaderMap, admin_key: &str) -> Result<(), ApiError> {
    match bearer(headers) {
        None => Err(ApiError::unauthorized("missing API key: send Authorization: Bearer <key>")),
        Some(token) if same_key(admin_key, token) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("invalid API key")),
    }
}
