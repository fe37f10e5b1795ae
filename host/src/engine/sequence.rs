//! A sequence: one caller's token stream with its own KV cells, decoded in the shared batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::lifecycle::ModelLease;
use super::scheduler::Command;
use super::{EngineError, Model, TokenAccount};

/// What a feed returns for the last position.
#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    /// The whole logits row (`vocab_size` floats).
    Logits,
    /// The `k` best candidates, best first, optionally only among `allowed` ids; with
    /// `logprobs`, also their log-probabilities over the whole vocabulary.
    TopK { k: usize, allowed: Option<Vec<i32>>, logprobs: bool },
}

impl Want {
    /// The `k` best candidates over the whole vocabulary.
    pub fn top(k: usize) -> Self {
        Want::TopK { k, allowed: None, logprobs: false }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Logits(Vec<f32>),
    /// `logprobs`: log-softmax of the candidates over the whole row, when asked for.
    TopK {
        ids: Vec<i32>,
        logits: Vec<f32>,
        logprobs: Option<Vec<f32>>,
    },
}

/// An open sequence. Dropping it frees its KV cells (or hands them to the prefix cache)
/// at the scheduler's next command, and frees its admission slot.
pub struct Sequence {
    /// Keeps the model loaded while the sequence is open.
    model: ModelLease,
    /// Charged for every feed before it is computed.
    account: Option<Arc<dyn TokenAccount>>,
    seq_id: i32,
    len: usize,
    /// Set while a feed is in flight; stays set if that feed's future was dropped,
    /// because the scheduler may still have computed part of it.
    in_flight: bool,
    // Declared last: released after `Drop::drop` has queued the close.
    _permit: OwnedSemaphorePermit,
}

impl Sequence {
    pub(crate) fn new(
        model: ModelLease,
        seq_id: i32,
        permit: OwnedSemaphorePermit,
        account: Option<Arc<dyn TokenAccount>>,
    ) -> Self {
        Self { model, account, seq_id, len: 0, in_flight: false, _permit: permit }
    }

    /// Tokens held so far (prompt plus fed generated tokens).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Append `tokens` (a prompt chunk or one generated token) and get the output for the
    /// last position once the batch that computes it has run.
    pub async fn feed(&mut self, tokens: &[i32], want: Want) -> Result<Output, EngineError> {
        let pending = self.submit(tokens, want)?;
        self.complete(pending).await
    }

    /// The first half of [`Sequence::feed`]: queue the tokens for the next batch step and
    /// return at once, so several sequences' feeds can join the same step. Until
    /// [`Sequence::complete`] takes the answer, this sequence accepts no other feed.
    pub fn submit(&mut self, tokens: &[i32], want: Want) -> Result<PendingFeed, EngineError> {
        if self.in_flight {
            return Err(EngineError::SequenceBroken);
        }
        let limit = self.model.info().context_length;
        if self.len + tokens.len() > limit {
            return Err(EngineError::ContextFull { requested: self.len + tokens.len(), limit });
        }
        self.model.validate_feed(tokens, &want)?;
        if let Some(account) = &self.account {
            // One token right after an answered feed is that answer's sample fed back: it
            // was paid for as the generated token of that row.
            let fed_back = tokens.len() == 1 && self.len > 0;
            let prompt = if fed_back { 0 } else { tokens.len() as u64 };
            account.charge(prompt, 1)?;
        }
        let (reply, rx) = oneshot::channel();
        self.model.send(Command::Feed { seq: self.seq_id, tokens: tokens.to_vec(), want, reply })?;
        self.in_flight = true;
        Ok(PendingFeed { model: Arc::as_ptr(&self.model) as usize, seq: self.seq_id, tokens: tokens.len(), rx })
    }

    /// The second half of [`Sequence::feed`]: wait for a submitted feed's answer.
    pub async fn complete(&mut self, pending: PendingFeed) -> Result<Output, EngineError> {
        if pending.seq != self.seq_id || pending.model != Arc::as_ptr(&self.model) as usize {
            return Err(EngineError::InvalidArgument("that feed was submitted on another sequence".into()));
        }
        let out = pending.rx.await.map_err(|_| self.model.stopped())?;
        self.in_flight = false;
        if out.is_ok() {
            self.len += pending.tokens;
        }
        out
    }
}

/// A feed submitted with [`Sequence::submit`], not yet completed.
#[must_use = "the sequence accepts no other feed until this one is completed"]
pub struct PendingFeed {
    /// The sequence it belongs to: its model (by address) and id.
    model: usize,
    seq: i32,
    tokens: usize,
    rx: oneshot::Receiver<Result<Output, EngineError>>,
}

impl Drop for Sequence {
    fn drop(&mut self) {
        // If the scheduler is gone there is nothing left to free.
        let _ = self.model.send(Command::Close { seq: self.seq_id });
        self.model.stats().active_sequences.fetch_sub(1, Ordering::Relaxed);
    }
}
