//! Prefix reuse, the scheduler's side: where a fresh prompt's prefix already sits in KV
//! cells (its own slot, another slot, the host cache), how the prompt takes it over (in
//! place, by moving to that slot, by exchanging cells, or by a copy), and how cells that
//! make way reach the host cache.

use std::sync::atomic::Ordering;

use llama_cpp_2::LlamaStateSeqFlags;

use super::super::kv::load_prefix;
use super::super::prefix_cache::{common_prefix, window_allows};
use super::super::slots::{self, Retained, Slot};
use super::Scheduler;

impl Scheduler<'_> {
    /// Move fresh sequence `seq` to the closed sequence's slot whose cells hold the longest
    /// prefix of its prompt, where it continues from them with no copy (the slot it opened
    /// in keeps what it retained): a returning conversation goes back to its own cells. Not
    /// when little of those cells would be used, or when the move splits the live slots into
    /// more runs (llama.cpp would split the step). Returns its slot.
    pub(super) fn move_to_prefix(&mut self, seq: i32) -> i32 {
        let from = seq as usize;
        let Some(live) = self.live(seq) else { return seq };
        if !live.history.is_empty() || live.pending.len() < 2 {
            return seq;
        }
        let prompt = &live.pending;
        let cap = prompt.len() - 1;
        let own = live.retained.as_ref().map_or(0, |r| common_prefix(&r.tokens, prompt).min(cap));
        let best = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Retained(r) => Some((i, common_prefix(&r.tokens, prompt).min(cap), r.tokens.len())),
                _ => None,
            })
            .max_by_key(|&(_, n, _)| n);
        let Some((to, n, held)) = best else { return seq };
        // Moving drops the cells past the prefix: when they are worth keeping, a copy of
        // the prefix (the slot stays as it is) beats pushing them out to host memory.
        if n < self.min_shared_prefix
            || held - n >= self.cache.min_tokens()
            || n <= own
            || !window_allows(n, self.ctx.kv_cache_seq_pos_min(to as i32), self.n_swa)
            || slots::live_runs(&self.slots, Some((from, to))) > slots::live_runs(&self.slots, None)
        {
            return seq;
        }
        // Both kinds were checked above; a mismatch puts everything back.
        let theirs = match std::mem::replace(&mut self.slots[to], Slot::Free) {
            Slot::Retained(r) => r,
            other => {
                self.slots[to] = other;
                return seq;
            }
        };
        let mut live = match std::mem::replace(&mut self.slots[from], Slot::Free) {
            Slot::Live(l) => l,
            other => {
                self.slots[from] = other;
                self.slots[to] = Slot::Retained(theirs);
                return seq;
            }
        };
        if let Some(mine) = live.retained.replace(theirs) {
            self.slots[from] = Slot::Retained(mine);
        }
        self.routes[live.id] = Some(to);
        self.slots[to] = Slot::Live(live);
        for s in self.queue.iter_mut().filter(|s| **s == seq) {
            *s = to as i32;
        }
        to as i32
    }

    /// Make way in `seq`'s cells for new work: what they hold goes to the host cache when
    /// worth keeping, then they are cleared.
    fn evict(&mut self, seq: i32, retained: Option<Retained>) {
        if let Some(r) = retained {
            self.save_state(seq, r.tokens);
            self.remove_cells(seq);
        }
    }

    /// Copy a sequence's KV state to the host-memory cache, unless it is too short to be
    /// worth it or a cached entry already covers it.
    pub(super) fn save_state(&mut self, seq: i32, tokens: Vec<i32>) {
        if !self.cache.wants(tokens.len()) || self.cache.covers(&tokens) {
            return;
        }
        // Another slot's cells hold it all (and will be kept in turn when that slot goes).
        let held = |(i, s): (usize, &Slot)| {
            i != seq as usize && matches!(s, Slot::Retained(r) if r.tokens.starts_with(&tokens))
        };
        if self.slots.iter().enumerate().any(held) {
            return;
        }
        let pos_min = self.ctx.kv_cache_seq_pos_min(seq);
        match self.ctx.state_seq_get(seq, LlamaStateSeqFlags::empty()) {
            Ok(state) => self.cache.insert(tokens, state, pos_min),
            Err(e) => tracing::warn!(model = %self.name, seq, error = %e, "cannot cache sequence state"),
        }
        self.stats.cached_bytes.store(self.cache.bytes(), Ordering::Relaxed);
        self.stats.cached_prefixes.store(self.cache.len(), Ordering::Relaxed);
    }

    /// Whether fresh `seq` should wait for a prompt being computed in this step (one of
    /// `leaders`) that will give it a longer prefix than anything computed so far.
    pub(super) fn waits_for_leader(&self, seq: i32, leaders: &[i32]) -> bool {
        let Some(live) = self.live(seq) else { return false };
        let prompt = &live.pending;
        if prompt.len() < 2 || leaders.is_empty() {
            return false;
        }
        let cap = prompt.len() - 1;
        let now = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != seq as usize)
            .map(|(_, s)| s.cells())
            .chain(live.retained.as_ref().map(|r| r.tokens.as_slice()))
            .map(|cells| common_prefix(cells, prompt))
            .chain(self.cache.best_match(prompt, cap, 0, self.n_swa).map(|(_, n)| n))
            .max()
            .unwrap_or(0)
            .min(cap);
        let later =
            leaders.iter().filter_map(|&s| self.live(s)).map(|l| l.future_prefix(prompt)).max().unwrap_or(0).min(cap);
        later >= now + self.min_shared_prefix
    }

    /// Give a fresh prompt the longest prefix already computed: what its own slot retained
    /// (kept in place), another slot's cells, or a closed sequence's cached state (copied
    /// into its own). Returns the tokens taken over.
    pub(super) fn reuse_prefix(&mut self, seq: i32) -> usize {
        let min = self.min_shared_prefix;
        let Some(live) = self.live_mut(seq) else { return 0 };
        live.fresh = false;
        let retained = live.retained.take();
        if !live.history.is_empty() || live.pending.len() < 2 {
            self.evict(seq, retained);
            return 0;
        }
        // Keep at least one token to compute: its row answers the feed.
        let cap = live.pending.len() - 1;
        let prompt = std::mem::take(&mut live.pending);
        let usable = |n: usize, s: i32| n >= min && window_allows(n, self.ctx.kv_cache_seq_pos_min(s), self.n_swa);
        let own = retained.as_ref().map_or(0, |r| common_prefix(&r.tokens, &prompt).min(cap));
        let own = if usable(own, seq) { own } else { 0 };
        let from_slots = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != seq as usize)
            .map(|(i, s)| (i as i32, common_prefix(s.cells(), &prompt).min(cap)))
            .filter(|&(s, n)| usable(n, s))
            .max_by_key(|&(_, n)| n);
        let from_cache = self.cache.best_match(&prompt, cap, min, self.n_swa);
        let elsewhere = from_slots.map_or(0, |(_, n)| n).max(from_cache.map_or(0, |(_, n)| n));
        let from_retained = from_slots.filter(|&(src, _)| self.slots[src as usize].retained_mut().is_some());
        let from_slots_wins = from_slots.is_some_and(|(_, n)| from_cache.is_none_or(|(_, c)| n >= c));
        let reused = match (retained, from_retained) {
            (Some(r), _) if own > 0 && own >= elsewhere => self.continue_retained(seq, r, own),
            (Some(r), Some((src, n))) if from_slots_wins && r.tokens.len() >= self.cache.min_tokens() => {
                self.swap_retained(seq, r, src, n)
            }
            (retained, _) => {
                // Keeping the evicted cells may reorder the host cache: look it up again.
                let from_cache = if retained.is_some() {
                    self.evict(seq, retained);
                    self.cache.best_match(&prompt, cap, min, self.n_swa)
                } else {
                    from_cache
                };
                match (from_slots, from_cache) {
                    (Some((src, n)), cached) if cached.is_none_or(|(_, c)| n >= c) => self.copy_live(src, seq, n),
                    (_, Some((i, n))) => self.restore_cached(i, seq, n),
                    _ => 0,
                }
            }
        };
        if let Some(live) = self.live_mut(seq) {
            live.history.extend_from_slice(&prompt[..reused]);
            live.pending = prompt[reused..].to_vec();
        }
        if reused > 0 {
            self.stats.reused_tokens.fetch_add(reused as u64, Ordering::Relaxed);
            self.stats.kv_tokens.fetch_add(reused, Ordering::Relaxed);
        }
        reused
    }

    /// Continue from the first `n` cells slot `src` retained (closed, or opened but not yet
    /// fed), and give `src` what `seq`'s slot retained in exchange: both stay in KV cells,
    /// where copying `seq`'s out to make room would put them in host memory. This is how a
    /// returning conversation that opened in another conversation's slot finds its own
    /// cells, including when every conversation opens at once.
    fn swap_retained(&mut self, seq: i32, own: Retained, src: i32, n: usize) -> usize {
        let flags = LlamaStateSeqFlags::empty();
        let min_tokens = self.cache.min_tokens();
        let lost = self.slots[src as usize]
            .retained_mut()
            .filter(|r| r.tokens.len() - n >= min_tokens)
            .map(|r| r.tokens.clone());
        if let Some(tokens) = lost {
            self.save_state(src, tokens);
        }
        let states =
            self.ctx.state_seq_get(src, flags).and_then(|theirs| Ok((theirs, self.ctx.state_seq_get(seq, flags)?)));
        let (theirs, mine) = match states {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(model = %self.name, seq, error = %e, "retained cells not exchanged; computing them");
                self.evict(seq, Some(own));
                return 0;
            }
        };
        match self.ctx.state_seq_set(&mine, src) {
            Ok(()) => {
                if let Some(r) = self.slots[src as usize].retained_mut() {
                    *r = own;
                }
            }
            Err(e) => {
                tracing::warn!(model = %self.name, seq = src, error = %e, "retained cells lost in an exchange");
                self.remove_cells(src);
                self.slots[src as usize].drop_retained();
            }
        }
        match load_prefix(&mut self.ctx, &theirs, seq, n) {
            Ok(()) => n,
            Err(e) => {
                tracing::warn!(model = %self.name, seq, error = %e, "exchanged cells not restored; computing them");
                self.remove_cells(seq);
                0
            }
        }
    }

    /// Continue from the first `n` cells `seq`'s slot retained and drop the rest, which
    /// goes to the host cache first when a tail worth keeping would be lost.
    fn continue_retained(&mut self, seq: i32, retained: Retained, n: usize) -> usize {
        if retained.tokens.len() - n >= self.cache.min_tokens() {
            self.save_state(seq, retained.tokens);
        }
        match self.ctx.clear_kv_cache_seq(Some(seq as u32), Some(n as u32), None) {
            Ok(_) => n,
            Err(e) => {
                tracing::warn!(model = %self.name, seq, error = %e, "retained cells not trimmed; computing them");
                self.remove_cells(seq);
                0
            }
        }
    }

    fn copy_live(&mut self, src: i32, dst: i32, n: usize) -> usize {
        match self.layout.copy_prefix(&mut self.ctx, src, dst, n) {
            Ok(()) => n,
            Err(e) => {
                tracing::warn!(model = %self.name, seq = dst, error = %e, "prefix copy failed; computing it");
                self.remove_cells(dst);
                0
            }
        }
    }

    /// Load cached entry `i` into `seq` and keep its first `n` tokens.
    fn restore_cached(&mut self, i: usize, seq: i32, n: usize) -> usize {
        let Some(state) = self.cache.take_use(i) else { return 0 };
        match load_prefix(&mut self.ctx, state, seq, n) {
            Ok(()) => n,
            Err(e) => {
                // In a shared pool this is also how a full cache shows: compute instead.
                tracing::debug!(model = %self.name, seq, error = %e, "cached prefix not restored; computing it");
                self.remove_cells(seq);
                0
            }
        }
    }
}
