"""`py-complete`: the `complete` plugin's protocol in Python (benchmarks compare the two).

POST {"prompt": text or token ids, "max_tokens", "stop", "stream", "ignore_eos",
"full_logits", and sampling fields}; answers {"model", "text", "finish_reason", "usage"},
or with "stream": true server-sent events {"text"}, then {"finish_reason", "usage"}, then
[DONE].
"""

from flywheel import App, HttpError, Model, Sampler, max_tokens

app = App()


@app.post("/")
def complete(req, res):
    body = req.json_object()
    prompt = body.get("prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
        raise HttpError.bad_request("prompt must be text or a list of token ids", "prompt")
    model = Model.open_requested(body.get("model"))
    sampler = Sampler.from_params(body, 1.0, model.vocab_size)
    sampler.full_logits = bool(body.get("full_logits"))
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    generation = model.generate(
        prompt,
        sampler,
        max_tokens=max_tokens(body.get("max_tokens"), 128, model.context_length),
        stop=stop,
        stop_at_end_of_generation=not body.get("ignore_eos"),
    )
    if body.get("stream"):
        sse = res.sse()
        for piece in generation:
            sse.send({"text": piece})
        sse.send({"finish_reason": generation.finish_reason, "usage": generation.usage()})
        sse.done()
        return None
    text = generation.text()
    return {"model": model.name, "text": text, "finish_reason": generation.finish_reason, "usage": generation.usage()}


IncomingHandler = app.handler
