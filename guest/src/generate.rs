//! The decode loop: sample, stop, detokenize incrementally.

use crate::constraint::{Constraint, Vocab};
use crate::logprobs::{self, TokenLogprob};
use crate::model::{Candidates, Model, Session, Want};
use crate::sampling::Sampler;
use crate::text::TextDecoder;
use crate::Error;

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn, a stop sequence appeared, or a constraint completed.
    Stop,
    /// The token budget (or the context) ran out.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Text that ends generation; it is not part of the output.
    pub stop: Vec<String>,
    /// Stop at the model's end-of-generation tokens (on by default).
    pub stop_at_end_of_generation: bool,
    pub constraint: Option<Box<dyn Constraint>>,
    /// Record each generated token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
}

impl GenerateOptions {
    pub fn max_tokens(n: usize) -> Self {
        Self { max_tokens: n, stop: Vec::new(), stop_at_end_of_generation: true, constraint: None, logprobs: None }
    }

    /// Record log-probabilities (see [`Generation::take_logprobs`]) with `alternatives` of
    /// the most likely tokens at each position.
    pub fn logprobs(mut self, alternatives: usize) -> Self {
        self.logprobs = Some(alternatives);
        self
    }

    pub fn stop(mut self, s: impl Into<String>) -> Self {
        let s = s.into();
        if !s.is_empty() {
            self.stop.push(s);
        }
        self
    }

    /// Constrain the output. Stop sequences are then ignored: cutting constrained output
    /// short would break what the constraint guarantees.
    pub fn constraint(mut self, c: impl Constraint + 'static) -> Self {
        self.constraint = Some(Box::new(c));
        self
    }
}

/// What one step of a generation made safe to show.
pub(crate) enum Piece {
    Text(String),
    /// Nothing yet (held back as a possible start of a stop sequence, or part of a character).
    Nothing,
    /// The generation has ended and all its text was returned.
    Ended,
}

/// A running generation. Pull text with [`Generation::next_text`] (or tokens with
/// [`Generation::next_token`]) until it returns `None`.
pub struct Generation<'m> {
    model: &'m Model,
    session: Session,
    sampler: Sampler,
    options: GenerateOptions,
    /// Tokens to feed before the next sample: the prompt, then each sampled token.
    next_input: Vec<i32>,
    generated: Vec<i32>,
    prompt_tokens: usize,
    budget: usize,
    /// The generated tokens' text, decoded incrementally after the prompt.
    text: TextDecoder,
    /// Text that closes a constrained output cut short by the budget.
    closing: String,
    /// Whether the text held back at the end was taken (or dropped at a stop sequence).
    flushed: bool,
    /// Decoded text held back because it may be the start of a stop sequence.
    held: String,
    /// The vocabulary's bytes, fetched once a constraint needs them.
    vocab: Option<Vocab>,
    /// Log-probabilities of tokens generated since the last [`Generation::take_logprobs`].
    logprobs: Vec<TokenLogprob>,
    finished: Option<FinishReason>,
}

impl<'m> Generation<'m> {
    pub(crate) fn new(
        model: &'m Model,
        prompt: &[i32],
        sampler: Sampler,
        options: GenerateOptions,
    ) -> Result<Self, Error> {
        let context = model.info().context_length as usize;
        if prompt.is_empty() {
            return Err(Error::Nn {
                code: crate::bindings::wasi::nn::errors::ErrorCode::InvalidArgument,
                message: "the prompt is empty".into(),
            });
        }
        if prompt.len() >= context {
            return Err(Error::Nn {
                code: crate::bindings::wasi::nn::errors::ErrorCode::TooLarge,
                message: format!(
                    "the prompt has {} tokens; model {} allows {} tokens per request, prompt and completion together",
                    prompt.len(),
                    model.name(),
                    context
                ),
            });
        }
        let budget = options.max_tokens.min(context - prompt.len());
        Ok(Self {
            model,
            session: model.session()?,
            sampler,
            options,
            next_input: prompt.to_vec(),
            generated: Vec::new(),
            prompt_tokens: prompt.len(),
            budget,
            text: TextDecoder::new(prompt),
            closing: String::new(),
            flushed: false,
            held: String::new(),
            vocab: None,
            logprobs: Vec::new(),
            finished: None,
        })
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    pub fn completion_tokens(&self) -> usize {
        self.generated.len()
    }

    pub fn generated(&self) -> &[i32] {
        &self.generated
    }

    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.finished.as_ref()
    }

    /// Ids allowed by the constraint in its current state.
    fn allowed(&mut self) -> Result<Option<Vec<i32>>, Error> {
        let Some(c) = &self.options.constraint else { return Ok(None) };
        if self.vocab.is_none() {
            let ids: Vec<i32> = (0..self.model.info().vocab_size as i32).collect();
            self.vocab = Some(Vocab::new(self.model.token_bytes(&ids)?));
        }
        let Some(vocab) = &self.vocab else { return Ok(None) };
        let mut allowed = Vec::new();
        c.allowed(vocab, &mut allowed);
        let eog = &self.model.info().end_of_generation;
        allowed.retain(|id| !eog.contains(id));
        Ok(Some(allowed))
    }

    fn token_bytes(&self, token: i32) -> Result<Vec<u8>, Error> {
        match &self.vocab {
            Some(v) => Ok(v.token(token).to_vec()),
            None => Ok(self.model.token_bytes(&[token])?.pop().unwrap_or_default()),
        }
    }

    /// The next token and its bytes, or `None` when generation has ended.
    pub fn next_token(&mut self) -> Result<Option<(i32, Vec<u8>)>, Error> {
        match self.step()? {
            Some(token) => Ok(Some((token, self.token_bytes(token)?))),
            None => Ok(None),
        }
    }

    /// Samples and records the next token. Its bytes are only looked up where a constraint
    /// needs them: text comes from the decoder, so an unconstrained step makes no extra call.
    fn step(&mut self) -> Result<Option<i32>, Error> {
        let Some(want) = self.prepare()? else { return Ok(None) };
        let candidates = self.session.feed(&self.next_input, &want)?;
        self.accept(&candidates)
    }

    /// What the next feed asks the host for; `None` when generation has ended (nothing is
    /// fed then).
    pub(crate) fn prepare(&mut self) -> Result<Option<Want>, Error> {
        if self.finished.is_some() {
            return Ok(None);
        }
        if self.generated.len() >= self.budget {
            self.finish(FinishReason::Length);
            return Ok(None);
        }
        let allowed = self.allowed()?;
        if allowed.as_ref().is_some_and(|a| a.is_empty()) {
            // No token can continue the constrained output: close it instead.
            self.finish(FinishReason::Length);
            return Ok(None);
        }
        let mut want = self.sampler.want(allowed);
        if let (Some(n), Want::TopK { k, logprobs, .. }) = (self.options.logprobs, &mut want) {
            *logprobs = true;
            *k = (*k).max(n as u32);
        }
        Ok(Some(want))
    }

    /// The session and the tokens its next feed carries (after [`Generation::prepare`]).
    pub(crate) fn feed_parts(&mut self) -> (&mut Session, &[i32]) {
        (&mut self.session, &self.next_input)
    }

    /// Sample from what the feed returned and record the token (`None`: generation ended).
    pub(crate) fn accept(&mut self, candidates: &Candidates) -> Result<Option<i32>, Error> {
        let token = self
            .sampler
            .sample(candidates, &self.generated)
            .ok_or_else(|| Error::Protocol("the host returned no candidates".into()))?;
        if self.options.stop_at_end_of_generation && self.model.is_end_of_generation(token) {
            self.finish(FinishReason::Stop);
            return Ok(None);
        }
        if let Some(n) = self.options.logprobs {
            let entry = logprobs::of(candidates, token, n)
                .ok_or_else(|| Error::Protocol("the host returned no log-probability for the sampled token".into()))?;
            self.logprobs.push(entry);
        }
        self.generated.push(token);
        self.next_input = vec![token];
        if self.options.constraint.is_some() {
            let bytes = self.token_bytes(token)?;
            if let Some(c) = &mut self.options.constraint {
                c.advance(&bytes);
                if c.is_complete() {
                    self.finished = Some(FinishReason::Stop);
                }
            }
        }
        Ok(Some(token))
    }

    fn finish(&mut self, reason: FinishReason) {
        if reason == FinishReason::Length {
            if let Some(c) = &self.options.constraint {
                // Keep constrained output valid when the budget runs out.
                self.closing = c.closing();
            }
        }
        self.finished = Some(reason);
    }

    /// The next piece of text safe to show: whole UTF-8 characters, never part of a stop
    /// sequence. `None` once everything has been returned.
    pub fn next_text(&mut self) -> Result<Option<String>, Error> {
        loop {
            let token = self.step()?;
            match self.text_after(token)? {
                Piece::Text(text) => return Ok(Some(text)),
                Piece::Ended => return Ok(None),
                Piece::Nothing => {}
            }
        }
    }

    /// The text a step made safe to show, after it produced `token` (or ended).
    pub(crate) fn text_after(&mut self, token: Option<i32>) -> Result<Piece, Error> {
        let model = self.model;
        let decode = |ids: &[i32]| model.detokenize(ids);
        if let Some(token) = token {
            let piece = self.text.push(token, decode)?;
            self.held.push_str(&piece);
        }
        let ended = self.finished.is_some();
        if ended && !self.flushed {
            self.flushed = true;
            let rest = self.text.finish(decode)?;
            self.held.push_str(&rest);
            self.held.push_str(&std::mem::take(&mut self.closing));
        }
        if let Some(text) = self.take_safe_text(ended) {
            return Ok(Piece::Text(text));
        }
        Ok(if ended { Piece::Ended } else { Piece::Nothing })
    }

    /// Text from `held` that cannot be the start of a stop sequence.
    fn take_safe_text(&mut self, ended: bool) -> Option<String> {
        if self.options.constraint.is_some() {
            return (!self.held.is_empty()).then(|| std::mem::take(&mut self.held));
        }
        if let Some((at, _)) =
            self.options.stop.iter().filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s))).min_by_key(|(i, _)| *i)
        {
            self.held.truncate(at);
            self.finished = Some(FinishReason::Stop);
            // What follows the stop sequence is never shown.
            self.flushed = true;
            return (!self.held.is_empty()).then(|| std::mem::take(&mut self.held));
        }
        let keep = if ended { 0 } else { self.stop_prefix_len() };
        let cut = self.held.len() - keep;
        if cut == 0 {
            return None;
        }
        let rest = self.held.split_off(cut);
        Some(std::mem::replace(&mut self.held, rest))
    }

    /// Length of the longest suffix of `held` that begins some stop sequence.
    fn stop_prefix_len(&self) -> usize {
        let h = &self.held;
        let mut best = 0;
        for s in &self.options.stop {
            for (i, _) in s.char_indices().skip(1).chain(std::iter::once((s.len(), ' '))) {
                let prefix = &s[..i];
                if prefix.len() > best && h.ends_with(prefix) {
                    best = prefix.len();
                }
            }
        }
        best.min(h.len())
    }

    /// Log-probabilities of the tokens generated since the last call (with
    /// [`GenerateOptions::logprobs`]). Taken after each [`Generation::next_text`], they are
    /// the tokens that text came from; tokens held back for a stop sequence come with the
    /// text that follows them.
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.logprobs)
    }

    /// Run to the end and return all text.
    pub fn collect_text(&mut self) -> Result<String, Error> {
        let mut out = String::new();
        while let Some(t) = self.next_text()? {
            out.push_str(&t);
        }
        Ok(out)
    }
}
