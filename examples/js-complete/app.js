// `js-complete`: the `complete` plugin's protocol in JavaScript (benchmarks compare the two).
//
// POST {"prompt": text or token ids, "max_tokens", "stop", "stream", "ignore_eos",
// "full_logits", and sampling fields}; answers {"model", "text", "finish_reason", "usage"},
// or with "stream": true server-sent events {"text"}, then {"finish_reason", "usage"}, then
// [DONE].
import { App, HttpError, Model, Sampler, maxTokens } from 'flywheel';

const app = new App();

app.post('/', (req, res) => {
  const body = req.jsonObject();
  const prompt = body.prompt;
  const isIds = Array.isArray(prompt) && prompt.every((t) => Number.isInteger(t));
  if (typeof prompt !== 'string' && !isIds) {
    throw HttpError.badRequest('prompt must be text or a list of token ids', 'prompt');
  }
  const model = Model.openRequested(body.model);
  const sampler = Sampler.fromParams(body, 1, model.vocabSize);
  sampler.fullLogits = Boolean(body.full_logits);
  const generation = model.generate(prompt, {
    sampler,
    maxTokens: maxTokens(body.max_tokens, 128, model.contextLength),
    stop: typeof body.stop === 'string' ? [body.stop] : (body.stop ?? []),
    stopAtEndOfGeneration: !body.ignore_eos,
  });
  if (body.stream) {
    const sse = res.sse();
    for (const piece of generation) sse.send({ text: piece });
    sse.send({ finish_reason: generation.finishReason, usage: generation.usage() });
    sse.done();
    return null;
  }
  const text = generation.text();
  return { model: model.name, text, finish_reason: generation.finishReason, usage: generation.usage() };
});

export const incomingHandler = app.handler;
