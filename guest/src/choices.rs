//! Several generations from one prompt, advanced in lockstep: each round feeds every
//! running one in the same host batch step (`flywheel:llm/batch`), so `n` choices cost
//! about one generation's time, and the prompt is computed once (the host copies its
//! cells to the other sequences).

use crate::generate::{GenerateOptions, Generation, Piece};
use crate::model::{feed_together, Model, Session, Want};
use crate::sampling::Sampler;
use crate::Error;

/// `n` generations after one prompt; pull text with [`Choices::next_texts`].
pub struct Choices<'m> {
    generations: Vec<Generation<'m>>,
    ended: Vec<bool>,
    /// Choices that ended (all their text shown) since the last [`Choices::take_ended`].
    newly_ended: Vec<usize>,
}

impl<'m> Choices<'m> {
    pub(crate) fn new(
        model: &'m Model,
        prompt: &[i32],
        choices: Vec<(Sampler, GenerateOptions)>,
    ) -> Result<Self, Error> {
        let generations = choices
            .into_iter()
            .map(|(sampler, options)| Generation::new(model, prompt, sampler, options))
            .collect::<Result<Vec<_>, _>>()?;
        let ended = vec![false; generations.len()];
        Ok(Self { generations, ended, newly_ended: Vec::new() })
    }

    pub fn len(&self) -> usize {
        self.generations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.generations.is_empty()
    }

    /// Choice `index`, for its finish reason, token counts and log-probabilities.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut Generation<'m>> {
        self.generations.get_mut(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Generation<'m>> {
        self.generations.iter()
    }

    /// The choices that have ended since the last call, once their last text was returned
    /// (for a stream's per-choice `finish_reason`).
    pub fn take_ended(&mut self) -> Vec<usize> {
        let mut ended = std::mem::take(&mut self.newly_ended);
        ended.sort_unstable();
        ended
    }

    /// One round: every running choice takes a step, all in one batch. Returns the text each
    /// choice made safe to show, by index (a choice may show nothing in a round), or `None`
    /// once every choice has ended and shown all its text.
    pub fn next_texts(&mut self) -> Result<Option<Vec<(usize, String)>>, Error> {
        if self.ended.iter().all(|&e| e) {
            return Ok(None);
        }
        let mut fed: Vec<(usize, Want)> = Vec::new();
        let mut idle = Vec::new();
        for (i, g) in self.generations.iter_mut().enumerate() {
            if self.ended[i] {
                continue;
            }
            match g.prepare()? {
                Some(want) => fed.push((i, want)),
                None => idle.push(i),
            }
        }
        let mut tokens = vec![None; self.generations.len()];
        if !fed.is_empty() {
            let mut parts: Vec<(&mut Session, &[i32], &Want)> = Vec::with_capacity(fed.len());
            let mut wants = fed.iter().map(|(_, w)| w);
            for (i, g) in self.generations.iter_mut().enumerate() {
                if fed.iter().any(|(f, _)| *f == i) {
                    let (session, input) = g.feed_parts();
                    let want = wants.next().ok_or_else(|| Error::Protocol("feeds out of order".into()))?;
                    parts.push((session, input, want));
                }
            }
            let candidates = feed_together(&mut parts)?;
            drop(parts);
            for ((i, _), c) in fed.iter().zip(&candidates) {
                tokens[*i] = self.generations[*i].accept(c)?;
            }
        }
        let mut pieces = Vec::new();
        for i in fed.iter().map(|(i, _)| *i).chain(idle) {
            match self.generations[i].text_after(tokens[i])? {
                Piece::Text(text) => pieces.push((i, text)),
                Piece::Nothing => {}
                Piece::Ended => {
                    self.ended[i] = true;
                    self.newly_ended.push(i);
                }
            }
        }
        pieces.sort_by_key(|(i, _)| *i);
        Ok(Some(pieces))
    }
}
