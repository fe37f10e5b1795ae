//! Constrained decoding: at each step only tokens that keep the output valid may be chosen.
//!
//! A constraint is an automaton over the output's bytes. For every step, the tokens whose
//! bytes it accepts go to the host as `allowed_ids`, so the host's top-k only ranks valid
//! continuations. [`JsonConstraint`] knows JSON's syntax; [`SchemaConstraint`] a JSON Schema.

mod json;
mod lexer;
mod schema;
mod schema_cursor;
#[cfg(test)]
mod schema_tests;
#[cfg(test)]
mod test_rng;

pub use json::JsonConstraint;
pub use schema::{SchemaConstraint, SchemaError};

/// Decides which tokens may come next.
pub trait Constraint {
    /// Whether `bytes` may be appended now.
    fn accepts(&self, bytes: &[u8]) -> bool;
    /// Record that `bytes` were appended.
    fn advance(&mut self, bytes: &[u8]);
    /// Whether the output is complete (generation should stop).
    fn is_complete(&self) -> bool;
    /// Text that completes the output validly, for when the token budget runs out.
    fn closing(&self) -> String;
    /// The tokens of `vocab` that may come next, in no particular order. The default asks
    /// [`Constraint::accepts`] of every token; byte automata walk the vocabulary as a trie.
    fn allowed(&self, vocab: &Vocab, out: &mut Vec<i32>) {
        out.extend(vocab.bytes.iter().enumerate().filter(|(_, b)| self.accepts(b)).map(|(id, _)| id as i32));
    }
}

/// A model's vocabulary as bytes, with the tokens in byte order so that a scan can share
/// the work of common prefixes and skip every token below a rejected prefix.
pub struct Vocab {
    bytes: Vec<Vec<u8>>,
    all: Sorted,
    /// Tokens that are plain string content (whole UTF-8 characters, no quote, backslash or
    /// control character): inside a JSON string they are always allowed and change nothing,
    /// so a scan there only walks the other tokens.
    plain: Vec<i32>,
    not_plain: Sorted,
}

/// Token ids sorted by their bytes, and how many bytes each shares with the one before.
#[derive(Default)]
struct Sorted {
    ids: Vec<u32>,
    shared: Vec<u16>,
}

impl Sorted {
    fn new(bytes: &[Vec<u8>], mut ids: Vec<u32>) -> Self {
        ids.sort_unstable_by(|&a, &b| bytes[a as usize].cmp(&bytes[b as usize]));
        let mut shared = Vec::with_capacity(ids.len());
        let mut previous: &[u8] = &[];
        for &id in &ids {
            let t = &bytes[id as usize];
            let common = t.iter().zip(previous).take_while(|(a, b)| a == b).count();
            shared.push(common.min(u16::MAX as usize) as u16);
            previous = t;
        }
        Self { ids, shared }
    }
}

/// Whether `bytes` are whole characters that a JSON string may hold as they are.
fn plain_string_content(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|s| s.chars().all(|c| c != '"' && c != '\\' && c >= ' '))
}

impl Vocab {
    /// `bytes[id]` is token `id`'s bytes; tokens without bytes are never allowed.
    pub fn new(bytes: Vec<Vec<u8>>) -> Self {
        let ids: Vec<u32> = (0..bytes.len() as u32).filter(|&id| !bytes[id as usize].is_empty()).collect();
        let (plain, not_plain): (Vec<u32>, Vec<u32>) =
            ids.iter().partition(|&&id| plain_string_content(&bytes[id as usize]));
        let all = Sorted::new(&bytes, ids);
        let not_plain = Sorted::new(&bytes, not_plain);
        Self { plain: plain.into_iter().map(|id| id as i32).collect(), bytes, all, not_plain }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Token `id`'s bytes (empty for an unknown id).
    pub fn token(&self, id: i32) -> &[u8] {
        usize::try_from(id).ok().and_then(|i| self.bytes.get(i)).map_or(&[], Vec::as_slice)
    }

    /// Every token `step` accepts byte by byte from `start` and that leaves a state `end`
    /// accepts, pushed onto `out`. Each state after a prefix is computed once for all
    /// tokens that share it.
    pub(crate) fn scan<S: Copy>(
        &self,
        start: S,
        step: impl FnMut(&mut S, u8) -> bool,
        end: impl Fn(&S) -> bool,
        out: &mut Vec<i32>,
    ) {
        self.scan_sorted(&self.all, start, step, end, out);
    }

    /// [`Vocab::scan`] for a `start` inside a JSON string, outside any escape or character:
    /// there every plain token is accepted without a look.
    pub(crate) fn scan_in_string<S: Copy>(
        &self,
        start: S,
        step: impl FnMut(&mut S, u8) -> bool,
        end: impl Fn(&S) -> bool,
        out: &mut Vec<i32>,
    ) {
        out.extend_from_slice(&self.plain);
        self.scan_sorted(&self.not_plain, start, step, end, out);
    }

    fn scan_sorted<S: Copy>(
        &self,
        sorted: &Sorted,
        start: S,
        mut step: impl FnMut(&mut S, u8) -> bool,
        end: impl Fn(&S) -> bool,
        out: &mut Vec<i32>,
    ) {
        let mut states: Vec<S> = Vec::with_capacity(64);
        states.push(start);
        // The current token's first `dead` bytes are rejected (usize::MAX: none are).
        let mut dead = usize::MAX;
        for (&id, &common) in sorted.ids.iter().zip(&sorted.shared) {
            let token = &self.bytes[id as usize];
            let common = common as usize;
            if dead <= common {
                continue;
            }
            dead = usize::MAX;
            states.truncate(common + 1);
            let mut state = states[common];
            let mut accepted = true;
            for (d, &b) in token[common..].iter().enumerate() {
                if !step(&mut state, b) {
                    dead = common + d + 1;
                    accepted = false;
                    break;
                }
                states.push(state);
            }
            if accepted && end(&state) {
                out.push(id as i32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy automaton: bytes must be ascending.
    fn ascending(last: &mut u8, b: u8) -> bool {
        let ok = b > *last;
        *last = b;
        ok
    }

    #[test]
    fn the_trie_scan_agrees_with_token_by_token_checks() {
        let words = ["", "a", "ab", "abc", "aba", "b", "ba", "bcd", "abcd", "c", "cb", "cbd", "ab", "zz", "xyz"];
        let vocab = Vocab::new(words.iter().map(|w| w.as_bytes().to_vec()).collect());
        let mut found = Vec::new();
        vocab.scan(0u8, ascending, |_| true, &mut found);
        found.sort_unstable();
        let expected: Vec<i32> = words
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                let mut last = 0;
                !w.is_empty() && w.bytes().all(|b| ascending(&mut last, b))
            })
            .map(|(i, _)| i as i32)
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn inside_a_string_plain_tokens_are_allowed_unread_and_the_rest_are_scanned() {
        let words: &[&[u8]] = &[b"abc", b" word", "é".as_bytes(), b"\"", b"x\"", b"\\n", b"\x01", b"\xC3", b"}"];
        let vocab = Vocab::new(words.iter().map(|w| w.to_vec()).collect());
        assert_eq!(vocab.plain, vec![0, 1, 2, 8]);
        let mut found = Vec::new();
        // An automaton that accepts nothing: only the plain tokens come back.
        vocab.scan_in_string((), |_, _| false, |_| true, &mut found);
        assert_eq!(found, vec![0, 1, 2, 8]);
    }
}
