//! Host-side candidate selection over a logits row.
//!
//! A guest that scans a 262k-entry row under wasm interruption checks runs ~3x slower
//! than native code, so the host answers "the k best tokens" itself. Rows are scanned in
//! blocks whose maximum is computed branch-free (auto-vectorized); a block that cannot
//! beat the current k-th best is skipped whole, which is almost every block once the
//! buffer has filled.

const BLOCK: usize = 64;

/// Index of the largest finite logit; ties go to the lowest id. `None` when no entry is finite.
pub fn argmax(row: &[f32]) -> Option<usize> {
    let mut best = f32::NEG_INFINITY;
    let mut best_idx = None;
    for (b, block) in row.chunks(BLOCK).enumerate() {
        let m = block_max(block);
        if m > best {
            // Find the first position of the new maximum inside this block.
            if let Some(i) = block.iter().position(|&x| x == m) {
                best = m;
                best_idx = Some(b * BLOCK + i);
            }
        }
    }
    best_idx
}

/// `ln Σ exp(row)`, the log-softmax normalizer, computed stably around the row's maximum
/// (in f64: a 262k-entry sum in f32 would lose the small terms). Non-finite entries count
/// as impossible tokens.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.chunks(BLOCK).map(block_max).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = row.iter().filter(|x| x.is_finite()).map(|&x| f64::from(x - max).exp()).sum();
    max + sum.ln() as f32
}

#[inline]
fn block_max(block: &[f32]) -> f32 {
    // NaN compares false and so never wins.
    block.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// A descending list of at most `k` (id, logit) pairs; ties keep the lower id first.
struct Best {
    k: usize,
    ids: Vec<i32>,
    logits: Vec<f32>,
}

impl Best {
    fn new(k: usize) -> Self {
        Self { k, ids: Vec::with_capacity(k + 1), logits: Vec::with_capacity(k + 1) }
    }

    /// The logit a candidate must beat to enter.
    #[inline]
    fn threshold(&self) -> f32 {
        if self.ids.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.logits[self.k - 1]
        }
    }

    #[inline]
    fn offer(&mut self, id: i32, logit: f32) {
        if logit.is_nan() || (self.ids.len() >= self.k && logit <= self.threshold()) {
            return;
        }
        // Strictly-greater keeps earlier (lower) ids ahead on ties.
        let at = self.logits.partition_point(|&l| l >= logit);
        self.ids.insert(at, id);
        self.logits.insert(at, logit);
        if self.ids.len() > self.k {
            self.ids.pop();
            self.logits.pop();
        }
    }
}

/// The `k` highest logits of `row`, best first, as (ids, logits).
///
/// With `allowed`, only those ids are candidates (ids must be in range; duplicates are
/// ignored). Non-finite NaN entries never appear; `-inf` entries only fill up a list that
/// has fewer finite candidates than `k`.
pub fn top_k(row: &[f32], k: usize, allowed: Option<&[i32]>) -> (Vec<i32>, Vec<f32>) {
    let k = k.min(row.len());
    if k == 0 {
        return (Vec::new(), Vec::new());
    }
    if let Some(allowed) = allowed {
        let mut best = Best::new(k);
        for &id in allowed {
            let Some(&logit) = usize::try_from(id).ok().and_then(|i| row.get(i)) else {
                continue;
            };
            if logit > best.threshold() || best.ids.len() < k {
                if best.ids.contains(&id) {
                    continue;
                }
                best.offer(id, logit);
            }
        }
        return (best.ids, best.logits);
    }
    if k == 1 {
        // A row with no finite entry still yields its first non-NaN one, as k >= 2 does.
        return match argmax(row).or_else(|| row.iter().position(|x| !x.is_nan())) {
            Some(i) => (vec![i as i32], vec![row[i]]),
            None => (Vec::new(), Vec::new()),
        };
    }
    if k > 256 {
        return top_k_by_selection(row, k);
    }
    let mut best = Best::new(k);
    for (b, block) in row.chunks(BLOCK).enumerate() {
        // block_max never yields NaN, so `<=` is the exact negation of `>` here.
        if best.ids.len() >= k && block_max(block) <= best.threshold() {
            continue;
        }
        let base = b * BLOCK;
        for (i, &x) in block.iter().enumerate() {
            if x > best.threshold() || best.ids.len() < k {
                best.offer((base + i) as i32, x);
            }
        }
    }
    (best.ids, best.logits)
}

/// Large k: partial selection then a sort of the winners.
fn top_k_by_selection(row: &[f32], k: usize) -> (Vec<i32>, Vec<f32>) {
    // NaN never enters; -0.0 and +0.0 compare equal, as in the other paths.
    let mut idx: Vec<i32> = (0..row.len() as i32).filter(|&i| !row[i as usize].is_nan()).collect();
    let k = k.min(idx.len());
    let cmp = |a: &i32, b: &i32| {
        row[*b as usize].partial_cmp(&row[*a as usize]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    let logits = idx.iter().map(|&i| row[i as usize]).collect();
    (idx, logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(row: &[f32], k: usize, allowed: Option<&[i32]>) -> Vec<i32> {
        let mut ids: Vec<i32> = match allowed {
            Some(a) => {
                let mut a = a.to_vec();
                a.sort_unstable();
                a.dedup();
                a
            }
            None => (0..row.len() as i32).collect(),
        };
        ids.retain(|&i| !row[i as usize].is_nan());
        ids.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        ids.truncate(k);
        ids
    }

    fn pseudo_row(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 20.0 - 10.0
            })
            .collect()
    }

    #[test]
    fn matches_reference_for_many_k() {
        for seed in 0..5 {
            let row = pseudo_row(5000, seed);
            for k in [1, 2, 5, 40, 64, 300, 5000] {
                assert_eq!(top_k(&row, k, None).0, reference(&row, k, None), "k={k} seed={seed}");
            }
        }
    }

    #[test]
    fn ties_prefer_lower_ids_and_nan_is_skipped() {
        let row = vec![1.0, 3.0, f32::NAN, 3.0, 2.0];
        assert_eq!(argmax(&row), Some(1));
        assert_eq!(top_k(&row, 3, None).0, vec![1, 3, 4]);
        assert_eq!(top_k(&row, 3, None).1, vec![3.0, 3.0, 2.0]);
    }

    #[test]
    fn log_sum_exp_normalizes_a_row() {
        let row: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 10.0).collect();
        let lse = log_sum_exp(&row);
        let total: f64 = row.iter().map(|&x| f64::from(x - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        // Far past f32's exp range: still finite.
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f32.ln())).abs() < 1e-3);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY, 0.0]), 0.0);
    }

    #[test]
    fn allowed_restricts_and_dedups() {
        let row = pseudo_row(1000, 9);
        let allowed = [5, 900, 5, 17, 400, 17];
        assert_eq!(top_k(&row, 3, Some(&allowed)).0, reference(&row, 3, Some(&allowed)));
        assert_eq!(top_k(&row, 10, Some(&allowed)).0.len(), 4);
    }

    #[test]
    fn a_row_without_finite_entries_answers_every_k_alike() {
        let row = vec![f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY];
        assert_eq!(top_k(&row, 1, None).0, vec![1]);
        assert_eq!(top_k(&row, 2, None).0, vec![1, 2]);
    }
}
