// HTTP glue for `wasi:http/incoming-handler`: routes, JSON in and out, server-sent events.
import { Fields, OutgoingBody, OutgoingResponse, ResponseOutparam } from 'wasi:http/types@0.2.12';
import { FlywheelError, HttpError, drop, toHttpError } from './errors.js';

// Largest request body the SDK reads (the host enforces its own limit first).
export const MAX_BODY = 8 << 20;
const CHUNK = 4096;
const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** Writing failed: the client went away. Stop working; nothing more can be sent. */
export class ClientGone extends FlywheelError {}

/**
 * A fully read request. `path` is as the client sent it; `route` is the path below the
 * plugin's mount (`/fn/<name>/x` -> `/x`; a declared route prefix stays whole).
 */
export class Request {
  constructor(method, pathWithQuery, headers, body) {
    this.method = method;
    this.pathWithQuery = pathWithQuery;
    const q = pathWithQuery.indexOf('?');
    this.path = q < 0 ? pathWithQuery : pathWithQuery.slice(0, q);
    this.query = q < 0 ? '' : pathWithQuery.slice(q + 1);
    this.headers = headers;
    this.body = body;
    if (this.path.startsWith('/fn/')) {
      const rest = this.path.slice(4);
      const slash = rest.indexOf('/');
      const below = slash < 0 ? '' : rest.slice(slash + 1).replace(/\/+$/, '');
      this.route = below ? `/${below}` : '/';
    } else {
      this.route = this.path;
    }
  }

  header(name) {
    return this.headers.get(name.toLowerCase()) ?? null;
  }

  /** The body as JSON; a 400 when it is empty, not UTF-8 or not JSON. */
  json() {
    if (this.body.length === 0) throw HttpError.badRequest('the request body is empty; send a JSON object');
    let text;
    try {
      text = decoder.decode(this.body);
    } catch {
      throw HttpError.badRequest('the request body is not valid UTF-8');
    }
    try {
      return JSON.parse(text);
    } catch (e) {
      throw HttpError.badRequest(`invalid JSON body: ${e.message}`);
    }
  }

  /** The body as a JSON object; a 400 otherwise. */
  jsonObject() {
    const value = this.json();
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      throw HttpError.badRequest('the request body must be a JSON object');
    }
    return value;
  }
}

function readRequest(request) {
  const headers = new Map();
  const fields = request.headers();
  for (const [name, value] of fields.entries()) {
    headers.set(name.toLowerCase(), Array.from(value, (c) => String.fromCharCode(c)).join(''));
  }
  drop(fields);
  const method = request.method();
  const name = method.tag === 'other' ? method.val : method.tag.toUpperCase();
  const path = request.pathWithQuery() || '/';
  const chunks = [];
  let size = 0;
  const incoming = request.consume();
  const stream = incoming.stream();
  for (;;) {
    let chunk;
    try {
      chunk = stream.blockingRead(65536n);
    } catch (e) {
      if (e?.payload?.tag === 'closed') break;
      throw HttpError.badRequest('reading the request body failed');
    }
    size += chunk.length;
    if (size > MAX_BODY) throw new HttpError(413, 'invalid_request_error', 'the request body is too large');
    chunks.push(chunk);
  }
  drop(stream);
  drop(incoming);
  const body = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    body.set(c, at);
    at += c.length;
  }
  return new Request(name, path, headers, body);
}

function writeAll(stream, data) {
  try {
    for (let i = 0; i < data.length; i += CHUNK) stream.blockingWriteAndFlush(data.subarray(i, i + CHUNK));
  } catch {
    throw new ClientGone('the client went away');
  }
}

/**
 * Where the response goes. A request gets one response: the first answering call (`json`,
 * `send`, `error`, `sse`) uses it up.
 */
export class Responder {
  constructor(out) {
    this.out = out;
    this.streams = [];
  }

  get started() {
    return this.out === null;
  }

  start(status, headers) {
    if (this.out === null) throw new HttpError(500, 'server_error', 'the response was already sent');
    const out = this.out;
    this.out = null;
    const fields = Fields.fromList(headers.map(([k, v]) => [k, encoder.encode(v)]));
    const resp = new OutgoingResponse(fields);
    resp.setStatusCode(status);
    const body = resp.body();
    ResponseOutparam.set(out, { tag: 'ok', val: resp });
    return body;
  }

  /** Answer with a complete body (Uint8Array or string). */
  send(status, contentType, data, headers = []) {
    const bytes = typeof data === 'string' ? encoder.encode(data) : data;
    const body = this.start(status, [['content-type', contentType], ['content-length', String(bytes.length)], ...headers]);
    const stream = body.write();
    writeAll(stream, bytes);
    drop(stream);
    OutgoingBody.finish(body, undefined);
  }

  json(value, status = 200) {
    this.send(status, 'application/json', JSON.stringify(value));
  }

  /** Answer with an error in OpenAI's shape; 429 and 503 carry Retry-After. */
  error(e) {
    const extra = e.status === 429 || e.status === 503 ? [['retry-after', String(e.retryAfter ?? 1)]] : [];
    this.send(e.status, 'application/json', JSON.stringify(e.toJSON()), extra);
  }

  /** Start a `text/event-stream` response. */
  sse() {
    const body = this.start(200, [
      ['content-type', 'text/event-stream'],
      ['cache-control', 'no-cache'],
      ['x-accel-buffering', 'no'],
    ]);
    const s = new SseStream(body);
    this.streams.push(s);
    return s;
  }
}

/**
 * Server-sent events. End with `done()` (sends `data: [DONE]`) or `finish()`; `fail(e)` sends
 * an `event: error` and then abandons the body, so the host cuts the response and no client
 * can take a partial answer as whole. A stream left open when the handler throws or returns
 * is failed the same way.
 */
export class SseStream {
  constructor(body) {
    this.body = body;
    this.stream = body.write();
  }

  get open() {
    return this.stream !== null;
  }

  /** Send one `data:` event: a string as is, anything else as JSON. */
  send(data) {
    if (!this.stream) throw new HttpError(500, 'server_error', 'the stream is closed');
    const text = typeof data === 'string' ? data : JSON.stringify(data);
    const event = text.split('\n').map((line) => `data: ${line}\n`).join('') + '\n';
    writeAll(this.stream, encoder.encode(event));
  }

  done() {
    this.send('[DONE]');
    this.finish();
  }

  finish() {
    if (!this.stream) return;
    drop(this.stream);
    this.stream = null;
    OutgoingBody.finish(this.body, undefined);
    this.body = null;
  }

  fail(e) {
    if (!this.stream) return;
    try {
      writeAll(this.stream, encoder.encode(`event: error\ndata: ${JSON.stringify(e.toJSON())}\n\n`));
    } catch {
      // The client is gone; nothing to tell it.
    }
    // The stream is a child of the body: drop it first, then the body unfinished.
    drop(this.stream);
    this.stream = null;
    drop(this.body);
    this.body = null;
  }
}

/**
 * Routes requests to handlers. A handler takes (request, responder); a value it returns
 * (object or array) is sent as JSON with status 200, and anything it throws becomes a JSON
 * error (an HttpError keeps its status; model and inference errors map as in the Rust SDK).
 *
 *     const app = new App();
 *     app.post('/', (req, res) => ({ hi: req.jsonObject().name }));
 *     export const incomingHandler = app.handler;
 */
export class App {
  constructor() {
    this.routes = [];
  }

  route(path, methods, fn) {
    this.routes.push([path, methods.map((m) => m.toUpperCase()), fn]);
    return this;
  }

  post(path, fn) {
    return this.route(path, ['POST'], fn);
  }

  get(path, fn) {
    return this.route(path, ['GET'], fn);
  }

  find(req) {
    const allowed = new Set();
    for (const [path, methods, fn] of this.routes) {
      if (path === req.route || path === req.path) {
        if (methods.includes(req.method)) return fn;
        methods.forEach((m) => allowed.add(m));
      }
    }
    if (allowed.size) {
      throw new HttpError(405, 'invalid_request_error', `use ${[...allowed].sort().join(' or ')} for ${req.route}`);
    }
    throw HttpError.notFound(`no route ${req.route}`);
  }

  serve(request, responseOut) {
    const res = new Responder(responseOut);
    try {
      const req = readRequest(request);
      const value = this.find(req)(req, res);
      if (!res.started) {
        if (value === undefined || value === null) throw new HttpError(500, 'server_error', 'the handler sent no response');
        res.json(value);
      }
    } catch (e) {
      if (e instanceof ClientGone) return;
      const err = toHttpError(e);
      if (!res.started) res.error(err);
      for (const s of res.streams) s.fail(err);
      return;
    }
    for (const s of res.streams) {
      // A handler that returned without ending its stream did not finish the answer.
      if (s.open) s.fail(new HttpError(500, 'server_error', 'the handler returned without ending its stream'));
    }
  }

  /** The object to export as `incomingHandler` from the plugin's main module. */
  get handler() {
    return { handle: (request, responseOut) => this.serve(request, responseOut) };
  }
}
