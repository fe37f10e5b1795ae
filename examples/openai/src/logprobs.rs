//! `logprobs` in OpenAI's two shapes: chat's list of token entries, and the completions
//! API's parallel arrays. Values are the model's log-softmax over the whole vocabulary
//! (before temperature, penalties or biases), computed on the host.

use flywheel_guest::{Generation, HttpError, Model, TokenLogprob};
use serde_json::{json, Map, Value};

/// Chat: `logprobs` (bool) and `top_logprobs` (0 to 20) → alternatives per token.
pub fn chat_request(logprobs: Option<bool>, top: Option<i64>) -> Result<Option<usize>, HttpError> {
    match (logprobs, top) {
        (Some(true), None) => Ok(Some(0)),
        (Some(true), Some(n)) if (0..=20).contains(&n) => Ok(Some(n as usize)),
        (_, Some(n)) if !(0..=20).contains(&n) => {
            Err(HttpError::bad_request(format!("top_logprobs must be between 0 and 20, got {n}"))
                .with_param("top_logprobs"))
        }
        (_, Some(_)) => Err(HttpError::bad_request("top_logprobs needs logprobs: true").with_param("top_logprobs")),
        _ => Ok(None),
    }
}

/// Completions: `logprobs` (0 to 5) alternatives per token.
pub fn completion_request(logprobs: Option<i64>, echo: bool) -> Result<Option<usize>, HttpError> {
    match logprobs {
        None => Ok(None),
        Some(n) if !(0..=5).contains(&n) => {
            Err(HttpError::bad_request(format!("logprobs must be between 0 and 5, got {n}")).with_param("logprobs"))
        }
        // The prompt's own log-probabilities would need its logits, which prefill skips.
        Some(_) if echo => {
            Err(HttpError::bad_request("logprobs together with echo is not supported").with_param("logprobs"))
        }
        Some(n) => Ok(Some(n as usize)),
    }
}

/// The text of each entry's token and of its alternatives, in one host call.
fn token_texts(model: &Model, entries: &[TokenLogprob]) -> Result<Vec<Vec<u8>>, HttpError> {
    let ids: Vec<i32> = entries.iter().flat_map(|e| std::iter::once(e.id).chain(e.top.iter().map(|t| t.0))).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(model.token_bytes(&ids)?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Chat's `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
pub fn chat(model: &Model, entries: &[TokenLogprob]) -> Result<Value, HttpError> {
    let mut texts = token_texts(model, entries)?.into_iter();
    let mut content = Vec::with_capacity(entries.len());
    for e in entries {
        let bytes = texts.next().unwrap_or_default();
        let top: Vec<Value> = e
            .top
            .iter()
            .map(|(_, lp)| {
                let b = texts.next().unwrap_or_default();
                json!({ "token": text(&b), "logprob": lp, "bytes": b })
            })
            .collect();
        content.push(json!({ "token": text(&bytes), "logprob": e.logprob, "bytes": bytes, "top_logprobs": top }));
    }
    Ok(json!({ "content": content, "refusal": null }))
}

/// The completions API's `{tokens, token_logprobs, top_logprobs, text_offset}`, with text
/// offsets running on across the chunks of a stream.
#[derive(Default)]
pub struct CompletionLogprobs {
    offset: usize,
}

impl CompletionLogprobs {
    pub fn render(&mut self, model: &Model, entries: &[TokenLogprob]) -> Result<Value, HttpError> {
        let mut texts = token_texts(model, entries)?.into_iter();
        let (mut tokens, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for e in entries {
            let token = text(&texts.next().unwrap_or_default());
            let mut top = Map::new();
            for (_, lp) in &e.top {
                top.insert(text(&texts.next().unwrap_or_default()), json!(lp));
            }
            offsets.push(self.offset);
            self.offset += token.chars().count();
            tokens.push(token);
            logprobs.push(e.logprob);
            tops.push(Value::Object(top));
        }
        Ok(json!({ "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets }))
    }
}

/// All text, and the log-probabilities of the tokens it came from.
pub fn collect(generation: &mut Generation) -> Result<(String, Vec<TokenLogprob>), flywheel_guest::Error> {
    let (mut out, mut entries) = (String::new(), Vec::new());
    while let Some(t) = generation.next_text()? {
        out.push_str(&t);
        entries.extend(generation.take_logprobs());
    }
    Ok((out, entries))
}
