"""HTTP glue for `wasi:http/incoming-handler`: routes, JSON in and out, server-sent events."""

import json

from componentize_py_types import Err, Ok
from wit_world.imports import streams as _streams
from wit_world.imports import types as _types

from .errors import FlywheelError, HttpError, to_http_error

# Largest request body the SDK reads (the host enforces its own limit first).
MAX_BODY = 8 << 20
_CHUNK = 4096

_METHODS = {
    _types.Method_Get: "GET",
    _types.Method_Head: "HEAD",
    _types.Method_Post: "POST",
    _types.Method_Put: "PUT",
    _types.Method_Delete: "DELETE",
    _types.Method_Connect: "CONNECT",
    _types.Method_Options: "OPTIONS",
    _types.Method_Trace: "TRACE",
    _types.Method_Patch: "PATCH",
}


class ClientGone(FlywheelError):
    """Writing failed: the client went away. Stop working; nothing more can be sent."""


class Request:
    """A fully read request. `path` is as the client sent it; `route` is the path below the
    plugin's mount (`/fn/<name>/x` -> `/x`; a declared route prefix stays whole)."""

    def __init__(self, method, path_with_query, headers, body):
        self.method = method
        self.path_with_query = path_with_query
        self.path, _, self.query = path_with_query.partition("?")
        self.headers = headers
        self.body = body
        if self.path.startswith("/fn/"):
            rest = self.path[4:].partition("/")[2]
            self.route = "/" + rest.rstrip("/") if rest.strip("/") else "/"
        else:
            self.route = self.path

    def header(self, name):
        return self.headers.get(name.lower())

    def json(self):
        """The body as JSON; a 400 when it is empty, not UTF-8 or not JSON."""
        if not self.body:
            raise HttpError.bad_request("the request body is empty; send a JSON object")
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HttpError.bad_request(f"the request body is not valid UTF-8: {e}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise HttpError.bad_request(f"invalid JSON body: {e}") from None

    def json_object(self):
        """The body as a JSON object (dict); a 400 otherwise."""
        value = self.json()
        if not isinstance(value, dict):
            raise HttpError.bad_request("the request body must be a JSON object")
        return value


def _read_request(request):
    headers = {}
    with request.headers() as fields:
        for name, value in fields.entries():
            headers[name.lower()] = value.decode("latin-1")
    method = request.method()
    name = method.value if isinstance(method, _types.Method_Other) else _METHODS.get(type(method), "GET")
    path = request.path_with_query() or "/"
    chunks, size = [], 0
    with request.consume() as incoming:
        with incoming.stream() as stream:
            while True:
                try:
                    chunk = stream.blocking_read(64 * 1024)
                except Err as e:
                    if isinstance(e.value, _streams.StreamError_Closed):
                        break
                    raise HttpError.bad_request("reading the request body failed") from None
                size += len(chunk)
                if size > MAX_BODY:
                    raise HttpError(413, "invalid_request_error", "the request body is too large")
                chunks.append(chunk)
    return Request(name, path, headers, b"".join(chunks))


def _write_all(stream, data):
    try:
        for i in range(0, len(data), _CHUNK):
            stream.blocking_write_and_flush(data[i : i + _CHUNK])
    except Err:
        raise ClientGone("the client went away") from None


class Responder:
    """Where the response goes. A request gets one response: the first answering call
    (`json`, `send`, `error`, `sse`) uses it up."""

    def __init__(self, out):
        self._out = out
        # The streams this response opened, so the App can cut one left open.
        self.streams = []

    @property
    def started(self):
        return self._out is None

    def _start(self, status, headers):
        if self._out is None:
            raise HttpError(500, "server_error", "the response was already sent")
        out, self._out = self._out, None
        fields = _types.Fields.from_list([(k, v.encode("latin-1")) for k, v in headers])
        resp = _types.OutgoingResponse(fields)
        resp.set_status_code(status)
        body = resp.body()
        _types.ResponseOutparam.set(out, Ok(resp))
        return body

    def send(self, status, content_type, data, headers=()):
        """Answer with a complete body (bytes or str)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        all_headers = [("content-type", content_type), ("content-length", str(len(data))), *headers]
        body = self._start(status, all_headers)
        with body.write() as stream:
            _write_all(stream, data)
        _types.OutgoingBody.finish(body, None)

    def json(self, value, status=200):
        self.send(status, "application/json", json.dumps(value, ensure_ascii=False))

    def error(self, e):
        """Answer with an error in OpenAI's shape; 429 and 503 carry Retry-After."""
        after = str(e.retry_after or 1)
        extra = [("retry-after", after)] if e.status in (429, 503) else []
        self.send(e.status, "application/json", json.dumps(e.to_json()), extra)

    def sse(self):
        """Start a `text/event-stream` response."""
        body = self._start(
            200, [("content-type", "text/event-stream"), ("cache-control", "no-cache"), ("x-accel-buffering", "no")]
        )
        stream = SseStream(body)
        self.streams.append(stream)
        return stream


class SseStream:
    """Server-sent events. End with `done()` (sends `data: [DONE]`) or `finish()`; `fail(e)`
    sends an `event: error` and then abandons the body, so the host cuts the response and no
    client can take a partial answer as whole. A stream left open when the handler raises is
    failed the same way."""

    def __init__(self, body):
        self._body = body
        self._stream = body.write()

    def send(self, data):
        """Send one `data:` event: a str as is, anything else as JSON."""
        if self._stream is None:
            raise HttpError(500, "server_error", "the stream is closed")
        if not isinstance(data, str):
            data = json.dumps(data, ensure_ascii=False)
        event = "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"
        _write_all(self._stream, event.encode("utf-8"))

    def done(self):
        self.send("[DONE]")
        self.finish()

    def finish(self):
        if self._stream is not None:
            self._stream.__exit__(None, None, None)
            self._stream = None
            _types.OutgoingBody.finish(self._body, None)
            self._body = None

    def fail(self, e):
        if self._stream is None:
            return
        try:
            _write_all(self._stream, f"event: error\ndata: {json.dumps(e.to_json())}\n\n".encode("utf-8"))
        except ClientGone:
            pass
        # The stream is a child of the body: drop it first, then the body unfinished.
        self._stream.__exit__(None, None, None)
        self._stream = None
        self._body.__exit__(None, None, None)
        self._body = None

    @property
    def open(self):
        return self._stream is not None


class App:
    """Routes requests to handlers. A handler takes (request, responder); a value it returns
    (dict or list) is sent as JSON with status 200, and an exception it raises becomes a JSON
    error (an HttpError keeps its status; a model or inference error maps as in the Rust SDK).

        app = App()

        @app.post("/")
        def hello(req, res):
            return {"hi": req.json_object().get("name")}

        IncomingHandler = app.handler
    """

    def __init__(self):
        self._routes = []

    def route(self, path, methods=("POST",)):
        def register(fn):
            self._routes.append((path, tuple(m.upper() for m in methods), fn))
            return fn

        return register

    def post(self, path):
        return self.route(path, ("POST",))

    def get(self, path):
        return self.route(path, ("GET",))

    def _find(self, req):
        allowed = []
        for path, methods, fn in self._routes:
            if path in (req.route, req.path):
                if req.method in methods:
                    return fn
                allowed.extend(methods)
        if allowed:
            raise HttpError(405, "invalid_request_error", f"use {' or '.join(sorted(set(allowed)))} for {req.route}")
        raise HttpError.not_found(f"no route {req.route}")

    def serve(self, request, response_out):
        res = Responder(response_out)
        try:
            req = _read_request(request)
            value = self._find(req)(req, res)
            if not res.started:
                if value is None:
                    raise HttpError(500, "server_error", "the handler sent no response")
                res.json(value)
        except ClientGone:
            pass
        except Exception as e:  # every failure becomes an answer the client can read
            err = to_http_error(e)
            if not res.started:
                res.error(err)
            for s in res.streams:
                s.fail(err)
            return
        for s in res.streams:
            if s.open:
                # A handler that returned without ending its stream did not finish the answer.
                s.fail(HttpError(500, "server_error", "the handler returned without ending its stream"))

    @property
    def handler(self):
        """The class to export as `IncomingHandler` from the plugin's main module."""
        app = self

        class IncomingHandler:
            def handle(self, request, response_out):
                app.serve(request, response_out)

        return IncomingHandler
