//! `openai`: the OpenAI API on Flywheel models, as a plugin.
//!
//! `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions` and
//! `POST /v1/chat/completions`, with `stream: true` as SSE chunks ending in `data: [DONE]`,
//! usage counts (also streamed with `stream_options.include_usage`), `stop`, `max_tokens`
//! (`max_completion_tokens`), `temperature`, `top_p`, `seed`, `logit_bias`, penalties and
//! `response_format` `json_object` and `json_schema` (constrained decoding). Errors use OpenAI's
//! shape. Extensions: `top_k`, `min_p`, `repetition_penalty` (`repeat_penalty`), `ignore_eos`.
//! Every other field is refused with a 400 naming it (see `fields`), never dropped.

mod fields;
mod logprobs;

use fields::Endpoint;
use flywheel_guest::{
    export_plugin, from_json_value, max_tokens, ChatMessage, Constraint, GenerateOptions, Generation, Handler,
    HttpError, JsonConstraint, Model, Request, Responder, SamplingParams, SchemaConstraint, SseStream, Stop,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

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

/// Fields both endpoints share (`null` is the same as absent, as in OpenAI's API).
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    ignore_eos: Option<bool>,
    #[serde(skip)]
    sampling: SamplingParams,
}

impl Common {
    fn streaming(&self) -> bool {
        self.stream == Some(true)
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// A request body of `endpoint`: its fields vetted, then the shared ones and the
/// endpoint's own (`T`) parsed, each type error naming its field.
fn read_body<T: DeserializeOwned>(req: &Request, endpoint: Endpoint) -> Result<(T, Common), HttpError> {
    let body: Map<String, Value> = req.json()?;
    fields::check(endpoint, &body)?;
    let body = Value::Object(body);
    let mut common: Common = from_json_value(&body)?;
    common.sampling = from_json_value(&body)?;
    Ok((from_json_value(&body)?, common))
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
    let limit = match (common.max_completion_tokens, common.max_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(HttpError::bad_request("max_tokens and max_completion_tokens disagree; send one")
                .with_param("max_tokens"))
        }
        (Some(n), _) => {
            max_tokens(Some(n), 256, info.context_length).map_err(|e| e.with_param("max_completion_tokens"))?
        }
        (None, n) => max_tokens(n, 256, info.context_length)?,
    };
    let sampler = common.sampling.sampler(1.0, info.vocab_size)?;
    let mut options = GenerateOptions::max_tokens(limit);
    options.stop_at_end_of_generation = common.ignore_eos != Some(true);
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
    echo: Option<bool>,
    logprobs: Option<i64>,
}

fn completions(req: &Request, res: Responder) -> Result<(), HttpError> {
    let (body, common): (CompletionRequest, Common) = read_body(req, Endpoint::Completions)?;
    let echo = body.echo == Some(true);
    let alternatives = logprobs::completion_request(body.logprobs, echo)?;
    let mut p = prepare(&common)?;
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
    let mut options = std::mem::replace(&mut p.options, GenerateOptions::max_tokens(0));
    options.logprobs = alternatives;
    let model = &p.model;
    let mut generation = model.generate(&tokens, p.sampler.clone(), options).map_err(|e| prompt_error(e, "prompt"))?;
    let chunk = |text: &str, logprobs: Value, reason: Option<&str>| {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": name,
            "choices": [{ "text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason }],
        })
    };
    let mut offsets = logprobs::CompletionLogprobs::default();
    if common.streaming() {
        stream_or_fail(res.sse()?, |sse| {
            if echo {
                sse.send_json(&chunk(&prompt_text, Value::Null, None))?;
            }
            while let Some(text) = generation.next_text()? {
                let lp = match alternatives {
                    Some(_) => offsets.render(model, &generation.take_logprobs())?,
                    None => Value::Null,
                };
                sse.send_json(&chunk(&text, lp, None))?;
            }
            sse.send_json(&chunk("", Value::Null, Some(finish_reason(&generation))))?;
            send_usage(
                sse,
                &common,
                &generation,
                |u| json!({ "id": id, "object": "text_completion", "created": created, "model": name, "choices": [], "usage": u }),
            )
        })
    } else {
        let (mut text, entries) = logprobs::collect(&mut generation)?;
        if echo {
            text = prompt_text + &text;
        }
        let lp = match alternatives {
            Some(_) => offsets.render(model, &entries)?,
            None => Value::Null,
        };
        let mut out = chunk(&text, lp, Some(finish_reason(&generation)));
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
    if common.stream_options.as_ref().is_some_and(|o| o.include_usage == Some(true)) {
        sse.send_json(&usage_chunk(usage(g)))?;
    }
    Ok(())
}

// ---- /v1/chat/completions --------------------------------------------------------------

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    response_format: Option<ResponseFormat>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
    refusal: Option<String>,
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
#[serde(deny_unknown_fields)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    json_schema: Option<JsonSchemaFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSchemaFormat {
    name: String,
    /// A note for the model; the schema's own descriptions are what it is shown.
    #[serde(rename = "description")]
    _description: Option<String>,
    schema: Option<Value>,
    /// The output follows the schema whether or not strict is asked for.
    #[serde(rename = "strict")]
    _strict: Option<bool>,
}

/// The constraint `response_format` asks for, if any.
fn output_constraint(format: Option<&ResponseFormat>) -> Result<Option<Box<dyn Constraint>>, HttpError> {
    let refuse = |msg: String| HttpError::bad_request(msg).with_param("response_format");
    let Some(format) = format else { return Ok(None) };
    match (format.kind.as_str(), &format.json_schema) {
        ("text", None) => Ok(None),
        ("json_object", None) => Ok(Some(Box::new(JsonConstraint::object()))),
        ("json_schema", Some(spec)) => {
            let valid_name = !spec.name.is_empty()
                && spec.name.len() <= 64
                && spec.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                return Err(refuse("json_schema.name must be 1 to 64 letters, digits, _ or -".into()));
            }
            match &spec.schema {
                None => Ok(Some(Box::new(JsonConstraint::object()))),
                Some(schema) => match SchemaConstraint::new(schema) {
                    Ok(c) => Ok(Some(Box::new(c))),
                    Err(e) => Err(refuse(format!("response_format.json_schema.schema: {e}"))),
                },
            }
        }
        ("json_schema", None) => Err(refuse("response_format of type json_schema needs a json_schema".into())),
        ("text" | "json_object", Some(_)) => Err(refuse("json_schema belongs to the type json_schema".into())),
        (other, _) => Err(refuse(format!(
            "response_format type {other:?} is not supported; use \"text\", \"json_object\" or \"json_schema\""
        ))),
    }
}

fn message_text(m: &Message) -> Result<String, HttpError> {
    let content = content_text(m)?;
    Ok(match &m.refusal {
        Some(r) if content.is_empty() => r.clone(),
        Some(r) => format!("{content}\n{r}"),
        None => content,
    })
}

fn content_text(m: &Message) -> Result<String, HttpError> {
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
    let (body, common): (ChatRequest, Common) = read_body(req, Endpoint::Chat)?;
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
    let constraint = output_constraint(body.response_format.as_ref())?;
    if constraint.is_some() && common.stop.is_some() {
        // Cutting constrained output at a stop sequence would break the document it promises.
        return Err(HttpError::bad_request(
            "stop cannot be combined with a json_object or json_schema response_format",
        )
        .with_param("stop"));
    }
    let alternatives = logprobs::chat_request(body.logprobs, body.top_logprobs)?;
    let mut p = prepare(&common)?;
    let tokens = p.model.chat_prompt(&messages)?;
    let mut options = std::mem::replace(&mut p.options, GenerateOptions::max_tokens(0));
    options.constraint = constraint;
    options.logprobs = alternatives;
    let model = &p.model;
    let mut generation =
        model.generate(&tokens, p.sampler.clone(), options).map_err(|e| prompt_error(e, "messages"))?;
    let id = random_id("chatcmpl");
    let created = now();
    let name = p.name.clone();
    if common.streaming() {
        let chunk = |delta: Value, logprobs: Value, reason: Option<&str>| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                "system_fingerprint": null,
                "choices": [{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason }],
            })
        };
        stream_or_fail(res.sse()?, |sse| {
            sse.send_json(&chunk(json!({ "role": "assistant", "content": "" }), Value::Null, None))?;
            while let Some(text) = generation.next_text()? {
                let lp = match alternatives {
                    Some(_) => logprobs::chat(model, &generation.take_logprobs())?,
                    None => Value::Null,
                };
                sse.send_json(&chunk(json!({ "content": text }), lp, None))?;
            }
            sse.send_json(&chunk(json!({}), Value::Null, Some(finish_reason(&generation))))?;
            send_usage(
                sse,
                &common,
                &generation,
                |u| json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [], "usage": u }),
            )
        })
    } else {
        let (text, entries) = logprobs::collect(&mut generation)?;
        let lp = match alternatives {
            Some(_) => logprobs::chat(model, &entries)?,
            None => Value::Null,
        };
        res.json(
            200,
            &json!({
                "id": id, "object": "chat.completion", "created": created, "model": name,
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": text, "refusal": null },
                    "logprobs": lp,
                    "finish_reason": finish_reason(&generation),
                }],
                "usage": usage(&generation),
            }),
        )
    }
}

export_plugin!(OpenAi);
