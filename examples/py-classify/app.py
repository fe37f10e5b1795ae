"""`py-classify`: constrained choice. The model may only produce one of a fixed set of labels.

POST /fn/py-classify {"text": "...", "labels": ["positive", "negative", ...] (optional: the
manifest's LABELS), "instruction": "..." (optional)}. Answers {"model", "label",
"probability", "tokens", "usage"}: `probability` is the model's own probability of the
label's tokens after the prompt (its log-probabilities, before any restriction).

Each step asks the host only for the tokens that continue some label (`allowed`), with
log-probabilities over the whole vocabulary, and takes the best; a label ends when its last
token is chosen.
"""

import math

from flywheel import App, HttpError, Model, Want, config

app = App()

MAX_LABELS = 64


class LabelTrie:
    """The labels' token sequences, to find which tokens may come next."""

    def __init__(self, model, labels):
        self.sequences = {}
        for label in labels:
            tokens = tuple(model.tokenize(label, add_special=False))
            if not tokens:
                raise HttpError.bad_request(f"label {label!r} has no tokens", "labels")
            if tokens in self.sequences:
                raise HttpError.bad_request(f"labels {self.sequences[tokens]!r} and {label!r} are the same text", "labels")
            self.sequences[tokens] = label

    def next_tokens(self, prefix):
        n = len(prefix)
        return sorted({seq[n] for seq in self.sequences if len(seq) > n and seq[:n] == prefix})

    def label(self, prefix):
        return self.sequences.get(prefix)

    def ends_here(self, prefix):
        """True when `prefix` is a label and no longer label continues it."""
        return prefix in self.sequences and not self.next_tokens(prefix)


def labels_of(body):
    labels = body.get("labels")
    if labels is None:
        labels = [x.strip() for x in config("LABELS", "positive,negative,neutral").split(",") if x.strip()]
    if not isinstance(labels, list) or not labels or len(labels) > MAX_LABELS:
        raise HttpError.bad_request(f"labels must be a list of 1 to {MAX_LABELS} strings", "labels")
    if not all(isinstance(x, str) and x.strip() for x in labels):
        raise HttpError.bad_request("every label must be a non-empty string", "labels")
    return labels


@app.post("/")
def classify(req, res):
    body = req.json_object()
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise HttpError.bad_request("text must be a non-empty string", "text")
    labels = labels_of(body)
    instruction = body.get("instruction", config("INSTRUCTION", "Classify the text."))
    if not isinstance(instruction, str):
        raise HttpError.bad_request("instruction must be a string", "instruction")
    model = Model.open_requested(body.get("model"))
    trie = LabelTrie(model, labels)
    prompt = model.chat_prompt(
        [
            {"role": "system", "content": f"{instruction} Answer with exactly one of: {', '.join(labels)}."},
            {"role": "user", "content": text},
        ]
    )
    # Where one label is a prefix of another ("yes", "yes sir"), ending the turn is a choice too.
    end_of_turn = sorted(model.info.end_of_generation)
    chosen = ()
    logprob = 0.0
    with model.session() as session:
        feed = prompt
        while True:
            allowed = trie.next_tokens(chosen)
            if trie.label(chosen) is not None:
                allowed += end_of_turn
            candidates = session.feed(feed, Want(k=len(allowed), allowed=allowed, logprobs=True))
            # The host ranks the allowed tokens best first; ids and logprobs line up.
            token, token_logprob = candidates.ids[0], candidates.logprobs[0]
            logprob += token_logprob
            if token in end_of_turn:
                break
            chosen += (token,)
            if trie.ends_here(chosen):
                break
            feed = [token]
    return {
        "model": model.name,
        "label": trie.label(chosen),
        "probability": math.exp(logprob),
        "tokens": list(chosen),
        "usage": {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(chosen),
            "total_tokens": len(prompt) + len(chosen),
        },
    }


IncomingHandler = app.handler
