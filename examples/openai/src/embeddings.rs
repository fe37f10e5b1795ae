//! `POST /v1/embeddings`: one unit-length vector per input, computed by the host in one
//! batch (`flywheel:llm/batch.embed`), pooled as the model's manifest says (mean by default).

use base64::Engine as _;
use flywheel_guest::{from_json_value, HttpError, Model, Request, Responder};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::open_model;

/// OpenAI's limit on inputs per request.
const MAX_INPUTS: usize = 2048;

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i32>),
    TokenLists(Vec<Vec<i32>>),
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    input: Input,
    model: Option<String>,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    /// For the caller's own records.
    #[serde(rename = "user")]
    _user: Option<String>,
}

fn bad_input(message: impl Into<String>) -> HttpError {
    HttpError::bad_request(message).with_param("input")
}

pub fn create(req: &Request, res: Responder) -> Result<(), HttpError> {
    let body: Map<String, Value> = req.json()?;
    if let Some(key) =
        body.keys().find(|k| !matches!(k.as_str(), "input" | "model" | "encoding_format" | "dimensions" | "user"))
    {
        return Err(HttpError::bad_request(format!("Unrecognized request argument supplied: {key}")).with_param(key));
    }
    if body.get("input").is_none_or(Value::is_null) {
        return Err(bad_input("you must provide input"));
    }
    let body: EmbeddingRequest = from_json_value(&Value::Object(body))?;
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(HttpError::bad_request(format!(
                "encoding_format must be \"float\" or \"base64\", got {other:?}"
            ))
            .with_param("encoding_format"))
        }
    };
    let (model, name) = open_model(body.model.as_deref())?;
    let inputs = match body.input {
        Input::Text(t) => vec![tokens_of(&model, &t)?],
        Input::Texts(texts) => texts.iter().map(|t| tokens_of(&model, t)).collect::<Result<_, _>>()?,
        Input::Tokens(ids) => vec![ids],
        Input::TokenLists(lists) => lists,
    };
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(bad_input(format!("input must hold 1 to {MAX_INPUTS} items, got {}", inputs.len())));
    }
    if let Some(i) = inputs.iter().position(Vec::is_empty) {
        return Err(bad_input(format!("input {i} is empty")));
    }
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let vectors = model.embed(&inputs).map_err(|e| {
        let mut h = HttpError::from(e);
        if h.status == 400 {
            h.kind = "invalid_request_error".into();
            h.param = Some("input".into());
        }
        h
    })?;
    let size = vectors.first().map_or(0, Vec::len);
    if let Some(d) = body.dimensions {
        if d != size as i64 {
            return Err(HttpError::bad_request(format!(
                "dimensions: model {name} gives embeddings of {size} dimensions and cannot shorten them"
            ))
            .with_param("dimensions"));
        }
    }
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 { json!(encode(v)) } else { json!(v) };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    res.json(
        200,
        &json!({
            "object": "list", "data": data, "model": name,
            "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
        }),
    )
}

fn tokens_of(model: &Model, text: &str) -> Result<Vec<i32>, HttpError> {
    if text.is_empty() {
        return Err(bad_input("input strings must not be empty"));
    }
    Ok(model.tokenize(text)?)
}

/// OpenAI's base64 format: the little-endian float32 bytes, base64-encoded.
fn encode(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
