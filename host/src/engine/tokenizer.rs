//! Text <-> token ids, with the GGUF vocabulary or, when the manifest names one, a
//! Hugging Face `tokenizer.json`.

use std::path::Path;
use std::sync::Arc;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::EngineError;

pub(crate) enum Tokenizer {
    Gguf,
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    pub(crate) fn load(model: &str, path: Option<&Path>) -> Result<Self, EngineError> {
        match path {
            None => Ok(Tokenizer::Gguf),
            Some(p) => tokenizers::Tokenizer::from_file(p).map(|t| Tokenizer::HuggingFace(Box::new(t))).map_err(|e| {
                EngineError::Tokenizer {
                    model: model.to_string(),
                    message: format!("cannot load {}: {e}", p.display()),
                }
            }),
        }
    }
}

/// Tokenization for one model. Cheap to share across threads.
pub(crate) struct Vocab {
    pub(crate) name: String,
    pub(crate) llama: Arc<LlamaModel>,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) n_vocab: usize,
}

impl Vocab {
    fn check(&self, tokens: &[i32]) -> Result<(), EngineError> {
        // llama.cpp aborts the process on an out-of-range id, so every id is checked first.
        match tokens.iter().find(|&&t| t < 0 || t as usize >= self.n_vocab) {
            Some(&token) => Err(EngineError::InvalidToken { token, vocab: self.n_vocab }),
            None => Ok(()),
        }
    }

    pub(crate) fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>, EngineError> {
        match &self.tokenizer {
            Tokenizer::Gguf => Ok(self
                .llama
                .vocab()
                .tokenize(text.as_bytes(), add_special, parse_special)
                .into_iter()
                .map(|t| t.0)
                .collect()),
            Tokenizer::HuggingFace(t) => {
                let enc = t.encode(text, add_special).map_err(|e| self.tokenizer_error(e))?;
                let ids: Vec<i32> = enc.get_ids().iter().map(|&i| i as i32).collect();
                self.check(&ids)?;
                Ok(ids)
            }
        }
    }

    pub(crate) fn detokenize(&self, tokens: &[i32], render_special: bool) -> Result<String, EngineError> {
        self.check(tokens)?;
        if tokens.is_empty() {
            return Ok(String::new());
        }
        match &self.tokenizer {
            Tokenizer::Gguf => {
                let toks: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken(t)).collect();
                let bytes = self.llama.vocab().detokenize(&toks, false, render_special);
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::HuggingFace(t) => {
                let ids: Vec<u32> = tokens.iter().map(|&i| i as u32).collect();
                t.decode(&ids, !render_special).map_err(|e| self.tokenizer_error(e))
            }
        }
    }

    /// The bytes each token prints as; concatenating them yields the exact output text.
    pub(crate) fn token_bytes(&self, tokens: &[i32], render_special: bool) -> Result<Vec<Vec<u8>>, EngineError> {
        self.check(tokens)?;
        match &self.tokenizer {
            Tokenizer::Gguf => {
                let vocab = self.llama.vocab();
                Ok(tokens.iter().map(|&t| vocab.token_to_piece(LlamaToken(t), render_special, None)).collect())
            }
            Tokenizer::HuggingFace(t) => {
                let anchor = t.token_to_id("a").or_else(|| t.encode("a", false).ok()?.get_ids().first().copied());
                let byte_level = t
                    .get_decoder()
                    .and_then(|d| serde_json::to_string(d).ok())
                    .is_some_and(|json| json.contains("\"ByteLevel\""));
                // Decoded once for the whole batch: constraints ask for every token at once.
                let anchor = match anchor {
                    Some(a) => Some((a, t.decode(&[a], false).map_err(|e| self.tokenizer_error(e))?)),
                    None => None,
                };
                tokens
                    .iter()
                    .map(|&id| hf_token_bytes(t, id as u32, anchor.as_ref(), byte_level, render_special))
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.tokenizer_error(e))
            }
        }
    }

    fn tokenizer_error(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::Tokenizer { model: self.name.clone(), message: e.to_string() }
    }
}

/// The bytes a token adds in the middle of text. Decoding it alone would apply the rules
/// for the start of text (a SentencePiece word loses its leading space) and cannot show
/// part of a UTF-8 character, so it is decoded after a plain `anchor` token, and a token
/// that is part of a character yields its raw byte (`<0xNN>` byte fallback, or a
/// byte-level symbol).
fn hf_token_bytes(
    t: &tokenizers::Tokenizer,
    id: u32,
    anchor: Option<&(u32, String)>,
    byte_level: bool,
    render_special: bool,
) -> tokenizers::Result<Vec<u8>> {
    let Some((anchor, before)) = anchor else { return Ok(t.decode(&[id], !render_special)?.into_bytes()) };
    let with = t.decode(&[*anchor, id], !render_special)?;
    match with.strip_prefix(before.as_str()) {
        Some(added) if !added.contains(char::REPLACEMENT_CHARACTER) => return Ok(added.as_bytes().to_vec()),
        _ => {}
    }
    let Some(piece) = t.id_to_token(id) else { return Ok(Vec::new()) };
    if let Some(byte) =
        piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok())
    {
        return Ok(vec![byte]);
    }
    if byte_level {
        if let Some(bytes) = piece.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>() {
            return Ok(bytes);
        }
    }
    Ok(with.get(before.len()..).unwrap_or_default().as_bytes().to_vec())
}

/// The byte a GPT-2 byte-level symbol stands for: printable bytes stand for themselves,
/// the others were moved, in order, to U+0100 and up.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let code = c as u32;
    if code < 0x100 {
        return printable(code).then_some(code as u8);
    }
    (0u32..=255).filter(|&b| !printable(b)).nth((code - 0x100) as usize).map(|b| b as u8)
}
