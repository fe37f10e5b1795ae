//! Engine tests on the generated tiny model (and, when fetched, the default model).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flywheel::engine::{Engine, EngineError, ModelManifest, NoObserver, Output, StepInfo, StepObserver, Want};
use support::*;

/// Records the largest batch the scheduler ran.
#[derive(Default)]
struct MaxBatch(AtomicUsize);
impl StepObserver for MaxBatch {
    fn on_step(&self, _: &str, step: &StepInfo) {
        self.0.fetch_max(step.sequences, Ordering::Relaxed);
    }
}

/// Teacher-forced comparison of solo and batched decoding.
///
/// llama.cpp's batched kernels sum in a different order than solo ones (the attention
/// window spans every sequence's cells with a unified KV cache), so logits differ in the
/// low bits: up to ~0.02 on the tiny model, whose logits span about 13. A masking or
/// position bug would shift them by whole units. So both runs are fed the same tokens,
/// every row must agree within 0.5% of its spread (~0.065), and the greedy pick must agree
/// wherever the solo run's top two are further apart than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_decoding_matches_solo_as_sequences_come_and_go() {
    let observer = Arc::new(MaxBatch::default());
    let engine = Engine::load(vec![tiny_manifest("tiny")], observer.clone()).unwrap();
    let model = engine.model("tiny").unwrap().loaded().unwrap();
    let prompts: Vec<Vec<i32>> = (0..8).map(|i| prompt(&model, i, 12 + 3 * i)).collect();
    let lengths: Vec<usize> = (0..8).map(|i| 40 - 3 * i).collect();

    let mut solo = Vec::new();
    for (p, &n) in prompts.iter().zip(&lengths) {
        let mut seq = model.open().await.unwrap();
        solo.push(greedy_rows(&mut seq, p, n).await);
    }

    // Sequence i joins once the others have produced 4*i tokens in total, and each
    // leaves after its own length, so the batch changes shape while it runs.
    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, p) in prompts.iter().cloned().enumerate() {
        let (model, progress) = (model.clone(), progress.clone());
        let forced = solo[i].1.clone();
        tasks.push(tokio::spawn(async move {
            while progress.load(Ordering::Relaxed) < 4 * i {
                tokio::task::yield_now().await;
            }
            let mut seq = model.open().await.unwrap();
            let mut rows = vec![logits(seq.feed(&p, Want::Logits).await.unwrap())];
            for t in forced {
                rows.push(logits(seq.feed(&[t], Want::Logits).await.unwrap()));
                progress.fetch_add(1, Ordering::Relaxed);
            }
            rows
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let batched = t.await.unwrap();
        assert_rows_close(&solo[i].0, &batched, 0.005, &format!("sequence {i}"));
    }
    assert!(observer.0.load(Ordering::Relaxed) >= 4, "sequences never shared a batch");
    let stats = model.stats();
    assert_eq!(stats.active_sequences.load(Ordering::Relaxed), 0);
}

/// Greedy generation that keeps every logits row: (rows, generated tokens).
async fn greedy_rows(seq: &mut flywheel::engine::Sequence, prompt: &[i32], n: usize) -> (Vec<Vec<f32>>, Vec<i32>) {
    let mut rows = vec![logits(seq.feed(prompt, Want::Logits).await.unwrap())];
    let mut toks = Vec::new();
    for _ in 0..n {
        let next = flywheel::engine::topk::argmax(rows.last().unwrap()).unwrap() as i32;
        toks.push(next);
        rows.push(logits(seq.feed(&[next], Want::Logits).await.unwrap()));
    }
    (rows, toks)
}

/// `relative` is the largest allowed difference as a fraction of the solo row's spread
/// (max - min logit).
fn assert_rows_close(solo: &[Vec<f32>], batched: &[Vec<f32>], relative: f32, what: &str) {
    assert_eq!(solo.len(), batched.len());
    for (pos, (a, b)) in solo.iter().zip(batched).enumerate() {
        let max_diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let spread = a.iter().copied().fold(f32::MIN, f32::max) - a.iter().copied().fold(f32::MAX, f32::min);
        let tolerance = relative * spread;
        if std::env::var_os("FLYWHEEL_TEST_VERBOSE").is_some() {
            eprintln!("{what}, row {pos}: max logit difference {max_diff} (spread {spread})");
        }
        assert!(max_diff < tolerance, "{what}, row {pos}: logits differ by {max_diff}");
        let (ids, top) = flywheel::engine::topk::top_k(a, 2, None);
        if top[0] - top[1] > tolerance {
            assert_eq!(
                flywheel::engine::topk::argmax(b),
                Some(ids[0] as usize),
                "{what}, row {pos}: greedy pick differs"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_frees_kv_cells_for_the_next_sequences() {
    let mut m = tiny_manifest("tiny-small");
    m.context_length = 64;
    m.max_sequences = 4; // 256 KV cells: four full sequences at once
    m.batch_size = 64;
    m.prefix_cache_mb = 0;
    let model = load(m);
    for i in 0..100 {
        let mut seq = model.open().await.unwrap();
        let p = prompt(&model, i, 40);
        let out = greedy(&mut seq, &p, 24).await;
        assert_eq!(out.len(), 24);
        assert_eq!(model.stats().kv_tokens.load(Ordering::Relaxed), 63);
        drop(seq);
    }
    // The close is processed before any later command; a new open observes it.
    let _probe = model.open().await.unwrap();
    assert_eq!(model.stats().kv_tokens.load(Ordering::Relaxed), 0);
    assert_eq!(model.stats().cached_prefixes.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_context_serves_many_sequences_with_the_prefix_cache_on() {
    // Closed sequences go to the host-memory cache; their KV cells are free at once.
    let mut m = tiny_manifest("tiny-pressure");
    m.context_length = 64;
    m.max_sequences = 4;
    m.batch_size = 64;
    m.prefix_cache_mb = 64;
    let model = load(m);
    let mut tasks = Vec::new();
    for w in 0..4 {
        let model = model.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let mut seq = model.open().await.unwrap();
                let p = prompt(&model, w * 100 + i, 40);
                assert_eq!(greedy(&mut seq, &p, 24).await.len(), 24);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_reuse_matches_cold_prefill_and_skips_shared_work() {
    let cold_model = {
        let mut m = tiny_manifest("tiny-cold");
        m.prefix_cache_mb = 0;
        m.min_shared_prefix = usize::MAX;
        load(m)
    };
    let warm_model = load(tiny_manifest("tiny-warm"));
    let base = prompt(&cold_model, 1, 48);
    let mut other = base[..32].to_vec();
    other.extend(prompt(&cold_model, 2, 17)[1..].iter().copied());

    let cold = {
        let mut seq = cold_model.open().await.unwrap();
        greedy(&mut seq, &other, 16).await
    };

    // A live sequence shares its prefix.
    let mut a = warm_model.open().await.unwrap();
    greedy(&mut a, &base, 4).await;
    let before = warm_model.stats().prefill_tokens.load(Ordering::Relaxed);
    let mut b = warm_model.open().await.unwrap();
    let warm = greedy(&mut b, &other, 16).await;
    let computed = warm_model.stats().prefill_tokens.load(Ordering::Relaxed) - before;
    assert_eq!(warm, cold, "reused prefix changes the output");
    assert_eq!(computed as usize, other.len() - 32, "the shared 32 tokens were computed again");
    drop(a);
    drop(b);

    // A closed sequence's cells are reused too.
    let before = warm_model.stats().prefill_tokens.load(Ordering::Relaxed);
    let mut c = warm_model.open().await.unwrap();
    let again = greedy(&mut c, &other, 16).await;
    let computed = warm_model.stats().prefill_tokens.load(Ordering::Relaxed) - before;
    assert_eq!(again, cold);
    assert_eq!(computed, 1, "only the last prompt token needs computing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_arriving_together_compute_their_shared_prefix_once() {
    let model = load(tiny_manifest("tiny-together"));
    let shared = prompt(&model, 5, 40);
    let prompts: Vec<Vec<i32>> = (0..6)
        .map(|i| {
            let mut p = shared.clone();
            p.extend(prompt(&model, 10 + i, 9)[1..].iter().copied());
            p
        })
        .collect();
    let mut cold = Vec::new();
    {
        let mut m = tiny_manifest("tiny-together-cold");
        m.prefix_cache_mb = 0;
        m.min_shared_prefix = usize::MAX;
        let cold_model = load(m);
        for p in &prompts {
            let mut seq = cold_model.open().await.unwrap();
            cold.push(greedy(&mut seq, p, 8).await);
        }
    }
    // Open all first so their prompts land in the same step.
    let mut seqs = Vec::new();
    for _ in 0..prompts.len() {
        seqs.push(model.open().await.unwrap());
    }
    let tasks: Vec<_> = seqs
        .into_iter()
        .zip(prompts.clone())
        .map(|(mut seq, p)| tokio::spawn(async move { greedy(&mut seq, &p, 8).await }))
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), cold[i]);
    }
    let computed = model.stats().prefill_tokens.load(Ordering::Relaxed) as usize;
    let total: usize = prompts.iter().map(Vec::len).sum();
    assert!(computed <= total - 4 * shared.len(), "computed {computed} of {total} prompt tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_full_fails_one_sequence_and_not_the_others() {
    let mut m = tiny_manifest("tiny-ctx");
    m.context_length = 32;
    let model = load(m);
    let mut other = model.open().await.unwrap();
    let p_other = prompt(&model, 3, 8);
    let mut full = model.open().await.unwrap();
    let p = prompt(&model, 4, 30);
    full.feed(&p, greedy_want()).await.unwrap();
    let err = full.feed(&[5, 6, 7], greedy_want()).await.unwrap_err();
    assert!(matches!(err, EngineError::ContextFull { requested: 33, limit: 32 }), "{err}");
    // Exactly at the limit still works, and the other sequence is unaffected.
    full.feed(&[5, 6], greedy_want()).await.unwrap();
    assert_eq!(greedy(&mut other, &p_other, 10).await.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_feeds_get_clear_errors() {
    let model = load(tiny_manifest("tiny-bad"));
    let vocab = model.info().vocab_size as i32;
    let mut seq = model.open().await.unwrap();
    let e = seq.feed(&[1, vocab], greedy_want()).await.unwrap_err();
    assert!(matches!(e, EngineError::InvalidToken { token, .. } if token == vocab), "{e}");
    let e = seq.feed(&[-1], greedy_want()).await.unwrap_err();
    assert!(matches!(e, EngineError::InvalidToken { token: -1, .. }), "{e}");
    let e = seq.feed(&[], greedy_want()).await.unwrap_err();
    assert!(matches!(e, EngineError::InvalidArgument(_)), "{e}");
    let e = seq.feed(&[1], Want::top(0)).await.unwrap_err();
    assert!(matches!(e, EngineError::InvalidArgument(_)), "{e}");
    let e = seq.feed(&[1], Want::TopK { k: 2, allowed: Some(vec![3, vocab + 5]), logprobs: false }).await.unwrap_err();
    assert!(matches!(e, EngineError::InvalidToken { .. }), "{e}");
    // The sequence still works, and allowed ids restrict the candidates.
    match seq.feed(&[1, 50, 60], Want::TopK { k: 5, allowed: Some(vec![70, 71, 72]), logprobs: false }).await.unwrap() {
        Output::TopK { ids, logits, .. } => {
            assert_eq!(ids.len(), 3);
            assert!(ids.iter().all(|i| (70..=72).contains(i)));
            assert!(logits.windows(2).all(|w| w[0] >= w[1]));
        }
        other => panic!("unexpected {other:?}"),
    }
    match seq.feed(&[61], Want::Logits).await.unwrap() {
        Output::Logits(row) => assert_eq!(row.len(), vocab as usize),
        other => panic!("unexpected {other:?}"),
    }
}

/// Log-probabilities from the host are log-softmax over the whole row, allowed ids or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_log_softmax_over_the_whole_vocabulary() {
    let model = load(tiny_manifest("tiny-logprobs"));
    let prompt = [1, 50, 60, 70];
    let mut full = model.open().await.unwrap();
    let Output::Logits(row) = full.feed(&prompt, Want::Logits).await.unwrap() else { panic!("asked for logits") };
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let normalizer = f64::from(max) + row.iter().map(|&x| f64::from(x - max).exp()).sum::<f64>().ln();
    for allowed in [None, Some(vec![3, 9, 27, 81])] {
        let mut seq = model.open().await.unwrap();
        let want = Want::TopK { k: 4, allowed: allowed.clone(), logprobs: true };
        let Output::TopK { ids, logprobs: Some(lp), .. } = seq.feed(&prompt, want).await.unwrap() else {
            panic!("no logprobs")
        };
        assert_eq!(ids.len(), 4);
        for (id, lp) in ids.iter().zip(&lp) {
            let exact = f64::from(row[*id as usize]) - normalizer;
            assert!((f64::from(*lp) - exact).abs() < 1e-4, "token {id}: {lp} against {exact} ({allowed:?})");
        }
    }
    let mut seq = model.open().await.unwrap();
    let Output::TopK { logprobs: None, .. } = seq.feed(&prompt, Want::top(2)).await.unwrap() else {
        panic!("logprobs that were not asked for")
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_queues_then_times_out_or_refuses() {
    let mut m = tiny_manifest("tiny-admit");
    m.max_sequences = 2;
    m.max_queue = Some(1);
    m.queue_timeout_ms = 300;
    let model = load(m);
    let a = model.open().await.unwrap();
    let _b = model.open().await.unwrap();
    // A third open waits; releasing a sequence admits it.
    let waiter = {
        let model = model.clone();
        tokio::spawn(async move { model.open().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(model.stats().waiting_opens.load(Ordering::Relaxed), 1);
    // The queue holds one: the next open is refused at once.
    let e = model.open().await.err().unwrap();
    assert!(matches!(e, EngineError::QueueFull { .. }), "{e}");
    drop(a);
    let _c = waiter.await.unwrap().unwrap();
    // Nothing frees up now: the wait ends with a timeout.
    let e = model.open().await.err().unwrap();
    assert!(matches!(e, EngineError::AdmissionTimeout { .. }), "{e}");
}

#[test]
fn missing_corrupt_and_garbage_model_files_are_clear_errors() {
    let dir = scratch_dir("bad-models");
    let load_err = |m: ModelManifest| Engine::load(vec![m], Arc::new(NoObserver)).err().expect("load must fail");

    let mut m = ModelManifest::for_file("missing", dir.join("absent.gguf"));
    m.sha256 = Some("ab".repeat(32));
    let e = load_err(m).to_string();
    assert!(e.contains("absent.gguf") && e.contains(&"ab".repeat(32)), "{e}");

    let corrupt = dir.join("corrupt.gguf");
    let mut bytes = std::fs::read(tiny_model_path()).unwrap();
    let good = sha256_hex(&bytes);
    bytes[1000] ^= 0xff;
    std::fs::write(&corrupt, &bytes).unwrap();
    let mut m = ModelManifest::for_file("corrupt", &corrupt);
    m.sha256 = Some(good.clone());
    let e = load_err(m);
    assert!(matches!(e, EngineError::ModelFileCorrupt { .. }), "{e}");
    assert!(e.to_string().contains(&good) && e.to_string().contains("corrupt.gguf"));

    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model at all").unwrap();
    let e = load_err(ModelManifest::for_file("garbage", &garbage));
    assert!(matches!(e, EngineError::ModelLoad { .. }), "{e}");

    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(tiny_model_path()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(ModelManifest::for_file("truncated", &truncated));
    assert!(matches!(e, EngineError::ModelLoad { .. }), "{e}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vocab_and_chat_template() {
    let model = load(tiny_manifest("tiny-vocab"));
    let info = model.info();
    assert_eq!(info.vocab_size, tiny_gguf::TinyModel::default().n_vocab());
    assert_eq!(info.bos, Some(tiny_gguf::BOS_ID as i32));
    assert_eq!(info.eos, Some(tiny_gguf::EOS_ID as i32));
    assert!(info.end_of_generation.contains(&(tiny_gguf::EOS_ID as i32)));
    let ids = model.tokenize("hello world, once upon a time", true, false).unwrap();
    assert_eq!(ids[0], tiny_gguf::BOS_ID as i32);
    assert_eq!(model.detokenize(&ids[1..], false).unwrap(), "hello world, once upon a time");
    let bytes: Vec<u8> = model.token_bytes(&ids[1..], false).unwrap().concat();
    assert_eq!(String::from_utf8(bytes).unwrap().trim_start(), "hello world, once upon a time");
    // Non-ASCII text goes through byte fallback and round-trips.
    let ids = model.tokenize("héllo ✓", false, false).unwrap();
    assert_eq!(model.detokenize(&ids, false).unwrap().trim_start(), "héllo ✓");
    let chat = model.apply_chat_template(&[("user".into(), "hi".into())], true).unwrap();
    assert_eq!(chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    let ids = model.tokenize(&chat, true, true).unwrap();
    assert!(ids.contains(&(tiny_gguf::IM_START_ID as i32)));
    assert!(model.detokenize(&[vocab_out_of_range(&model)], false).is_err());
}

fn vocab_out_of_range(model: &flywheel::engine::Model) -> i32 {
    model.info().vocab_size as i32
}

/// On the real default model batched math is not bit-identical to solo decoding (the
/// reduction order inside llama.cpp's kernels depends on the batch), so compare with
/// teacher forcing: feed both runs the same tokens and compare the logits rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_model_batched_logits_match_solo_within_tolerance() {
    let Some(mut m) = default_model_manifest() else {
        eprintln!("skipped: the default model is not fetched (python3 models/fetch.py)");
        return;
    };
    m.threads = 2;
    m.max_sequences = 8;
    m.context_length = 256;
    let model = load(m);
    let prompts: Vec<Vec<i32>> = (0..8)
        .map(|i| model.tokenize(&format!("Write a short story number {i} about a robot who"), true, false).unwrap())
        .collect();
    let steps = 16;
    let mut solo = Vec::new();
    for p in &prompts {
        let mut seq = model.open().await.unwrap();
        solo.push(greedy_rows(&mut seq, p, steps).await);
    }
    let tasks: Vec<_> = prompts
        .iter()
        .cloned()
        .zip(solo.iter().map(|s| s.1.clone()))
        .map(|(p, toks)| {
            let model = model.clone();
            tokio::spawn(async move {
                let mut seq = model.open().await.unwrap();
                let mut rows = vec![logits(seq.feed(&p, Want::Logits).await.unwrap())];
                for t in toks {
                    rows.push(logits(seq.feed(&[t], Want::Logits).await.unwrap()));
                }
                rows
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        // Quantized matmuls take batch-dependent paths: measured differences reach ~1.0 on
        // rows spanning ~30-40, i.e. up to ~3.5%; a masking or position bug moves logits by a
        // sizeable part of the spread.
        assert_rows_close(&solo[i].0, &t.await.unwrap(), 0.1, &format!("sequence {i}"));
    }
}

fn logits(out: Output) -> Vec<f32> {
    match out {
        Output::Logits(row) => row,
        other => panic!("expected logits, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizer_json_in_the_manifest_replaces_the_gguf_vocabulary() {
    let gguf = load(tiny_manifest("tiny-gguf-vocab"));
    let path = scratch_dir("tokenizer").join("tokenizer.json");
    std::fs::write(&path, tiny_gguf::tokenizer_json()).unwrap();
    let mut m = tiny_manifest("tiny-hf-vocab");
    m.tokenizer = Some(path);
    let hf = load(m);

    let text = "hello world xyzzy";
    let from_gguf = gguf.tokenize(text, false, false).unwrap();
    let from_hf = hf.tokenize(text, false, false).unwrap();
    // The word-level tokenizer knows "hello" and "world" (as the ids of their SPM pieces)
    // and maps the unknown word to <unk>; SPM spells it out in pieces instead.
    assert_eq!(from_hf.len(), 3);
    assert_eq!(&from_hf[..2], &from_gguf[..2]);
    assert_eq!(from_hf[2], 0);
    assert!(from_gguf.len() > 3);
    assert_eq!(hf.detokenize(&from_hf[..2], false).unwrap(), "hello world");
    // Sequences fed with these ids decode like any others.
    let mut seq = hf.open().await.unwrap();
    assert_eq!(greedy(&mut seq, &from_hf, 4).await.len(), 4);
    // A broken tokenizer file is a clear load error.
    let bad = scratch_dir("tokenizer").join("broken.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let mut m = tiny_manifest("tiny-bad-vocab");
    m.tokenizer = Some(bad);
    let e = Engine::load(vec![m], Arc::new(NoObserver)).err().unwrap().to_string();
    assert!(e.contains("broken.json"), "{e}");
}

/// Both real models at once, decoding at the same time on the one decode thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_real_models_load_and_decode_together() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let manifests: Vec<ModelManifest> = ["smollm2.toml", "gemma3-270m.toml"]
        .iter()
        .filter_map(|f| ModelManifest::from_file(&dir.join(f)).ok())
        .filter(|m| m.file.exists())
        .map(|mut m| {
            m.context_length = 256;
            m.max_sequences = 4;
            m
        })
        .collect();
    if manifests.len() < 2 {
        eprintln!("skipped: fetch both models first (python3 models/fetch.py --all)");
        return;
    }
    let engine = Engine::load(manifests, Arc::new(NoObserver)).unwrap();
    let mut tasks = Vec::new();
    for name in ["smollm2", "gemma3-270m"] {
        let model = engine.model(name).unwrap().loaded().unwrap();
        tasks.push(tokio::spawn(async move {
            let prompt = model.tokenize("The capital of France is", true, false).unwrap();
            let mut seq = model.open().await.unwrap();
            let out = greedy(&mut seq, &prompt, 6).await;
            (out.len(), model.detokenize(&out, false).unwrap())
        }));
    }
    for t in tasks {
        let (n, text) = t.await.unwrap();
        assert_eq!(n, 6);
        assert!(!text.trim().is_empty(), "{text:?}");
    }
    let gemma = engine.model("gemma3-270m").unwrap().loaded().unwrap();
    assert_eq!(gemma.info().vocab_size, 262_144);
    let chat = gemma.apply_chat_template(&[("user".into(), "hi".into())], true).unwrap();
    assert!(chat.contains("<start_of_turn>user"), "{chat}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_stays_within_its_budget_and_skips_short_sequences() {
    let mut m = tiny_manifest("tiny-budget");
    m.prefix_cache_mb = 1;
    m.prefix_cache_min_tokens = 32;
    let model = load(m);
    // Short sequences are not worth keeping.
    for i in 0..20 {
        let mut seq = model.open().await.unwrap();
        greedy(&mut seq, &prompt(&model, i, 10), 8).await;
    }
    let _probe = model.open().await.unwrap();
    assert_eq!(model.stats().cached_prefixes.load(Ordering::Relaxed), 0);
    drop(_probe);
    // Long distinct ones fill the cache up to its budget, and no further.
    for i in 0..200 {
        let mut seq = model.open().await.unwrap();
        greedy(&mut seq, &prompt(&model, 1000 + i, 60), 8).await;
    }
    let _probe = model.open().await.unwrap();
    let bytes = model.stats().cached_bytes.load(Ordering::Relaxed);
    assert!(bytes > 0 && bytes <= 1 << 20, "{bytes} bytes cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_batch_wait_and_cancelled_opens_leave_the_engine_usable() {
    let mut m = tiny_manifest("tiny-nowait");
    m.max_batch_wait_us = 0;
    m.max_sequences = 2;
    let model = load(m);
    // Concurrent sequences with no straggler wait at all.
    let tasks: Vec<_> = (0..2)
        .map(|i| {
            let model = model.clone();
            tokio::spawn(async move {
                let mut seq = model.open().await.unwrap();
                greedy(&mut seq, &prompt(&model, i, 10), 12).await.len()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 12);
    }
    // Opens abandoned at every stage must not leak their sequence slots.
    for i in 0..200 {
        let model = model.clone();
        let t = tokio::spawn(async move { model.open().await.map(|_| ()) });
        for _ in 0..(i % 4) {
            tokio::task::yield_now().await;
        }
        t.abort();
        let _ = t.await;
    }
    let both = tokio::time::timeout(Duration::from_secs(2), async {
        let a = model.open().await.unwrap();
        let b = model.open().await.unwrap();
        (a, b)
    })
    .await;
    assert!(both.is_ok(), "sequence slots leaked by cancelled opens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_submitted_together_compute_their_common_prompt_once() {
    let model = load(tiny_manifest("tiny-submit"));
    let p = prompt(&model, 3, 48);
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(model.open().await.unwrap());
    }
    // All three are queued before any is waited for, as `compute-many` does for `n` choices.
    let pending: Vec<_> = seqs.iter_mut().map(|s| s.submit(&p, Want::top(4)).unwrap()).collect();
    let mut outputs = Vec::new();
    for (seq, feed) in seqs.iter_mut().zip(pending) {
        outputs.push(seq.complete(feed).await.unwrap());
    }
    let Output::TopK { ids, .. } = &outputs[0] else { panic!("top-k was asked for") };
    for out in &outputs[1..] {
        let Output::TopK { ids: other, .. } = out else { panic!("top-k was asked for") };
        assert_eq!(other[0], ids[0], "the same prompt gave different next tokens");
    }
    let computed = model.stats().prefill_tokens.load(Ordering::Relaxed) as usize;
    // The first computes the prompt; the others copy all but its last token.
    assert!(computed <= p.len() + 2 * 2, "computed {computed} prompt tokens for 3 x {}", p.len());
    // A second submit while one is pending is refused; the pending one still completes.
    let first = seqs[0].submit(&[ids[0]], Want::top(1)).unwrap();
    assert!(matches!(seqs[0].submit(&[ids[0]], Want::top(1)), Err(EngineError::SequenceBroken)));
    seqs[0].complete(first).await.unwrap();
    assert_eq!(seqs[0].len(), p.len() + 1);
}

/// Records how many prompts each step computed, and their tokens.
#[derive(Default)]
struct PromptsPerStep(std::sync::Mutex<Vec<(usize, usize)>>);
impl StepObserver for PromptsPerStep {
    fn on_step(&self, _: &str, step: &StepInfo) {
        if let Ok(mut steps) = self.0.lock() {
            steps.push((step.sequences - step.decode_tokens, step.prefill_tokens));
        }
    }
}

/// Short prompts queued behind a long one: with a small `prompt_step_tokens` each step
/// takes whole prompts only until it holds that many tokens, so their answers come out a
/// couple at a time; with it at `batch_size` the steps are packed full, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_prompts_is_answered_a_few_per_step() {
    for step_tokens in [32, 64] {
        let observer = Arc::new(PromptsPerStep::default());
        let mut m = tiny_manifest("tiny-burst");
        m.batch_size = 64;
        m.prompt_step_tokens = step_tokens;
        // The test prompts all begin "Prompt N": no sharing, so each computes in full.
        m.min_shared_prefix = 64;
        let engine = Engine::load(vec![m], observer.clone()).unwrap();
        let model = engine.model("tiny-burst").unwrap().loaded().unwrap();
        let long = prompt(&model, 1, 200);
        let shorts: Vec<Vec<i32>> = (0..7).map(|i| prompt(&model, 10 + i, 24)).collect();
        let mut seqs = Vec::new();
        for _ in 0..8 {
            seqs.push(model.open().await.unwrap());
        }
        // The long prompt takes four steps (64, 64, 64, 8 tokens); the short ones queue
        // behind it meanwhile.
        let (first, rest) = seqs.split_at_mut(1);
        let long_feed = first[0].submit(&long, Want::top(1)).unwrap();
        let feeds: Vec<_> = rest.iter_mut().zip(&shorts).map(|(s, p)| s.submit(p, Want::top(1)).unwrap()).collect();
        first[0].complete(long_feed).await.unwrap();
        for (seq, feed) in rest.iter_mut().zip(feeds) {
            seq.complete(feed).await.unwrap();
        }
        // A step answers its sequences before it reports itself: wait for the last report.
        let total = long.len() + shorts.iter().map(Vec::len).sum::<usize>();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let steps = loop {
            let steps = observer.0.lock().unwrap().clone();
            if steps.iter().map(|s| s.1).sum::<usize>() >= total || std::time::Instant::now() > deadline {
                break steps;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let most = steps.iter().map(|s| s.0).max().unwrap_or(0);
        if step_tokens == 32 {
            // 8 + 24 tokens, or 24 + 24: never a third prompt in a step.
            assert!(most <= 2, "a step computed {most} prompts: {steps:?}");
            assert!(steps.len() >= 7, "8 prompts in {} steps: {steps:?}", steps.len());
        } else {
            // 8 + 24 + 24 + 8: the step that finished the long prompt started three more.
            assert!(most >= 3, "steps were not packed: {steps:?}");
        }
    }
}

fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_unit_length_and_the_same_alone_or_in_a_batch() {
    let mut m = tiny_manifest("tiny-embed");
    m.embedding_max_inputs = 2;
    m.embedding_batch = Some(64);
    let model = load(m);
    let a = prompt(&model, 7, 20);
    let b = prompt(&model, 8, 30);
    // Five inputs in batches of at most two.
    let batch = model.embed(vec![a.clone(), b.clone(), a.clone(), b.clone(), a.clone()]).await.unwrap();
    assert_eq!(batch.len(), 5);
    for v in &batch {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let alone = model.embed(vec![a.clone()]).await.unwrap().remove(0);
    assert!(distance(&batch[0], &alone) < 1e-3 && distance(&batch[4], &alone) < 1e-3);
    assert!(distance(&batch[1], &batch[3]) < 1e-3);
    assert!(distance(&batch[0], &batch[1]) > 1e-2, "different inputs embed alike");
    assert_eq!(model.stats().embedded_tokens.load(Ordering::Relaxed) as usize, 3 * a.len() + 2 * b.len() + a.len());

    let too_long = prompt(&model, 9, 65);
    assert!(matches!(
        model.embed(vec![too_long]).await,
        Err(EngineError::EmbeddingInputTooLong { index: 0, tokens: 65, limit: 64 })
    ));
    assert!(matches!(model.embed(vec![a.clone(), vec![]]).await, Err(EngineError::InvalidArgument(_))));
    assert!(matches!(model.embed(vec![vec![-1]]).await, Err(EngineError::InvalidToken { .. })));
    // Generation shares the decode thread and is unaffected.
    let mut seq = model.open().await.unwrap();
    assert!(matches!(seq.feed(&a, Want::top(1)).await, Ok(Output::TopK { .. })));
}

/// GPU and memory settings of a manifest, as far as a CPU node can check them: a q8_0 KV
/// cache decodes, a quantized cache without flash attention and a bad tensor_split are
/// refused at validation, an
/// unknown device is refused at load naming the devices this node has, and the devices
/// are listed with their memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_cache_type_flash_attention_and_devices_from_the_manifest() {
    // The tiny model's 16-wide heads cannot be cut in q8_0's 32-wide blocks: a clear error.
    let mut q8 = tiny_manifest("tiny-q8");
    q8.kv_cache_type = flywheel::engine::KvCacheKind::Q8_0;
    let e = Engine::load(vec![q8], Arc::new(NoObserver)).err().expect("refused").to_string();
    assert!(e.contains("kv_cache_type q8_0"), "{e}");
    // SmolLM2's 64-wide heads can: it decodes, and its greedy answer starts as with f16.
    let Some(mut smollm2) = default_model_manifest() else {
        panic!("the default model is missing: run python3 models/fetch.py smollm2 (scripts/test.sh does)");
    };
    smollm2.max_sequences = 2;
    smollm2.context_length = 256;
    smollm2.batch_size = 256;
    let f16 = load(smollm2.clone());
    smollm2.name = "smollm2-q8".into();
    smollm2.kv_cache_type = flywheel::engine::KvCacheKind::Q8_0;
    let q8 = load(smollm2);
    let p = f16.tokenize("The capital of France is", true, false).unwrap();
    let (mut a, mut b) = (f16.open().await.unwrap(), q8.open().await.unwrap());
    let (a, b) = (greedy(&mut a, &p, 8).await, greedy(&mut b, &p, 8).await);
    assert_eq!(b.len(), 8, "a q8_0 KV cache decodes");
    assert_eq!(a[..3], b[..3], "q8_0 keeps the first greedy tokens: {a:?} vs {b:?}");

    let dir = scratch_dir("gpu-settings");
    let path = dir.join("m.toml");
    let file = tiny_model_path();
    std::fs::write(
        &path,
        format!("name = \"m\"\nfile = \"{}\"\nkv_cache_type = \"q8_0\"\nflash_attention = \"off\"\n", file.display()),
    )
    .unwrap();
    let e = ModelManifest::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("flash attention"), "{e}");
    std::fs::write(&path, format!("name = \"m\"\nfile = \"{}\"\nsplit_mode = \"diagonal\"\n", file.display())).unwrap();
    assert!(ModelManifest::from_file(&path).unwrap_err().to_string().contains("split_mode"));
    for (split, refusal) in [
        ("tensor_split = [1, -1]", "0 or more"),
        ("tensor_split = [1, nan]", "finite"),
        ("tensor_split = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]", "at most 16"),
        ("tensor_split = [3, 1]\nsplit_mode = \"none\"", "main_gpu"),
    ] {
        std::fs::write(&path, format!("name = \"m\"\nfile = \"{}\"\n{split}\n", file.display())).unwrap();
        let e = ModelManifest::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("tensor_split") && e.contains(refusal), "{split}: {e}");
    }
    std::fs::write(&path, format!("name = \"m\"\nfile = \"{}\"\ntensor_split = [3, 1]\n", file.display())).unwrap();
    assert_eq!(ModelManifest::from_file(&path).unwrap().tensor_split, [3.0, 1.0]);

    let mut elsewhere = tiny_manifest("tiny-elsewhere");
    elsewhere.devices = vec!["CUDA7".into()];
    let e = Engine::load(vec![elsewhere], Arc::new(NoObserver)).err().expect("no such device").to_string();
    assert!(e.contains("no device named \"CUDA7\"") && e.contains("CPU"), "{e}");

    let devices = flywheel::engine::devices();
    let cpu = devices.iter().find(|d| d.kind == "cpu").expect("the CPU is a device");
    assert!(cpu.memory_total_bytes > 0 && cpu.memory_free_bytes <= cpu.memory_total_bytes, "{cpu:?}");
}

/// `kv_memory_fraction` sizes the sequences to the memory free once the weights are in:
/// the count follows the share given (within a node whose free memory moves by less than
/// a fifth during the test), the manifest's `max_sequences` caps it, a share too small for
/// one sequence is refused at load saying what one needs, and bad shares are refused at
/// validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_memory_fraction_sizes_the_sequences_to_free_memory() {
    let mut capped = tiny_manifest("tiny-fit-capped");
    capped.max_sequences = 3;
    capped.kv_memory_fraction = Some(1.0);
    let model = load(capped);
    assert_eq!(model.info().max_sequences, 3, "plenty of memory: the cap");
    let per_sequence = model.info().kv_bytes_per_sequence;
    assert!(per_sequence > 0);
    let info = model.info();
    assert_eq!((info.kv_bytes_cpu, info.kv_bytes_gpu), (3 * per_sequence, 0), "three sequences' cells, all on the CPU");
    let held: Vec<_> = [model.open_now().await, model.open_now().await, model.open_now().await].into_iter().collect();
    assert!(held.iter().all(Result::is_ok));
    assert!(model.open_now().await.is_err(), "a fourth sequence must not open");

    let free = flywheel::engine::devices().iter().filter(|d| d.kind == "cpu").map(|d| d.memory_free_bytes).sum::<u64>();
    let mut two = tiny_manifest("tiny-fit-two");
    two.kv_memory_fraction = Some(2.5 * per_sequence as f64 / free as f64);
    let model = load(two);
    assert_eq!(model.info().max_sequences, 2, "2.5 sequences' worth of memory opens 2");

    let mut none = tiny_manifest("tiny-fit-none");
    none.kv_memory_fraction = Some(0.5 * per_sequence as f64 / free as f64);
    let e = Engine::load(vec![none], Arc::new(NoObserver)).err().expect("not one sequence fits").to_string();
    assert!(e.contains("one sequence of 256 tokens needs") && e.contains("kv_memory_fraction"), "{e}");

    for bad in [0.0, 1.5, f64::NAN] {
        let mut m = tiny_manifest("tiny-fit-bad");
        m.kv_memory_fraction = Some(bad);
        assert!(m.validate().unwrap_err().contains("kv_memory_fraction"), "{bad}");
    }
    let mut both = tiny_manifest("tiny-fit-both");
    both.kv_memory_fraction = Some(0.5);
    both.kv_cells = Some(both.context_length);
    assert!(both.validate().unwrap_err().contains("not both"));
}

/// `flywheel models synth` writes these for machines real weights cannot reach: every
/// weight type loads, padded vocabularies keep their size, and the same seed gives the same
/// greedy text (f16 and q8_0 round the f32 weights, so their text may differ from f32's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_models_of_every_weight_type_load_and_generate() {
    use flywheel::synthetic::{Shape, SyntheticModel, WeightType};
    let dir = scratch_dir("synthetic");
    let shape = Shape { n_vocab: 1000, ..Shape::tiny() };
    for weights in [WeightType::F32, WeightType::F16, WeightType::Q8_0] {
        let synth = SyntheticModel { shape, weights, ..Default::default() };
        let path = dir.join(format!("{weights:?}.gguf"));
        synth.write_to(&path).unwrap();
        let mut runs = Vec::new();
        for run in 0..2 {
            let mut manifest = tiny_manifest(&format!("synth-{weights:?}-{run}"));
            manifest.file = path.clone();
            let model = load(manifest);
            assert_eq!(model.info().vocab_size, 1000, "{weights:?}");
            let prompt = prompt(&model, 7, 24);
            let mut seq = model.open().await.unwrap();
            runs.push(greedy(&mut seq, &prompt, 12).await);
        }
        assert_eq!(runs[0], runs[1], "{weights:?}: the same file gives the same greedy tokens");
        let size = std::fs::metadata(&path).unwrap().len();
        let f32_size = dir.join("F32.gguf").metadata().unwrap().len();
        if weights != WeightType::F32 {
            assert!(size < f32_size, "{weights:?} weights are smaller than f32's ({size} vs {f32_size})");
        }
    }
    // A shape that cannot be stored is refused, not written.
    let odd =
        SyntheticModel { shape: Shape { n_ff: 100, ..Shape::tiny() }, weights: WeightType::Q8_0, ..Default::default() };
    assert!(odd.write_to(&dir.join("odd.gguf")).is_err());
}
