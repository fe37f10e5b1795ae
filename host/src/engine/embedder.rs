//! Embeddings of one model, computed on the decode thread in a context of their own.
//!
//! Generation keeps its context and KV layout; embeddings need llama.cpp's `embeddings`
//! mode and a pooling type, which apply to a whole context. So each model gets a second,
//! small context (created on the first embedding, so models nobody embeds with pay
//! nothing), whose KV cells are cleared before every batch. Every job waiting when the
//! decode thread gets to it is packed into as few batches as fit.

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

/// A job being computed: its results fill in as its inputs' batches run.
struct Running {
    job: EmbedJob,
    out: Vec<Option<Vec<f32>>>,
    failed: Option<EngineError>,
}

pub(crate) struct Embedder<'m> {
    name: String,
    llama: &'m LlamaModel,
    params: LlamaContextParams,
    n_tokens: usize,
    n_inputs: usize,
    ctx: Option<LlamaContext<'m>>,
    queue: VecDeque<EmbedJob>,
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
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED);
        Self {
            name: m.name.clone(),
            llama,
            params,
            n_tokens,
            n_inputs: m.embedding_max_inputs,
            ctx: None,
            queue: VecDeque::new(),
            stats,
        }
    }

    pub(crate) fn has_work(&self) -> bool {
        !self.queue.is_empty()
    }

    pub(crate) fn push(&mut self, job: EmbedJob) {
        self.queue.push_back(job);
    }

    /// Compute every queued job.
    pub(crate) fn run(&mut self) {
        let mut running: Vec<Running> = self
            .queue
            .drain(..)
            // A caller that gave up costs nothing.
            .filter(|j| !j.reply.is_closed())
            .map(|job| Running { out: vec![None; job.inputs.len()], job, failed: None })
            .collect();
        if running.is_empty() {
            return;
        }
        if let Err(e) = self.ensure_context() {
            for r in running {
                let _ = r.job.reply.send(Err(clone_error(&e)));
            }
            return;
        }
        // Pack (job, input) pairs in arrival order into batches that fit the context.
        let mut pending: VecDeque<(usize, usize)> =
            running.iter().enumerate().flat_map(|(j, r)| (0..r.job.inputs.len()).map(move |i| (j, i))).collect();
        while !pending.is_empty() {
            let mut batch = Vec::new();
            let mut tokens = 0;
            while let Some(&(j, i)) = pending.front() {
                let len = running[j].job.inputs[i].len();
                if batch.len() == self.n_inputs || (tokens + len > self.n_tokens && !batch.is_empty()) {
                    break;
                }
                tokens += len;
                batch.push((j, i));
                pending.pop_front();
            }
            let inputs: Vec<&[i32]> = batch.iter().map(|&(j, i)| running[j].job.inputs[i].as_slice()).collect();
            match self.embed_batch(&inputs) {
                Ok(vectors) => {
                    for ((j, i), v) in batch.into_iter().zip(vectors) {
                        running[j].out[i] = Some(v);
                    }
                }
                Err(e) => {
                    tracing::error!(model = %self.name, error = %e, inputs = inputs.len(), "embedding batch failed");
                    for (j, _) in batch {
                        running[j].failed.get_or_insert_with(|| clone_error(&e));
                    }
                }
            }
        }
        for r in running {
            let result = match r.failed {
                Some(e) => Err(e),
                None => r
                    .out
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| EngineError::Decode("an embedding was not computed".into())),
            };
            let _ = r.job.reply.send(result);
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

    /// One decode of `inputs` (each its own sequence), pooled and normalized.
    fn embed_batch(&mut self, inputs: &[&[i32]]) -> Result<Embeddings, EngineError> {
        let ctx = self.ctx.as_mut().ok_or_else(|| EngineError::Decode("no embedding context".into()))?;
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
            out.push(unit_length(pooled));
        }
        self.stats.embedded_tokens.fetch_add(total as u64, Ordering::Relaxed);
        Ok(out)
    }
}

/// `v` scaled to length 1 (as OpenAI's and llama-server's embeddings are); zero stays zero.
fn unit_length(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
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
