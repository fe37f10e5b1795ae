//! The batch scheduler of one model; the decode thread (`decode_thread.rs`) runs it.
//!
//! Callers talk to it over a channel. Each step packs every ready sequence's tokens into
//! one llama.cpp batch (one decode token per generating sequence first, then prompt
//! chunks up to the batch budget), runs it, and answers each sequence whose input is
//! complete from its own logits row. Sequences join and leave between steps.
//!
//! Prefix reuse: a fresh prompt that starts with tokens already computed for a live
//! sequence gets those KV cells by `seq_cp` (metadata only with a unified KV cache); one
//! that starts like a recently closed sequence gets that sequence's KV state copied back
//! from a host-memory cache; fresh prompts arriving in the same step that share a prefix
//! compute it once, as batch entries tagged with several sequence ids.
//!
//! Closed sequences are kept in host memory rather than in KV cells because, with a
//! unified cache, every occupied cell widens the attention window of every other
//! sequence: 800 idle cells slowed single-stream decoding of SmolLM2 by ~15%.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{DecodeError, LlamaStateSeqFlags, SeqState};
use tokio::sync::oneshot;

use super::model::EngineStats;
use super::{topk, EngineError, ModelManifest, Output, StepInfo, StepObserver, Want};

/// What a model's callers ask of its scheduler.
pub(crate) enum Command {
    Open { reply: oneshot::Sender<Result<i32, EngineError>> },
    Feed { seq: i32, tokens: Vec<i32>, want: Want, reply: oneshot::Sender<Result<Output, EngineError>> },
    Close { seq: i32 },
}

/// Context settings shared by the scheduler and the native baseline of `bench engine`.
pub fn context_params(m: &ModelManifest) -> LlamaContextParams {
    let n_ctx = u32::try_from(m.kv_cells()).unwrap_or(u32::MAX);
    let n_batch = u32::try_from(m.batch_size).unwrap_or(u32::MAX);
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(seq_slots(m) as u32)
        // One pool of cells for all sequences: shared prefixes cost nothing and any
        // sequence may grow to context_length.
        .with_kv_unified(true)
        .with_n_threads(m.threads)
        .with_n_threads_batch(m.threads)
        .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED)
}

/// One sequence id per open sequence.
pub(crate) fn seq_slots(m: &ModelManifest) -> usize {
    m.max_sequences
}

struct Feed {
    want: Want,
    reply: oneshot::Sender<Result<Output, EngineError>>,
}

struct Live {
    /// Tokens whose KV cells exist, at positions 0..len.
    history: Vec<i32>,
    /// Tokens of the current feed not yet computed.
    pending: Vec<i32>,
    feed: Option<Feed>,
    /// When this sequence's last feed was answered, until its next command arrives.
    answered_at: Option<Instant>,
    /// The current feed has not yet looked for a reusable prefix.
    fresh: bool,
    /// History length when the current feed was accepted: a failed feed rolls back to it.
    feed_start: usize,
    /// The current feed is one generated token (a decode), not a prompt or its last chunk.
    decoding: bool,
}

enum Slot {
    Free,
    Live(Live),
}

/// A closed sequence's tokens and KV state, kept in host memory for prefix reuse.
struct CachedPrefix {
    tokens: Vec<i32>,
    state: SeqState,
    last_used: u64,
}

/// Where a reusable prefix comes from.
enum PrefixSource {
    Live(i32),
    Cached(usize),
}

/// One batch entry: a token at a position, computed for one or more sequences.
struct Entry {
    token: i32,
    pos: i32,
    seqs: Vec<i32>,
    logits: bool,
}

/// What one sequence gets from a step.
struct Planned {
    seq: i32,
    /// Leading pending tokens computed by another sequence's entries in this step.
    shared: usize,
    /// Own pending tokens in this step.
    own: usize,
    /// Batch index of the row that answers the feed, when the feed completes in this step.
    answer_row: Option<usize>,
    prefill: bool,
}

pub(crate) struct Scheduler<'m> {
    name: String,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    n_vocab: usize,
    n_batch: usize,
    context_length: usize,
    cache: Vec<CachedPrefix>,
    cache_budget: usize,
    cache_min_tokens: usize,
    min_shared_prefix: usize,
    max_batch_wait: Duration,
    slots: Vec<Slot>,
    /// Sequences with work, in arrival order (fairness for prompt chunks).
    queue: VecDeque<i32>,
    stats: Arc<EngineStats>,
    observer: Arc<dyn StepObserver>,
    clock: u64,
    last_step_end: Instant,
    last_step_time: Duration,
}

impl<'m> Scheduler<'m> {
    pub(crate) fn new(
        m: &ModelManifest,
        ctx: LlamaContext<'m>,
        n_vocab: usize,
        stats: Arc<EngineStats>,
        observer: Arc<dyn StepObserver>,
    ) -> Self {
        let slots = seq_slots(m);
        let n_batch = (ctx.n_batch() as usize).min(m.batch_size);
        Self {
            name: m.name.clone(),
            ctx,
            // Each token may belong to every sequence (a prefix shared by all).
            batch: LlamaBatch::new(n_batch, slots as i32),
            n_vocab,
            n_batch,
            context_length: m.context_length,
            cache: Vec::new(),
            cache_budget: m.prefix_cache_mb.saturating_mul(1 << 20),
            cache_min_tokens: m.prefix_cache_min_tokens.max(m.min_shared_prefix).max(1),
            min_shared_prefix: m.min_shared_prefix.max(1),
            max_batch_wait: Duration::from_micros(m.max_batch_wait_us),
            slots: (0..slots).map(|_| Slot::Free).collect(),
            queue: VecDeque::new(),
            stats,
            observer,
            clock: 0,
            last_step_end: Instant::now(),
            last_step_time: Duration::ZERO,
        }
    }

    /// Whether a sequence waits for a step.
    pub(crate) fn has_work(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Until when to wait for sequences answered by the last step to submit their next
    /// token, so they decode in the next step instead of forming a second, smaller batch.
    /// Bounded by half the last step time (and the manifest's maximum).
    pub(crate) fn wait_deadline(&self) -> Instant {
        let floor = Duration::from_micros(50).min(self.max_batch_wait);
        let budget = (self.last_step_time / 2).clamp(floor, self.max_batch_wait);
        self.last_step_end + budget
    }

    /// Whether a sequence answered by the last step has not come back yet.
    pub(crate) fn awaiting_any(&self) -> bool {
        self.slots.iter().any(|s| match s {
            Slot::Live(l) => l.answered_at.is_some_and(|t| t >= self.last_step_end - self.last_step_time),
            _ => false,
        })
    }

    pub(crate) fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Open { reply } => {
                let r = self.open();
                // The caller gave up (its future was dropped): nobody will close this slot.
                if let Err(Ok(seq)) = reply.send(r) {
                    self.slots[seq as usize] = Slot::Free;
                }
            }
            Command::Feed { seq, tokens, want, reply } => {
                if let Err(e) = self.accept_feed(seq, tokens, want, reply) {
                    tracing::debug!(model = %self.name, seq, error = %e, "feed refused");
                }
            }
            Command::Close { seq } => self.close(seq),
        }
    }

    fn open(&mut self) -> Result<i32, EngineError> {
        // Admission control keeps open sequences within the slots (and an open whose caller
        // is gone frees its slot at once), so one is free.
        let free = self
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Free))
            .ok_or_else(|| EngineError::KvCacheFull { model: self.name.clone() })?;
        self.slots[free] = Slot::Live(Live {
            history: Vec::new(),
            pending: Vec::new(),
            feed: None,
            answered_at: None,
            fresh: true,
            feed_start: 0,
            decoding: false,
        });
        Ok(free as i32)
    }

    fn accept_feed(
        &mut self,
        seq: i32,
        tokens: Vec<i32>,
        want: Want,
        reply: oneshot::Sender<Result<Output, EngineError>>,
    ) -> Result<(), EngineError> {
        let limit = self.context_length;
        let n_vocab = self.n_vocab;
        let live = match self.slots.get_mut(seq as usize) {
            Some(Slot::Live(l)) => l,
            _ => {
                let e = EngineError::InvalidArgument(format!("sequence {seq} is not open"));
                let _ = reply.send(Err(EngineError::InvalidArgument(e.to_string())));
                return Err(e);
            }
        };
        live.answered_at = None;
        let check = if live.feed.is_some() {
            Err(EngineError::InvalidArgument("a feed is already in progress".into()))
        } else if tokens.is_empty() {
            Err(EngineError::InvalidArgument("no tokens to feed".into()))
        } else if let Some(&token) = tokens.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            // Also checked by the caller: an out-of-range id would abort the process in llama.cpp.
            Err(EngineError::InvalidToken { token, vocab: n_vocab })
        } else if live.history.len() + tokens.len() > limit {
            Err(EngineError::ContextFull { requested: live.history.len() + tokens.len(), limit })
        } else {
            Ok(())
        };
        if let Err(e) = check {
            let msg = e.to_string();
            let _ = reply.send(Err(e));
            return Err(EngineError::InvalidArgument(msg));
        }
        live.fresh = live.history.is_empty();
        live.feed_start = live.history.len();
        live.decoding = tokens.len() == 1 && !live.history.is_empty();
        live.pending = tokens;
        live.feed = Some(Feed { want, reply });
        self.queue.push_back(seq);
        Ok(())
    }

    fn close(&mut self, seq: i32) {
        let Some(slot) = self.slots.get_mut(seq as usize) else { return };
        let Slot::Live(live) = std::mem::replace(slot, Slot::Free) else { return };
        self.queue.retain(|&s| s != seq);
        self.stats.kv_tokens.fetch_sub(live.history.len(), Ordering::Relaxed);
        if self.cache_budget > 0 && live.history.len() >= self.cache_min_tokens {
            self.cache_state(seq, live.history);
        }
        self.remove_cells(seq);
    }

    /// Copy a closing sequence's KV state to the host-memory cache, unless a cached entry
    /// already covers it.
    fn cache_state(&mut self, seq: i32, tokens: Vec<i32>) {
        if let Some(c) = self.cache.iter_mut().find(|c| c.tokens.len() >= tokens.len() && c.tokens.starts_with(&tokens))
        {
            self.clock += 1;
            c.last_used = self.clock;
            return;
        }
        let state = match self.ctx.state_seq_get(seq, LlamaStateSeqFlags::empty()) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(model = %self.name, seq, error = %e, "cannot cache sequence state");
                return;
            }
        };
        if state.byte_len() > self.cache_budget {
            return;
        }
        // Entries this one extends are now redundant.
        self.cache.retain(|c| !tokens.starts_with(&c.tokens));
        self.clock += 1;
        self.cache.push(CachedPrefix { tokens, state, last_used: self.clock });
        while self.cache_bytes() > self.cache_budget {
            let oldest = self.cache.iter().enumerate().min_by_key(|(_, c)| c.last_used).map(|(i, _)| i);
            match oldest {
                Some(i) => drop(self.cache.swap_remove(i)),
                None => break,
            }
        }
        self.stats.cached_bytes.store(self.cache_bytes(), Ordering::Relaxed);
        self.stats.cached_prefixes.store(self.cache.len(), Ordering::Relaxed);
    }

    fn cache_bytes(&self) -> usize {
        self.cache.iter().map(|c| c.state.byte_len()).sum()
    }

    fn remove_cells(&mut self, seq: i32) {
        if let Err(e) = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None) {
            tracing::error!(model = %self.name, seq, error = %e, "failed to free KV cells");
        }
    }

    fn live(&mut self, seq: i32) -> Option<&mut Live> {
        match self.slots.get_mut(seq as usize) {
            Some(Slot::Live(l)) => Some(l),
            _ => None,
        }
    }

    /// Give a fresh prompt the longest prefix already computed: a live sequence's cells
    /// (shared by `seq_cp`) or a closed sequence's cached state (copied back). Returns the
    /// number of tokens taken over.
    fn reuse_prefix(&mut self, seq: i32) -> usize {
        let min = self.min_shared_prefix;
        let Some(live) = self.live(seq) else { return 0 };
        live.fresh = false;
        if !live.history.is_empty() || live.pending.len() < 2 {
            return 0;
        }
        // Keep at least one token to compute: its row answers the feed.
        let cap = live.pending.len() - 1;
        let prompt = std::mem::take(&mut live.pending);
        let mut best: Option<(PrefixSource, usize)> = None;
        let mut consider = |source: PrefixSource, tokens: &[i32]| {
            let n = common_prefix(tokens, &prompt).min(cap);
            if n >= min && best.as_ref().is_none_or(|(_, b)| n > *b) {
                best = Some((source, n));
            }
        };
        for (i, slot) in self.slots.iter().enumerate() {
            if let Slot::Live(l) = slot {
                if i as i32 != seq {
                    consider(PrefixSource::Live(i as i32), &l.history);
                }
            }
        }
        for (i, c) in self.cache.iter().enumerate() {
            consider(PrefixSource::Cached(i), &c.tokens);
        }
        let reused = match best {
            Some((PrefixSource::Live(src), n)) => match self.ctx.copy_kv_cache_seq(src, seq, None, Some(n as u32)) {
                Ok(()) => n,
                Err(e) => {
                    tracing::warn!(model = %self.name, seq, error = %e, "prefix copy failed; computing it");
                    0
                }
            },
            Some((PrefixSource::Cached(i), n)) => self.restore_cached(i, seq, n),
            None => 0,
        };
        if let Some(live) = self.live(seq) {
            live.history.extend_from_slice(&prompt[..reused]);
            live.pending = prompt[reused..].to_vec();
        }
        if reused > 0 {
            self.stats.reused_tokens.fetch_add(reused as u64, Ordering::Relaxed);
            self.stats.kv_tokens.fetch_add(reused, Ordering::Relaxed);
        }
        reused
    }

    /// Load cached entry `i` into `seq` and keep its first `n` tokens.
    fn restore_cached(&mut self, i: usize, seq: i32, n: usize) -> usize {
        self.clock += 1;
        let entry = &mut self.cache[i];
        entry.last_used = self.clock;
        let restored = self.ctx.state_seq_set(&entry.state, seq).map_err(|e| e.to_string()).and_then(|()| {
            self.ctx.clear_kv_cache_seq(Some(seq as u32), Some(n as u32), None).map(|_| ()).map_err(|e| e.to_string())
        });
        match restored {
            Ok(()) => n,
            Err(e) => {
                tracing::warn!(model = %self.name, seq, error = %e, "cached prefix restore failed; computing it");
                self.remove_cells(seq);
                0
            }
        }
    }

    /// Plan one batch: decode tokens first, then prompt chunks in arrival order.
    fn plan(&mut self, entries: &mut Vec<Entry>) -> Vec<Planned> {
        let mut planned = Vec::new();
        let order: Vec<i32> = self.queue.iter().copied().collect();
        // Decode tokens: one per generating sequence.
        for &seq in &order {
            let Some(live) = self.live(seq) else { continue };
            if live.decoding {
                entries.push(Entry {
                    token: live.pending[0],
                    pos: live.history.len() as i32,
                    seqs: vec![seq],
                    logits: true,
                });
                planned.push(Planned { seq, shared: 0, own: 1, answer_row: Some(entries.len() - 1), prefill: false });
            }
        }
        // Fresh prompts started in this step, for in-step sharing: (seq, first entry index, tokens).
        let mut leaders: Vec<(i32, usize, Vec<i32>)> = Vec::new();
        for &seq in &order {
            if entries.len() >= self.n_batch {
                break;
            }
            let Some(live) = self.live(seq) else { continue };
            if live.decoding {
                continue; // a decode token, already planned
            }
            if live.fresh {
                self.reuse_prefix(seq);
            }
            let Some(live) = self.live(seq) else { continue };
            let start = live.history.len();
            let pending = live.pending.clone();
            let mut shared = 0;
            if start == 0 {
                // Share the longest prefix another fresh prompt computes in this step.
                let cap = pending.len() - 1;
                let best = leaders
                    .iter()
                    .map(|(_, first, toks)| (*first, common_prefix(toks, &pending).min(cap)))
                    .max_by_key(|&(_, n)| n);
                if let Some((first, n)) = best.filter(|&(_, n)| n >= self.min_shared_prefix) {
                    for e in &mut entries[first..first + n] {
                        e.seqs.push(seq);
                    }
                    shared = n;
                }
            }
            let room = self.n_batch - entries.len();
            let own = (pending.len() - shared).min(room);
            let first = entries.len();
            for (i, &token) in pending[shared..shared + own].iter().enumerate() {
                entries.push(Entry { token, pos: (start + shared + i) as i32, seqs: vec![seq], logits: false });
            }
            let completes = shared + own == pending.len();
            if completes {
                if let Some(e) = entries.last_mut() {
                    e.logits = true;
                }
            }
            if start == 0 && shared == 0 && own > 0 {
                leaders.push((seq, first, pending[..own].to_vec()));
            }
            planned.push(Planned { seq, shared, own, answer_row: completes.then(|| entries.len() - 1), prefill: true });
        }
        planned
    }

    pub(crate) fn step(&mut self) {
        let started = Instant::now();
        let mut entries = Vec::with_capacity(self.n_batch);
        let mut planned = self.plan(&mut entries);
        if entries.is_empty() {
            // Only possible if every queued sequence vanished; drop stale queue entries.
            self.queue.retain(|&s| matches!(self.slots.get(s as usize), Some(Slot::Live(l)) if l.feed.is_some()));
            return;
        }
        let mut result = self.decode(&entries);
        // Out of KV cells: give up on the prompts in this step, then on everyone.
        if matches!(result, Err(DecodeError::NoKvCacheSlot)) {
            let prefills: Vec<i32> = planned.iter().filter(|p| p.prefill).map(|p| p.seq).collect();
            if !prefills.is_empty() && prefills.len() < planned.len() {
                for &seq in &prefills {
                    self.fail(seq, EngineError::KvCacheFull { model: self.name.clone() });
                }
                planned.retain(|p| !p.prefill);
                entries.retain(|e| !e.seqs.iter().any(|s| prefills.contains(s)));
                result = self.decode(&entries);
            }
        }
        if let Err(e) = result {
            let err = match e {
                DecodeError::NoKvCacheSlot => EngineError::KvCacheFull { model: self.name.clone() },
                other => EngineError::Decode(other.to_string()),
            };
            tracing::error!(model = %self.name, error = %err, tokens = entries.len(), "decode failed");
            for p in &planned {
                self.fail(p.seq, clone_error(&err, &self.name));
            }
            return;
        }
        self.finish(&planned, &entries);
        let now = Instant::now();
        self.last_step_time = now - started;
        self.last_step_end = now;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let decode_tokens = planned.iter().filter(|p| !p.prefill).count();
        let prefill_tokens = planned.iter().filter(|p| p.prefill).map(|p| p.own).sum();
        let info = StepInfo {
            tokens: entries.len(),
            sequences: planned.len(),
            decode_tokens,
            prefill_tokens,
            duration: self.last_step_time,
        };
        self.observer.on_step(&self.name, &info);
    }

    fn decode(&mut self, entries: &[Entry]) -> Result<(), DecodeError> {
        self.batch.clear();
        for e in entries {
            if let Err(err) = self.batch.add(LlamaToken(e.token), e.pos, &e.seqs, e.logits) {
                return Err(DecodeError::Unknown(match err {
                    llama_cpp_2::llama_batch::BatchAddError::InsufficientSpace(n) => n as i32,
                    llama_cpp_2::llama_batch::BatchAddError::EmptyBuffer => -1,
                }));
            }
        }
        let r = self.ctx.decode(&mut self.batch);
        if r.is_err() {
            // Compute errors may leave part of the batch applied: trim every touched sequence
            // back to what its history says.
            for e in entries {
                for &s in &e.seqs {
                    let keep = match self.slots.get(s as usize) {
                        Some(Slot::Live(l)) => l.history.len(),
                        _ => 0,
                    };
                    let _ = self.ctx.clear_kv_cache_seq(Some(s as u32), Some(keep as u32), None);
                }
            }
        }
        r
    }

    /// Record what the step computed and answer every completed feed.
    fn finish(&mut self, planned: &[Planned], entries: &[Entry]) {
        let now = Instant::now();
        for p in planned {
            let Some(Slot::Live(live)) = self.slots.get_mut(p.seq as usize) else {
                continue;
            };
            let advanced = p.shared + p.own;
            live.history.extend(live.pending.drain(..advanced));
            self.stats.kv_tokens.fetch_add(advanced, Ordering::Relaxed);
            if p.prefill {
                self.stats.prefill_tokens.fetch_add(p.own as u64, Ordering::Relaxed);
                self.stats.reused_tokens.fetch_add(p.shared as u64, Ordering::Relaxed);
            } else {
                self.stats.decode_tokens.fetch_add(1, Ordering::Relaxed);
            }
            let Some(row) = p.answer_row else { continue };
            let Some(feed) = live.feed.take() else {
                continue;
            };
            live.answered_at = Some(now);
            debug_assert!(entries[row].logits);
            let logits = self.ctx.get_logits_ith(row as i32);
            let out = match feed.want {
                Want::Logits => Output::Logits(logits.to_vec()),
                Want::TopK { k, allowed } => {
                    let (ids, logits) = topk::top_k(logits, k, allowed.as_deref());
                    Output::TopK { ids, logits }
                }
            };
            let _ = feed.reply.send(Ok(out));
        }
        self.queue.retain(|&s| matches!(self.slots.get(s as usize), Some(Slot::Live(l)) if l.feed.is_some()));
    }

    /// Answer a sequence's feed with an error and roll the sequence back to where the feed
    /// started (reused prefixes and computed chunks included), so a retry starts clean.
    fn fail(&mut self, seq: i32, err: EngineError) {
        let mut dropped = 0;
        let mut keep = None;
        if let Some(live) = self.live(seq) {
            live.pending.clear();
            if live.history.len() > live.feed_start {
                dropped = live.history.len() - live.feed_start;
                live.history.truncate(live.feed_start);
                keep = Some(live.feed_start);
            }
            if let Some(feed) = live.feed.take() {
                let _ = feed.reply.send(Err(err));
            }
        }
        if let Some(keep) = keep {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), Some(keep as u32), None);
            self.stats.kv_tokens.fetch_sub(dropped, Ordering::Relaxed);
        }
        self.queue.retain(|&s| s != seq);
    }
}

fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn clone_error(e: &EngineError, model: &str) -> EngineError {
    match e {
        EngineError::KvCacheFull { .. } => EngineError::KvCacheFull { model: model.to_string() },
        other => EngineError::Decode(other.to_string()),
    }
}
