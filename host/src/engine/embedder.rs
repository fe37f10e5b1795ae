//! Embeddings of one model, computed on the decode thread in a context of their own.
//!
//! Generation keeps its context and KV layout; embeddings need llama.cpp's `embeddings`
//! mode and a pooling type, which apply to a whole context. So each model gets a second,
//! small context (created on the first embedding, so models nobody embeds with pay
//! nothing), whose KV cells are cleared before every batch. Waiting jobs are packed, oldest
//! first, into batches that fit; the decode thread runs one batch between generation steps.
//!
//! With embeddings on, llama.cpp makes every token an output and reserves a logits row for
//! each (vocabulary x `embedding_batch` floats), which is why the default batch is small.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use super::backend::{backend, CONTEXT_CREATION};
use super::manifest::Pooling;
use super::model::EngineStats;
use super::{EngineError, ModelManifest};

/// Unit-length embeddings, one per input, in the inputs' order.
pub(crate) type Embeddings = Vec<Vec<f32>>;

/// One caller's inputs, already checked against the vocabulary and the batch size.
pub(crate) struct EmbedJob {
    pub inputs: Vec<Vec<i32>>,
    pub reply: oneshot::Sender<Result<Embeddings, EngineError>>,
}

/// A job being computed: its first `done` inputs' embeddings are in `out`.
struct Running {
    job: EmbedJob,
    done: usize,
    out: Embeddings,
}

pub(crate) struct Embedder<'m> {
    name: String,
    llama: &'m LlamaModel,
    params: LlamaContextParams,
    n_tokens: usize,
    n_inputs: usize,
    ctx: Option<LlamaContext<'m>>,
    queue: VecDeque<EmbedJob>,
    /// Jobs with inputs left to compute, oldest first.
    running: Vec<Running>,
    stats: Arc<EngineStats>,
}

fn pooling(p: Pooling) -> LlamaPoolingType {
    match p {
        Pooling::Mean => LlamaPoolingType::Mean,
        Pooling::Cls => LlamaPoolingType::Cls,
        Pooling::Last => LlamaPoolingType::Last,
    }
}

impl<'m> Embedder<'m> {
    pub(crate) fn new(m: &ModelManifest, llama: &'m LlamaModel, stats: Arc<EngineStats>) -> Self {
        let n_tokens = m.embedding_tokens();
        let n = u32::try_from(n_tokens).unwrap_or(u32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n))
            .with_n_batch(n)
            .with_n_ubatch(n)
            .with_n_seq_max(m.embedding_max_inputs as u32)
            .with_kv_unified(true)
            .with_embeddings(true)
            .with_pooling_type(pooling(m.embedding_pooling))
            .with_n_threads(m.threads)
            .with_n_threads_batch(m.threads)
            .with_flash_attention_policy(super::kv::flash_attention(m.flash_attention));
        Self {
            name: m.name.clone(),
            llama,
            params,
            n_tokens,
            n_inputs: m.embedding_max_inputs,
            ctx: None,
            queue: VecDeque::new(),
            running: Vec::new(),
            stats,
        }
    }

    pub(crate) fn has_work(&self) -> bool {
        !self.queue.is_empty() || !self.running.is_empty()
    }

    pub(crate) fn push(&mut self, job: EmbedJob) {
        self.queue.push_back(job);
    }

    /// Compute one batch of the waiting inputs, oldest job first, and answer every job it
    /// completes. One batch per turn of the decode loop, so a large request never holds
    /// generation back for longer than one batch takes.
    pub(crate) fn run(&mut self) {
        self.running.extend(self.queue.drain(..).map(|job| Running { done: 0, out: Vec::new(), job }));
        // A caller that gave up costs nothing more.
        self.running.retain(|r| !r.job.reply.is_closed());
        if self.running.is_empty() {
            return;
        }
        if let Err(e) = self.ensure_context() {
            for r in self.running.drain(..) {
                let _ = r.job.reply.send(Err(clone_error(&e)));
            }
            return;
        }
        // (job, input) pairs in arrival order, as many as fit the context.
        let mut batch = Vec::new();
        let mut tokens = 0;
        'pack: for (j, r) in self.running.iter().enumerate() {
            for i in r.done..r.job.inputs.len() {
                let len = r.job.inputs[i].len();
                if batch.len() == self.n_inputs || (tokens + len > self.n_tokens && !batch.is_empty()) {
                    break 'pack;
                }
                tokens += len;
                batch.push((j, i));
            }
        }
        let inputs: Vec<&[i32]> = batch.iter().map(|&(j, i)| self.running[j].job.inputs[i].as_slice()).collect();
        let result = match self.ctx.as_mut() {
            Some(ctx) => embed_batch(ctx, &self.stats, &inputs),
            None => Err(EngineError::Decode("no embedding context".into())),
        };
        let jobs: Vec<usize> = {
            let mut js: Vec<usize> = batch.iter().map(|&(j, _)| j).collect();
            js.dedup();
            js
        };
        match result {
            Ok(vectors) => {
                for ((j, _), v) in batch.into_iter().zip(vectors) {
                    self.running[j].out.push(v);
                    self.running[j].done += 1;
                }
            }
            Err(e) => {
                tracing::error!(model = %self.name, error = %e, inputs = batch.len(), "embedding batch failed");
                // The jobs in this batch fail; the others go on.
                for &j in jobs.iter().rev() {
                    let r = self.running.remove(j);
                    let _ = r.job.reply.send(Err(clone_error(&e)));
                }
                return;
            }
        }
        let mut j = 0;
        while j < self.running.len() {
            if self.running[j].done == self.running[j].job.inputs.len() {
                let r = self.running.remove(j);
                let _ = r.job.reply.send(Ok(r.out));
            } else {
                j += 1;
            }
        }
    }

    fn ensure_context(&mut self) -> Result<(), EngineError> {
        if self.ctx.is_some() {
            return Ok(());
        }
        let started = Instant::now();
        let _guard = CONTEXT_CREATION.lock().unwrap_or_else(|p| p.into_inner());
        let ctx = self.llama.new_context(backend()?, self.params.clone()).map_err(|e| EngineError::ContextCreate {
            model: self.name.clone(),
            message: format!("embedding context of {} tokens: {e}", self.n_tokens),
        })?;
        tracing::info!(model = %self.name, tokens = self.n_tokens, took = ?started.elapsed(), "embedding context created");
        self.ctx = Some(ctx);
        Ok(())
    }
}

/// One decode of `inputs` (each its own sequence), pooled and normalized.
fn embed_batch(ctx: &mut LlamaContext<'_>, stats: &EngineStats, inputs: &[&[i32]]) -> Result<Embeddings, EngineError> {
    let total: usize = inputs.iter().map(|i| i.len()).sum();
    let mut batch = LlamaBatch::new(total.max(1), 1);
    for (seq, input) in inputs.iter().enumerate() {
        for (pos, &t) in input.iter().enumerate() {
            batch
                .add(LlamaToken(t), pos as i32, &[seq as i32], true)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
        }
    }
    // Cells of the last batch would be attended to as if they were this input's.
    ctx.clear_kv_cache();
    ctx.decode(&mut batch).map_err(|e| EngineError::Decode(e.to_string()))?;
    let mut out = Vec::with_capacity(inputs.len());
    for seq in 0..inputs.len() {
        let pooled = ctx
            .embeddings_seq_ith(seq as i32)
            .map_err(|_| EngineError::Decode(format!("llama.cpp returned no pooled embedding for input {seq}")))?;
        if pooled.iter().any(|x| !x.is_finite()) {
            return Err(EngineError::Decode(format!("llama.cpp returned a non-finite embedding for input {seq}")));
        }
        out.push(unit_length(pooled));
    }
    stats.embedded_tokens.fetch_add(total as u64, Ordering::Relaxed);
    Ok(out)
}

/// `v` (finite) scaled to length 1, as OpenAI's and llama-server's embeddings are; zero
/// stays zero.
fn unit_length(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
}

fn clone_error(e: &EngineError) -> EngineError {
    match e {
        EngineError::ContextCreate { model, message } => {
            EngineError::ContextCreate { model: model.clone(), message: message.clone() }
        }
        other => EngineError::Decode(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::unit_length;

    #[test]
    fn unit_length_scales_to_one_and_keeps_zero() {
        let v = unit_length(&[3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(unit_length(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
