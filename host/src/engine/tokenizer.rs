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
            Tokenizer::HuggingFace(t) => tokens
                .iter()
                .map(|&id| {
                    t.decode(&[id as u32], !render_special).map(String::into_bytes).map_err(|e| self.tokenizer_error(e))
                })
                .collect(),
        }
    }

    fn tokenizer_error(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::Tokenizer { model: self.name.clone(), message: e.to_string() }
    }
}
