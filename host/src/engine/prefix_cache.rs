//! Host-memory cache of closed (or preempted) sequences' KV state, for prefix reuse.
//!
//! A new prompt that starts like a cached sequence gets that state copied back into its
//! own cells instead of computing it (multi-turn chat resends the whole history). Entries
//! are evicted least recently used within a byte budget.

use llama_cpp_2::SeqState;

struct Entry {
    tokens: Vec<i32>,
    state: SeqState,
    /// Lowest position the state holds (above 0 once a sliding window dropped cells).
    pos_min: i32,
    last_used: u64,
}

pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    /// Shortest sequence worth keeping: shorter ones are cheaper to recompute.
    min_tokens: usize,
    clock: u64,
}

impl PrefixCache {
    pub(crate) fn new(budget: usize, min_tokens: usize) -> Self {
        Self { entries: Vec::new(), budget, min_tokens: min_tokens.max(1), clock: 0 }
    }

    /// Whether a sequence of `len` tokens is worth caching (and the cache is on).
    pub(crate) fn wants(&self, len: usize) -> bool {
        self.budget > 0 && len >= self.min_tokens
    }

    /// Shortest sequence worth keeping.
    pub(crate) fn min_tokens(&self) -> usize {
        self.min_tokens
    }

    /// Whether an entry already covers `tokens` (then there is no need to copy them out);
    /// marks that entry used.
    pub(crate) fn covers(&mut self, tokens: &[i32]) -> bool {
        self.clock += 1;
        let clock = self.clock;
        match self.entries.iter_mut().find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(tokens)) {
            Some(e) => {
                e.last_used = clock;
                true
            }
            None => false,
        }
    }

    /// Keep `state` (the KV cells of `tokens`), replacing entries it extends and evicting
    /// the least recently used past the budget.
    pub(crate) fn insert(&mut self, tokens: Vec<i32>, state: SeqState, pos_min: i32) {
        if state.byte_len() > self.budget {
            return;
        }
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        self.clock += 1;
        self.entries.push(Entry { tokens, state, pos_min, last_used: self.clock });
        while self.bytes() > self.budget {
            let oldest = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i);
            match oldest {
                Some(i) => drop(self.entries.swap_remove(i)),
                None => break,
            }
        }
    }

    /// The entry sharing the longest usable prefix with `prompt` (capped at `cap`), if at
    /// least `min`: (index, tokens).
    pub(crate) fn best_match(&self, prompt: &[i32], cap: usize, min: usize, n_swa: usize) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(cap), e.pos_min))
            .filter(|&(_, n, pos_min)| n >= min && window_allows(n, pos_min, n_swa))
            .map(|(i, n, _)| (i, n))
            .max_by_key(|&(_, n)| n)
    }

    /// Entry `i`'s state, marked used.
    pub(crate) fn take_use(&mut self, i: usize) -> Option<&SeqState> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(i).map(|e| {
            e.last_used = clock;
            &e.state
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.state.byte_len()).sum()
    }
}

/// Whether a state whose lowest held position is `pos_min` can continue after its first
/// `n` tokens: a sliding-window cache keeps only the last `n_swa` positions, and the next
/// token needs the window before it (the test llama-server makes).
pub(crate) fn window_allows(n: usize, pos_min: i32, n_swa: usize) -> bool {
    n_swa == 0 || pos_min <= 0 || pos_min as usize <= n.saturating_sub(n_swa)
}

pub(crate) fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
