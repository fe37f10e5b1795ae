//! Shared test support: a generated tiny model, manifests and small helpers.
#![allow(dead_code)]

pub mod node;
pub mod polyglot;
pub mod raw;
pub mod server;
pub mod tiny_gguf;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use flywheel::engine::{Engine, Model, ModelManifest, NoObserver, Output, Sequence, Want};

/// A per-process scratch folder under the target dir.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch");
    let dir = base.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The tiny model's GGUF, written once per test process.
pub fn tiny_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = scratch_dir("models").join("tiny.gguf");
        tiny_gguf::TinyModel::default().write_to(&path).expect("write tiny model");
        path
    })
    .clone()
}

/// A manifest for the tiny model, with settings that keep tests fast and deterministic.
pub fn tiny_manifest(name: &str) -> ModelManifest {
    let mut m = ModelManifest::for_file(name, tiny_model_path());
    m.threads = 1;
    m.context_length = 256;
    m.max_sequences = 8;
    m.batch_size = 256;
    m.queue_timeout_ms = 5_000;
    // Test prompts are short; cache them anyway.
    m.prefix_cache_min_tokens = 16;
    m
}

pub fn load(manifest: ModelManifest) -> Arc<Model> {
    let engine = Engine::load(vec![manifest], Arc::new(NoObserver)).expect("load tiny model");
    let model = engine.models().next().and_then(|h| h.loaded());
    model.expect("one model")
}

/// The real default model, when it has been fetched.
pub fn default_model_manifest() -> Option<ModelManifest> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/smollm2.toml");
    let m = ModelManifest::from_file(&path).ok()?;
    m.file.exists().then_some(m)
}

/// Deterministic distinct prompts of `len` tokens drawn from the tiny vocabulary.
pub fn prompt(model: &Model, seed: usize, len: usize) -> Vec<i32> {
    let words = ["the", "cat", "dog", "story", "once", "upon", "time", "world", "hello", "edge"];
    let mut text = format!("Prompt {seed}:");
    let mut i = seed;
    let mut toks = model.tokenize(&text, true, false).expect("tokenize");
    while toks.len() < len {
        i = i.wrapping_mul(31).wrapping_add(7);
        text.push(' ');
        text.push_str(words[i % words.len()]);
        toks = model.tokenize(&text, true, false).expect("tokenize");
    }
    toks.truncate(len);
    toks
}

pub fn top1(out: &Output) -> i32 {
    match out {
        Output::TopK { ids, .. } => ids[0],
        Output::Logits(row) => flywheel::engine::topk::argmax(row).expect("finite logits") as i32,
    }
}

pub fn greedy_want() -> Want {
    Want::top(1)
}

/// Feed a prompt and generate `n` greedy tokens (ignoring end-of-generation).
pub async fn greedy(seq: &mut Sequence, prompt: &[i32], n: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(n);
    let mut next = top1(&seq.feed(prompt, greedy_want()).await.expect("prefill"));
    for _ in 0..n {
        out.push(next);
        if out.len() == n {
            break;
        }
        next = top1(&seq.feed(&[next], greedy_want()).await.expect("decode"));
    }
    out
}
