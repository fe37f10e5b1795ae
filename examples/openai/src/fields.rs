//! Every request field of OpenAI's chat and completion APIs, and what this plugin does with
//! it. A field is honoured, or refused with a 400 that names it (`param`): none is dropped,
//! because a client that relies on a field it did not get produces wrong programs without
//! an error. `null` means "not given", as in OpenAI's API.
//!
//! This runs on the raw JSON object before it is parsed; values of honoured fields are
//! checked where they are used.

use flywheel_guest::HttpError;
use serde_json::{Map, Value};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Refuse what this plugin would otherwise have to ignore.
pub fn check(endpoint: Endpoint, body: &Map<String, Value>) -> Result<(), HttpError> {
    let required = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    if body.get(required).is_none_or(Value::is_null) {
        return Err(HttpError::bad_request(format!("you must provide {required}")).with_param(required));
    }
    let streaming = body.get("stream").is_some_and(|v| v == &Value::Bool(true));
    for (key, value) in body {
        match verdict(endpoint, key, value, streaming) {
            Verdict::Unrecognized => {
                return Err(
                    HttpError::bad_request(format!("Unrecognized request argument supplied: {key}")).with_param(key)
                )
            }
            _ if value.is_null() => {}
            Verdict::Honoured => {}
            Verdict::Refused(why) => return Err(HttpError::bad_request(format!("{key}: {why}")).with_param(key)),
        }
    }
    if endpoint == Endpoint::Chat {
        if let Some(Value::Array(messages)) = body.get("messages") {
            for (i, m) in messages.iter().enumerate() {
                check_message(i, m)?;
            }
        }
    }
    Ok(())
}

enum Verdict {
    Honoured,
    Refused(String),
    /// Not a field of this API.
    Unrecognized,
}

fn refuse(why: impl Into<String>) -> Verdict {
    Verdict::Refused(why.into())
}

fn verdict(endpoint: Endpoint, key: &str, v: &Value, streaming: bool) -> Verdict {
    use Endpoint::{Chat, Completions};
    use Verdict::Honoured;
    match (endpoint, key) {
        // Honoured by both endpoints; their values are checked where they are parsed.
        (_, "model" | "max_tokens" | "stop" | "stream" | "temperature" | "top_p" | "seed") => Honoured,
        (_, "frequency_penalty" | "presence_penalty" | "logit_bias" | "n") => Honoured,
        // Extensions that llama.cpp's clients send (documented in the README).
        (_, "top_k" | "min_p" | "repetition_penalty" | "repeat_penalty" | "ignore_eos") => Honoured,
        // Identifiers for the caller's own records; they do not change the answer.
        (_, "user") | (Chat, "safety_identifier" | "prompt_cache_key") => string(v),
        (_, "stream_options") => stream_options(v, streaming),

        (Chat, "messages" | "max_completion_tokens" | "response_format") => Honoured,
        (Chat, "metadata") => metadata(v),
        (Chat, "store") if v == &Value::Bool(false) => Honoured,
        (Chat, "store") => refuse("this server does not store completions; send false or leave it out"),
        (Chat, "modalities") if v.as_array().is_some_and(|m| m.iter().all(|x| x == "text")) => Honoured,
        (Chat, "modalities") => refuse("only text output is supported"),
        (Chat, "audio") => refuse("audio output is not supported"),
        (Chat, "service_tier") if v == "auto" || v == "default" => Honoured,
        (Chat, "service_tier") => refuse("this server has one service tier; send \"auto\" or \"default\""),
        (Chat, "reasoning_effort") if v == "none" => Honoured,
        (Chat, "reasoning_effort") => refuse("the models served here do not reason before answering; send \"none\""),
        (Chat, "verbosity") => refuse("output verbosity is not supported"),
        (Chat, "prediction") => refuse("predicted outputs are not supported"),
        (Chat, "web_search_options") => refuse("web search is not available"),
        (Chat, "moderation") => refuse("moderation is not available"),
        // The prefix cache is in memory and implicit: it keeps what memory allows, no longer.
        (Chat, "prompt_cache_retention") if v == "in_memory" => Honoured,
        (Chat, "prompt_cache_retention") => refuse("prompts are cached in memory only; send \"in_memory\""),
        (Chat, "prompt_cache_options")
            if v.as_object().is_some_and(|o| o.len() == 1 && o.get("mode").is_some_and(|m| m == "implicit")) =>
        {
            Honoured
        }
        (Chat, "prompt_cache_options") => refuse("prompt caching here is implicit; send {\"mode\": \"implicit\"}"),
        (Chat, "tools" | "tool_choice" | "parallel_tool_calls") => Honoured,
        (Chat, "functions" | "function_call") => refuse("function calls are not supported"),
        (Chat, "logprobs" | "top_logprobs") => Honoured,

        (Completions, "prompt" | "echo") => Honoured,
        (Completions, "best_of") if v == 1 => Honoured,
        (Completions, "best_of") => refuse("only best_of = 1 is supported"),
        (Completions, "suffix") if v == "" => Honoured,
        (Completions, "suffix") => refuse("text insertion (a suffix) is not supported"),
        (Completions, "logprobs") => Honoured,

        _ => Verdict::Unrecognized,
    }
}

fn string(v: &Value) -> Verdict {
    match v {
        Value::String(_) => Verdict::Honoured,
        _ => refuse("must be a string"),
    }
}

fn stream_options(v: &Value, streaming: bool) -> Verdict {
    if !streaming {
        return refuse("only allowed when stream is true");
    }
    let Some(options) = v.as_object() else { return refuse("must be an object") };
    for (name, value) in options {
        match (name.as_str(), value) {
            ("include_usage", Value::Bool(_) | Value::Null) => {}
            ("include_obfuscation", Value::Bool(false) | Value::Null) => {}
            ("include_obfuscation", _) => return refuse("obfuscation padding is not supported; send false"),
            (other, _) => return refuse(format!("unknown option {other:?}")),
        }
    }
    Verdict::Honoured
}

/// OpenAI's limits: up to 16 pairs, keys up to 64 characters, string values up to 512.
fn metadata(v: &Value) -> Verdict {
    let Some(pairs) = v.as_object() else { return refuse("must be an object of strings") };
    if pairs.len() > 16 {
        return refuse(format!("holds {} pairs; at most 16 are allowed", pairs.len()));
    }
    for (k, value) in pairs {
        let Some(text) = value.as_str() else { return refuse(format!("the value of {k:?} is not a string")) };
        if k.chars().count() > 64 || text.chars().count() > 512 {
            return refuse(format!("keys are at most 64 characters and values at most 512 ({k:?})"));
        }
    }
    Verdict::Honoured
}

/// Message fields: what the chat template renders is honoured; the rest is refused.
fn check_message(i: usize, m: &Value) -> Result<(), HttpError> {
    let param = format!("messages[{i}]");
    let Some(fields) = m.as_object() else {
        return Err(HttpError::bad_request(format!("{param} must be an object")).with_param(&param));
    };
    for (key, value) in fields {
        let refused = match (key.as_str(), value) {
            (_, Value::Null) | ("role" | "content", _) => continue,
            // An assistant's refusal in the history is rendered as what it said.
            ("refusal", Value::String(_)) => continue,
            ("name", _) => "participant names are not supported",
            ("tool_calls" | "tool_call_id", _) => continue,
            ("function_call", _) => "function_call is deprecated and not supported; send tool_calls",
            ("audio", _) => "audio is not supported",
            _ => "is not a field of a chat message",
        };
        let param = format!("{param}.{key}");
        return Err(HttpError::bad_request(format!("{param}: {refused}")).with_param(&param));
    }
    // Text parts hold their text and nothing else (other kinds are refused when read).
    if let Some(Value::Array(parts)) = fields.get("content") {
        for (j, part) in parts.iter().enumerate() {
            let Some(part) = part.as_object().filter(|p| p.get("type").is_some_and(|t| t == "text")) else { continue };
            if let Some(key) = part.keys().find(|k| !matches!(k.as_str(), "type" | "text")) {
                let param = format!("{param}.content[{j}].{key}");
                return Err(HttpError::bad_request(format!("{param} is not supported")).with_param(&param));
            }
        }
    }
    Ok(())
}
