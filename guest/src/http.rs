//! HTTP glue: read the request, answer with JSON, or stream server-sent events.

use std::cell::RefCell;
use std::rc::Rc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use wasip2::http::types::{Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};
use wasip2::io::streams::{OutputStream, StreamError};

use crate::HttpError;

/// Largest request body the SDK reads (the host enforces its own limit first).
pub const MAX_BODY: usize = 8 << 20;

/// A plugin's request handler.
pub trait Handler {
    /// Answer `req` through `res`. An `Err` returned before anything was sent becomes a
    /// JSON error response with its status.
    fn handle(req: Request, res: Responder) -> Result<(), HttpError>;
}

/// A fully read request.
pub struct Request {
    pub method: String,
    /// Path and query, as the client sent them.
    pub path_with_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn path(&self) -> &str {
        self.path_with_query.split('?').next().unwrap_or("")
    }

    pub fn query(&self) -> Option<&str> {
        self.path_with_query.split_once('?').map(|(_, q)| q)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The body as JSON of type `T`; a clear 400 error when it is not.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        if self.body.is_empty() {
            return Err(HttpError::bad_request("the request body is empty; send a JSON object"));
        }
        let text = std::str::from_utf8(&self.body)
            .map_err(|e| HttpError::bad_request(format!("the request body is not valid UTF-8: {e}")))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| field_error(&e))?;
        de.end().map_err(HttpError::from)?;
        Ok(value)
    }
}

/// Parse `T` from JSON already read, with the same errors as [`Request::json`]: a type
/// error names the field at fault (`param`), as `messages[0].role`.
pub fn from_json_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, HttpError> {
    serde_path_to_error::deserialize(value).map_err(|e| field_error(&e))
}

fn field_error(e: &serde_path_to_error::Error<serde_json::Error>) -> HttpError {
    let path = e.path().to_string();
    // Broken syntax is no field's fault, and the root (".") is no field.
    let syntax = e.inner().classify() != serde_json::error::Category::Data;
    if syntax || path == "." || path.is_empty() {
        return HttpError::bad_request(format!("invalid JSON body: {}", e.inner()));
    }
    HttpError::bad_request(format!("invalid value for {path}: {}", e.inner())).with_param(&path)
}

fn method_name(m: &Method) -> String {
    match m {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(s) => s.clone(),
    }
}

fn read_request(req: &IncomingRequest) -> Result<Request, HttpError> {
    let headers = req.headers().entries();
    let mut body = Vec::new();
    let incoming = req.consume().map_err(|()| HttpError::bad_request("the request body was already consumed"))?;
    {
        let stream = incoming.stream().map_err(|()| HttpError::bad_request("cannot read the request body"))?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        return Err(HttpError::new(413, "invalid_request_error", "the request body is too large"));
                    }
                    body.extend_from_slice(&chunk);
                }
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(HttpError::bad_request(format!(
                        "reading the request body failed: {}",
                        e.to_debug_string()
                    )));
                }
            }
        }
    }
    Ok(Request {
        method: method_name(&req.method()),
        path_with_query: req.path_with_query().unwrap_or_else(|| "/".into()),
        headers,
        body,
    })
}

/// The entry point `export_plugin!` generates a call to.
pub fn serve<H: Handler>(request: IncomingRequest, out: ResponseOutparam) {
    let out = Rc::new(RefCell::new(Some(out)));
    let req = read_request(&request);
    drop(request);
    let result = req.and_then(|req| H::handle(req, Responder { out: out.clone() }));
    if let Err(e) = result {
        // Only possible to report if no response was started; otherwise the stream just ends.
        if out.borrow().is_some() {
            Responder { out }.error(&e);
        }
    }
}

/// Where the response goes. Each answering method consumes it: a request gets one response.
pub struct Responder {
    out: Rc<RefCell<Option<ResponseOutparam>>>,
}

impl Responder {
    fn take_out(&self) -> Option<ResponseOutparam> {
        self.out.borrow_mut().take()
    }

    fn start(self, status: u16, headers: &[(&str, &str)]) -> Result<OutgoingBody, HttpError> {
        let out = self.take_out().ok_or_else(|| HttpError::new(500, "server_error", "response already sent"))?;
        let list: Vec<(String, Vec<u8>)> =
            headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        let fields =
            Fields::from_list(&list).map_err(|e| HttpError::new(500, "server_error", format!("bad header: {e:?}")))?;
        let resp = OutgoingResponse::new(fields);
        resp.set_status_code(status)
            .map_err(|()| HttpError::new(500, "server_error", format!("bad status {status}")))?;
        let body = resp.body().map_err(|()| HttpError::new(500, "server_error", "no response body"))?;
        ResponseOutparam::set(out, Ok(resp));
        Ok(body)
    }

    /// Answer with a complete body.
    pub fn send(self, status: u16, content_type: &str, body: &[u8]) -> Result<(), HttpError> {
        self.send_with(status, &[("content-type", content_type)], body)
    }

    /// Answer with a complete body and these headers (`content-length` is added).
    pub fn send_with(self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HttpError> {
        let len = body.len().to_string();
        let mut all = headers.to_vec();
        all.push(("content-length", &len));
        let outgoing = self.start(status, &all)?;
        {
            let stream = outgoing.write().map_err(|()| HttpError::new(500, "server_error", "no body stream"))?;
            write_all(&stream, body).map_err(|_| HttpError::new(499, "client_closed", "the client went away"))?;
        }
        OutgoingBody::finish(outgoing, None).map_err(|e| HttpError::new(500, "server_error", format!("{e:?}")))
    }

    /// Answer with JSON.
    pub fn json<T: Serialize>(self, status: u16, value: &T) -> Result<(), HttpError> {
        let body = serde_json::to_vec(value).map_err(|e| HttpError::new(500, "server_error", e.to_string()))?;
        self.send(status, "application/json", &body)
    }

    /// Answer with an error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
    pub fn error(self, e: &HttpError) {
        let body = e.to_json();
        let mut headers = vec![("content-type", "application/json")];
        let retry_after = e.retry_after.unwrap_or(1).to_string();
        if e.status == 429 || e.status == 503 {
            // Busy, not broken: tell clients when to come back.
            headers.push(("retry-after", retry_after.as_str()));
        }
        // Nothing more can be done if even the error cannot be sent.
        let _ = self.send_with(e.status, &headers, body.to_string().as_bytes());
    }

    /// Start a `text/event-stream` response.
    pub fn sse(self) -> Result<SseStream, HttpError> {
        let body = self.start(
            200,
            &[("content-type", "text/event-stream"), ("cache-control", "no-cache"), ("x-accel-buffering", "no")],
        )?;
        let stream = body.write().map_err(|()| HttpError::new(500, "server_error", "no body stream"))?;
        Ok(SseStream { stream: Some(stream), body: Some(body) })
    }
}

/// Writes in the chunk sizes WASI streams accept.
fn write_all(stream: &OutputStream, mut bytes: &[u8]) -> Result<(), StreamError> {
    while !bytes.is_empty() {
        let n = bytes.len().min(4096);
        stream.blocking_write_and_flush(&bytes[..n])?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// A server-sent events stream. A failed send means the client went away: stop working.
///
/// End it with [`SseStream::done`] or [`SseStream::finish`] when it is complete, or with
/// [`SseStream::fail`] when it is not. A stream dropped without either (the handler
/// returned an error, or trapped) is cut by the host, so the client sees it as incomplete.
pub struct SseStream {
    stream: Option<OutputStream>,
    body: Option<OutgoingBody>,
}

impl SseStream {
    /// Send one `data:` event.
    pub fn send_data(&mut self, data: &str) -> Result<(), HttpError> {
        let stream = self.stream.as_ref().ok_or_else(|| HttpError::new(500, "server_error", "stream closed"))?;
        let mut event = String::with_capacity(data.len() + 8);
        for line in data.split('\n') {
            event.push_str("data: ");
            event.push_str(line);
            event.push('\n');
        }
        event.push('\n');
        write_all(stream, event.as_bytes()).map_err(|_| HttpError::new(499, "client_closed", "the client went away"))
    }

    pub fn send_json<T: Serialize>(&mut self, value: &T) -> Result<(), HttpError> {
        let data = serde_json::to_string(value).map_err(|e| HttpError::new(500, "server_error", e.to_string()))?;
        self.send_data(&data)
    }

    /// Send `data: [DONE]` and end the stream.
    pub fn done(mut self) -> Result<(), HttpError> {
        self.send_data("[DONE]")?;
        self.finish()
    }

    /// End the stream as failed: an `event: error` carrying `e` in OpenAI's error shape,
    /// then the body is abandoned unfinished, so the host cuts the response (HTTP/1.1
    /// closes without the final chunk, HTTP/2 resets the stream) and no client can take the
    /// partial answer as whole.
    pub fn fail(mut self, e: &HttpError) {
        if let Some(stream) = self.stream.take() {
            let event = format!("event: error\ndata: {}\n\n", e.to_json());
            // The client may be gone already; the body is cut either way.
            let _ = write_all(&stream, event.as_bytes());
        }
        // Dropped without `finish`: the host sees an aborted body.
        self.body.take();
    }

    /// End the stream.
    pub fn finish(mut self) -> Result<(), HttpError> {
        self.stream.take();
        match self.body.take() {
            Some(body) => {
                OutgoingBody::finish(body, None).map_err(|e| HttpError::new(500, "server_error", format!("{e:?}")))
            }
            None => Ok(()),
        }
    }
}
