// A generation: feed, sample, repeat, with stop conditions and UTF-8-safe text pieces.
import { HttpError } from './errors.js';
import { Sampler } from './sampling.js';

/**
 * Made by `Model.generate`. Iterate it for text pieces (a character split across tokens comes
 * out whole; text that may begin a stop string is held back until it cannot), or call
 * `nextToken()` for [id, bytes] steps. `finishReason` is "stop" or "length" once done; the
 * execution context is freed then.
 */
export class Generation {
  constructor(model, prompt, { sampler, maxTokens, stop, stopAtEndOfGeneration, allowed }) {
    if (prompt.length === 0) throw HttpError.badRequest('the prompt is empty', 'prompt');
    this.model = model;
    this.sampler = sampler ?? Sampler.greedy();
    this.maxTokens = maxTokens;
    this.stop = (typeof stop === 'string' ? [stop] : stop).filter((s) => s);
    this.stopAtEndOfGeneration = stopAtEndOfGeneration;
    this.allowed = allowed;
    this.promptTokens = prompt.length;
    this.generated = [];
    this.finishReason = null;
    // The candidates the last token was sampled from (for logprobs or inspection).
    this.lastCandidates = null;
    this.toFeed = prompt;
    this.decoder = new TextDecoder('utf-8');
    this.held = '';
    this.stoppedByString = false;
    this.session = model.session();
  }

  get completionTokens() {
    return this.generated.length;
  }

  usage() {
    return {
      prompt_tokens: this.promptTokens,
      completion_tokens: this.completionTokens,
      total_tokens: this.promptTokens + this.completionTokens,
    };
  }

  finish(reason) {
    if (this.finishReason === null) this.finishReason = reason;
    this.session.close();
  }

  /** Stop early and free the execution context. */
  close() {
    this.finish('stop');
  }

  /** One step: [token id, the bytes it prints as], or null when the generation is over. */
  nextToken() {
    if (this.finishReason !== null) return null;
    if (this.generated.length >= this.maxTokens) {
      this.finish('length');
      return null;
    }
    const allowed = typeof this.allowed === 'function' ? this.allowed(this.generated) : this.allowed;
    let candidates;
    let token;
    try {
      candidates = this.session.feed(this.toFeed, this.sampler.want(allowed));
      token = this.sampler.sample(candidates, this.generated);
    } catch (e) {
      this.finish('error');
      throw e;
    }
    if (token === null || token === undefined) {
      this.finish('stop');
      return null;
    }
    this.lastCandidates = candidates;
    this.generated.push(token);
    this.toFeed = [token];
    if (this.stopAtEndOfGeneration && this.model.isEndOfGeneration(token)) {
      this.finish('stop');
      return null;
    }
    return [token, this.model.tokenPiece(token)];
  }

  // Text safe to emit now, keeping the longest tail that could start a stop string.
  splitHeld() {
    let keep = 0;
    for (const s of this.stop) {
      for (let n = Math.min(s.length - 1, this.held.length); n > 0; n--) {
        if (this.held.endsWith(s.slice(0, n))) {
          keep = Math.max(keep, n);
          break;
        }
      }
    }
    const cut = this.held.length - keep;
    const out = this.held.slice(0, cut);
    this.held = this.held.slice(cut);
    return out;
  }

  /** The next non-empty text piece, or null when the generation is over. */
  nextText() {
    for (;;) {
      const step = this.nextToken();
      if (step === null) {
        const tail = this.held + this.decoder.decode();
        this.held = '';
        if (this.stoppedByString) return null;
        return tail || null;
      }
      this.held += this.decoder.decode(step[1], { stream: true });
      for (const s of this.stop) {
        const at = this.held.indexOf(s);
        if (at >= 0) {
          const out = this.held.slice(0, at);
          this.held = '';
          this.stoppedByString = true;
          this.finish('stop');
          return out || null;
        }
      }
      const out = this.splitHeld();
      if (out) return out;
    }
  }

  *[Symbol.iterator]() {
    for (;;) {
      const piece = this.nextText();
      if (piece === null) return;
      yield piece;
    }
  }

  /** Generate to the end and return the whole text. */
  text() {
    let out = '';
    for (const piece of this) out += piece;
    return out;
  }
}
