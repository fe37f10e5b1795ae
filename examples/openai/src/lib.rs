//! `openai`: the OpenAI API on Flywheel models, as a plugin.
//!
//! `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions` and
//! `POST /v1/chat/completions`, with `stream: true` as SSE chunks ending in `data: [DONE]`,
//! usage counts (also streamed with `stream_options.include_usage`), `stop`, `max_tokens`
//! (`max_completion_tokens`), `temperature`, `top_p`, `seed`, `logit_bias`, penalties and
//! `response_format: {"type": "json_object"}` (constrained decoding). Errors use OpenAI's
//! shape. Extensions: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`.

use flywheel_guest::{
    export_plugin, max_tokens, ChatMessage, GenerateOptions, Generation, Handler, HttpError, JsonConstraint, Model,
    Request, Responder, SamplingParams, SseStream, Stop,
};
use serde::Deserialize;
use serde_json::{json, Value};

struct OpenAi;

impl Handler for OpenAi {
    fn handle(req: Request, res: Responder) -> Result<(), HttpError> {
        // Served at /v1/... and at /fn/openai/v1/...
        let path = req.path().trim_start_matches("/fn/openai").trim_end_matches('/').to_string();
        match (req.method.as_str(), path.as_str()) {
            ("GET", "/v1/models") => {
                let data: Vec<Value> = Model::available().iter().map(|m| model_object(m)).collect();
                res.json(200, &json!({ "object": "list", "data": data }))
            }
            ("GET", p) if p.starts_with("/v1/models/") => {
                let id = &p["/v1/models/".len()..];
                if Model::available().iter().any(|m| m == id) {
                    res.json(200, &model_object(id))
                } else {
                    Err(model_not_found(id))
                }
            }
            ("POST", "/v1/completions") => completions(&req, res),
            ("POST", "/v1/chat/completions") => chat_completions(&req, res),
            (_, "/v1/models" | "/v1/completions" | "/v1/chat/completions") => {
                Err(HttpError::new(405, "invalid_request_error", format!("{} is not allowed on {path}", req.method)))
            }
            _ => Err(HttpError::not_found(format!("unknown endpoint {path}"))),
        }
    }
}

fn model_object(id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": "flywheel" })
}

fn model_not_found(id: &str) -> HttpError {
    let mut e = HttpError::new(
        404,
        "invalid_request_error",
        format!("The model `{id}` does not exist or you do not have access to it."),
    );
    e.param = Some("model".into());
    e
}

fn now() -> u64 {
    wasip2::clocks::wall_clock::now().seconds
}

fn random_id(prefix: &str) -> String {
    let a = wasip2::random::random::get_random_u64();
    let b = wasip2::random::random::get_random_u64();
    format!("{prefix}-{a:016x}{b:08x}")
}

use flywheel_guest::wasip2;

/// Fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(flatten)]
    sampling: SamplingParams,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What a request resolved to, before generating.
struct Prepared {
    model: Model,
    name: String,
    options: GenerateOptions,
    sampler: flywheel_guest::Sampler,
}

fn prepare(common: &Common) -> Result<Prepared, HttpError> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(HttpError::bad_request("only n = 1 is supported").with_param("n"));
    }
    let available = Model::available();
    let name = match &common.model {
        Some(m) if available.contains(m) => m.clone(),
        Some(m) => return Err(model_not_found(m)),
        None => available.first().cloned().ok_or_else(|| HttpError::new(503, "server_error", "no model is loaded"))?,
    };
    let model = Model::open(&name)?;
    let info = model.info();
    let limit = max_tokens(common.max_completion_tokens.or(common.max_tokens), 256, info.context_length)?;
    let sampler = common.sampling.sampler(1.0, info.vocab_size)?;
    let mut options = GenerateOptions::max_tokens(limit);
    options.stop_at_end_of_generation = !common.ignore_eos;
    for s in common.stop.clone().map(Stop::into_vec).transpose()?.unwrap_or_default() {
        options = options.stop(s);
    }
    Ok(Prepared { model, name, options, sampler })
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens(),
        "completion_tokens": g.completion_tokens(),
        "total_tokens": g.prompt_tokens() + g.completion_tokens(),
    })
}

fn finish_reason(g: &Generation) -> &'static str {
    g.finish_reason().map(|r| r.as_str()).unwrap_or("stop")
}

// ---- /v1/completions -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i32>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    common: Common,
}

fn completions(req: &Request, res: Responder) -> Result<(), HttpError> {
    let body: CompletionRequest = req.json()?;
    let mut p = prepare(&body.common)?;
    let (prompt_text, tokens) = match &body.prompt {
        Prompt::Text(t) => (t.clone(), p.model.tokenize(t)?),
        Prompt::Texts(v) if v.len() == 1 => (v[0].clone(), p.model.tokenize(&v[0])?),
        Prompt::Texts(_) => {
            return Err(HttpError::bad_request("only one prompt per request is supported").with_param("prompt"))
        }
        Prompt::Tokens(ids) => (p.model.detokenize(ids).unwrap_or_default(), ids.clone()),
    };
    let id = random_id("cmpl");
    let created = now();
    let name = p.name.clone();
    let options = std::mem::replace(&mut p.options, GenerateOptions::max_tokens(0));
    let mut generation =
        p.model.generate(&tokens, p.sampler.clone(), options).map_err(|e| prompt_error(e, "prompt"))?;
    let chunk = |text: &str, reason: Option<&str>| {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": name,
            "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": reason }],
        })
    };
    if body.common.stream {
        stream_or_fail(res.sse()?, |sse| {
            if body.echo {
                sse.send_json(&chunk(&prompt_text, None))?;
            }
            while let Some(text) = generation.next_text()? {
                sse.send_json(&chunk(&text, None))?;
            }
            sse.send_json(&chunk("", Some(finish_reason(&generation))))?;
            send_usage(
                sse,
                &body.common,
                &generation,
                |u| json!({ "id": id, "object": "text_completion", "created": created, "model": name, "choices": [], "usage": u }),
            )
        })
    } else {
        let mut text = generation.collect_text()?;
        if body.echo {
            text = prompt_text + &text;
        }
        let mut out = chunk(&text, Some(finish_reason(&generation)));
        out["usage"] = usage(&generation);
        res.json(200, &out)
    }
}

/// A prompt that does not fit is the client's problem: say so as OpenAI does.
/// A prompt that does not fit the context is the client's error, in the field `param`.
fn prompt_error(e: flywheel_guest::Error, param: &str) -> HttpError {
    let mut h = HttpError::from(e);
    if h.kind == "context_length_exceeded" {
        h.kind = "invalid_request_error".into();
        h.param = Some(param.into());
    }
    h
}

/// Streams what `send` sends, then `data: [DONE]`. A failure part-way (the engine, the
/// context, a send) becomes an error event and a cut stream, never a `[DONE]`: a client
/// must not take a partial answer as whole.
fn stream_or_fail(
    mut sse: SseStream,
    send: impl FnOnce(&mut SseStream) -> Result<(), HttpError>,
) -> Result<(), HttpError> {
    match send(&mut sse) {
        Ok(()) => sse.done(),
        Err(e) => {
            sse.fail(&e);
            Ok(())
        }
    }
}

fn send_usage(
    sse: &mut SseStream,
    common: &Common,
    g: &Generation,
    usage_chunk: impl Fn(Value) -> Value,
) -> Result<(), HttpError> {
    if common.stream_options.as_ref().is_some_and(|o| o.include_usage) {
        sse.send_json(&usage_chunk(usage(g)))?;
    }
    Ok(())
}

// ---- /v1/chat/completions --------------------------------------------------------------

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    response_format: Option<ResponseFormat>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

fn message_text(m: &Message) -> Result<String, HttpError> {
    match &m.content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|p| match (p.kind.as_str(), &p.text) {
                ("text", Some(t)) => Ok(t.as_str()),
                (kind, _) => Err(HttpError::bad_request(format!("content parts of type {kind:?} are not supported"))
                    .with_param("messages")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join("")),
    }
}

fn chat_completions(req: &Request, res: Responder) -> Result<(), HttpError> {
    let body: ChatRequest = req.json()?;
    if body.messages.is_empty() {
        return Err(HttpError::bad_request("messages must not be empty").with_param("messages"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for m in &body.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => return Err(HttpError::bad_request(format!("unknown role {other:?}")).with_param("messages")),
        };
        messages.push(ChatMessage { role: role.into(), content: message_text(m)? });
    }
    let mut p = prepare(&body.common)?;
    let json_mode = match body.response_format.as_ref().map(|f| f.kind.as_str()) {
        None | Some("text") => false,
        Some("json_object") => true,
        Some(other) => {
            return Err(HttpError::bad_request(format!(
                "response_format type {other:?} is not supported; use \"json_object\""
            ))
            .with_param("response_format"))
        }
    };
    let tokens = p.model.chat_prompt(&messages)?;
    let mut options = std::mem::replace(&mut p.options, GenerateOptions::max_tokens(0));
    if json_mode {
        options = options.constraint(JsonConstraint::object());
    }
    let mut generation =
        p.model.generate(&tokens, p.sampler.clone(), options).map_err(|e| prompt_error(e, "messages"))?;
    let id = random_id("chatcmpl");
    let created = now();
    let name = p.name.clone();
    if body.common.stream {
        let chunk = |delta: Value, reason: Option<&str>| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                "system_fingerprint": null,
                "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": reason }],
            })
        };
        stream_or_fail(res.sse()?, |sse| {
            sse.send_json(&chunk(json!({ "role": "assistant", "content": "" }), None))?;
            while let Some(text) = generation.next_text()? {
                sse.send_json(&chunk(json!({ "content": text }), None))?;
            }
            sse.send_json(&chunk(json!({}), Some(finish_reason(&generation))))?;
            send_usage(
                sse,
                &body.common,
                &generation,
                |u| json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [], "usage": u }),
            )
        })
    } else {
        let text = generation.collect_text()?;
        res.json(
            200,
            &json!({
                "id": id, "object": "chat.completion", "created": created, "model": name,
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": text, "refusal": null },
                    "logprobs": null,
                    "finish_reason": finish_reason(&generation),
                }],
                "usage": usage(&generation),
            }),
        )
    }
}

export_plugin!(OpenAi);
