//! `flywheel bench engine`: the scheduler against a plain llama-cpp-2 lockstep loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::{median, synthetic_prompts, Row};
use crate::engine::{context_params, topk, Model, ModelManifest, Output, Want};

pub struct EngineBench {
    pub ns: Vec<usize>,
    pub prompt: usize,
    pub gen: usize,
    /// Tokens shared by every prompt in the shared-prefix row.
    pub shared_prefix: usize,
    /// Alternating runs per configuration; rows report the median run.
    pub repeat: usize,
}

impl Default for EngineBench {
    fn default() -> Self {
        Self { ns: vec![1, 2, 4, 8, 16], prompt: 64, gen: 128, shared_prefix: 48, repeat: 3 }
    }
}

impl EngineBench {
    /// Runs native and engine rows for each N, then the shared-prefix row at the largest N.
    pub async fn run(&self, model: &Arc<Model>, mut on_row: impl FnMut(&Row)) -> anyhow::Result<Vec<Row>> {
        let info = model.info().clone();
        let manifest = model.manifest().clone();
        anyhow::ensure!(
            self.ns.iter().all(|&n| n <= manifest.max_sequences),
            "model {} allows {} sequences; lower --n",
            info.name,
            manifest.max_sequences
        );
        // Warm both paths (thread pools, caches) before measuring.
        let warm = synthetic_prompts(manifest.max_sequences.min(2), self.prompt, 0, info.vocab_size, info.bos, 7);
        native_on_decode_thread(model, &warm, 8)?;
        engine_run(model, &warm, 8).await?;

        // Fresh seeds for every run: no prompt can reuse cells cached by an earlier run.
        let mut seed = 100;
        let mut prompts = |n: usize, shared: usize| {
            seed += 1;
            synthetic_prompts(n, self.prompt, shared, info.vocab_size, info.bos, seed)
        };
        let mut rows = Vec::new();
        let repeat = self.repeat.max(1);
        for &n in &self.ns {
            // Alternate native and engine runs so drift on a shared machine hits both alike.
            let (mut native, mut engine) = (Vec::new(), Vec::new());
            for _ in 0..repeat {
                let p = prompts(n, 0);
                native.push(native_on_decode_thread(model, &p, self.gen)?);
                engine.push(engine_run(model, &p, self.gen).await?);
                let (a, b) = (&native[native.len() - 1], &engine[engine.len() - 1]);
                tracing::info!(n, native = a.tok_s, engine = b.tok_s, ratio = b.tok_s / a.tok_s, "run");
            }
            for row in [median_row(native), median_row(engine)] {
                on_row(&row);
                rows.push(row);
            }
        }
        if let Some(&n) = self.ns.iter().max() {
            let mut shared = Vec::new();
            for _ in 0..repeat {
                shared.push(engine_run(model, &prompts(n, self.shared_prefix), self.gen).await?);
            }
            let mut row = median_row(shared);
            row.mode = "engine-shared-prefix".into();
            on_row(&row);
            rows.push(row);
        }
        Ok(rows)
    }
}

/// The run with the median tok/s.
pub(crate) fn median_row(mut runs: Vec<Row>) -> Row {
    runs.sort_by(|a, b| a.tok_s.total_cmp(&b.tok_s));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

/// N tasks, each opening a sequence and decoding greedily with host top-1.
pub(crate) async fn engine_run(model: &Arc<Model>, prompts: &[Vec<i32>], gen: usize) -> anyhow::Result<Row> {
    let prefill_before = model.stats().prefill_tokens.load(std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in prompts {
        let (model, p) = (model.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            let opened = Instant::now();
            let mut seq = model.open().await?;
            let want = Want::top(1);
            let mut next = first_id(seq.feed(&p, want.clone()).await?)?;
            let first = opened.elapsed();
            let first_at = Instant::now();
            for _ in 1..gen {
                next = first_id(seq.feed(&[next], want.clone()).await?)?;
            }
            anyhow::Ok((first, first_at))
        }));
    }
    gather("engine", tasks, start, model, prefill_before, prompts, gen).await
}

/// Each task's (time to first token, instant of the first token) become one row: tok/s over
/// the whole run, step time after every sequence has its first token, median TTFT, and the
/// prompt tokens the engine computed meanwhile.
pub(crate) async fn gather(
    mode: &str,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<(Duration, Instant)>>>,
    start: Instant,
    model: &Model,
    prefill_before: u64,
    prompts: &[Vec<i32>],
    gen: usize,
) -> anyhow::Result<Row> {
    let mut ttfts = Vec::new();
    let mut all_first = start;
    for t in tasks {
        let (ttft, first_at) = t.await??;
        ttfts.push(ttft.as_secs_f64() * 1e3);
        all_first = all_first.max(first_at);
    }
    let total = start.elapsed();
    let prefill = model.stats().prefill_tokens.load(std::sync::atomic::Ordering::Relaxed) - prefill_before;
    Ok(row(mode, prompts, gen, total, all_first.elapsed(), median(&mut ttfts), prefill))
}

fn first_id(out: Output) -> anyhow::Result<i32> {
    match out {
        Output::TopK { ids, .. } => ids.first().copied().ok_or_else(|| anyhow::anyhow!("empty top-k")),
        Output::Logits(row) => Ok(topk::argmax(&row).unwrap_or(0) as i32),
    }
}

/// The native loop, run on the engine's decode thread (its own context, same settings).
fn native_on_decode_thread(model: &Arc<Model>, prompts: &[Vec<i32>], gen: usize) -> anyhow::Result<Row> {
    let (llama, manifest, prompts) = (model.llama().clone(), model.manifest().clone(), prompts.to_vec());
    model
        .run_on_decode_thread(move || native_lockstep(&llama, &manifest, &prompts, gen))
        .ok_or_else(|| anyhow::anyhow!("the decode thread is gone"))?
}

/// The baseline: every sequence advances in lockstep in one batch, on the calling thread.
fn native_lockstep(
    model: &LlamaModel,
    manifest: &ModelManifest,
    prompts: &[Vec<i32>],
    gen: usize,
) -> anyhow::Result<Row> {
    let backend = crate::engine::backend_ref()?;
    let mut ctx = {
        let _guard = crate::engine::CONTEXT_CREATION.lock().unwrap_or_else(|p| p.into_inner());
        model.new_context(backend, context_params(manifest))?
    };
    let n = prompts.len();
    let n_batch = manifest.batch_size;
    let mut batch = LlamaBatch::new(n_batch, 1);
    let start = Instant::now();
    let mut next = vec![0i32; n];
    let mut ttfts = Vec::with_capacity(n);
    // Prefill in chunks of the batch size; a prompt's last token gets logits.
    let entries: Vec<(usize, usize)> =
        prompts.iter().enumerate().flat_map(|(s, p)| (0..p.len()).map(move |i| (s, i))).collect();
    for chunk in entries.chunks(n_batch) {
        batch.clear();
        let mut rows = Vec::new();
        for &(s, i) in chunk {
            let last = i + 1 == prompts[s].len();
            batch.add(LlamaToken(prompts[s][i]), i as i32, &[s as i32], last)?;
            if last {
                rows.push((s, batch.n_tokens() - 1));
            }
        }
        ctx.decode(&mut batch)?;
        for (s, row) in rows {
            next[s] = topk::argmax(ctx.get_logits_ith(row)).unwrap_or(0) as i32;
            ttfts.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let first_at = Instant::now();
    let mut pos: Vec<i32> = prompts.iter().map(|p| p.len() as i32).collect();
    for _ in 1..gen {
        batch.clear();
        for s in 0..n {
            batch.add(LlamaToken(next[s]), pos[s], &[s as i32], true)?;
            pos[s] += 1;
        }
        ctx.decode(&mut batch)?;
        for (s, tok) in next.iter_mut().enumerate() {
            *tok = topk::argmax(ctx.get_logits_ith(s as i32)).unwrap_or(0) as i32;
        }
    }
    let total = start.elapsed();
    let prefill: usize = prompts.iter().map(Vec::len).sum();
    Ok(row("native", prompts, gen, total, first_at.elapsed(), median(&mut ttfts), prefill as u64))
}

pub(crate) fn row(
    mode: &str,
    prompts: &[Vec<i32>],
    gen: usize,
    total: Duration,
    decode: Duration,
    ttft_ms: f64,
    prefill: u64,
) -> Row {
    let n = prompts.len();
    Row {
        bench: "engine",
        mode: mode.to_string(),
        n,
        prompt: prompts.first().map_or(0, Vec::len),
        gen,
        tok_s: (n * gen) as f64 / total.as_secs_f64(),
        step_ms: decode.as_secs_f64() * 1e3 / (gen.saturating_sub(1).max(1)) as f64,
        ttft_ms,
        prefill_tokens: prefill,
        ..Row::default()
    }
}
