// Errors from inference calls, and the HTTP answer each maps to.

import { exceeded } from 'flywheel:llm/quota@0.1.0';

export class FlywheelError extends Error {}

/** A `wasi:nn` call failed; `code` is the wasi-nn error code, e.g. "too-large". */
export class InferenceError extends FlywheelError {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** A `flywheel:llm/model` call failed; `code` is e.g. "not-found". */
export class ModelError extends FlywheelError {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/**
 * The request's API key spent a quota (its token quota, even mid-generation): answer 429.
 * `retryAfterMs` is null when the request can never fit the quota.
 */
export class QuotaError extends FlywheelError {
  constructor(message, retryAfterMs) {
    super(message);
    this.retryAfterMs = retryAfterMs;
  }
}

/** The host returned something this SDK did not expect. */
export class ProtocolError extends FlywheelError {}

/** An HTTP error answer: status, a machine-readable type, a message, the field at fault. */
export class HttpError extends FlywheelError {
  constructor(status, kind, message, param = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.kind = kind;
    this.param = param;
    // Seconds for the Retry-After header of 429 and 503 answers (1 when null).
    this.retryAfter = retryAfter;
  }

  static badRequest(message, param = null) {
    return new HttpError(400, 'invalid_request_error', message, param);
  }

  static notFound(message) {
    return new HttpError(404, 'not_found_error', message);
  }

  /** OpenAI's error shape. */
  toJSON() {
    return { error: { message: this.message, type: this.kind, param: this.param, code: this.status } };
  }
}

const INFERENCE_STATUS = {
  'invalid-argument': [400, 'invalid_request_error'],
  'invalid-encoding': [400, 'invalid_request_error'],
  'too-large': [400, 'context_length_exceeded'],
  'not-found': [404, 'model_not_found'],
  security: [403, 'permission_error'],
  timeout: [503, 'overloaded_error'],
  'unsupported-operation': [501, 'unsupported_error'],
};

const MODEL_STATUS = {
  'not-found': [404, 'model_not_found'],
  'not-allowed': [403, 'permission_error'],
  'invalid-argument': [400, 'invalid_request_error'],
  unsupported: [400, 'unsupported_error'],
};

/** The HTTP answer for anything a handler threw. */
export function toHttpError(e) {
  if (e instanceof HttpError) return e;
  if (e instanceof QuotaError) {
    // Rounded up; a request that can never fit is told to wait a whole minute.
    const after = e.retryAfterMs == null ? 60 : Math.max(1, Math.ceil(e.retryAfterMs / 1000));
    return new HttpError(429, 'rate_limit_error', e.message, null, after);
  }
  if (e instanceof InferenceError) {
    const [status, kind] = INFERENCE_STATUS[e.code] ?? [500, 'server_error'];
    return new HttpError(status, kind, e.message);
  }
  if (e instanceof ModelError) {
    const [status, kind] = MODEL_STATUS[e.code] ?? [500, 'server_error'];
    return new HttpError(status, kind, e.message);
  }
  return new HttpError(500, 'server_error', `${e?.name ?? 'Error'}: ${e?.message ?? e}`);
}

/** A wasi-nn call's thrown ComponentError as an InferenceError. */
export function nnError(e) {
  const p = e?.payload;
  if (p && typeof p.code === 'function') {
    const q = exceeded(p);
    if (q) return new QuotaError(p.data(), q.retryAfterMs == null ? null : Number(q.retryAfterMs));
    return new InferenceError(p.code(), p.data());
  }
  return e;
}

/** A flywheel:llm call's thrown ComponentError as a ModelError. */
export function llmError(e) {
  const p = e?.payload;
  if (p && typeof p.code === 'string') return new ModelError(p.code, p.message);
  return e;
}

/** Drop a resource now (frees host state such as a sequence's KV cells). */
export function drop(resource) {
  if (resource && typeof resource[Symbol.dispose] === 'function') resource[Symbol.dispose]();
}
