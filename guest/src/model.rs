//! Models and sessions: `wasi:nn` graphs and execution contexts, plus `flywheel:llm`.

use crate::bindings::flywheel::llm::batch;
use crate::bindings::flywheel::llm::model as llm;
use crate::bindings::wasi::nn::graph::{load_by_name, Graph};
use crate::bindings::wasi::nn::inference::GraphExecutionContext;
use crate::bindings::wasi::nn::tensor::{Tensor, TensorType};
use crate::choices::Choices;
use crate::generate::{GenerateOptions, Generation};
use crate::sampling::Sampler;
use crate::Error;

pub use llm::{ChatMessage, ModelInfo};

/// What a feed asks the host for.
#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    /// The `k` best candidates (host-side), optionally only among `allowed` ids; with
    /// `logprobs`, also their log-probabilities over the whole vocabulary.
    TopK { k: u32, allowed: Option<Vec<i32>>, logprobs: bool },
    /// The whole logits row (one float per vocabulary entry).
    Logits,
}

/// The next-token distribution a feed returns.
#[derive(Clone, Debug, PartialEq)]
pub enum Candidates {
    /// Best first; `logprobs` when asked for.
    Top { ids: Vec<i32>, logits: Vec<f32>, logprobs: Option<Vec<f32>> },
    /// Indexed by token id.
    Full(Vec<f32>),
}

impl Candidates {
    /// The highest-scoring token, ties to the lowest id.
    pub fn best(&self) -> Option<i32> {
        match self {
            Candidates::Top { ids, .. } => ids.first().copied(),
            Candidates::Full(row) => {
                let mut best: Option<(usize, f32)> = None;
                for (i, &l) in row.iter().enumerate() {
                    // NaN never wins: `l > b` is false for it.
                    if best.is_none_or(|(_, b)| l > b) && !l.is_nan() {
                        best = Some((i, l));
                    }
                }
                best.map(|(i, _)| i as i32)
            }
        }
    }
}

/// A model the plugin may use.
pub struct Model {
    graph: Graph,
    info: ModelInfo,
}

impl Model {
    /// Open a model by name (the host's model manifest name).
    pub fn open(name: &str) -> Result<Self, Error> {
        let graph = load_by_name(name)?;
        let info = llm::info(name)?;
        Ok(Self { graph, info })
    }

    /// The models this plugin may use.
    pub fn available() -> Vec<String> {
        llm::list_models()
    }

    /// The model a request asked for, else the plugin's `MODEL` config value, else the first
    /// model it may use.
    pub fn open_requested(requested: Option<&str>) -> Result<Self, crate::HttpError> {
        let name = match requested {
            Some(n) => n.to_string(),
            None => std::env::var("MODEL")
                .ok()
                .or_else(|| Self::available().into_iter().next())
                .ok_or_else(|| crate::HttpError::new(503, "server_error", "no model is available to this plugin"))?,
        };
        Ok(Self::open(&name)?)
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Tokenize text the way a prompt starts: with BOS if the model adds one.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i32>, Error> {
        Ok(llm::tokenize(&self.info.name, text, true, false)?)
    }

    /// Tokenize with explicit control over special tokens.
    pub fn tokenize_with(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>, Error> {
        Ok(llm::tokenize(&self.info.name, text, add_special, parse_special)?)
    }

    pub fn detokenize(&self, tokens: &[i32]) -> Result<String, Error> {
        Ok(llm::detokenize(&self.info.name, tokens, false)?)
    }

    /// The bytes each token prints as (special tokens print as nothing).
    pub fn token_bytes(&self, tokens: &[i32]) -> Result<Vec<Vec<u8>>, Error> {
        Ok(llm::token_bytes(&self.info.name, tokens, false)?)
    }

    /// Render a conversation with the model's chat template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, Error> {
        Ok(llm::apply_chat_template(&self.info.name, messages, add_generation_prompt)?)
    }

    /// A conversation as prompt tokens, ready for the assistant's turn.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<i32>, Error> {
        let text = self.apply_chat_template(messages, true)?;
        self.tokenize_with(&text, true, true)
    }

    pub fn is_end_of_generation(&self, token: i32) -> bool {
        self.info.end_of_generation.contains(&token)
    }

    /// A new execution context: one sequence in the host's batch, with its own KV cells.
    pub fn session(&self) -> Result<Session, Error> {
        let ctx = self.graph.init_execution_context()?;
        Ok(Session { ctx, vocab: self.info.vocab_size as usize, len: 0 })
    }

    /// One unit-length embedding per input (token ids), pooled as the host's model manifest
    /// says (mean by default). Inputs compute in one batch on the host.
    pub fn embed(&self, inputs: &[Vec<i32>]) -> Result<Vec<Vec<f32>>, Error> {
        Ok(batch::embed(&self.graph, inputs)?)
    }

    /// Start generating after `prompt`.
    pub fn generate(
        &self,
        prompt: &[i32],
        sampler: Sampler,
        options: GenerateOptions,
    ) -> Result<Generation<'_>, Error> {
        Generation::new(self, prompt, sampler, options)
    }

    /// Start one generation per `(sampler, options)` after `prompt`, to advance together
    /// ([`Choices`]): `n` choices for one prompt. Each holds an execution context.
    pub fn generate_many(
        &self,
        prompt: &[i32],
        choices: Vec<(Sampler, GenerateOptions)>,
    ) -> Result<Choices<'_>, Error> {
        Choices::new(self, prompt, choices)
    }
}

/// An execution context. Dropping it frees its KV cells in the host.
pub struct Session {
    ctx: GraphExecutionContext,
    vocab: usize,
    len: usize,
}

fn i32_tensor(values: &[i32]) -> Tensor {
    let mut data = Vec::with_capacity(values.len() * 4);
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    Tensor::new(&[values.len() as u32], TensorType::I32, &data)
}

fn read_i32(t: &Tensor) -> Vec<i32> {
    t.data().chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn read_f32(t: &Tensor) -> Vec<f32> {
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

impl Session {
    /// Tokens this session holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append tokens and get the next-token distribution after the last one.
    pub fn feed(&mut self, tokens: &[i32], want: &Want) -> Result<Candidates, Error> {
        let outputs = self.ctx.compute(inputs(tokens, want))?;
        self.read(tokens.len(), want, &outputs)
    }

    /// What a compute returned, as candidates; counts the fed tokens.
    fn read(&mut self, fed: usize, want: &Want, outputs: &[(String, Tensor)]) -> Result<Candidates, Error> {
        self.len += fed;
        let find = |name: &str| outputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        match want {
            Want::TopK { logprobs, .. } => {
                let (Some(ids), Some(logits)) = (find("top_k_ids"), find("top_k_logits")) else {
                    return Err(Error::Protocol("the host returned no top_k_ids/top_k_logits".into()));
                };
                let logprobs = match (logprobs, find("top_k_logprobs")) {
                    (false, _) => None,
                    (true, Some(t)) => Some(read_f32(t)),
                    (true, None) => return Err(Error::Protocol("the host returned no top_k_logprobs".into())),
                };
                Ok(Candidates::Top { ids: read_i32(ids), logits: read_f32(logits), logprobs })
            }
            Want::Logits => {
                let row = find("logits").map(read_f32).unwrap_or_default();
                if row.len() != self.vocab {
                    return Err(Error::Protocol(format!(
                        "logits row has {} entries, expected {}",
                        row.len(),
                        self.vocab
                    )));
                }
                Ok(Candidates::Full(row))
            }
        }
    }
}

/// The compute inputs of a feed.
fn inputs(tokens: &[i32], want: &Want) -> Vec<(String, Tensor)> {
    let mut inputs = vec![("input_ids".to_string(), i32_tensor(tokens))];
    if let Want::TopK { k, allowed, logprobs } = want {
        inputs.push(("top_k".to_string(), i32_tensor(&[*k as i32])));
        if let Some(allowed) = allowed {
            inputs.push(("allowed_ids".to_string(), i32_tensor(allowed)));
        }
        if *logprobs {
            inputs.push(("logprobs".to_string(), i32_tensor(&[1])));
        }
    }
    inputs
}

/// Feed several sessions at once: the host decodes them in the same batch step, where
/// feeding them one after another would take a step each. Results come in order; the
/// first failure fails the call.
pub fn feed_together(feeds: &mut [(&mut Session, &[i32], &Want)]) -> Result<Vec<Candidates>, Error> {
    let requests: Vec<(&GraphExecutionContext, Vec<(String, Tensor)>)> =
        feeds.iter().map(|(session, tokens, want)| (&session.ctx, inputs(tokens, want))).collect();
    let results = batch::compute_many(&requests);
    drop(requests);
    if results.len() != feeds.len() {
        return Err(Error::Protocol(format!("{} results for {} feeds", results.len(), feeds.len())));
    }
    // Every session that advanced counts its tokens, even when another's feed failed.
    let mut out = Vec::with_capacity(feeds.len());
    let mut first_error = None;
    for ((session, tokens, want), result) in feeds.iter_mut().zip(results) {
        match result.map_err(Error::from).and_then(|outputs| session.read(tokens.len(), want, &outputs)) {
            Ok(c) => out.push(c),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
