// Models and sessions: `wasi:nn` graphs and execution contexts, plus `flywheel:llm/model`.
import { loadByName } from 'wasi:nn/graph@0.2.0-rc-2024-10-28';
import * as llm from 'flywheel:llm/model@0.1.0';
import { computeMany, embed as embedMany } from 'flywheel:llm/batch@0.1.0';
import { Candidates, Want, readTensor, readValues } from './candidates.js';
import { config } from './config.js';
import { HttpError, ProtocolError, drop, llmError, nnError } from './errors.js';
import { Generation } from './generate.js';

function llmCall(fn, ...args) {
  try {
    return fn(...args);
  } catch (e) {
    throw llmError(e);
  }
}

/**
 * One execution context: a sequence in the host's batch with its own KV cells.
 * `close()` frees the cells at once; call it when done (a `finally` block).
 */
export class Session {
  constructor(ctx, vocabSize) {
    this.ctx = ctx;
    this.vocabSize = vocabSize;
    this.length = 0;
  }

  /** Append `tokens` and return the next-token Candidates after the last one. */
  feed(tokens, want = new Want()) {
    if (!this.ctx) throw new ProtocolError('the session is closed');
    let outputs;
    try {
      outputs = this.ctx.compute(want.inputs(tokens));
    } catch (e) {
      throw nnError(e);
    }
    return this.read(tokens.length, want, outputs);
  }

  read(fed, want, outputs) {
    this.length += fed;
    const found = new Map(outputs);
    if (want.fullLogits) {
      const t = found.get('logits');
      const row = t ? readTensor(t, Float32Array) : new Float32Array(0);
      if (row.length !== this.vocabSize) {
        throw new ProtocolError(`logits row has ${row.length} entries, expected ${this.vocabSize}`);
      }
      return new Candidates({ row });
    }
    const ids = found.get('top_k_ids');
    const logits = found.get('top_k_logits');
    if (!ids || !logits) throw new ProtocolError('the host returned no top_k_ids/top_k_logits');
    let logprobs = null;
    if (want.logprobs) {
      const lp = found.get('top_k_logprobs');
      if (!lp) throw new ProtocolError('the host returned no top_k_logprobs');
      logprobs = readValues(lp, 'f32');
    }
    return new Candidates({ ids: readValues(ids, 'i32'), logits: readValues(logits, 'f32'), logprobs });
  }

  close() {
    if (this.ctx) {
      drop(this.ctx);
      this.ctx = null;
    }
  }
}

/**
 * Feed several sessions in one host batch step: `feeds` is a list of [session, tokens, want];
 * returns one Candidates or InferenceError per feed, in order.
 */
export function feedTogether(feeds) {
  const results = computeMany(feeds.map(([s, t, w]) => [s.ctx, w.inputs(t)]));
  return results.map((r, i) => {
    const [s, t, w] = feeds[i];
    return r.tag === 'ok' ? s.read(t.length, w, r.val) : nnError({ payload: r.val });
  });
}

/** A model the plugin may use, by its name on the host. */
export class Model {
  constructor(name) {
    try {
      this.graph = loadByName(name);
    } catch (e) {
      throw nnError(e);
    }
    this.info = llmCall(llm.info, name);
    this.name = this.info.name;
    this.endOfGeneration = new Set(this.info.endOfGeneration);
    // Each token's bytes, fetched once per instance: a host call per generated token is a
    // large part of a guest's per-token cost.
    this.pieces = new Map();
  }

  /** The models this plugin may use. */
  static available() {
    return llm.listModels();
  }

  /** The model a request asked for, else the MODEL config value, else the first one available. */
  static openRequested(requested = null) {
    const name = requested || config('MODEL') || Model.available()[0];
    if (!name) throw new HttpError(503, 'server_error', 'no model is available to this plugin');
    return new Model(name);
  }

  get vocabSize() {
    return this.info.vocabSize;
  }

  get contextLength() {
    return this.info.contextLength;
  }

  isEndOfGeneration(token) {
    return this.endOfGeneration.has(token);
  }

  /** Text to token ids; by default the way a prompt starts (with BOS if the model adds one). */
  tokenize(text, addSpecial = true, parseSpecial = false) {
    return Array.from(llmCall(llm.tokenize, this.name, text, addSpecial, parseSpecial));
  }

  detokenize(tokens, renderSpecial = false) {
    return llmCall(llm.detokenize, this.name, Int32Array.from(tokens), renderSpecial);
  }

  /** The exact bytes each token prints as (special tokens print as nothing). */
  tokenBytes(tokens, renderSpecial = false) {
    return llmCall(llm.tokenBytes, this.name, Int32Array.from(tokens), renderSpecial);
  }

  /** The bytes one token prints as (cached per instance). */
  tokenPiece(token) {
    let piece = this.pieces.get(token);
    if (piece === undefined) {
      piece = this.tokenBytes([token])[0];
      this.pieces.set(token, piece);
    }
    return piece;
  }

  /** Render a conversation ([{role, content}]) with the model's chat template. */
  applyChatTemplate(messages, addGenerationPrompt = true) {
    const msgs = messages.map((m) => ({ role: String(m.role), content: String(m.content) }));
    return llmCall(llm.applyChatTemplate, this.name, msgs, addGenerationPrompt);
  }

  /** A conversation as prompt tokens, ready for the assistant's turn. */
  chatPrompt(messages) {
    return this.tokenize(this.applyChatTemplate(messages, true), true, true);
  }

  /** A new execution context (waits, bounded, when all of the model's sequences are busy). */
  session() {
    try {
      return new Session(this.graph.initExecutionContext(), this.info.vocabSize);
    } catch (e) {
      throw nnError(e);
    }
  }

  /** One unit-length embedding per input (text or token ids), computed in one host batch. */
  embed(inputs) {
    const ids = inputs.map((x) => Int32Array.from(typeof x === 'string' ? this.tokenize(x) : x));
    try {
      return embedMany(this.graph, ids).map((v) => Array.from(v));
    } catch (e) {
      throw nnError(e);
    }
  }

  /**
   * Start generating after `prompt` (text or token ids). Returns a Generation: iterate it for
   * text pieces, or call `text()`. `sampler` is a Sampler or any object with `want(allowed)`
   * and `sample(candidates, generated)`; `allowed` (ids, or a function of the generated ids)
   * restricts each step to those ids.
   */
  generate(prompt, { sampler = null, maxTokens = 128, stop = [], stopAtEndOfGeneration = true, allowed = null } = {}) {
    const ids = typeof prompt === 'string' ? this.tokenize(prompt) : Array.from(prompt);
    return new Generation(this, ids, { sampler, maxTokens, stop, stopAtEndOfGeneration, allowed });
  }
}
