"""What a feed asks the host for and what it returns: the tensors of Flywheel's wasi-nn mapping."""

from array import array

from wit_world.imports import tensor as _tensor


def i32_tensor(values):
    data = array("i", values).tobytes()
    return _tensor.Tensor([len(values)], _tensor.TensorType.I32, data)


def read_tensor(t, typecode):
    a = array(typecode)
    a.frombytes(t.data())
    return a


class Candidates:
    """The next-token distribution a feed returned.

    With host candidates (the default): `ids` and `logits`, best first, and `logprobs` (over
    the whole vocabulary) when asked for. With `full_logits`: `row`, one logit per token id,
    and `ids`/`logits` are None.
    """

    __slots__ = ("ids", "logits", "logprobs", "row")

    def __init__(self, ids=None, logits=None, logprobs=None, row=None):
        self.ids = ids
        self.logits = logits
        self.logprobs = logprobs
        self.row = row

    def pairs(self):
        """(token id, logit) pairs: the host's candidates, or every entry of a full row."""
        if self.row is not None:
            return list(enumerate(self.row))
        return list(zip(self.ids, self.logits))

    def best(self):
        """The highest-scoring token (ties to the lowest id)."""
        if self.row is not None:
            best, best_logit = None, None
            for i, v in enumerate(self.row):
                if v == v and (best_logit is None or v > best_logit):
                    best, best_logit = i, v
            return best
        return self.ids[0] if self.ids else None


class Want:
    """What a feed asks the host for: the `k` best candidates (optionally only among
    `allowed` ids, optionally with log-probabilities), or with `full_logits` the whole row."""

    __slots__ = ("k", "allowed", "logprobs", "full_logits")

    def __init__(self, k=1, allowed=None, logprobs=False, full_logits=False):
        self.k = k
        self.allowed = allowed
        self.logprobs = logprobs
        self.full_logits = full_logits

    def inputs(self, tokens):
        named = [("input_ids", i32_tensor(tokens))]
        if not self.full_logits:
            named.append(("top_k", i32_tensor([self.k])))
            if self.allowed is not None:
                named.append(("allowed_ids", i32_tensor(self.allowed)))
            if self.logprobs:
                named.append(("logprobs", i32_tensor([1])))
        return named


