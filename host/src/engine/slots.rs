//! The scheduler's sequence slots: one per llama.cpp sequence id, each free, live (an open
//! sequence) or retained (a closed sequence whose KV cells stay in its stream until the
//! slot is needed again, as llama-server's slots keep their prompt).

use std::cmp::Reverse;
use std::time::Instant;

use tokio::sync::oneshot;

use super::prefix_cache::common_prefix;
use super::{EngineError, Output, Want};

pub(crate) struct Feed {
    pub(crate) want: Want,
    pub(crate) reply: oneshot::Sender<Result<Output, EngineError>>,
}

pub(crate) struct Live {
    /// Tokens whose KV cells exist, at positions 0..len.
    pub(crate) history: Vec<i32>,
    /// Tokens not yet computed: the current feed's, after any that a preemption took
    /// out of the cells.
    pub(crate) pending: Vec<i32>,
    pub(crate) feed: Option<Feed>,
    /// When this sequence's last feed was answered, until its next command arrives.
    pub(crate) answered_at: Option<Instant>,
    /// The sequence holds no cells and has not yet looked for a reusable prefix.
    pub(crate) fresh: bool,
    /// Position where the current feed's tokens start: a failed feed rolls back to it.
    pub(crate) feed_start: usize,
    /// The current feed is one generated token (a decode), not a prompt or its last chunk.
    pub(crate) decoding: bool,
    /// Open order: the newest sequence is the one preempted.
    pub(crate) opened: u64,
    /// The id its caller knows it by (the slot may change before its first prompt).
    pub(crate) id: usize,
    /// What the slot's previous sequence left in the cells, until this sequence's first
    /// prompt decides whether to continue from it, keep it elsewhere or drop it.
    pub(crate) retained: Option<Retained>,
}

impl Live {
    pub(crate) fn new(id: usize, opened: u64, retained: Option<Retained>) -> Self {
        Self {
            history: Vec::new(),
            pending: Vec::new(),
            feed: None,
            answered_at: None,
            fresh: true,
            feed_start: 0,
            decoding: false,
            opened,
            id,
            retained,
        }
    }

    /// Common prefix of `prompt` with what this sequence holds and will hold once its
    /// pending tokens are computed.
    pub(crate) fn future_prefix(&self, prompt: &[i32]) -> usize {
        let done = common_prefix(&self.history, prompt);
        if done < self.history.len() {
            return done;
        }
        done + common_prefix(&self.pending, &prompt[done..])
    }

    /// The tokens whose cells this slot holds now.
    pub(crate) fn cells(&self) -> &[i32] {
        match &self.retained {
            Some(r) if self.history.is_empty() => &r.tokens,
            _ => &self.history,
        }
    }
}

/// A closed sequence's tokens, whose cells are still in its stream.
pub(crate) struct Retained {
    pub(crate) tokens: Vec<i32>,
    /// When it closed (the scheduler's close count): the oldest is reused first.
    pub(crate) closed: u64,
}

pub(crate) enum Slot {
    Free,
    Retained(Retained),
    Live(Live),
}

impl Slot {
    /// The cells a closed sequence left here, while nothing else uses the slot: a retained
    /// slot, or one a sequence has opened in but not yet fed.
    pub(crate) fn retained_mut(&mut self) -> Option<&mut Retained> {
        match self {
            Slot::Retained(r) => Some(r),
            Slot::Live(l) if l.history.is_empty() => l.retained.as_mut(),
            _ => None,
        }
    }

    /// Forget the cells a closed sequence left here (they were cleared).
    pub(crate) fn drop_retained(&mut self) {
        match self {
            Slot::Retained(_) => *self = Slot::Free,
            Slot::Live(l) => l.retained = None,
            Slot::Free => {}
        }
    }

    /// The tokens whose cells this slot holds.
    pub(crate) fn cells(&self) -> &[i32] {
        match self {
            Slot::Free => &[],
            Slot::Retained(r) => &r.tokens,
            Slot::Live(l) => l.cells(),
        }
    }
}

/// Runs of consecutive live slots, with the sequence in slot `from` moved to `to` if given.
pub(crate) fn live_runs(slots: &[Slot], moved: Option<(usize, usize)>) -> usize {
    let live = |i: usize| match moved {
        Some((_, to)) if i == to => true,
        Some((from, _)) if i == from => false,
        _ => matches!(slots.get(i), Some(Slot::Live(_))),
    };
    (0..slots.len()).filter(|&i| live(i) && (i == 0 || !live(i - 1))).count()
}

/// The slot a new sequence opens in, or `None` when every slot is live.
///
/// llama.cpp runs a step as one ubatch only over consecutive sequence ids, so the slot
/// that joins the most live neighbours comes first. Then a free slot before a retained
/// one (retained cells may still serve a later prompt), the longest-closed retained one,
/// and the lowest id.
pub(crate) fn choose(slots: &[Slot]) -> Option<usize> {
    let live = |i: usize| matches!(slots.get(i), Some(Slot::Live(_)));
    (0..slots.len()).filter(|&i| !live(i)).min_by_key(|&i| {
        let neighbours = usize::from(i > 0 && live(i - 1)) + usize::from(live(i + 1));
        let age = match &slots[i] {
            Slot::Retained(r) => Some(r.closed),
            _ => None,
        };
        // `None` sorts first: free slots before retained ones.
        (Reverse(neighbours), age, i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Slot {
        Slot::Live(Live::new(0, 0, None))
    }

    fn retained(closed: u64) -> Slot {
        Slot::Retained(Retained { tokens: vec![1, 2, 3], closed })
    }

    #[test]
    fn free_slots_come_before_retained_ones_and_old_before_new() {
        assert_eq!(choose(&[retained(5), Slot::Free, retained(1)]), Some(1));
        assert_eq!(choose(&[retained(5), retained(2), retained(7)]), Some(1));
        assert_eq!(choose(&[live(), live()]), None);
    }

    #[test]
    fn live_ids_stay_contiguous() {
        // A gap between live slots is filled first, even by a retained slot.
        assert_eq!(choose(&[live(), retained(9), live(), Slot::Free]), Some(1));
        // Otherwise the live run grows at one of its ends.
        assert_eq!(choose(&[Slot::Free, Slot::Free, live(), retained(3), Slot::Free]), Some(1));
        assert_eq!(choose(&[retained(1), Slot::Free, Slot::Free, live(), retained(3)]), Some(2));
    }

    #[test]
    fn runs_of_live_slots_count_a_move() {
        let slots = [live(), Slot::Free, live(), retained(1), Slot::Free];
        assert_eq!(live_runs(&slots, None), 2);
        assert_eq!(live_runs(&slots, Some((2, 1))), 1);
        assert_eq!(live_runs(&slots, Some((2, 3))), 2);
        assert_eq!(live_runs(&slots, Some((0, 4))), 2);
        assert_eq!(live_runs(&[Slot::Free, live()], Some((1, 0))), 1);
    }
}
