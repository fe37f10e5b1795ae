//! `complete`: continue a prompt.
//!
//! POST a JSON body: `prompt` (required: text, or token ids as in OpenAI's API), `model`,
//! `max_tokens` (default 128), `stop`, `stream`, `ignore_eos`, and sampling fields (`temperature` default 1.0, `top_p`, `top_k`, `min_p`,
//! `repetition_penalty`, `frequency_penalty`, `presence_penalty`, `seed`, `logit_bias`),
//! plus `full_logits` to sample from whole logits rows instead of the host's top
//! candidates. Answers `{"model", "text", "finish_reason", "usage"}`, or with
//! `"stream": true` server-sent events `{"text": ...}` then a final event with
//! `finish_reason` and `usage`, then `data: [DONE]`.

use flywheel_guest::{
    export_plugin, max_tokens, GenerateOptions, Handler, HttpError, Model, Request, Responder, SamplingParams, Stop,
};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<i32>),
}

#[derive(Deserialize)]
struct CompleteRequest {
    prompt: Prompt,
    model: Option<String>,
    max_tokens: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    full_logits: bool,
    /// Keep generating past end-of-generation tokens (benchmarks).
    #[serde(default)]
    ignore_eos: bool,
    #[serde(flatten)]
    sampling: SamplingParams,
}

struct Complete;

impl Handler for Complete {
    fn handle(req: Request, res: Responder) -> Result<(), HttpError> {
        if req.method != "POST" {
            return Err(HttpError::new(405, "invalid_request_error", "use POST with a JSON body"));
        }
        let body: CompleteRequest = req.json()?;
        let model = Model::open_requested(body.model.as_deref())?;
        let name = model.name().to_string();
        let info = model.info();
        let limit = max_tokens(body.max_tokens, 128, info.context_length)?;
        let sampler = body.sampling.sampler(1.0, info.vocab_size)?.full_logits(body.full_logits);
        let mut options = GenerateOptions::max_tokens(limit);
        options.stop_at_end_of_generation = !body.ignore_eos;
        for s in body.stop.map(Stop::into_vec).transpose()?.unwrap_or_default() {
            options = options.stop(s);
        }
        let prompt = match &body.prompt {
            Prompt::Text(text) => model.tokenize(text)?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        let mut generation = model.generate(&prompt, sampler, options)?;

        let usage = |g: &flywheel_guest::Generation| {
            json!({
                "prompt_tokens": g.prompt_tokens(),
                "completion_tokens": g.completion_tokens(),
                "total_tokens": g.prompt_tokens() + g.completion_tokens(),
            })
        };
        if body.stream {
            let mut sse = res.sse()?;
            while let Some(text) = generation.next_text()? {
                sse.send_json(&json!({ "text": text }))?;
            }
            let reason = generation.finish_reason().map(|r| r.as_str());
            sse.send_json(&json!({ "finish_reason": reason, "usage": usage(&generation) }))?;
            sse.done()
        } else {
            let text = generation.collect_text()?;
            let reason = generation.finish_reason().map(|r| r.as_str());
            res.json(200, &json!({ "model": name, "text": text, "finish_reason": reason, "usage": usage(&generation) }))
        }
    }
}

export_plugin!(Complete);
