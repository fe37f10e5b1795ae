//! Bearer API keys: global ones from the config, plus each plugin's own.

use http::HeaderMap;

use super::errors::ApiError;

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compare without leaking where the first difference is.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Check a request against the accepted keys; no keys at all means the route is open.
pub fn check<'k>(headers: &HeaderMap, keys: impl Iterator<Item = &'k String> + Clone) -> Result<(), ApiError> {
    if keys.clone().next().is_none() {
        return Ok(());
    }
    match bearer(headers) {
        None => Err(ApiError::unauthorized("missing API key: send Authorization: Bearer <key>")),
        Some(token) if keys.clone().any(|k| same(k, token)) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("invalid API key")),
    }
}
