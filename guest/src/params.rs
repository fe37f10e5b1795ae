//! Request parameters shared by completion-style plugins, with validation.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{HttpError, Sampler};

/// Sampling fields as OpenAI's API names them.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingParams {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// llama.cpp's name for `repetition_penalty`.
    pub repeat_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u64>,
    /// Token id (as a string, as in OpenAI's API) to bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f32>>,
}

fn range(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, HttpError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => {
            Err(HttpError::bad_request(format!("{name} must be between {lo} and {hi}, got {x}")).with_param(name))
        }
        other => Ok(other),
    }
}

impl SamplingParams {
    /// A sampler for these parameters; `default_temperature` applies when none is given.
    pub fn sampler(&self, default_temperature: f32, vocab_size: u32) -> Result<Sampler, HttpError> {
        let mut s = match self.seed {
            Some(seed) => Sampler::seeded(seed),
            None => Sampler::new(),
        };
        s = s.temperature(range("temperature", self.temperature, 0.0, 2.0)?.unwrap_or(default_temperature));
        if let Some(p) = range("top_p", self.top_p, 0.0, 1.0)? {
            s = s.top_p(p);
        }
        if let Some(p) = range("min_p", self.min_p, 0.0, 1.0)? {
            s = s.min_p(p);
        }
        if let Some(k) = self.top_k {
            if !(0..=1000).contains(&k) {
                return Err(
                    HttpError::bad_request(format!("top_k must be between 0 and 1000, got {k}")).with_param("top_k")
                );
            }
            s = s.top_k(k as u32);
        }
        let repetition = match (self.repetition_penalty, self.repeat_penalty) {
            (Some(_), Some(_)) => {
                return Err(HttpError::bad_request("send repetition_penalty or repeat_penalty, not both")
                    .with_param("repeat_penalty"))
            }
            (None, Some(p)) => range("repeat_penalty", Some(p), 0.01, 10.0)?,
            (p, None) => range("repetition_penalty", p, 0.01, 10.0)?,
        };
        if let Some(p) = repetition {
            s = s.repetition_penalty(p);
        }
        if let Some(p) = range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)? {
            s = s.frequency_penalty(p);
        }
        if let Some(p) = range("presence_penalty", self.presence_penalty, -2.0, 2.0)? {
            s = s.presence_penalty(p);
        }
        for (token, bias) in self.logit_bias.iter().flatten() {
            let id: i64 = token.parse().map_err(|_| {
                HttpError::bad_request(format!("logit_bias key {token:?} is not a token id")).with_param("logit_bias")
            })?;
            if id < 0 || id >= i64::from(vocab_size) {
                return Err(HttpError::bad_request(format!(
                    "logit_bias token {id} is outside the vocabulary of {vocab_size}"
                ))
                .with_param("logit_bias"));
            }
            let bias = range("logit_bias", Some(*bias), -100.0, 100.0)?.unwrap_or(0.0);
            s = s.logit_bias(id as i32, bias);
        }
        Ok(s)
    }
}

/// `stop`: one string or a list of up to 4.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Result<Vec<String>, HttpError> {
        let v = match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if v.len() > 4 {
            return Err(HttpError::bad_request("stop may hold at most 4 sequences").with_param("stop"));
        }
        Ok(v.into_iter().filter(|s| !s.is_empty()).collect())
    }
}

/// `max_tokens`, checked against the model's context.
pub fn max_tokens(requested: Option<i64>, default: usize, context: u32) -> Result<usize, HttpError> {
    match requested {
        None => Ok(default.min(context as usize)),
        Some(n) if n < 1 => {
            Err(HttpError::bad_request(format!("max_tokens must be at least 1, got {n}")).with_param("max_tokens"))
        }
        Some(n) if n > i64::from(context) => Err(HttpError::bad_request(format!(
            "max_tokens is {n}, but the model's context holds {context} tokens in total"
        ))
        .with_param("max_tokens")),
        Some(n) => Ok(n as usize),
    }
}
