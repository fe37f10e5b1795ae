//! The batch scheduler of one model; the decode thread (`decode_thread.rs`) runs it.
//!
//! Callers talk to it over a channel. Each step packs every ready sequence's tokens into
//! one llama.cpp batch (one decode token per generating sequence first, then prompt
//! chunks up to the batch budget, in arrival order), runs it, and answers each sequence
//! whose input is complete from its own logits row. Sequences join and leave between steps.
//!
//! KV layout (`kv.rs`): by default every sequence has its own stream of `context_length`
//! cells, as in llama-server, so attention only scans that sequence's cells; a manifest
//! with fewer `kv_cells` than that gets one pool shared by all sequences, which can run
//! out: then the newest sequence is preempted (its state goes to host memory, and it is
//! restored or recomputed when there is room again).
//!
//! Prefix reuse: a closed sequence's cells stay in its stream (`slots.rs`) until the slot
//! is needed again, and only then go to a host-memory cache, when worth keeping. A fresh
//! prompt that starts with tokens some slot holds continues from them: in place when its
//! own slot holds them, otherwise from a copy; one that starts like a sequence in the host
//! cache gets that state copied back; a fresh prompt sharing a prefix with a prompt being
//! computed in this step waits for it, then copies.
//! Batch entries always belong to one sequence and are sorted by sequence, so llama.cpp
//! never splits a step further than it must and no copy takes a path that asserts.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use tokio::sync::oneshot;

use super::kv::Layout;
use super::model::EngineStats;
use super::prefix_cache::PrefixCache;
use super::slots::{self, Feed, Live, Retained, Slot};
use super::{topk, EngineError, ModelManifest, Output, StepInfo, StepObserver, Want};

mod reuse;

/// What a model's callers ask of its scheduler.
pub(crate) enum Command {
    Open { reply: oneshot::Sender<Result<i32, EngineError>> },
    Feed { seq: i32, tokens: Vec<i32>, want: Want, reply: oneshot::Sender<Result<Output, EngineError>> },
    Close { seq: i32 },
}

/// One sequence id per open sequence.
pub(crate) fn seq_slots(m: &ModelManifest) -> usize {
    m.max_sequences
}

/// What one sequence gets from a step.
struct Planned {
    seq: i32,
    /// Pending tokens computed in this step.
    own: usize,
    /// The feed completes in this step (its last token's row answers it).
    completes: bool,
    prefill: bool,
}

/// One batch entry: a token at a position of one sequence.
struct Entry {
    token: i32,
    pos: i32,
    seq: i32,
    logits: bool,
}

pub(crate) struct Scheduler<'m> {
    name: String,
    ctx: LlamaContext<'m>,
    layout: Layout,
    batch: LlamaBatch<'static>,
    n_vocab: usize,
    n_batch: usize,
    context_length: usize,
    /// Sliding attention window (0: none); limits which prefixes can be reused.
    n_swa: usize,
    cache: PrefixCache,
    min_shared_prefix: usize,
    max_batch_wait: Duration,
    /// A step stops taking prompts at the first that completes once it holds this many tokens.
    prompt_step_tokens: usize,
    slots: Vec<Slot>,
    /// The slot of each id callers hold (`None`: not open). A fresh sequence may move to
    /// the slot holding its prompt's prefix, so ids and slots are not the same.
    routes: Vec<Option<usize>>,
    /// Sequences (by slot) with work, in arrival order (fairness for prompt chunks).
    queue: VecDeque<i32>,
    /// Prompts that found no free cells in this step; they wait for the next one.
    held: Vec<i32>,
    stats: Arc<EngineStats>,
    observer: Arc<dyn StepObserver>,
    opens: u64,
    closes: u64,
    last_step_end: Instant,
    last_step_time: Duration,
}

impl Drop for Scheduler<'_> {
    /// The model unloads: what its gauges counted goes with it.
    fn drop(&mut self) {
        self.stats.kv_tokens.store(0, Ordering::Relaxed);
        self.stats.retained_tokens.store(0, Ordering::Relaxed);
        self.stats.cached_prefixes.store(0, Ordering::Relaxed);
        self.stats.cached_bytes.store(0, Ordering::Relaxed);
    }
}

impl<'m> Scheduler<'m> {
    pub(crate) fn new(
        m: &ModelManifest,
        ctx: LlamaContext<'m>,
        n_vocab: usize,
        n_swa: usize,
        stats: Arc<EngineStats>,
        observer: Arc<dyn StepObserver>,
    ) -> Self {
        let slots = seq_slots(m);
        let n_batch = (ctx.n_batch() as usize).min(m.batch_size);
        Self {
            name: m.name.clone(),
            ctx,
            layout: Layout::of(m),
            batch: LlamaBatch::new(n_batch, 1),
            n_vocab,
            n_batch,
            context_length: m.context_length,
            n_swa,
            cache: PrefixCache::new(
                m.prefix_cache_mb.saturating_mul(1 << 20),
                m.prefix_cache_min_tokens.max(m.min_shared_prefix),
            ),
            min_shared_prefix: m.min_shared_prefix.max(1),
            max_batch_wait: Duration::from_micros(m.max_batch_wait_us),
            prompt_step_tokens: m.prompt_step_tokens,
            slots: (0..slots).map(|_| Slot::Free).collect(),
            routes: vec![None; slots],
            queue: VecDeque::new(),
            held: Vec::new(),
            stats,
            observer,
            opens: 0,
            closes: 0,
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
                if let Err(Ok(id)) = reply.send(r) {
                    if let Some(slot) = self.unroute(id) {
                        self.abandon(slot);
                    }
                }
            }
            Command::Feed { seq: id, tokens, want, reply } => {
                let Some(seq) = self.route(id) else {
                    let _ = reply.send(Err(EngineError::InvalidArgument(format!("sequence {id} is not open"))));
                    return;
                };
                if let Err(e) = self.accept_feed(seq, tokens, want, reply) {
                    tracing::debug!(model = %self.name, seq, error = %e, "feed refused");
                }
            }
            Command::Close { seq: id } => {
                if let Some(seq) = self.unroute(id) {
                    self.close(seq);
                }
            }
        }
        self.count_retained();
    }

    /// Publish how many tokens retained cells hold (a handful of slots: cheap to recount).
    fn count_retained(&self) {
        let retained = self
            .slots
            .iter()
            .map(|s| match s {
                Slot::Retained(r) => r.tokens.len(),
                Slot::Live(l) => l.retained.as_ref().map_or(0, |r| r.tokens.len()),
                Slot::Free => 0,
            })
            .sum();
        self.stats.retained_tokens.store(retained, Ordering::Relaxed);
    }

    /// The slot of the sequence callers know as `id`.
    fn route(&self, id: i32) -> Option<i32> {
        let slot = (*self.routes.get(usize::try_from(id).ok()?)?)?;
        Some(slot as i32)
    }

    /// Forget `id` (its sequence is closing); its slot.
    fn unroute(&mut self, id: i32) -> Option<i32> {
        let slot = self.routes.get_mut(usize::try_from(id).ok()?)?.take()?;
        Some(slot as i32)
    }

    fn open(&mut self) -> Result<i32, EngineError> {
        // Admission control keeps open sequences within the slots (and an open whose caller
        // is gone frees its slot at once), so one is free or retained.
        let full = || EngineError::KvCacheFull { model: self.name.clone() };
        let slot = slots::choose(&self.slots).ok_or_else(full)?;
        let id = self.routes.iter().position(Option::is_none).ok_or_else(full)?;
        self.opens += 1;
        let retained = match std::mem::replace(&mut self.slots[slot], Slot::Free) {
            Slot::Retained(r) => Some(r),
            _ => None,
        };
        self.slots[slot] = Slot::Live(Live::new(id, self.opens, retained));
        self.routes[id] = Some(slot);
        Ok(id as i32)
    }

    /// Undo an open nobody will use: the slot's retained cells are untouched, so it goes
    /// back to holding them.
    fn abandon(&mut self, seq: i32) {
        let Some(slot) = self.slots.get_mut(seq as usize) else { return };
        if let Slot::Live(live) = std::mem::replace(slot, Slot::Free) {
            if let Some(r) = live.retained {
                *slot = Slot::Retained(r);
            }
        }
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
        let held = live.history.len() + live.pending.len();
        let check = if live.feed.is_some() {
            Err(EngineError::InvalidArgument("a feed is already in progress".into()))
        } else if tokens.is_empty() {
            Err(EngineError::InvalidArgument("no tokens to feed".into()))
        } else if let Some(&token) = tokens.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            // Also checked by the caller: an out-of-range id would abort the process in llama.cpp.
            Err(EngineError::InvalidToken { token, vocab: n_vocab })
        } else if held + tokens.len() > limit {
            Err(EngineError::ContextFull { requested: held + tokens.len(), limit })
        } else {
            Ok(())
        };
        if let Err(e) = check {
            let msg = e.to_string();
            let _ = reply.send(Err(e));
            return Err(EngineError::InvalidArgument(msg));
        }
        live.fresh = live.history.is_empty();
        live.feed_start = held;
        live.decoding = tokens.len() == 1 && !live.history.is_empty() && live.pending.is_empty();
        live.pending.extend_from_slice(&tokens);
        live.feed = Some(Feed { want, reply });
        self.queue.push_back(seq);
        Ok(())
    }

    fn close(&mut self, seq: i32) {
        let Some(slot) = self.slots.get_mut(seq as usize) else { return };
        let Slot::Live(mut live) = std::mem::replace(slot, Slot::Free) else { return };
        self.queue.retain(|&s| s != seq);
        self.stats.kv_tokens.fetch_sub(live.history.len(), Ordering::Relaxed);
        if live.history.is_empty() {
            // Nothing was computed: cells the slot retained are still there.
            if let Some(r) = live.retained.take() {
                self.slots[seq as usize] = Slot::Retained(r);
            }
            return;
        }
        match self.layout {
            // The cells stay where they are, free to keep: a later prompt continues from
            // them, and they reach the host cache only if the slot is needed first.
            Layout::Streams => {
                self.closes += 1;
                self.slots[seq as usize] = Slot::Retained(Retained { tokens: live.history, closed: self.closes });
            }
            // Cells in a shared pool are wanted by the other sequences.
            Layout::Pool => {
                self.save_state(seq, live.history);
                self.remove_cells(seq);
            }
        }
    }

    fn remove_cells(&mut self, seq: i32) {
        if let Err(e) = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None) {
            tracing::error!(model = %self.name, seq, error = %e, "failed to free KV cells");
        }
    }

    fn live(&self, seq: i32) -> Option<&Live> {
        match self.slots.get(seq as usize) {
            Some(Slot::Live(l)) => Some(l),
            _ => None,
        }
    }

    fn live_mut(&mut self, seq: i32) -> Option<&mut Live> {
        match self.slots.get_mut(seq as usize) {
            Some(Slot::Live(l)) => Some(l),
            _ => None,
        }
    }

    fn lives(&self) -> impl Iterator<Item = (i32, &Live)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::Live(l) => Some((i as i32, l)),
            Slot::Free | Slot::Retained(_) => None,
        })
    }

    /// Plan one batch: decode tokens first, then prompt chunks in arrival order, up to the
    /// first prompt that completes once the step holds `prompt_step_tokens`. Whole prompts
    /// in small steps let a burst's first tokens out in turn: with equal prompts the median
    /// one waits for about half the burst, not for most of it.
    fn plan(&mut self) -> Vec<Planned> {
        let order: Vec<i32> = self.queue.iter().copied().filter(|s| !self.held.contains(s)).collect();
        let mut planned = Vec::new();
        let mut budget = self.n_batch;
        for &seq in &order {
            if self.live(seq).is_some_and(|l| l.decoding) {
                planned.push(Planned { seq, own: 1, completes: true, prefill: false });
                budget -= 1;
            }
        }
        // Prompts computed in this step, which fresh prompts sharing a prefix wait for.
        let mut leaders: Vec<i32> = Vec::new();
        for &seq in &order {
            if budget == 0 {
                break;
            }
            let Some(live) = self.live(seq) else { continue };
            if live.decoding {
                continue;
            }
            let mut seq = seq;
            if live.fresh {
                if self.waits_for_leader(seq, &leaders) {
                    continue;
                }
                seq = self.move_to_prefix(seq);
                self.reuse_prefix(seq);
            }
            let Some(live) = self.live(seq) else { continue };
            let own = live.pending.len().min(budget);
            if own == 0 {
                continue;
            }
            budget -= own;
            let completes = own == live.pending.len();
            planned.push(Planned { seq, own, completes, prefill: true });
            leaders.push(seq);
            if completes && self.n_batch - budget >= self.prompt_step_tokens {
                break;
            }
        }
        // Sorted by sequence id, so llama.cpp can run the sequences side by side.
        planned.sort_by_key(|p| p.seq);
        planned
    }

    /// The batch entries of a plan, sequence by sequence; answer rows in plan order.
    fn entries(&self, planned: &[Planned]) -> (Vec<Entry>, Vec<Option<usize>>) {
        let mut entries = Vec::with_capacity(self.n_batch);
        let mut rows = Vec::with_capacity(planned.len());
        for p in planned {
            let Some(live) = self.live(p.seq) else {
                rows.push(None);
                continue;
            };
            let start = live.history.len();
            for (i, &token) in live.pending[..p.own].iter().enumerate() {
                let last = i + 1 == p.own;
                entries.push(Entry { token, pos: (start + i) as i32, seq: p.seq, logits: last && p.completes });
            }
            rows.push(p.completes.then(|| entries.len() - 1));
        }
        (entries, rows)
    }

    pub(crate) fn step(&mut self) {
        let started = Instant::now();
        self.held.clear();
        // Each retry holds prompts back or preempts a sequence, so this ends.
        let mut retries = 2 * self.slots.len() + 2;
        let (planned, entries, rows) = loop {
            let planned = self.plan();
            if planned.is_empty() {
                // Every queued sequence vanished or waits for cells.
                let slots = &self.slots;
                self.queue.retain(|&s| matches!(slots.get(s as usize), Some(Slot::Live(l)) if l.feed.is_some()));
                return;
            }
            let (entries, rows) = self.entries(&planned);
            match self.decode(&entries) {
                Ok(()) => break (planned, entries, rows),
                Err(DecodeError::NoKvCacheSlot) if retries > 0 && self.make_room(&planned) => retries -= 1,
                Err(e) => {
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
            }
        };
        self.finish(&planned, &rows);
        self.count_retained();
        let now = Instant::now();
        self.last_step_time = now - started;
        self.last_step_end = now;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let info = StepInfo {
            tokens: entries.len(),
            sequences: planned.len(),
            decode_tokens: planned.iter().filter(|p| !p.prefill).count(),
            prefill_tokens: planned.iter().filter(|p| p.prefill).map(|p| p.own).sum(),
            duration: self.last_step_time,
        };
        self.observer.on_step(&self.name, &info);
    }

    /// The cells ran out for a planned step. Prompts wait first (new work never pushes out
    /// old), and of prompts alone only the oldest stays in the plan. When that does not fit
    /// either, the newest other sequence holding cells is preempted. Nothing held comes back
    /// in this step, so each call holds prompts or takes one more sequence's cells, and the
    /// retries end. False when nothing can be done.
    fn make_room(&mut self, planned: &[Planned]) -> bool {
        let prompts: Vec<i32> = planned.iter().filter(|p| p.prefill).map(|p| p.seq).collect();
        if !prompts.is_empty() && planned.iter().any(|p| !p.prefill) {
            self.held.extend(&prompts);
            return true;
        }
        // Letting held prompts back in would restore their cached prefixes into the cells
        // just freed, and two prompts could take turns preempting each other.
        let keep = prompts.iter().filter_map(|&s| self.live(s).map(|l| (l.opened, s))).min().map(|(_, s)| s);
        let others: Vec<i32> = prompts.iter().copied().filter(|&s| Some(s) != keep).collect();
        if !others.is_empty() {
            self.held.extend(&others);
            return true;
        }
        let victim = self
            .lives()
            .filter(|&(s, l)| !l.history.is_empty() && Some(s) != keep)
            .max_by_key(|(_, l)| l.opened)
            .map(|(s, _)| s);
        match victim {
            Some(v) => {
                self.preempt(v);
                // It resumes in a later step.
                self.held.push(v);
                true
            }
            None => false,
        }
    }

    /// Take a sequence's cells away: its state goes to the host cache (when worth keeping)
    /// and its tokens become pending again, restored or recomputed at its next turn.
    fn preempt(&mut self, seq: i32) {
        let Some(live) = self.live_mut(seq) else { return };
        let history = std::mem::take(&mut live.history);
        let mut pending = history.clone();
        pending.append(&mut live.pending);
        live.pending = pending;
        live.fresh = true;
        live.decoding = false;
        let held = history.len();
        tracing::debug!(model = %self.name, seq, tokens = held, "preempted");
        self.save_state(seq, history);
        self.remove_cells(seq);
        self.stats.kv_tokens.fetch_sub(held, Ordering::Relaxed);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
    }

    fn decode(&mut self, entries: &[Entry]) -> Result<(), DecodeError> {
        self.batch.clear();
        for e in entries {
            if let Err(err) = self.batch.add(LlamaToken(e.token), e.pos, &[e.seq], e.logits) {
                return Err(DecodeError::Unknown(match err {
                    llama_cpp_2::llama_batch::BatchAddError::InsufficientSpace(n) => n as i32,
                    llama_cpp_2::llama_batch::BatchAddError::EmptyBuffer => -1,
                }));
            }
        }
        let r = self.ctx.decode(&mut self.batch);
        if r.is_err() {
            // A failure may leave part of the batch applied: trim every touched sequence back
            // to what its history says.
            let mut touched: Vec<i32> = entries.iter().map(|e| e.seq).collect();
            touched.dedup();
            for s in touched {
                let keep = self.live(s).map_or(0, |l| l.history.len());
                let _ = self.ctx.clear_kv_cache_seq(Some(s as u32), Some(keep as u32), None);
            }
        }
        r
    }

    /// Record what the step computed and answer every completed feed.
    fn finish(&mut self, planned: &[Planned], rows: &[Option<usize>]) {
        let now = Instant::now();
        for (p, row) in planned.iter().zip(rows) {
            let Some(Slot::Live(live)) = self.slots.get_mut(p.seq as usize) else {
                continue;
            };
            live.history.extend(live.pending.drain(..p.own));
            self.stats.kv_tokens.fetch_add(p.own, Ordering::Relaxed);
            if p.prefill {
                self.stats.prefill_tokens.fetch_add(p.own as u64, Ordering::Relaxed);
            } else {
                self.stats.decode_tokens.fetch_add(1, Ordering::Relaxed);
            }
            let Some(row) = *row else { continue };
            let Some(feed) = live.feed.take() else {
                continue;
            };
            live.answered_at = Some(now);
            live.decoding = false;
            let logits = self.ctx.get_logits_ith(row as i32);
            let out = match feed.want {
                Want::Logits => Output::Logits(logits.to_vec()),
                Want::TopK { k, allowed, logprobs } => {
                    let (ids, top) = topk::top_k(logits, k, allowed.as_deref());
                    let logprobs = logprobs.then(|| {
                        let normalizer = topk::log_sum_exp(logits);
                        top.iter().map(|l| l - normalizer).collect()
                    });
                    Output::TopK { ids, logits: top, logprobs }
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
        if let Some(live) = self.live_mut(seq) {
            if live.history.len() > live.feed_start {
                dropped = live.history.len() - live.feed_start;
                live.history.truncate(live.feed_start);
                keep = Some(live.feed_start);
            }
            // Tokens before the feed that a preemption left to recompute stay pending.
            live.pending.truncate(live.feed_start.saturating_sub(live.history.len()));
            live.decoding = false;
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

fn clone_error(e: &EngineError, model: &str) -> EngineError {
    match e {
        EngineError::KvCacheFull { .. } => EngineError::KvCacheFull { model: model.to_string() },
        other => EngineError::Decode(other.to_string()),
    }
}
