//! Response bodies, and reading request bodies within a size and time limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;

use super::errors::ApiError;
use crate::plugins::{BodyError, InvokeError};

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
    let mut body = std::pin::pin!(body);
    let mut read = bytes::BytesMut::new();
    let collect = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                let e: BoxError = e.into();
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if read.len() + data.len() > limit {
                    return Ok(false);
                }
                read.extend_from_slice(&data);
            }
        }
        Ok::<bool, ApiError>(true)
    };
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {} ms", timeout.as_millis()),
        )),
        Ok(Err(e)) => Err(e),
        Ok(Ok(true)) => Ok(read.freeze()),
        Ok(Ok(false)) => {
            // Read (and drop) a bounded amount more before answering: a client still sending
            // when the connection closes may never see the 413 (hyper does no lingering close).
            let mut drained = 0usize;
            let drain = async {
                while let Some(Ok(frame)) = body.frame().await {
                    drained += frame.data_ref().map_or(0, Bytes::len);
                    if drained > limit.saturating_mul(4).max(MIN_DRAIN_BYTES) {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            Err(too_large(limit))
        }
    }
}

/// How much of an oversized body is read before the 413 goes out, at most.
const MIN_DRAIN_BYTES: usize = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("the request body is larger than the limit of {limit} bytes"),
    )
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every byte was sent and the body ended cleanly.
    Complete,
    /// The body failed after the head was sent; the client sees a cut response.
    Cut(&'static str),
    /// The client went away before the end.
    ClientGone,
}

/// A response body that never disguises a failure as success, and reports how it ended.
///
/// An error from the inner body is passed on, so hyper closes an HTTP/1.1 connection
/// without the final chunk and resets an HTTP/2 stream. For a server-sent event stream, a
/// guest failure is first announced as an `event: error` with OpenAI's error JSON.
/// `on_done` runs once, when the body is dropped, with how it ended and the guard it holds
/// (the serving slot).
pub struct ResponseBody<G: Send + 'static> {
    inner: ServerBody,
    event_stream: bool,
    /// The declared length: hyper stops polling once it is sent, so reaching it is the end.
    content_length: Option<u64>,
    sent: u64,
    /// An error held back until what was sent before it had a chance to go out.
    pending: Option<(BoxError, Pin<Box<tokio::time::Sleep>>)>,
    ending: Option<Ending>,
    guard: Option<G>,
    on_done: Option<Box<dyn FnOnce(Ending, G) + Send>>,
}

/// How long the bytes before a failure (and its error event) get to reach the socket
/// before the response is cut.
const FLUSH_BEFORE_CUT: Duration = Duration::from_millis(50);

impl<G: Send + 'static> ResponseBody<G> {
    /// Wraps the body of a response with these headers.
    pub fn new(
        inner: ServerBody,
        headers: &hyper::HeaderMap,
        guard: G,
        on_done: impl FnOnce(Ending, G) + Send + 'static,
    ) -> Self {
        let header = |name| headers.get(name).and_then(|v: &hyper::header::HeaderValue| v.to_str().ok());
        let event_stream = header(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
        let content_length = header(hyper::header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok());
        Self {
            inner,
            event_stream,
            content_length,
            sent: 0,
            pending: None,
            ending: None,
            guard: Some(guard),
            on_done: Some(Box::new(on_done)),
        }
    }
}

/// The metric label of a failure, and the error a client is told about (guest failures only:
/// a guest that abandoned its own body has said what it wanted to).
fn describe(e: &BoxError) -> (&'static str, Option<ApiError>) {
    match e.downcast_ref::<BodyError>() {
        Some(BodyError::Guest(invoke)) => {
            let reason = match invoke {
                InvokeError::Trap { kind, .. } => kind.label(),
                InvokeError::Deadline { .. } => "deadline",
                _ => "other",
            };
            (reason, Some(ApiError::from(invoke)))
        }
        Some(BodyError::Unfinished { .. }) => ("unfinished", None),
        None => ("host", None),
    }
}

fn error_event(e: &ApiError) -> Bytes {
    let json = serde_json::json!({
        "error": { "message": e.message, "type": e.kind, "param": null, "code": e.status.as_u16() }
    });
    Bytes::from(format!("event: error\ndata: {json}\n\n"))
}

impl<G: Send + 'static> Drop for ResponseBody<G> {
    fn drop(&mut self) {
        let ending = match self.ending {
            Some(ending) => ending,
            None if self.content_length == Some(self.sent) || self.inner.is_end_stream() => Ending::Complete,
            None => Ending::ClientGone,
        };
        // The inner body goes first: for a plugin that stops the guest's inference at once,
        // so whoever sees the ending recorded also sees no more tokens decoded for it.
        drop(std::mem::take(&mut self.inner));
        if let (Some(g), Some(f)) = (self.guard.take(), self.on_done.take()) {
            f(ending, g);
        }
    }
}

impl<G: Send + Unpin + 'static> Body for ResponseBody<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some((_, sleep)) = this.pending.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(this.pending.take().map(|(e, _)| Err(e)));
        }
        if this.ending.is_some() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ending = Some(Ending::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let (reason, notice) = describe(&e);
                this.ending = Some(Ending::Cut(reason));
                // The error is held back a moment, so what was sent before it reaches the
                // client rather than dying in a buffer with the connection.
                let mut flush = Box::pin(tokio::time::sleep(FLUSH_BEFORE_CUT));
                if let Some(notice) = notice.filter(|_| this.event_stream) {
                    this.pending = Some((e, flush));
                    return Poll::Ready(Some(Ok(Frame::data(error_event(&notice)))));
                }
                if flush.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(e)));
                }
                this.pending = Some((e, flush));
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && (self.ending.is_some() || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.ending.is_some() {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}
