//! Errors from inference calls and the HTTP status each maps to.

use crate::bindings::flywheel::llm::model as llm;
use crate::bindings::flywheel::llm::quota;
use crate::bindings::wasi::nn::errors::{Error as NnErrorResource, ErrorCode as NnCode};

/// A failed inference or tokenization call.
#[derive(Clone, Debug)]
pub enum Error {
    /// A `wasi:nn` call failed.
    Nn { code: NnCode, message: String },
    /// A `flywheel:llm` call failed.
    Llm { code: llm::ErrorCode, message: String },
    /// The request's API key spent a quota (its token quota, mid-generation): answer 429.
    /// `retry_after_ms` is `None` when the request can never fit the quota.
    Quota { message: String, retry_after_ms: Option<u64> },
    /// The host returned something this SDK did not expect.
    Protocol(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Nn { message, .. }
            | Error::Llm { message, .. }
            | Error::Quota { message, .. }
            | Error::Protocol(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

impl From<NnErrorResource> for Error {
    fn from(e: NnErrorResource) -> Self {
        if let Some(q) = quota::exceeded(&e) {
            return Error::Quota { message: e.data(), retry_after_ms: q.retry_after_ms };
        }
        Error::Nn { code: e.code(), message: e.data() }
    }
}

impl From<llm::Error> for Error {
    fn from(e: llm::Error) -> Self {
        Error::Llm { code: e.code, message: e.message }
    }
}

/// An HTTP error answer: status, a machine-readable type and a message.
#[derive(Clone, Debug)]
pub struct HttpError {
    pub status: u16,
    /// A short type such as `invalid_request_error`.
    pub kind: String,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// Seconds a client should wait before retrying (the `Retry-After` header of 429 and
    /// 503 answers; 1 when unset).
    pub retry_after: Option<u64>,
}

impl HttpError {
    pub fn new(status: u16, kind: &str, message: impl Into<String>) -> Self {
        Self { status, kind: kind.to_string(), message: message.into(), param: None, retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found_error", message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// The error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.status }
        })
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)
    }
}

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        let (status, kind) = match &e {
            Error::Nn { code, .. } => match code {
                NnCode::InvalidArgument | NnCode::InvalidEncoding => (400, "invalid_request_error"),
                NnCode::TooLarge => (400, "context_length_exceeded"),
                NnCode::NotFound => (404, "model_not_found"),
                NnCode::Security => (403, "permission_error"),
                NnCode::Timeout => (503, "overloaded_error"),
                NnCode::UnsupportedOperation => (501, "unsupported_error"),
                _ => (500, "server_error"),
            },
            Error::Llm { code, .. } => match code {
                llm::ErrorCode::NotFound => (404, "model_not_found"),
                llm::ErrorCode::NotAllowed => (403, "permission_error"),
                llm::ErrorCode::InvalidArgument => (400, "invalid_request_error"),
                llm::ErrorCode::Unsupported => (400, "unsupported_error"),
            },
            Error::Quota { retry_after_ms, .. } => {
                let mut h = HttpError::new(429, "rate_limit_error", e.to_string());
                // Rounded up; a request that can never fit is told to wait a whole minute.
                h.retry_after = Some(retry_after_ms.map_or(60, |ms| ms.div_ceil(1000).max(1)));
                return h;
            }
            Error::Protocol(_) => (500, "server_error"),
        };
        HttpError::new(status, kind, e.to_string())
    }
}

impl From<serde_json::Error> for HttpError {
    fn from(e: serde_json::Error) -> Self {
        HttpError::bad_request(format!("invalid JSON body: {e}"))
    }
}
