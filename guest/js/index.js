// Flywheel's JavaScript SDK for guest plugins (componentize-js, world `flywheel:llm/plugin`).
// A plugin's main module imports what it needs from here and exports `incomingHandler`.
export { Candidates, Want, i32Tensor, readTensor, readValues } from './candidates.js';
export { allConfig, config } from './config.js';
export { FlywheelError, HttpError, InferenceError, ModelError, ProtocolError, QuotaError, toHttpError } from './errors.js';
export { Generation } from './generate.js';
export { App, ClientGone, Request, Responder, SseStream } from './http.js';
export { Model, Session, feedTogether } from './model.js';
export { DEFAULT_HOST_CANDIDATES, Sampler, freshSeed, logSoftmax, rng, softmax } from './sampling.js';
import { HttpError } from './errors.js';

/** A request's `max_tokens`: the default when absent, a 400 when not a positive integer. */
export function maxTokens(requested, fallback, contextLength) {
  if (requested === undefined || requested === null) return Math.min(fallback, contextLength);
  if (!Number.isInteger(requested) || requested < 1) {
    throw HttpError.badRequest(`max_tokens must be a positive integer, got ${JSON.stringify(requested)}`, 'max_tokens');
  }
  return Math.min(requested, contextLength);
}
