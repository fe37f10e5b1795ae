"""`py-chat`: a chat endpoint whose sampler is written in Python.

POST /fn/py-chat {"messages": [{"role", "content"}, ...], "max_tokens", "temperature",
"min_p", "repetition_penalty", "seed", "stream"}. Answers {"model", "message": {"role":
"assistant", "content"}, "finish_reason", "usage"}, or with "stream": true server-sent events
{"delta": text} ..., then {"finish_reason", "usage"}, then [DONE].

The host returns the best 40 candidates of each step; `MinPSampler` below does the rest in
the guest: a repetition penalty over the tokens generated so far, min-p filtering relative to
the most likely candidate, temperature, and a seeded draw.
"""

import math
import random

from flywheel import App, HttpError, Model, Want, config, fresh_seed, max_tokens

app = App()

CANDIDATES = 40


class MinPSampler:
    """min-p sampling with a repetition penalty, over the host's top candidates."""

    def __init__(self, temperature, min_p, repetition_penalty, seed):
        self.temperature = temperature
        self.min_p = min_p
        self.repetition_penalty = repetition_penalty
        self.rng = random.Random(fresh_seed() if seed is None else seed)

    def want(self, allowed=None):
        # What the host computes for us each step: the best CANDIDATES ids and their logits.
        return Want(k=CANDIDATES, allowed=allowed)

    def sample(self, candidates, generated):
        seen = set(generated)
        scored = []
        for token, logit in candidates.pairs():
            if logit != logit:  # NaN: never pick it
                continue
            if token in seen:
                # CTRL-style penalty: shrink positive logits, push negative ones further down.
                logit = logit / self.repetition_penalty if logit > 0 else logit * self.repetition_penalty
            scored.append((token, logit))
        if not scored:
            return None
        if self.temperature == 0:
            return max(scored, key=lambda p: (p[1], -p[0]))[0]
        top = max(logit for _, logit in scored)
        weights = [(t, math.exp((logit - top) / self.temperature)) for t, logit in scored]
        # min-p: keep tokens at least min_p times as likely as the most likely one.
        floor = self.min_p * max(w for _, w in weights)
        kept = [(t, w) for t, w in weights if w >= floor]
        r = self.rng.random() * sum(w for _, w in kept)
        for token, w in kept:
            r -= w
            if r <= 0:
                return token
        return kept[-1][0]


def number(body, name, lo, hi, default):
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise HttpError.bad_request(f"{name} must be a number between {lo} and {hi}", name)
    return float(value)


def messages_of(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError.bad_request("messages must be a non-empty list of {role, content}", "messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise HttpError.bad_request("each message needs a string role and string content", "messages")
    return messages


@app.post("/")
def chat(req, res):
    body = req.json_object()
    messages = messages_of(body)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise HttpError.bad_request("seed must be a non-negative integer", "seed")
    sampler = MinPSampler(
        temperature=number(body, "temperature", 0, 2, float(config("TEMPERATURE", "0.7"))),
        min_p=number(body, "min_p", 0, 1, float(config("MIN_P", "0.05"))),
        repetition_penalty=number(body, "repetition_penalty", 1, 10, float(config("REPETITION_PENALTY", "1.1"))),
        seed=seed,
    )
    model = Model.open_requested(body.get("model"))
    generation = model.generate(
        model.chat_prompt(messages),
        sampler,
        max_tokens=max_tokens(body.get("max_tokens"), 256, model.context_length),
    )
    if body.get("stream"):
        sse = res.sse()
        for piece in generation:
            sse.send({"delta": piece})
        sse.send({"finish_reason": generation.finish_reason, "usage": generation.usage()})
        sse.done()
        return None
    content = generation.text()
    return {
        "model": model.name,
        "message": {"role": "assistant", "content": content},
        "finish_reason": generation.finish_reason,
        "usage": generation.usage(),
    }


IncomingHandler = app.handler
