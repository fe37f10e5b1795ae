//! `n` > 1: several choices for one prompt, generated together. Every round advances all
//! running choices in one host batch step, and the prompt is computed once (the host copies
//! its KV cells to the other choices' sequences), so `n` choices cost far less than `n`
//! requests. Choice `i` samples with `seed + i` when a seed is given.

use flywheel_guest::{Choices, GenerateOptions, HttpError, Responder, SseStream, TokenLogprob};
use serde_json::{json, Value};

use crate::logprobs::{self, CompletionLogprobs};
use crate::{finish_reason, prompt_error, stream_or_fail, Common, Prepared};

/// One choice's options and how many log-probability alternatives it reports.
pub type ChoiceSpec = (GenerateOptions, Option<usize>);

fn start<'m>(p: &'m Prepared, tokens: &[i32], specs: Vec<ChoiceSpec>, param: &str) -> Result<Choices<'m>, HttpError> {
    let choices = specs
        .into_iter()
        .zip(&p.samplers)
        .map(|((mut options, alternatives), sampler)| {
            options.logprobs = alternatives;
            (sampler.clone(), options)
        })
        .collect();
    p.model.generate_many(tokens, choices).map_err(|e| prompt_error(e, param))
}

/// The prompt counts once; every choice's tokens count.
fn usage(choices: &Choices) -> Value {
    let prompt = choices.iter().next().map_or(0, |g| g.prompt_tokens());
    let completion: usize = choices.iter().map(|g| g.completion_tokens()).sum();
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

fn reasons(choices: &Choices) -> Vec<&'static str> {
    choices.iter().map(finish_reason).collect()
}

fn wants_usage(common: &Common) -> bool {
    common.stream_options.as_ref().is_some_and(|o| o.include_usage == Some(true))
}

/// Stream every choice's text as it comes and each choice's end when it ends (as OpenAI
/// does), then the usage when asked for. `piece` and `end` make a `choices` entry; `wrap`
/// makes the chunk around a list of them.
fn stream_rounds(
    sse: &mut SseStream,
    choices: &mut Choices,
    common: &Common,
    wrap: impl Fn(Value) -> Value,
    mut piece: impl FnMut(usize, String, Vec<TokenLogprob>) -> Result<Value, HttpError>,
    end: impl Fn(usize, &str) -> Value,
) -> Result<(), HttpError> {
    while let Some(pieces) = choices.next_texts()? {
        for (i, text) in pieces {
            let entries = choices.get_mut(i).map(|g| g.take_logprobs()).unwrap_or_default();
            sse.send_json(&wrap(json!([piece(i, text, entries)?])))?;
        }
        for i in choices.take_ended() {
            let reason = choices.iter().nth(i).map_or("stop", finish_reason);
            sse.send_json(&wrap(json!([end(i, reason)])))?;
        }
    }
    if wants_usage(common) {
        let mut last = wrap(json!([]));
        last["usage"] = usage(choices);
        sse.send_json(&last)?;
    }
    Ok(())
}

/// Run every choice to its end: each one's text and log-probabilities.
fn collect(choices: &mut Choices) -> Result<Vec<(String, Vec<TokenLogprob>)>, flywheel_guest::Error> {
    let mut out = vec![(String::new(), Vec::new()); choices.len()];
    while let Some(pieces) = choices.next_texts()? {
        for (i, text) in pieces {
            out[i].0.push_str(&text);
            if let Some(g) = choices.get_mut(i) {
                out[i].1.extend(g.take_logprobs());
            }
        }
    }
    Ok(out)
}

/// `/v1/completions` with `n` > 1; `echo` is the prompt text when it is echoed.
#[allow(clippy::too_many_arguments)]
pub fn completions(
    res: Responder,
    common: &Common,
    p: &Prepared,
    tokens: &[i32],
    specs: Vec<ChoiceSpec>,
    echo: Option<&str>,
    id: &str,
    created: u64,
) -> Result<(), HttpError> {
    let reporting = specs.first().and_then(|s| s.1).is_some();
    let mut choices = start(p, tokens, specs, "prompt")?;
    let model = &p.model;
    let name = &p.name;
    let object = |choices: Value| json!({ "id": id, "object": "text_completion", "created": created, "model": name, "choices": choices });
    let mut offsets: Vec<CompletionLogprobs> = (0..choices.len()).map(|_| CompletionLogprobs::default()).collect();
    if common.streaming() {
        stream_or_fail(res.sse()?, |sse| {
            if let Some(prompt) = echo {
                for i in 0..choices.len() {
                    let c = json!([{ "text": prompt, "index": i, "logprobs": null, "finish_reason": null }]);
                    sse.send_json(&object(c))?;
                }
            }
            let piece = |i: usize, text: String, entries: Vec<TokenLogprob>| {
                let lp = if reporting { offsets[i].render(model, &entries)? } else { Value::Null };
                Ok(json!({ "text": text, "index": i, "logprobs": lp, "finish_reason": null }))
            };
            let end =
                |i: usize, reason: &str| json!({ "text": "", "index": i, "logprobs": null, "finish_reason": reason });
            stream_rounds(sse, &mut choices, common, object, piece, end)
        })
    } else {
        let results = collect(&mut choices)?;
        let reasons = reasons(&choices);
        let mut out = Vec::with_capacity(results.len());
        for (i, ((text, entries), reason)) in results.into_iter().zip(reasons).enumerate() {
            let lp = if reporting { offsets[i].render(model, &entries)? } else { Value::Null };
            let text = match echo {
                Some(prompt) => format!("{prompt}{text}"),
                None => text,
            };
            out.push(json!({ "text": text, "index": i, "logprobs": lp, "finish_reason": reason }));
        }
        let mut body = object(Value::Array(out));
        body["usage"] = usage(&choices);
        res.json(200, &body)
    }
}

/// `/v1/chat/completions` with `n` > 1 (tool calls are refused before this).
pub fn chat(
    res: Responder,
    common: &Common,
    p: &Prepared,
    tokens: &[i32],
    specs: Vec<ChoiceSpec>,
    id: &str,
    created: u64,
) -> Result<(), HttpError> {
    let reporting = specs.first().and_then(|s| s.1).is_some();
    let mut choices = start(p, tokens, specs, "messages")?;
    let model = &p.model;
    let name = &p.name;
    let render = |entries: &[TokenLogprob]| if reporting { logprobs::chat(model, entries) } else { Ok(Value::Null) };
    if common.streaming() {
        let chunk = |choices: Value| {
            json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "system_fingerprint": null, "choices": choices })
        };
        stream_or_fail(res.sse()?, |sse| {
            for i in 0..choices.len() {
                let delta = json!({ "role": "assistant", "content": "" });
                sse.send_json(&chunk(
                    json!([{ "index": i, "delta": delta, "logprobs": null, "finish_reason": null }]),
                ))?;
            }
            let piece = |i: usize, text: String, entries: Vec<TokenLogprob>| {
                Ok(
                    json!({ "index": i, "delta": { "content": text }, "logprobs": render(&entries)?, "finish_reason": null }),
                )
            };
            let end =
                |i: usize, reason: &str| json!({ "index": i, "delta": {}, "logprobs": null, "finish_reason": reason });
            stream_rounds(sse, &mut choices, common, chunk, piece, end)
        })
    } else {
        let results = collect(&mut choices)?;
        let reasons = reasons(&choices);
        let mut out = Vec::with_capacity(results.len());
        for (i, ((text, entries), reason)) in results.into_iter().zip(reasons).enumerate() {
            let message = json!({ "role": "assistant", "content": text, "refusal": null });
            out.push(json!({ "index": i, "message": message, "logprobs": render(&entries)?, "finish_reason": reason }));
        }
        res.json(
            200,
            &json!({
                "id": id, "object": "chat.completion", "created": created, "model": name,
                "system_fingerprint": null, "choices": out, "usage": usage(&choices),
            }),
        )
    }
}
