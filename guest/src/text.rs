//! Token ids to text, incrementally: the pieces a stream shows add up to exactly what
//! detokenizing the whole sequence gives.

/// Tokens of context kept before the first token not yet shown.
const WINDOW: usize = 4;

/// Incremental detokenization, as servers built on Hugging Face tokenizers do it: a new
/// token's text is what decoding a short window ending at it adds to decoding the window
/// without it. Decoding a window rather than the token alone keeps the tokenizer's rules
/// that depend on context: a SentencePiece word's leading space (dropped at the start of
/// text, kept after other text), and a UTF-8 character whose bytes span several tokens
/// (held back until it is complete). The window starts at a token already shown, so rules
/// for the start of the text only ever touch text that is not shown again.
#[derive(Clone, Debug, Default)]
pub struct TextDecoder {
    tokens: Vec<i32>,
    /// `tokens[..read]` are shown; `tokens[window..read]` is the context decoded with the rest.
    window: usize,
    read: usize,
    /// The text of `tokens[window..read]`, once computed.
    shown: Option<String>,
}

impl TextDecoder {
    /// A decoder for tokens that follow `context` (the end of the prompt, never shown).
    /// With no context the text starts at the first token, as a whole-sequence decode does.
    pub fn new(context: &[i32]) -> Self {
        let context = &context[context.len().saturating_sub(WINDOW)..];
        Self { tokens: context.to_vec(), window: 0, read: context.len(), shown: None }
    }

    /// Adds a token; returns the text it made final (often all of its own text, sometimes
    /// nothing yet, sometimes what earlier tokens held back too).
    pub fn push<E>(&mut self, token: i32, decode: impl Fn(&[i32]) -> Result<String, E>) -> Result<String, E> {
        self.tokens.push(token);
        let shown = match self.shown.take() {
            Some(s) => s,
            None => decode(&self.tokens[self.window..self.read])?,
        };
        let all = decode(&self.tokens[self.window..])?;
        // An unfinished character decodes as U+FFFD until its last byte arrives.
        if all.ends_with(char::REPLACEMENT_CHARACTER) {
            self.shown = Some(shown);
            return Ok(String::new());
        }
        let new = all[common_prefix(&shown, &all)..].to_string();
        if new.is_empty() {
            self.shown = Some(shown);
            return Ok(new);
        }
        self.advance();
        Ok(new)
    }

    /// The text of tokens still held back, at the end of the sequence.
    pub fn finish<E>(&mut self, decode: impl Fn(&[i32]) -> Result<String, E>) -> Result<String, E> {
        if self.read == self.tokens.len() {
            return Ok(String::new());
        }
        let shown = match self.shown.take() {
            Some(s) => s,
            None => decode(&self.tokens[self.window..self.read])?,
        };
        let all = decode(&self.tokens[self.window..])?;
        self.advance();
        Ok(all[common_prefix(&shown, &all)..].to_string())
    }

    /// Everything pushed is shown; the window moves to start at what was just shown.
    fn advance(&mut self) {
        self.window = self.read;
        self.read = self.tokens.len();
        self.shown = None;
        // Keep only what a later window can reach.
        let keep_from = self.window.min(self.read.saturating_sub(WINDOW));
        if keep_from > 64 {
            self.tokens.drain(..keep_from);
            self.window -= keep_from;
            self.read -= keep_from;
        }
    }
}

/// Where `all` stops agreeing with `shown` (its length, when the tokenizer only appends, as
/// tokenizers do away from unfinished characters); a char boundary of `all`.
fn common_prefix(shown: &str, all: &str) -> usize {
    if all.starts_with(shown) {
        return shown.len();
    }
    shown
        .char_indices()
        .zip(all.char_indices())
        .find(|((_, a), (_, b))| a != b)
        .map_or(shown.len().min(all.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy SentencePiece-like vocabulary: "▁" words, byte tokens, and a decoder that
    /// drops the leading space of the text and decodes bytes lossily.
    fn decode(ids: &[i32]) -> Result<String, ()> {
        let mut bytes = Vec::new();
        for &id in ids {
            match id {
                0..=255 => bytes.push(id as u8),
                300 => bytes.extend_from_slice(" hello".as_bytes()),
                301 => bytes.extend_from_slice(" world".as_bytes()),
                302 => bytes.extend_from_slice("lo".as_bytes()),
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(text.strip_prefix(' ').map(str::to_string).unwrap_or(text))
    }

    fn stream(context: &[i32], ids: &[i32]) -> String {
        let mut d = TextDecoder::new(context);
        let mut out = String::new();
        for &id in ids {
            out.push_str(&d.push(id, decode).unwrap());
        }
        out + &d.finish(decode).unwrap()
    }

    fn continuation(context: &[i32], ids: &[i32]) -> String {
        let all: Vec<i32> = context.iter().chain(ids).copied().collect();
        let whole = decode(&all).unwrap();
        let before = decode(context).unwrap();
        whole[before.len()..].to_string()
    }

    #[test]
    fn pieces_add_up_to_the_whole_decode() {
        // "€" is E2 82 AC, split over three byte tokens.
        let cases: &[(&[i32], &[i32])] = &[
            (&[], &[300, 301]),
            (&[300], &[301, 302]),
            (&[300], &[0xE2, 0x82, 0xAC, 301]),
            (&[], &[0xE2, 0x82, 0xAC]),
            (&[301], &[0xE2, 0x82, 302, 0xAC]),
            (&[], &[0xF0, 0x9F, 0x98]),
            (&[300], &[0xFF, 0xFE, 300]),
        ];
        for (context, ids) in cases {
            assert_eq!(stream(context, ids), continuation(context, ids), "{context:?} {ids:?}");
        }
    }

    #[test]
    fn random_sequences_add_up() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let vocab: Vec<i32> = (0x20..0x7f).chain(0x80..0x100).chain([300, 301, 302, 999]).collect();
        for _ in 0..2000 {
            let n = (next() % 20) as usize;
            let ids: Vec<i32> = (0..n).map(|_| vocab[(next() % vocab.len() as u64) as usize]).collect();
            // A prompt's end is whole text: no unfinished character.
            let words = [300, 301, 302, 0x41, 0x20];
            let context: Vec<i32> = (0..(next() % 3)).map(|_| words[(next() % words.len() as u64) as usize]).collect();
            assert_eq!(stream(&context, &ids), continuation(&context, &ids), "{context:?} {ids:?}");
        }
    }
}
