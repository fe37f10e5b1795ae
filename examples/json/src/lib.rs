//! `json`: generate a JSON object, constrained token by token so the output always parses.
//!
//! POST `{"prompt": "...", "model"?, "max_tokens"? (default 256), "temperature"? (default 0),
//! "seed"?, "array"? (allow a top-level array too)}`. At each step only tokens that keep the
//! output a valid JSON prefix are allowed (sent to the host as `allowed_ids`); if the token
//! budget runs out, the document is closed. Answers `{"model", "json", "text",
//! "finish_reason", "usage"}` where `json` is the parsed value.

use flywheel_guest::{
    export_plugin, max_tokens, ChatMessage, GenerateOptions, Handler, HttpError, JsonConstraint, Model, Request,
    Responder, SamplingParams,
};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct JsonRequest {
    prompt: String,
    model: Option<String>,
    max_tokens: Option<i64>,
    #[serde(default)]
    array: bool,
    #[serde(flatten)]
    sampling: SamplingParams,
}

struct Json;

impl Handler for Json {
    fn handle(req: Request, res: Responder) -> Result<(), HttpError> {
        if req.method != "POST" {
            return Err(HttpError::new(405, "invalid_request_error", "use POST with a JSON body"));
        }
        let body: JsonRequest = req.json()?;
        let model = Model::open_requested(body.model.as_deref())?;
        let name = model.name().to_string();
        let info = model.info();
        let limit = max_tokens(body.max_tokens, 256, info.context_length)?;
        let sampler = body.sampling.sampler(0.0, info.vocab_size)?;
        // Chat models answer better inside their template; base models get the raw prompt.
        let prompt = if info.chat_template.is_some() {
            let system = "You answer with a single JSON document and nothing else.";
            model.chat_prompt(&[
                ChatMessage { role: "system".into(), content: system.into() },
                ChatMessage { role: "user".into(), content: body.prompt.clone() },
            ])?
        } else {
            model.tokenize(&body.prompt)?
        };
        let constraint = if body.array { JsonConstraint::any() } else { JsonConstraint::object() };
        let options = GenerateOptions::max_tokens(limit).constraint(constraint);
        let mut generation = model.generate(&prompt, sampler, options)?;
        let text = generation.collect_text()?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            HttpError::new(500, "server_error", format!("constrained output did not parse ({e}): {text}"))
        })?;
        let reason = generation.finish_reason().map(|r| r.as_str());
        res.json(
            200,
            &json!({
                "model": name,
                "json": value,
                "text": text,
                "finish_reason": reason,
                "usage": {
                    "prompt_tokens": generation.prompt_tokens(),
                    "completion_tokens": generation.completion_tokens(),
                    "total_tokens": generation.prompt_tokens() + generation.completion_tokens(),
                },
            }),
        )
    }
}

export_plugin!(Json);
