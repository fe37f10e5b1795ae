//! `POST /v1/chat/completions`: messages through the model's chat template, plain or
//! constrained (`response_format`, tool calls), streamed or whole.

use flywheel_guest::{ChatMessage, Constraint, HttpError, JsonConstraint, Request, Responder, SchemaConstraint};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::fields::Endpoint;
use crate::tools::{self, Choice, Tools};
use crate::{
    finish_reason, logprobs, now, prepare, prompt_error, random_id, read_body, send_usage, stream_or_fail, usage,
    Common,
};

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    response_format: Option<ResponseFormat>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
    refusal: Option<String>,
    /// An assistant's calls, earlier in the conversation.
    tool_calls: Option<Vec<HistoryCall>>,
    /// A tool message answers this call.
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryCall {
    #[serde(rename = "id")]
    _id: String,
    #[serde(rename = "type")]
    _kind: Option<String>,
    function: HistoryFunction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryFunction {
    name: String,
    arguments: String,
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

/// What the template renders for a message: its text, an assistant's refusal, and the
/// calls it made, written as the model is asked to write them.
fn message_text(m: &Message) -> Result<String, HttpError> {
    let mut parts = vec![content_text(m)?];
    parts.extend(m.refusal.clone());
    for call in m.tool_calls.iter().flatten() {
        parts.push(tools::render_call(&call.function.name, &call.function.arguments));
    }
    parts.retain(|p| !p.is_empty());
    Ok(parts.join("\n"))
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

pub fn completions(req: &Request, res: Responder) -> Result<(), HttpError> {
    let (body, common): (ChatRequest, Common) = read_body(req, Endpoint::Chat)?;
    if body.messages.is_empty() {
        return Err(HttpError::bad_request("messages must not be empty").with_param("messages"));
    }
    let tools = tools::parse(body.tools.as_ref(), body.tool_choice.as_ref(), body.parallel_tool_calls)?;
    let mut messages = Vec::with_capacity(body.messages.len() + 1);
    for (i, m) in body.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" if m.tool_call_id.is_none() => {
                return Err(HttpError::bad_request("a tool message needs the tool_call_id it answers")
                    .with_param(&format!("messages[{i}].tool_call_id")))
            }
            "tool" => "tool",
            other => return Err(HttpError::bad_request(format!("unknown role {other:?}")).with_param("messages")),
        };
        messages.push(ChatMessage { role: role.into(), content: message_text(m)? });
    }
    if let Some(prompt) = tools.as_ref().and_then(Tools::system_prompt) {
        match messages.first_mut() {
            Some(first) if first.role == "system" => first.content = format!("{}\n\n{prompt}", first.content),
            _ => messages.insert(0, ChatMessage { role: "system".into(), content: prompt }),
        }
    }
    let calling = tools.as_ref().filter(|t| t.choice != Choice::None);
    let mut constraint = output_constraint(body.response_format.as_ref())?;
    if let Some(t) = calling {
        if constraint.is_some() {
            return Err(HttpError::bad_request("tools cannot be combined with a json_object or json_schema response_format; send tool_choice: none or no response_format")
                .with_param("response_format"));
        }
        constraint = t.constraint();
    }
    if constraint.is_some() && common.stop.is_some() {
        // Cutting constrained output at a stop sequence would break the document it promises.
        return Err(HttpError::bad_request("stop cannot be combined with constrained output (a JSON response_format, or tool_choice required or a named function)")
            .with_param("stop"));
    }
    let alternatives = logprobs::chat_request(body.logprobs, body.top_logprobs)?;
    let p = prepare(&common)?;
    let tokens = p.model.chat_prompt(&messages)?;
    let id = random_id("chatcmpl");
    let created = now();
    if p.n() > 1 {
        if calling.is_some() {
            return Err(HttpError::bad_request(
                "n > 1 cannot be combined with tool calls; send n: 1 or tool_choice: none",
            )
            .with_param("n"));
        }
        let mut choices = Vec::with_capacity(p.n());
        for _ in 0..p.n() {
            let mut options = p.options();
            // Each choice needs a constraint of its own (it tracks that choice's output).
            options.constraint = output_constraint(body.response_format.as_ref())?;
            choices.push((options, alternatives));
        }
        return crate::choices::chat(res, &common, &p, &tokens, choices, &id, created);
    }
    let mut options = p.options();
    options.constraint = constraint;
    options.logprobs = alternatives;
    let model = &p.model;
    let mut generation =
        model.generate(&tokens, p.sampler.clone(), options).map_err(|e| prompt_error(e, "messages"))?;
    let name = p.name.clone();
    let chunk = |delta: Value, logprobs: Value, reason: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
            "system_fingerprint": null,
            "choices": [{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason }],
        })
    };
    let render_logprobs = |entries: &[flywheel_guest::TokenLogprob]| match alternatives {
        Some(_) => logprobs::chat(model, entries),
        None => Ok(Value::Null),
    };
    if common.streaming() {
        stream_or_fail(res.sse()?, |sse| {
            sse.send_json(&chunk(json!({ "role": "assistant", "content": "" }), Value::Null, None))?;
            // Text streams as it comes, unless tools may be called and it starts like a call:
            // that is only known once the answer is whole.
            let mut held = String::new();
            let mut held_logprobs = Vec::new();
            let mut holding = calling.is_some();
            while let Some(text) = generation.next_text()? {
                if holding {
                    held.push_str(&text);
                    held_logprobs.extend(generation.take_logprobs());
                    let started = held.trim_start();
                    if started.is_empty() || started.starts_with('{') {
                        continue;
                    }
                    holding = false;
                    let lp = render_logprobs(&std::mem::take(&mut held_logprobs))?;
                    sse.send_json(&chunk(json!({ "content": std::mem::take(&mut held) }), lp, None))?;
                    continue;
                }
                let lp = render_logprobs(&generation.take_logprobs())?;
                sse.send_json(&chunk(json!({ "content": text }), lp, None))?;
            }
            let call = calling.and_then(|t| t.call_in(&held));
            let reason = match &call {
                Some((function, arguments)) => {
                    let head = json!({"tool_calls": [{
                        "index": 0, "id": tools::call_id(), "type": "function",
                        "function": {"name": function, "arguments": ""},
                    }]});
                    sse.send_json(&chunk(head, Value::Null, None))?;
                    for piece in pieces(arguments, 24) {
                        let delta = json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]});
                        sse.send_json(&chunk(delta, Value::Null, None))?;
                    }
                    call_finish_reason(&generation)
                }
                None => {
                    if !held.is_empty() {
                        let lp = render_logprobs(&held_logprobs)?;
                        sse.send_json(&chunk(json!({ "content": held }), lp, None))?;
                    }
                    finish_reason(&generation)
                }
            };
            sse.send_json(&chunk(json!({}), Value::Null, Some(reason)))?;
            send_usage(
                sse,
                &common,
                &generation,
                |u| json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [], "usage": u }),
            )
        })
    } else {
        let (text, entries) = logprobs::collect(&mut generation)?;
        let (message, lp, reason) = match calling.and_then(|t| t.call_in(&text)) {
            Some((function, arguments)) => {
                let calls = json!([{
                    "id": tools::call_id(), "type": "function",
                    "function": {"name": function, "arguments": arguments},
                }]);
                let message = json!({ "role": "assistant", "content": null, "refusal": null, "tool_calls": calls });
                (message, Value::Null, call_finish_reason(&generation))
            }
            None => {
                let message = json!({ "role": "assistant", "content": text, "refusal": null });
                (message, render_logprobs(&entries)?, finish_reason(&generation))
            }
        };
        res.json(
            200,
            &json!({
                "id": id, "object": "chat.completion", "created": created, "model": name,
                "system_fingerprint": null,
                "choices": [{ "index": 0, "message": message, "logprobs": lp, "finish_reason": reason }],
                "usage": usage(&generation),
            }),
        )
    }
}

/// A call that ended by itself is `tool_calls`; one cut by the token budget stays `length`.
fn call_finish_reason(g: &flywheel_guest::Generation) -> &'static str {
    match g.finish_reason() {
        Some(flywheel_guest::FinishReason::Length) => "length",
        _ => "tool_calls",
    }
}

/// `text` in pieces of about `size` characters, for argument deltas.
fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(size.max(1)).map(|c| c.iter().collect()).collect()
}
