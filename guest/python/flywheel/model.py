"""Models and sessions: `wasi:nn` graphs and execution contexts, plus `flywheel:llm/model`."""

from array import array

from componentize_py_types import Err
from wit_world.imports import batch as _batch
from wit_world.imports import graph as _graph
from wit_world.imports import model as _llm
from wit_world.imports import quota as _quota

from .errors import HttpError, InferenceError, ModelError, ProtocolError, QuotaError
from .config import config
from .candidates import Candidates, Want, read_tensor
from .generate import Generation


def _code(enum_value):
    return enum_value.name.lower().replace("_", "-")


def _nn_error(e):
    """A wasi-nn `Err` (an error resource) as an InferenceError, or a QuotaError when the
    request's API key spent a quota."""
    err = e.value
    exceeded = _quota.exceeded(err)
    if exceeded is not None:
        return QuotaError(err.data(), exceeded.retry_after_ms)
    return InferenceError(_code(err.code()), err.data())


def _llm_call(fn, *args):
    try:
        return fn(*args)
    except Err as e:
        raise ModelError(_code(e.value.code), e.value.message) from None


class Session:
    """One execution context: a sequence in the host's batch with its own KV cells.
    `close()` (or leaving a `with` block) frees the cells at once."""

    def __init__(self, ctx, vocab_size):
        self._ctx = ctx
        self._vocab = vocab_size
        self.length = 0

    def feed(self, tokens, want):
        """Append `tokens` and return the next-token Candidates after the last one."""
        if self._ctx is None:
            raise ProtocolError("the session is closed")
        try:
            outputs = self._ctx.compute(want.inputs(tokens))
        except Err as e:
            raise _nn_error(e) from None
        return self._read(len(tokens), want, outputs)

    def _read(self, fed, want, outputs):
        self.length += fed
        found = {name: t for name, t in outputs}
        if want.full_logits:
            t = found.get("logits")
            row = read_tensor(t, "f") if t is not None else array("f")
            if len(row) != self._vocab:
                raise ProtocolError(f"logits row has {len(row)} entries, expected {self._vocab}")
            return Candidates(row=row)
        ids, logits = found.get("top_k_ids"), found.get("top_k_logits")
        if ids is None or logits is None:
            raise ProtocolError("the host returned no top_k_ids/top_k_logits")
        logprobs = None
        if want.logprobs:
            lp = found.get("top_k_logprobs")
            if lp is None:
                raise ProtocolError("the host returned no top_k_logprobs")
            logprobs = list(read_tensor(lp, "f"))
        return Candidates(ids=list(read_tensor(ids, "i")), logits=list(read_tensor(logits, "f")), logprobs=logprobs)

    def close(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def feed_together(feeds):
    """Feed several sessions in one host batch step: `feeds` is a list of
    (session, tokens, want); returns one Candidates or InferenceError per feed, in order."""
    requests = [(s._ctx, w.inputs(t)) for s, t, w in feeds]
    results = _batch.compute_many(requests)
    out = []
    for (s, t, w), r in zip(feeds, results):
        if isinstance(r, Err):
            out.append(_nn_error(r))
        else:
            out.append(s._read(len(t), w, r.value))
    return out


class Model:
    """A model the plugin may use, by its name on the host."""

    def __init__(self, name):
        try:
            self._graph = _graph.load_by_name(name)
        except Err as e:
            raise _nn_error(e) from None
        self.info = _llm_call(_llm.info, name)
        self.name = self.info.name
        self._end_of_generation = frozenset(self.info.end_of_generation)
        # Each token's bytes, fetched once per instance: a host call per generated token
        # is a large part of a guest's per-token cost.
        self._pieces = {}

    @staticmethod
    def available():
        """The models this plugin may use."""
        return _llm.list_models()

    @classmethod
    def open_requested(cls, requested=None):
        """The model a request asked for, else the plugin's MODEL config value, else the first
        model the plugin may use."""
        name = requested or config("MODEL") or next(iter(cls.available()), None)
        if name is None:
            raise HttpError(503, "server_error", "no model is available to this plugin")
        return cls(name)

    @property
    def vocab_size(self):
        return self.info.vocab_size

    @property
    def context_length(self):
        return self.info.context_length

    def is_end_of_generation(self, token):
        return token in self._end_of_generation

    def token_piece(self, token):
        """The bytes one token prints as (cached per instance)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self.token_bytes([token])[0]
            self._pieces[token] = piece
        return piece

    def tokenize(self, text, add_special=True, parse_special=False):
        """Text to token ids; by default the way a prompt starts (with BOS if the model adds one)."""
        return _llm_call(_llm.tokenize, self.name, text, add_special, parse_special)

    def detokenize(self, tokens, render_special=False):
        return _llm_call(_llm.detokenize, self.name, list(tokens), render_special)

    def token_bytes(self, tokens, render_special=False):
        """The exact bytes each token prints as (special tokens print as nothing)."""
        return _llm_call(_llm.token_bytes, self.name, list(tokens), render_special)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Render a conversation ([{"role", "content"}] or ChatMessage) with the model's template."""
        msgs = [m if isinstance(m, _llm.ChatMessage) else _llm.ChatMessage(m["role"], m["content"]) for m in messages]
        return _llm_call(_llm.apply_chat_template, self.name, msgs, add_generation_prompt)

    def chat_prompt(self, messages):
        """A conversation as prompt tokens, ready for the assistant's turn."""
        return self.tokenize(self.apply_chat_template(messages, True), True, True)

    def session(self):
        """A new execution context (waits, bounded, when all of the model's sequences are busy)."""
        try:
            ctx = self._graph.init_execution_context()
        except Err as e:
            raise _nn_error(e) from None
        return Session(ctx, self.info.vocab_size)

    def embed(self, inputs):
        """One unit-length embedding per input (text or token ids), computed in one host batch."""
        ids = [self.tokenize(x) if isinstance(x, str) else list(x) for x in inputs]
        try:
            return _batch.embed(self._graph, ids)
        except Err as e:
            raise _nn_error(e) from None

    def generate(self, prompt, sampler=None, max_tokens=128, stop=(), stop_at_end_of_generation=True, allowed=None):
        """Start generating after `prompt` (text or token ids). Returns a Generation: iterate it
        for text pieces, or call `text()`. `sampler` is a Sampler or any object with `want()`
        and `sample(candidates, generated)`; `allowed` restricts every step to those ids."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return Generation(self, ids, sampler, max_tokens, stop, stop_at_end_of_generation, allowed)
