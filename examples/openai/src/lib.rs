//! `openai`: the OpenAI API on Flywheel models, as a plugin.
//!
//! `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions` and
//! `POST /v1/chat/completions`, with `stream: true` as SSE chunks ending in `data: [DONE]`,
//! usage counts (also streamed with `stream_options.include_usage`), `stop`, `max_tokens`
//! (`max_completion_tokens`), `temperature`, `top_p`, `seed`, `logit_bias`, penalties and
//! `response_format` `json_object` and `json_schema` (constrained decoding). Errors use OpenAI's
//! shape. Extensions: `top_k`, `min_p`, `repetition_penalty` (`repeat_penalty`), `ignore_eos`.
//! Every other field is refused with a 400 naming it (see `fields`), never dropped.

mod chat;
mod choices;
mod embeddings;
mod fields;
mod logprobs;
mod tools;

use fields::Endpoint;
use flywheel_guest::{
    export_plugin, from_json_value, max_tokens, GenerateOptions, Generation, Handler, HttpError, Model, Request,
    Responder, SamplingParams, SseStream, Stop,
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
            ("POST", "/v1/chat/completions") => chat::completions(&req, res),
            ("POST", "/v1/embeddings") => embeddings::create(&req, res),
            (_, "/v1/models" | "/v1/completions" | "/v1/chat/completions" | "/v1/embeddings") => {
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
    limit: usize,
    stops: Vec<String>,
    stop_at_end_of_generation: bool,
    sampler: flywheel_guest::Sampler,
    /// Choices asked for (`n`), one sampler each.
    samplers: Vec<flywheel_guest::Sampler>,
}

impl Prepared {
    /// Generation options of one choice (each choice needs its own).
    fn options(&self) -> GenerateOptions {
        let mut options = GenerateOptions::max_tokens(self.limit);
        options.stop_at_end_of_generation = self.stop_at_end_of_generation;
        for s in &self.stops {
            options = options.stop(s.clone());
        }
        options
    }

    fn n(&self) -> usize {
        self.samplers.len()
    }
}

/// Most choices one request may ask for: the plugin manifest's `OPENAI_MAX_N` (each choice
/// holds one of the instance's execution contexts, so it must not exceed `max_contexts`).
fn max_choices() -> i64 {
    std::env::var("OPENAI_MAX_N").ok().and_then(|v| v.parse().ok()).filter(|&n| n >= 1).unwrap_or(1)
}

fn choice_count(n: Option<i64>) -> Result<usize, HttpError> {
    let max = max_choices();
    match n {
        None => Ok(1),
        Some(n) if (1..=max).contains(&n) => Ok(n as usize),
        Some(n) => {
            Err(HttpError::bad_request(format!("n must be between 1 and {max} on this server, got {n}"))
                .with_param("n"))
        }
    }
}

/// The model a request names (the first one served when it names none), opened.
fn open_model(requested: Option<&str>) -> Result<(Model, String), HttpError> {
    let available = Model::available();
    let name = match requested {
        Some(m) if available.iter().any(|a| a == m) => m.to_string(),
        Some(m) => return Err(model_not_found(m)),
        None => available.first().cloned().ok_or_else(|| HttpError::new(503, "server_error", "no model is loaded"))?,
    };
    Ok((Model::open(&name)?, name))
}

fn prepare(common: &Common) -> Result<Prepared, HttpError> {
    let n = choice_count(common.n)?;
    let (model, name) = open_model(common.model.as_deref())?;
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
    // With a seed, choice i samples with seed + i: reproducible, and not n copies of one answer.
    let mut samplers = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let mut params = common.sampling.clone();
        params.seed = params.seed.map(|s| s.wrapping_add(i));
        samplers.push(params.sampler(1.0, info.vocab_size)?);
    }
    let stops = common.stop.clone().map(Stop::into_vec).transpose()?.unwrap_or_default();
    let stop_at_end_of_generation = common.ignore_eos != Some(true);
    Ok(Prepared { model, name, limit, stops, stop_at_end_of_generation, sampler, samplers })
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
    let p = prepare(&common)?;
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
    if p.n() > 1 {
        let choices = (0..p.n()).map(|_| (p.options(), alternatives)).collect();
        let echoed = echo.then_some(prompt_text.as_str());
        return choices::completions(res, &common, &p, &tokens, choices, echoed, &id, created);
    }
    let mut options = p.options();
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

export_plugin!(OpenAi);
