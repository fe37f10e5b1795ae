//! KV layouts under pressure, on the generated tiny model: every prefix-sharing path in both
//! layouts gives the answers of a cold run and never takes the process down, closed
//! sequences' cells stay in their slot until it is needed, and a shared pool that runs out
//! preempts sequences instead of failing them.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use flywheel::engine::{EngineError, Model, ModelManifest, Output, Want};
use support::*;

/// The same model with no reuse of any kind: the reference answers.
fn cold(name: &str, context_length: usize) -> Arc<Model> {
    let mut m = tiny_manifest(name);
    m.context_length = context_length;
    m.prefix_cache_mb = 0;
    m.min_shared_prefix = usize::MAX;
    load(m)
}

async fn cold_answer(model: &Arc<Model>, prompt: &[i32], n: usize) -> Vec<i32> {
    let mut seq = model.open().await.unwrap();
    greedy(&mut seq, prompt, n).await
}

/// `got` is what a cold run gives, or differs from it only where the cold run's top two
/// logits are nearly tied. Batches of different shapes sum in different orders (a shared
/// pool's attention spans every sequence's cells), so the low bits of logits move and a
/// near tie may flip; a wrong prefix or position moves them by whole units.
async fn assert_matches_cold(reference: &Arc<Model>, prompt: &[i32], got: &[i32], want: &[i32], what: &str) {
    if got == want {
        return;
    }
    let mut seq = reference.open().await.unwrap();
    let mut row = logits(seq.feed(prompt, Want::Logits).await.unwrap());
    for (i, &t) in got.iter().enumerate() {
        let max = row.iter().copied().fold(f32::MIN, f32::max);
        let min = row.iter().copied().fold(f32::MAX, f32::min);
        let tolerance = 0.005 * (max - min);
        assert!(
            row[t as usize] >= max - tolerance,
            "{what}: token {i} is {t} (logit {}), the cold run's best is {max} (tolerance {tolerance})\n got {got:?}\nwant {want:?}",
            row[t as usize]
        );
        if i + 1 < got.len() {
            row = logits(seq.feed(&[t], Want::Logits).await.unwrap());
        }
    }
}

fn logits(out: Output) -> Vec<f32> {
    match out {
        Output::Logits(row) => row,
        Output::TopK { .. } => panic!("asked for logits"),
    }
}

fn with_prefix(prefix: &[i32], tail: Vec<i32>) -> Vec<i32> {
    let mut p = prefix.to_vec();
    p.extend(&tail[1..]);
    p
}

/// Every way a prompt can take over cells another sequence computed, at the slot limit,
/// in the layout `m` selects.
async fn every_sharing_path(m: ModelManifest) {
    let context = m.context_length;
    let slots = m.max_sequences;
    let reference = cold(&format!("{}-cold", m.name), context);
    let model = load(m);
    let base = prompt(&model, 1, 64);

    // Live prefix: `a` is still open while `b` starts with its first 48 tokens.
    let pb = with_prefix(&base[..48], prompt(&model, 2, 20));
    let mut a = model.open().await.unwrap();
    let got = greedy(&mut a, &base, 8).await;
    assert_matches_cold(&reference, &base, &got, &cold_answer(&reference, &base, 8).await, "first prompt").await;
    let reused = model.stats().reused_tokens.load(Ordering::Relaxed);
    let mut b = model.open().await.unwrap();
    let got = greedy(&mut b, &pb, 8).await;
    assert_matches_cold(&reference, &pb, &got, &cold_answer(&reference, &pb, 8).await, "live prefix").await;
    assert!(model.stats().reused_tokens.load(Ordering::Relaxed) >= reused + 48, "the live prefix was not reused");

    // Cached prefix: both closed, a third prompt extends `a`'s whole history.
    drop(a);
    drop(b);
    let pc = with_prefix(&base, prompt(&model, 3, 12));
    let got = cold_answer(&model, &pc, 8).await;
    assert_matches_cold(&reference, &pc, &got, &cold_answer(&reference, &pc, 8).await, "cached prefix").await;

    // Same-step sharing: every slot at once, each prompt the same 40 tokens then its own.
    let shared = prompt(&model, 4, 40);
    let prompts: Vec<Vec<i32>> = (0..slots).map(|i| with_prefix(&shared, prompt(&model, 10 + i, 9))).collect();
    let mut expected = Vec::new();
    for p in &prompts {
        expected.push(cold_answer(&reference, p, 6).await);
    }
    let mut seqs = Vec::new();
    for _ in 0..slots {
        seqs.push(model.open().await.unwrap());
    }
    let tasks: Vec<_> = seqs
        .into_iter()
        .zip(prompts.clone())
        .map(|(mut s, p)| tokio::spawn(async move { (greedy(&mut s, &p, 6).await, s) }))
        .collect();
    let mut open = Vec::new();
    for ((t, want), p) in tasks.into_iter().zip(&expected).zip(&prompts) {
        let (got, seq) = t.await.unwrap();
        assert_matches_cold(&reference, p, &got, want, "same-step sharing").await;
        open.push(seq);
    }

    // Interleaved closes and opens at the slot limit: ids with gaps, prefixes from the
    // survivors and from the sequences just closed.
    for round in 0..3 {
        let closing: Vec<_> = (0..open.len()).filter(|i| (i + round) % 2 == 0).collect();
        for &i in closing.iter().rev() {
            drop(open.swap_remove(i));
        }
        let mut tasks = Vec::new();
        for (k, earlier) in prompts.iter().enumerate().take(closing.len()) {
            let p = if k % 2 == 0 {
                with_prefix(earlier, prompt(&model, 100 + round * 10 + k, 7))
            } else {
                prompt(&model, 200 + round * 10 + k, 30)
            };
            let want = cold_answer(&reference, &p, 5).await;
            let model = model.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = model.open().await.unwrap();
                (greedy(&mut s, &p, 5).await, want, p, s)
            }));
        }
        for t in tasks {
            let (got, want, p, seq) = t.await.unwrap();
            assert_matches_cold(&reference, &p, &got, &want, &format!("interleaved round {round}")).await;
            open.push(seq);
        }
    }
    drop(open);

    // A prompt sharing a long prefix but longer than a sequence's context is refused, and
    // one that fills the context exactly is served.
    let long = prompt(&model, 5, context - 4);
    let mut holder = model.open().await.unwrap();
    greedy(&mut holder, &long, 2).await;
    let mut too_long = long.clone();
    too_long.extend(prompt(&model, 6, 6)[1..].iter().copied());
    let mut s = model.open().await.unwrap();
    let err = s.feed(&too_long, greedy_want()).await.unwrap_err();
    assert!(matches!(err, EngineError::ContextFull { .. }), "{err}");
    let mut exact = long.clone();
    exact.extend(prompt(&model, 7, 5)[1..].iter().copied());
    assert_eq!(exact.len(), context);
    let mut s = model.open().await.unwrap();
    let got = top1(&s.feed(&exact, greedy_want()).await.unwrap());
    let want = cold_answer(&reference, &exact, 1).await;
    assert_matches_cold(&reference, &exact, &[got], &want, "prefix up to the context limit").await;
    drop(s);
    drop(holder);

    // Still serving, and nothing is left behind.
    let got = cold_answer(&model, &base, 4).await;
    assert_matches_cold(&reference, &base, &got, &cold_answer(&reference, &base, 4).await, "after it all").await;
    let _probe = model.open().await.unwrap();
    assert_eq!(model.stats().kv_tokens.load(Ordering::Relaxed), 0, "KV tokens leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prefix_path_matches_a_cold_run_with_a_stream_per_sequence() {
    every_sharing_path(tiny_manifest("tiny-streams")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prefix_path_matches_a_cold_run_in_a_shared_pool() {
    let mut m = tiny_manifest("tiny-pool");
    m.kv_cells = Some(m.context_length * m.max_sequences / 2);
    every_sharing_path(m).await;
}

/// Reads the retained-token gauge once every command sent before has been handled.
async fn retained_tokens(model: &Arc<Model>) -> usize {
    let _probe = model.open().await.unwrap();
    model.stats().retained_tokens.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sequences_keep_their_cells_in_their_slot_until_it_is_needed() {
    // No host cache: whatever is reused after a close comes from cells left in a slot.
    let mut m = tiny_manifest("tiny-retain");
    m.max_sequences = 2;
    m.prefix_cache_mb = 0;
    let reference = cold("tiny-retain-cold", m.context_length);
    let model = load(m);
    let reused = || model.stats().reused_tokens.load(Ordering::Relaxed);
    let base = prompt(&model, 1, 48);

    let got = cold_answer(&model, &base, 8).await;
    assert_matches_cold(&reference, &base, &got, &cold_answer(&reference, &base, 8).await, "first prompt").await;
    assert!(retained_tokens(&model).await >= 48, "the closed sequence's cells were not kept");

    // The next open takes the other, free slot, but its prompt continues the closed one's:
    // it moves to that slot and goes on from its cells.
    let pb = with_prefix(&base, prompt(&model, 2, 10));
    let before = reused();
    let got = cold_answer(&model, &pb, 8).await;
    assert_matches_cold(&reference, &pb, &got, &cold_answer(&reference, &pb, 8).await, "copied from a slot").await;
    assert!(reused() >= before + 48, "the retained prefix was not reused");
    assert!(retained_tokens(&model).await >= pb.len(), "the sequence did not stay in the slot it moved to");

    // An unrelated prompt (in the free slot) must not see any of those cells.
    let other = prompt(&model, 3, 30);
    let got = cold_answer(&model, &other, 8).await;
    assert_matches_cold(&reference, &other, &got, &cold_answer(&reference, &other, 8).await, "repurposed slot").await;

    // The next open takes the oldest slot, holding `pb`'s sequence, and continues it in place.
    let pd = with_prefix(&pb, prompt(&model, 4, 6));
    let before = reused();
    let got = cold_answer(&model, &pd, 8).await;
    assert_matches_cold(&reference, &pd, &got, &cold_answer(&reference, &pd, 8).await, "kept in place").await;
    assert!(reused() >= before + pb.len() as u64, "the slot's own cells were not continued");

    // Sequences opened and closed without a prompt (in the oldest slot, which holds
    // `other`) leave the slot's cells as they were.
    drop(model.open().await.unwrap());
    drop(model.open().await.unwrap());
    let before = reused();
    let pe = with_prefix(&other, prompt(&model, 5, 4));
    let got = cold_answer(&model, &pe, 4).await;
    assert_matches_cold(&reference, &pe, &got, &cold_answer(&reference, &pe, 4).await, "after empty opens").await;
    assert!(reused() >= before + other.len() as u64, "an empty open dropped the retained cells");
    let _probe = model.open().await.unwrap();
    assert_eq!(model.stats().kv_tokens.load(Ordering::Relaxed), 0, "KV tokens leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_opened_in_each_others_slots_exchange_cells() {
    // No host cache: both closed sequences must survive in KV cells.
    let mut m = tiny_manifest("tiny-exchange");
    m.max_sequences = 2;
    m.prefix_cache_mb = 0;
    m.prefix_cache_min_tokens = 32;
    let reference = cold("tiny-exchange-cold", m.context_length);
    let model = load(m);
    let (pa, pb) = (prompt(&model, 1, 40), prompt(&model, 2, 40));
    cold_answer(&model, &pa, 4).await; // slot 0
    cold_answer(&model, &pb, 4).await; // slot 1
                                       // Both open before either prompt arrives: the first takes the oldest slot, `pa`'s, and
                                       // continues `pb`; the second gets `pb`'s slot and continues `pa`. Neither can move to
                                       // the slot it wants (the other holds it), so they exchange cells.
    let continuing = [with_prefix(&pb, prompt(&model, 3, 6)), with_prefix(&pa, prompt(&model, 4, 6))];
    let mut seqs = vec![model.open().await.unwrap(), model.open().await.unwrap()];
    let before = model.stats().reused_tokens.load(Ordering::Relaxed);
    let tasks: Vec<_> = seqs
        .drain(..)
        .zip(continuing.clone())
        .map(|(mut s, p)| tokio::spawn(async move { greedy(&mut s, &p, 6).await }))
        .collect();
    for (t, p) in tasks.into_iter().zip(&continuing) {
        let got = t.await.unwrap();
        assert_matches_cold(&reference, p, &got, &cold_answer(&reference, p, 6).await, "exchanged").await;
    }
    let reused = model.stats().reused_tokens.load(Ordering::Relaxed) - before;
    assert!(reused >= 80, "{reused} tokens reused: a sequence's cells were lost in the exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_conversations_at_the_slot_limit_match_cold_runs() {
    // Every turn resends the history (minus a few tokens at its end, as a re-tokenized
    // answer may differ) plus a new question, all conversations at once, so turns open in
    // each other's slots, exchange cells, continue in place and go through host memory.
    let mut m = tiny_manifest("tiny-turns");
    m.max_sequences = 4;
    m.prefix_cache_min_tokens = 16;
    m.prefix_cache_mb = 1;
    let reference = cold("tiny-turns-cold", m.context_length);
    let model = load(m);
    let conversations = 6;
    let mut histories: Vec<Vec<i32>> = (0..conversations).map(|c| prompt(&model, 100 + c, 20)).collect();
    for turn in 0..4 {
        let tasks: Vec<_> = histories
            .iter()
            .enumerate()
            .map(|(c, h)| {
                let mut p = h[..h.len() - (c + turn) % 3].to_vec();
                p.extend(&prompt(&model, 1000 + 10 * c + turn, 8)[1..]);
                let model = model.clone();
                tokio::spawn(async move {
                    let mut seq = model.open().await.unwrap();
                    let out = greedy(&mut seq, &p, 10).await;
                    (p, out)
                })
            })
            .collect();
        for (c, t) in tasks.into_iter().enumerate() {
            let (p, got) = t.await.unwrap();
            let want = cold_answer(&reference, &p, 10).await;
            assert_matches_cold(&reference, &p, &got, &want, &format!("conversation {c} turn {turn}")).await;
            histories[c] = p.iter().chain(&got[..got.len() - 1]).copied().collect();
        }
    }
    let _probe = model.open().await.unwrap();
    assert_eq!(model.stats().kv_tokens.load(Ordering::Relaxed), 0, "KV tokens leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repurposed_slot_moves_its_cells_to_the_host_cache() {
    let mut m = tiny_manifest("tiny-repurpose");
    m.max_sequences = 1;
    m.prefix_cache_mb = 16;
    m.prefix_cache_min_tokens = 16;
    let reference = cold("tiny-repurpose-cold", m.context_length);
    let model = load(m);
    let first = prompt(&model, 1, 48);
    cold_answer(&model, &first, 4).await;
    let probe = model.open().await.unwrap();
    assert_eq!(model.stats().cached_prefixes.load(Ordering::Relaxed), 0, "a close copied cells out");
    drop(probe);
    // The only slot is needed for an unrelated prompt: the first sequence goes to host memory.
    cold_answer(&model, &prompt(&model, 2, 40), 4).await;
    let _probe = model.open().await.unwrap();
    assert_eq!(model.stats().cached_prefixes.load(Ordering::Relaxed), 1);
    drop(_probe);
    // And comes back from there for a prompt that continues it.
    let again = with_prefix(&first, prompt(&model, 3, 8));
    let before = model.stats().reused_tokens.load(Ordering::Relaxed);
    let got = cold_answer(&model, &again, 8).await;
    assert_matches_cold(&reference, &again, &got, &cold_answer(&reference, &again, 8).await, "from host memory").await;
    assert!(model.stats().reused_tokens.load(Ordering::Relaxed) >= before + 48, "the cached state was not restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_runs_out_preempts_and_every_request_completes() {
    let mut m = tiny_manifest("tiny-preempt");
    m.max_sequences = 4;
    m.context_length = 160;
    // Room for a bit more than one and a half full sequences: four growing ones must take turns.
    m.kv_cells = Some(256);
    let reference = cold("tiny-preempt-cold", 160);
    let model = load(m);
    let prompts: Vec<Vec<i32>> = (0..4).map(|i| prompt(&model, 300 + i, 24)).collect();
    let mut expected = Vec::new();
    for p in &prompts {
        expected.push(cold_answer(&reference, p, 120).await);
    }
    for round in 0..2 {
        let tasks: Vec<_> = prompts
            .iter()
            .cloned()
            .map(|p| {
                let model = model.clone();
                tokio::spawn(async move {
                    let mut s = model.open().await.unwrap();
                    greedy(&mut s, &p, 120).await
                })
            })
            .collect();
        for ((t, want), p) in tasks.into_iter().zip(&expected).zip(&prompts) {
            let got = t.await.unwrap();
            assert_matches_cold(&reference, p, &got, want, &format!("round {round}: a preempted sequence")).await;
        }
    }
    assert!(model.stats().preemptions.load(Ordering::Relaxed) > 0, "the pool never ran out: the test proves nothing");
    let _probe = model.open().await.unwrap();
    assert_eq!(model.stats().kv_tokens.load(Ordering::Relaxed), 0);
}

#[test]
fn kv_cells_outside_one_context_and_the_full_size_are_refused() {
    let mut m = tiny_manifest("tiny-cells");
    m.kv_cells = Some(m.context_length - 1);
    assert!(m.validate().unwrap_err().contains("kv_cells"));
    m.kv_cells = Some(m.context_length * m.max_sequences + 1);
    assert!(m.validate().unwrap_err().contains("kv_cells"));
    m.kv_cells = Some(m.context_length);
    assert!(m.validate().is_ok());
}
