//! Log-probabilities of generated tokens, as OpenAI's `logprobs` reports them: the model's
//! own distribution (log-softmax of its logits over the whole vocabulary), before
//! temperature, penalties or biases.

use crate::model::Candidates;

/// One generated token, how likely the model found it, and its most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: i32,
    pub logprob: f32,
    /// The most likely tokens at this position, best first (among those a constraint
    /// allowed, when there is one).
    pub top: Vec<(i32, f32)>,
}

/// The entry for `chosen` with `n` alternatives, from what the host returned.
pub(crate) fn of(candidates: &Candidates, chosen: i32, n: usize) -> Option<TokenLogprob> {
    match candidates {
        Candidates::Top { ids, logprobs: Some(lp), .. } => {
            let at = ids.iter().position(|&id| id == chosen)?;
            let top = ids.iter().copied().zip(lp.iter().copied()).take(n).collect();
            Some(TokenLogprob { id: chosen, logprob: *lp.get(at)?, top })
        }
        Candidates::Top { logprobs: None, .. } => None,
        Candidates::Full(row) => {
            let normalizer = log_sum_exp(row);
            let logprob = row.get(usize::try_from(chosen).ok()?)? - normalizer;
            let mut best: Vec<(i32, f32)> = Vec::with_capacity(n + 1);
            for (id, &l) in row.iter().enumerate() {
                if n == 0 || l.is_nan() || best.len() == n && l <= best[n - 1].1 {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (id as i32, l));
                best.truncate(n);
            }
            let top = best.into_iter().map(|(id, l)| (id, l - normalizer)).collect();
            Some(TokenLogprob { id: chosen, logprob, top })
        }
    }
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = row.iter().filter(|x| x.is_finite()).map(|&x| f64::from(x - max).exp()).sum();
    max + sum.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_row_gives_log_softmax_and_the_best_alternatives() {
        let row = vec![1.0, 3.0, 2.0, f32::NAN, 0.5];
        let e = of(&Candidates::Full(row.clone()), 2, 2).unwrap();
        let z: f64 = [1.0f64, 3.0, 2.0, 0.5].iter().map(|x| x.exp()).sum();
        assert!((f64::from(e.logprob) - (2.0 - z.ln())).abs() < 1e-5);
        assert_eq!(e.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let normalizer = 2.0 - e.logprob;
        let total: f32 = [0, 1, 2, 4].iter().map(|&i| (row[i] - normalizer).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
    }

    #[test]
    fn host_candidates_carry_their_own_logprobs() {
        let c =
            Candidates::Top { ids: vec![7, 3, 9], logits: vec![5.0, 4.0, 1.0], logprobs: Some(vec![-0.1, -1.1, -4.1]) };
        let e = of(&c, 3, 2).unwrap();
        assert_eq!(e, TokenLogprob { id: 3, logprob: -1.1, top: vec![(7, -0.1), (3, -1.1)] });
        assert!(of(&c, 42, 2).is_none());
    }
}
