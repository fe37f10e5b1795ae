"""A generation: feed, sample, repeat, with stop conditions and UTF-8-safe text pieces."""

import codecs

from .errors import HttpError
from .sampling import Sampler


class Generation:
    """Made by `Model.generate`. Iterate it for text pieces (a character split across tokens
    comes out whole; text that may begin a stop string is held back until it cannot), or
    call `next_token()` for (id, bytes) steps. `finish_reason` is "stop" or "length" once
    done; the execution context is freed then."""

    def __init__(self, model, prompt, sampler, max_tokens, stop, stop_at_end_of_generation, allowed):
        if not prompt:
            raise HttpError.bad_request("the prompt is empty", "prompt")
        self.model = model
        self.sampler = sampler if sampler is not None else Sampler.greedy()
        self.max_tokens = max_tokens
        self.stop = [stop] if isinstance(stop, str) else [s for s in stop if s]
        self.stop_at_end_of_generation = stop_at_end_of_generation
        self.allowed = allowed
        self.prompt_tokens = len(prompt)
        self.generated = []
        self.finish_reason = None
        # The candidates the last token was sampled from (for logprobs or inspection).
        self.last_candidates = None
        self._to_feed = list(prompt)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""
        self.session = model.session()

    @property
    def completion_tokens(self):
        return len(self.generated)

    def usage(self):
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def _want(self):
        allowed = self.allowed(self.generated) if callable(self.allowed) else self.allowed
        return self.sampler.want(allowed)

    def _finish(self, reason):
        if self.finish_reason is None:
            self.finish_reason = reason
        self.session.close()

    def close(self):
        """Stop early and free the execution context."""
        self._finish("stop")

    def next_token(self):
        """One step: (token id, the bytes it prints as), or None when the generation is over."""
        if self.finish_reason is not None:
            return None
        if len(self.generated) >= self.max_tokens:
            self._finish("length")
            return None
        candidates = self.session.feed(self._to_feed, self._want())
        token = self.sampler.sample(candidates, self.generated)
        if token is None:
            self._finish("stop")
            return None
        self.last_candidates = candidates
        self.generated.append(token)
        self._to_feed = [token]
        if self.stop_at_end_of_generation and self.model.is_end_of_generation(token):
            self._finish("stop")
            return None
        return token, self.model.token_piece(token)

    def _split_held(self):
        """Text safe to emit now, keeping the longest tail that could start a stop string."""
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._held)), 0, -1):
                if self._held.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def next_text(self):
        """The next non-empty text piece, or None when the generation is over."""
        while True:
            step = self.next_token()
            if step is None:
                tail = self._held + self._decoder.decode(b"", final=True)
                self._held = ""
                if self.finish_reason == "stop" and self._stopped_by_string:
                    return None
                return tail or None
            self._held += self._decoder.decode(step[1])
            for s in self.stop:
                at = self._held.find(s)
                if at >= 0:
                    out = self._held[:at]
                    self._held = ""
                    self._stopped_by_string = True
                    self._finish("stop")
                    return out or None
            out = self._split_held() if self.stop else self._take_all()
            if out:
                return out

    _stopped_by_string = False

    def _take_all(self):
        out, self._held = self._held, ""
        return out

    def __iter__(self):
        while True:
            piece = self.next_text()
            if piece is None:
                return
            yield piece

    def text(self):
        """Generate to the end and return the whole text."""
        return "".join(self)
