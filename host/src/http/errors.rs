//! Every failure a client can cause, as a status and a JSON body.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use super::body::{full, ServerBody};
use crate::plugins::{InvokeError, TrapKind};

/// An error answer: `{"error": {"message", "type", "code"}}` (OpenAI's shape, so OpenAI
/// clients show the message).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), retry_after: None }
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }

    /// 429: the request's API key has spent a quota.
    pub fn quota(key: &str, refused: &crate::tenants::Refused) -> Self {
        let exceeded = refused.for_key(key);
        // A request larger than the whole quota gets a minute: all of it comes back by then.
        let after = refused.retry_after.unwrap_or(Duration::from_secs(60));
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", exceeded.to_string()).retry_after(after)
    }

    pub fn into_response(self) -> Response<ServerBody> {
        let body = json!({
            "error": { "message": self.message, "type": self.kind, "param": null, "code": self.status.as_u16() }
        });
        let mut resp = Response::new(full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(after) = self.retry_after {
            // Rounded up: a client that waits this long finds room.
            let secs = after.as_millis().div_ceil(1000).max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> Self {
        ApiError::from(&e)
    }
}

impl From<&InvokeError> for ApiError {
    fn from(e: &InvokeError) -> Self {
        let message = e.to_string();
        match e {
            InvokeError::Busy { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                .retry_after(Duration::from_secs(1)),
            InvokeError::Deadline { .. } => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message),
            InvokeError::Trap { kind: TrapKind::MemoryLimit, plugin } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "plugin_error",
                format!("plugin {plugin} exceeded its memory limit"),
            ),
            InvokeError::Trap { kind, plugin } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "plugin_error",
                format!("plugin {plugin} crashed ({})", kind.label()),
            ),
            InvokeError::NoResponse { .. } | InvokeError::GuestError { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "plugin_error", message)
            }
            InvokeError::Instantiate { .. } | InvokeError::PoolFull { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", message)
                    .retry_after(Duration::from_secs(1))
            }
            InvokeError::BadRequest(m) => ApiError::bad_request(m.clone()),
        }
    }
}
