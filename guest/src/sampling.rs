//! Composable sampling over the candidates a feed returns.
//!
//! Order: logit bias, penalties, then greedy (temperature 0) or top-k, softmax at the
//! temperature, top-p and min-p on those probabilities (OpenAI's semantics: top-p applies
//! to the tempered distribution), and a draw from the seeded RNG.

use crate::model::{Candidates, Want};

/// How many candidates to ask the host for when sampling (not greedy). Tokens outside
/// the best 64 have negligible probability for any usual temperature and top-p.
pub const DEFAULT_HOST_CANDIDATES: u32 = 64;

#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f32,
    top_k: Option<u32>,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    /// Penalties look at this many most recent tokens.
    penalty_window: usize,
    logit_bias: Vec<(i32, f32)>,
    host_candidates: u32,
    full_logits: bool,
    rng: Rng,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    /// Temperature 1, no truncation, seeded from the host's random source.
    pub fn new() -> Self {
        Self::seeded(wasip2::random::random::get_random_u64())
    }

    /// Temperature 1, no truncation, reproducible draws for `seed`.
    pub fn seeded(seed: u64) -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_window: 64,
            logit_bias: Vec::new(),
            host_candidates: DEFAULT_HOST_CANDIDATES,
            full_logits: false,
            rng: Rng::new(seed),
        }
    }

    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self::seeded(0).temperature(0.0)
    }

    /// 0 means greedy.
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = t.max(0.0);
        self
    }

    pub fn top_k(mut self, k: u32) -> Self {
        self.top_k = (k > 0).then_some(k);
        self
    }

    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = p.clamp(0.0, 1.0);
        self
    }

    pub fn min_p(mut self, p: f32) -> Self {
        self.min_p = p.clamp(0.0, 1.0);
        self
    }

    /// Divides positive logits (multiplies negative ones) of recent tokens; 1 is off.
    pub fn repetition_penalty(mut self, p: f32) -> Self {
        self.repetition_penalty = if p > 0.0 { p } else { 1.0 };
        self
    }

    /// Subtracts `p` times a recent token's count from its logit.
    pub fn frequency_penalty(mut self, p: f32) -> Self {
        self.frequency_penalty = p;
        self
    }

    /// Subtracts `p` from the logit of every recent token.
    pub fn presence_penalty(mut self, p: f32) -> Self {
        self.presence_penalty = p;
        self
    }

    pub fn penalty_window(mut self, n: usize) -> Self {
        self.penalty_window = n;
        self
    }

    /// Add `bias` to a token's logit (OpenAI's `logit_bias`; -100 bans it).
    pub fn logit_bias(mut self, token: i32, bias: f32) -> Self {
        self.logit_bias.retain(|(t, _)| *t != token);
        self.logit_bias.push((token, bias));
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.rng = Rng::new(seed);
        self
    }

    /// Candidates to ask the host for when sampling.
    pub fn host_candidates(mut self, k: u32) -> Self {
        self.host_candidates = k.max(1);
        self
    }

    /// Ask for the whole logits row every step instead of the host's top candidates.
    pub fn full_logits(mut self, on: bool) -> Self {
        self.full_logits = on;
        self
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// What to ask the host for, given an optional set of allowed tokens.
    pub fn want(&self, allowed: Option<Vec<i32>>) -> Want {
        let positive_bias = self.logit_bias.iter().any(|(_, b)| *b > 0.0);
        if allowed.is_none() && (self.full_logits || positive_bias) {
            return Want::Logits;
        }
        let simple_greedy = self.temperature == 0.0 && !self.has_penalties() && self.logit_bias.is_empty();
        let mut k = if simple_greedy { 1 } else { self.host_candidates.max(self.top_k.unwrap_or(0)) };
        if let Some(a) = &allowed {
            k = k.min(a.len().max(1) as u32);
        }
        Want::TopK { k, allowed, logprobs: false }
    }

    /// Pick the next token. `recent` is the generated history the penalties look at.
    pub fn sample(&mut self, candidates: &Candidates, recent: &[i32]) -> Option<i32> {
        if let Candidates::Full(row) = candidates {
            if self.temperature == 0.0 && self.logit_bias.is_empty() && !self.has_penalties() {
                // Plain greedy over a full row: one scan, no copies.
                return candidates.best().filter(|&id| !row[id as usize].is_nan());
            }
        }
        let mut cands: Vec<(i32, f32)> = match candidates {
            Candidates::Top { ids, logits, .. } => ids.iter().copied().zip(logits.iter().copied()).collect(),
            Candidates::Full(row) => row.iter().enumerate().map(|(i, &l)| (i as i32, l)).collect(),
        };
        cands.retain(|(_, l)| !l.is_nan());
        if cands.is_empty() {
            return None;
        }
        self.apply_bias_and_penalties(&mut cands, recent);
        if self.temperature == 0.0 {
            return cands
                .iter()
                .fold(None, |best: Option<(i32, f32)>, &(id, l)| match best {
                    Some((_, b)) if b >= l => best,
                    _ => Some((id, l)),
                })
                .map(|(id, _)| id);
        }
        cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.top_k {
            cands.truncate(k as usize);
        }
        // Softmax at temperature.
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands.iter().map(|(_, l)| ((l - max) / self.temperature).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.min_p > 0.0 {
            let floor = probs[0] * self.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.next_f32() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return Some(cands[i].0);
            }
        }
        Some(cands[keep - 1].0)
    }

    fn apply_bias_and_penalties(&self, cands: &mut [(i32, f32)], recent: &[i32]) {
        for (id, bias) in &self.logit_bias {
            if let Some(c) = cands.iter_mut().find(|(i, _)| i == id) {
                c.1 += bias;
            }
        }
        if !self.has_penalties() || recent.is_empty() {
            return;
        }
        let window = &recent[recent.len().saturating_sub(self.penalty_window)..];
        let mut counts: Vec<(i32, u32)> = Vec::new();
        for &t in window {
            match counts.iter_mut().find(|(id, _)| *id == t) {
                Some(c) => c.1 += 1,
                None => counts.push((t, 1)),
            }
        }
        for (id, n) in counts {
            if let Some(c) = cands.iter_mut().find(|(i, _)| *i == id) {
                let l = &mut c.1;
                *l = if *l > 0.0 { *l / self.repetition_penalty } else { *l * self.repetition_penalty };
                *l -= self.frequency_penalty * n as f32 + self.presence_penalty;
            }
        }
    }
}

/// SplitMix64: small, fast and reproducible for a seed.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(pairs: &[(i32, f32)]) -> Candidates {
        Candidates::Top {
            ids: pairs.iter().map(|p| p.0).collect(),
            logits: pairs.iter().map(|p| p.1).collect(),
            logprobs: None,
        }
    }

    fn sampler(seed: u64) -> Sampler {
        Sampler::seeded(seed).temperature(0.0)
    }

    #[test]
    fn greedy_takes_the_best_and_bias_can_ban_it() {
        let c = top(&[(5, 3.0), (7, 2.0), (9, 1.0)]);
        assert_eq!(sampler(1).sample(&c, &[]), Some(5));
        assert_eq!(sampler(1).logit_bias(5, -100.0).sample(&c, &[]), Some(7));
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let c = top(&[(5, 3.0), (7, 2.9)]);
        assert_eq!(sampler(1).repetition_penalty(1.5).sample(&c, &[5, 5]), Some(7));
        assert_eq!(sampler(1).presence_penalty(0.5).sample(&c, &[5]), Some(7));
        assert_eq!(sampler(1).frequency_penalty(0.01).sample(&c, &[5]), Some(5));
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let c = top(&[(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)]);
        let draw = |seed| {
            let mut s = sampler(seed).temperature(1.0).top_k(2);
            (0..50).map(|_| s.sample(&c, &[]).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().all(|t| *t == 1 || *t == 2));
        assert!(draw(7).contains(&2), "temperature 1 should sometimes pick the second");
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let c = top(&[(1, 10.0), (2, 0.0), (3, 0.0)]);
        let mut s = sampler(3).temperature(1.0).top_p(0.5);
        assert!((0..50).all(|_| s.sample(&c, &[]) == Some(1)));
        let mut s = sampler(3).temperature(1.0).min_p(0.01);
        assert!((0..50).all(|_| s.sample(&c, &[]) == Some(1)));
    }

    #[test]
    fn want_asks_for_one_candidate_only_when_greedy_and_plain() {
        assert_eq!(sampler(1).want(None), Want::TopK { k: 1, allowed: None, logprobs: false });
        assert_eq!(sampler(1).temperature(0.7).want(None), Want::TopK { k: 64, allowed: None, logprobs: false });
        assert_eq!(sampler(1).logit_bias(3, 5.0).want(None), Want::Logits);
        assert_eq!(
            sampler(1).temperature(0.7).want(Some(vec![1, 2])),
            Want::TopK { k: 2, allowed: Some(vec![1, 2]), logprobs: false }
        );
    }
}
