//! Response bodies, and reading request bodies within a size and time limit.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::StatusCode;

use super::errors::ApiError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ServerBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ServerBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Read a whole request body, refusing more than `limit` bytes (413) or a client slower
/// than `timeout` (408).
pub async fn read_limited<B>(body: B, limit: usize, timeout: Duration) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {} ms", timeout.as_millis()),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large(limit)),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("cannot read the request body: {e}"),
        )),
    }
}

pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("the request body is larger than the limit of {limit} bytes"),
    )
}

/// A body that runs `on_done` once, when it is dropped: after the last byte was sent, or
/// when the client went away. Holds whatever must live as long as the response (the
/// serving slot).
pub struct TrackedBody<G: Send + 'static> {
    inner: ServerBody,
    guard: Option<G>,
    on_done: Option<Box<dyn FnOnce(G) + Send>>,
}

impl<G: Send + 'static> TrackedBody<G> {
    pub fn new(inner: ServerBody, guard: G, on_done: impl FnOnce(G) + Send + 'static) -> Self {
        Self { inner, guard: Some(guard), on_done: Some(Box::new(on_done)) }
    }
}

impl<G: Send + 'static> Drop for TrackedBody<G> {
    fn drop(&mut self) {
        if let (Some(g), Some(f)) = (self.guard.take(), self.on_done.take()) {
            f(g);
        }
    }
}

impl<G: Send + Unpin + 'static> Body for TrackedBody<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
