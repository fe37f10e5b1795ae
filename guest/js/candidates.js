// What a feed asks the host for and what it returns: the tensors of Flywheel's wasi-nn mapping.
import { Tensor } from 'wasi:nn/tensor@0.2.0-rc-2024-10-28';

export function i32Tensor(values) {
  const ints = Int32Array.from(values);
  return new Tensor(Uint32Array.of(ints.length), 'I32', new Uint8Array(ints.buffer));
}

/** A tensor's data as an Int32Array or Float32Array (copied: the bytes may be unaligned). */
export function readTensor(t, Type) {
  const bytes = t.data();
  return new Type(bytes.slice().buffer);
}

/** A short tensor's values as a plain array ('i32' or 'f32'), read in place. */
export function readValues(t, type) {
  const bytes = t.data();
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = bytes.byteLength >> 2;
  const out = new Array(n);
  if (type === 'i32') for (let i = 0; i < n; i++) out[i] = view.getInt32(i * 4, true);
  else for (let i = 0; i < n; i++) out[i] = view.getFloat32(i * 4, true);
  return out;
}

/**
 * What a feed asks for: the `k` best candidates (optionally only among `allowed` ids,
 * optionally with log-probabilities over the whole vocabulary), or `fullLogits`, the whole row.
 */
export class Want {
  constructor({ k = 1, allowed = null, logprobs = false, fullLogits = false } = {}) {
    this.k = k;
    this.allowed = allowed;
    this.logprobs = logprobs;
    this.fullLogits = fullLogits;
  }

  inputs(tokens) {
    const named = [['input_ids', i32Tensor(tokens)]];
    if (!this.fullLogits) {
      named.push(['top_k', i32Tensor([this.k])]);
      if (this.allowed) named.push(['allowed_ids', i32Tensor(this.allowed)]);
      if (this.logprobs) named.push(['logprobs', i32Tensor([1])]);
    }
    return named;
  }
}

/**
 * The next-token distribution: `ids` and `logits` best first (and `logprobs` when asked),
 * or `row`, one logit per token id, for a full-logits feed.
 */
export class Candidates {
  constructor({ ids = null, logits = null, logprobs = null, row = null }) {
    this.ids = ids;
    this.logits = logits;
    this.logprobs = logprobs;
    this.row = row;
  }

  /** [id, logit] pairs: the host's candidates, or every entry of a full row. */
  pairs() {
    if (this.row) return Array.from(this.row, (l, i) => [i, l]);
    return Array.from(this.ids, (id, i) => [id, this.logits[i]]);
  }

  /** The highest-scoring token (ties to the lowest id). */
  best() {
    if (this.row) {
      let best = null;
      let bestLogit = -Infinity;
      for (let i = 0; i < this.row.length; i++) {
        if (this.row[i] > bestLogit) {
          best = i;
          bestLogit = this.row[i];
        }
      }
      return best;
    }
    return this.ids.length ? this.ids[0] : null;
  }
}
