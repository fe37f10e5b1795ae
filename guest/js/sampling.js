// Composable sampling over the candidates a feed returns; the same order and semantics as
// the Rust and Python SDKs: logit bias, penalties, greedy or top-k, softmax at the
// temperature, top-p and min-p, a draw from a seeded RNG. Write your own sampler by
// extending Sampler (override `sample`) or by passing any object with `want(allowed)` and
// `sample(candidates, generated)`.
import { getRandomU64 } from 'wasi:random/random@0.2.12';
import { Want } from './candidates.js';
import { HttpError } from './errors.js';

export const DEFAULT_HOST_CANDIDATES = 64;

/** A seed from the host's random source (the engine's own RNG state is part of the build-time snapshot). */
export function freshSeed() {
  return Number(getRandomU64() & 0xffffffffn);
}

/** mulberry32: small, fast, reproducible for a seed. */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function softmax(logits, temperature = 1) {
  const top = Math.max(...logits);
  const exps = logits.map((l) => Math.exp((l - top) / temperature));
  const total = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / total);
}

export function logSoftmax(logits) {
  const top = Math.max(...logits);
  const lse = top + Math.log(logits.reduce((a, l) => a + Math.exp(l - top), 0));
  return logits.map((l) => l - lse);
}

export class Sampler {
  constructor({
    temperature = 1,
    topK = null,
    topP = 1,
    minP = 0,
    repetitionPenalty = 1,
    frequencyPenalty = 0,
    presencePenalty = 0,
    penaltyWindow = 64,
    logitBias = {},
    seed = null,
    hostCandidates = DEFAULT_HOST_CANDIDATES,
    fullLogits = false,
  } = {}) {
    Object.assign(this, { temperature, topK, topP, minP, repetitionPenalty, frequencyPenalty, presencePenalty });
    Object.assign(this, { penaltyWindow, hostCandidates, fullLogits });
    this.logitBias = new Map(Object.entries(logitBias).map(([k, v]) => [Number(k), Number(v)]));
    this.random = rng(seed ?? freshSeed());
  }

  static greedy() {
    return new Sampler({ temperature: 0 });
  }

  /**
   * A sampler from OpenAI-style request fields (temperature, top_p, top_k, min_p,
   * repetition_penalty, frequency_penalty, presence_penalty, seed, logit_bias); a 400 naming
   * the field for a value out of range.
   */
  static fromParams(params, defaultTemperature = 1, vocabSize = null) {
    const number = (name, lo, hi, dflt) => {
      const v = params[name];
      if (v === undefined || v === null) return dflt;
      if (typeof v !== 'number' || !(v >= lo && v <= hi)) {
        throw HttpError.badRequest(`${name} must be a number between ${lo} and ${hi}, got ${JSON.stringify(v)}`, name);
      }
      return v;
    };
    const topK = params.top_k ?? null;
    if (topK !== null && !(Number.isInteger(topK) && topK >= 0 && topK <= 1000)) {
      throw HttpError.badRequest(`top_k must be an integer between 0 and 1000, got ${JSON.stringify(topK)}`, 'top_k');
    }
    const seed = params.seed ?? null;
    if (seed !== null && !(Number.isInteger(seed) && seed >= 0)) {
      throw HttpError.badRequest(`seed must be a non-negative integer, got ${JSON.stringify(seed)}`, 'seed');
    }
    const bias = params.logit_bias ?? {};
    if (typeof bias !== 'object' || Array.isArray(bias)) {
      throw HttpError.badRequest('logit_bias must map token ids to numbers', 'logit_bias');
    }
    for (const [k, v] of Object.entries(bias)) {
      const id = Number(k);
      if (!Number.isInteger(id) || id < 0 || (vocabSize !== null && id >= vocabSize)) {
        throw HttpError.badRequest(`logit_bias key ${JSON.stringify(k)} is not a token id of this model`, 'logit_bias');
      }
      if (typeof v !== 'number' || !(v >= -100 && v <= 100)) {
        throw HttpError.badRequest(`logit_bias values must be between -100 and 100, got ${JSON.stringify(v)}`, 'logit_bias');
      }
    }
    return new Sampler({
      temperature: number('temperature', 0, 2, defaultTemperature),
      topK: topK || null,
      topP: number('top_p', 0, 1, 1),
      minP: number('min_p', 0, 1, 0),
      repetitionPenalty: number('repetition_penalty', 0, 10, 1) || 1,
      frequencyPenalty: number('frequency_penalty', -2, 2, 0),
      presencePenalty: number('presence_penalty', -2, 2, 0),
      logitBias: bias,
      seed: seed === null ? null : seed % 4294967296,
    });
  }

  hasPenalties() {
    return this.repetitionPenalty !== 1 || this.frequencyPenalty !== 0 || this.presencePenalty !== 0;
  }

  /** What to ask the host for: one candidate when plainly greedy, the whole row when a positive bias could lift any token, else the best `hostCandidates`. */
  want(allowed = null) {
    const positiveBias = [...this.logitBias.values()].some((b) => b > 0);
    if (!allowed && (this.fullLogits || positiveBias)) return new Want({ fullLogits: true });
    const plainGreedy = this.temperature === 0 && !this.hasPenalties() && this.logitBias.size === 0;
    let k = plainGreedy ? 1 : Math.max(this.hostCandidates, this.topK ?? 0);
    if (allowed) k = Math.min(k, Math.max(allowed.length, 1));
    return new Want({ k, allowed });
  }

  /** Apply logit bias and penalties to [id, logit] pairs, in place. */
  adjust(pairs, recent) {
    if (this.logitBias.size) {
      for (const p of pairs) {
        const b = this.logitBias.get(p[0]);
        if (b !== undefined) p[1] += b;
      }
    }
    if (!this.hasPenalties() || recent.length === 0) return;
    const counts = new Map();
    for (const t of recent.slice(-this.penaltyWindow)) counts.set(t, (counts.get(t) ?? 0) + 1);
    for (const p of pairs) {
      const n = counts.get(p[0]);
      if (n) {
        p[1] = p[1] > 0 ? p[1] / this.repetitionPenalty : p[1] * this.repetitionPenalty;
        p[1] -= this.frequencyPenalty * n + this.presencePenalty;
      }
    }
  }

  /** Pick the next token id (null when nothing can be picked). */
  sample(candidates, recent = []) {
    if (candidates.row && this.temperature === 0 && this.logitBias.size === 0 && !this.hasPenalties()) {
      return candidates.best();
    }
    let pairs = candidates.pairs().filter((p) => !Number.isNaN(p[1]));
    if (pairs.length === 0) return null;
    this.adjust(pairs, recent);
    if (this.temperature === 0) {
      return pairs.reduce((best, p) => (p[1] > best[1] || (p[1] === best[1] && p[0] < best[0]) ? p : best))[0];
    }
    pairs.sort((a, b) => b[1] - a[1] || a[0] - b[0]);
    if (this.topK) pairs = pairs.slice(0, this.topK);
    const probs = softmax(pairs.map((p) => p[1]), this.temperature);
    let keep = probs.length;
    if (this.topP < 1) {
      let acc = 0;
      for (let i = 0; i < probs.length; i++) {
        acc += probs[i];
        if (acc >= this.topP) {
          keep = i + 1;
          break;
        }
      }
    }
    if (this.minP > 0) {
      const floor = probs[0] * this.minP;
      keep = Math.min(keep, Math.max(1, probs.filter((p) => p >= floor).length));
    }
    return this.draw(pairs.slice(0, keep), probs.slice(0, keep));
  }

  /** Draw one id from [id, _] pairs with weights `probs`. */
  draw(pairs, probs) {
    let r = this.random() * probs.reduce((a, b) => a + b, 0);
    for (let i = 0; i < pairs.length; i++) {
      r -= probs[i];
      if (r <= 0) return pairs[i][0];
    }
    return pairs[pairs.length - 1][0];
  }
}
