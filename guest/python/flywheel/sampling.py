"""Composable sampling over the candidates a feed returns.

Order, as in the Rust SDK: logit bias, penalties, then greedy (temperature 0) or top-k,
softmax at the temperature, top-p and min-p on those probabilities, and a draw from the
seeded RNG. Write your own sampler by subclassing Sampler (override `sample`) or by passing
any object with `want(allowed)` and `sample(candidates, generated)`.
"""

import math
import random

from wit_world.imports import random as _wasi_random

from .candidates import Want
from .errors import HttpError

# Tokens outside the best 64 have negligible probability at usual temperatures and top-p.
DEFAULT_HOST_CANDIDATES = 64


def fresh_seed():
    """A seed from the host's random source. The module's own `random` state is part of the
    build-time snapshot, so every instance would draw the same numbers from it."""
    return _wasi_random.get_random_u64()


def softmax(logits, temperature=1.0):
    """Probabilities for `logits` at `temperature` (> 0)."""
    top = max(logits)
    exps = [math.exp((x - top) / temperature) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def log_softmax(logits):
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - lse for x in logits]


class Sampler:
    def __init__(
        self,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        min_p=0.0,
        repetition_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        penalty_window=64,
        logit_bias=None,
        seed=None,
        host_candidates=DEFAULT_HOST_CANDIDATES,
        full_logits=False,
    ):
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.repetition_penalty = repetition_penalty
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty
        self.penalty_window = penalty_window
        self.logit_bias = {int(k): float(v) for k, v in (logit_bias or {}).items()}
        self.host_candidates = host_candidates
        self.full_logits = full_logits
        self.rng = random.Random(fresh_seed() if seed is None else seed)

    @classmethod
    def greedy(cls):
        return cls(temperature=0.0)

    @classmethod
    def from_params(cls, params, default_temperature=1.0, vocab_size=None):
        """A sampler from OpenAI-style request fields (temperature, top_p, top_k, min_p,
        repetition_penalty, frequency_penalty, presence_penalty, seed, logit_bias), with
        a 400 naming the field for a value out of range."""

        def number(name, lo, hi, default):
            v = params.get(name)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                raise HttpError.bad_request(f"{name} must be a number between {lo} and {hi}, got {v!r}", name)
            return float(v)

        top_k = params.get("top_k")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= 1000):
            raise HttpError.bad_request(f"top_k must be an integer between 0 and 1000, got {top_k!r}", "top_k")
        seed = params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise HttpError.bad_request(f"seed must be a non-negative integer, got {seed!r}", "seed")
        bias = params.get("logit_bias") or {}
        if not isinstance(bias, dict):
            raise HttpError.bad_request("logit_bias must map token ids to numbers", "logit_bias")
        checked = {}
        for k, v in bias.items():
            try:
                tid = int(k)
            except ValueError:
                raise HttpError.bad_request(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
            if vocab_size is not None and not 0 <= tid < vocab_size:
                raise HttpError.bad_request(f"logit_bias token {tid} is outside the vocabulary", "logit_bias")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise HttpError.bad_request(f"logit_bias values must be between -100 and 100, got {v!r}", "logit_bias")
            checked[tid] = float(v)
        return cls(
            temperature=number("temperature", 0.0, 2.0, default_temperature),
            top_k=top_k or None,
            top_p=number("top_p", 0.0, 1.0, 1.0),
            min_p=number("min_p", 0.0, 1.0, 0.0),
            repetition_penalty=number("repetition_penalty", 0.0, 10.0, 1.0) or 1.0,
            frequency_penalty=number("frequency_penalty", -2.0, 2.0, 0.0),
            presence_penalty=number("presence_penalty", -2.0, 2.0, 0.0),
            logit_bias=checked,
            seed=seed,
        )

    def has_penalties(self):
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def want(self, allowed=None):
        """What to ask the host for: one candidate when plainly greedy, the whole row when a
        positive bias could lift any token, else the best `host_candidates`."""
        if allowed is None and (self.full_logits or any(b > 0 for b in self.logit_bias.values())):
            return Want(full_logits=True)
        plain_greedy = self.temperature == 0.0 and not self.has_penalties() and not self.logit_bias
        k = 1 if plain_greedy else max(self.host_candidates, self.top_k or 0)
        if allowed is not None:
            k = min(k, max(len(allowed), 1))
        return Want(k=k, allowed=allowed)

    def adjust(self, pairs, recent):
        """Apply logit bias and penalties to (id, logit) pairs, in place."""
        if self.logit_bias:
            for i, (tid, logit) in enumerate(pairs):
                b = self.logit_bias.get(tid)
                if b is not None:
                    pairs[i] = (tid, logit + b)
        if not self.has_penalties() or not recent:
            return
        counts = {}
        for t in recent[-self.penalty_window :]:
            counts[t] = counts.get(t, 0) + 1
        for i, (tid, logit) in enumerate(pairs):
            n = counts.get(tid)
            if n:
                logit = logit / self.repetition_penalty if logit > 0 else logit * self.repetition_penalty
                pairs[i] = (tid, logit - self.frequency_penalty * n - self.presence_penalty)

    def sample(self, candidates, recent=()):
        """Pick the next token id (None when nothing can be picked)."""
        if candidates.row is not None and self.temperature == 0.0 and not self.logit_bias and not self.has_penalties():
            return candidates.best()
        pairs = [(t, l) for t, l in candidates.pairs() if l == l]  # drops NaN
        if not pairs:
            return None
        self.adjust(pairs, recent)
        if self.temperature == 0.0:
            return max(pairs, key=lambda p: (p[1], -p[0]))[0]
        pairs.sort(key=lambda p: (-p[1], p[0]))
        if self.top_k:
            pairs = pairs[: self.top_k]
        probs = softmax([l for _, l in pairs], self.temperature)
        keep = len(probs)
        if self.top_p < 1.0:
            acc = 0.0
            for i, p in enumerate(probs):
                acc += p
                if acc >= self.top_p:
                    keep = i + 1
                    break
        if self.min_p > 0.0:
            floor = probs[0] * self.min_p
            keep = min(keep, max(1, sum(1 for p in probs if p >= floor)))
        return self.draw(pairs[:keep], probs[:keep])

    def draw(self, pairs, probs):
        """Draw one id from (id, _) pairs with weights `probs`."""
        r = self.rng.random() * sum(probs)
        for (tid, _), p in zip(pairs, probs):
            r -= p
            if r <= 0:
                return tid
        return pairs[-1][0]
