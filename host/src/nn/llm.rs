//! `flywheel:llm/model`: tokenization, chat templates and model facts.

use super::bindings::flywheel::llm::model::{self, ChatMessage, Error, ErrorCode, ModelInfo};
use super::NnView;
use crate::engine::{EngineError, ModelLease};

fn err(code: ErrorCode, message: impl Into<String>) -> Error {
    Error { code, message: message.into() }
}

fn from_engine(e: EngineError) -> Error {
    let code = match &e {
        EngineError::UnknownModel(_) => ErrorCode::NotFound,
        EngineError::ChatTemplate(_) => ErrorCode::Unsupported,
        _ => ErrorCode::InvalidArgument,
    };
    err(code, e.to_string())
}

/// Longest text or token list a tokenizer call takes: these run on an async worker and
/// cannot be interrupted, so they must stay short.
const MAX_TEXT_BYTES: usize = 4 << 20;
const MAX_TOKENS: usize = 1 << 20;

fn too_long(what: &str, n: usize, max: usize) -> Error {
    err(ErrorCode::InvalidArgument, format!("{what} has {n} entries; at most {max} are accepted"))
}

impl NnView<'_> {
    /// The model, loaded first if it must be (this waits for the load).
    async fn llm_model(&mut self, name: &str) -> Result<ModelLease, Error> {
        self.ctx.note_call();
        self.ctx.model(name).await.map_err(|refusal| {
            let code = match refusal.code {
                super::ErrorCode::Security => ErrorCode::NotAllowed,
                super::ErrorCode::InvalidArgument => ErrorCode::InvalidArgument,
                _ => ErrorCode::NotFound,
            };
            err(code, refusal.message)
        })
    }
}

impl model::Host for NnView<'_> {
    fn list_models(&mut self) -> wasmtime::Result<Vec<String>> {
        self.ctx.note_call();
        Ok(self.ctx.allowed_model_names())
    }

    async fn info(&mut self, name: String) -> wasmtime::Result<Result<ModelInfo, Error>> {
        Ok(self.llm_model(&name).await.map(|m| {
            let i = m.info();
            ModelInfo {
                name: i.name.clone(),
                description: i.description.clone(),
                vocab_size: i.vocab_size as u32,
                context_length: i.context_length as u32,
                bos: i.bos,
                eos: i.eos,
                eot: i.eot,
                end_of_generation: i.end_of_generation.clone(),
                adds_bos: i.adds_bos,
                chat_template: i.chat_template.clone(),
            }
        }))
    }

    async fn tokenize(
        &mut self,
        name: String,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> wasmtime::Result<Result<Vec<i32>, Error>> {
        if text.len() > MAX_TEXT_BYTES {
            return Ok(Err(too_long("the text", text.len(), MAX_TEXT_BYTES)));
        }
        let model = self.llm_model(&name).await;
        Ok(model.and_then(|m| m.tokenize(&text, add_special, parse_special).map_err(from_engine)))
    }

    async fn detokenize(
        &mut self,
        name: String,
        tokens: Vec<i32>,
        render_special: bool,
    ) -> wasmtime::Result<Result<String, Error>> {
        if tokens.len() > MAX_TOKENS {
            return Ok(Err(too_long("the token list", tokens.len(), MAX_TOKENS)));
        }
        let model = self.llm_model(&name).await;
        Ok(model.and_then(|m| m.detokenize(&tokens, render_special).map_err(from_engine)))
    }

    async fn token_bytes(
        &mut self,
        name: String,
        tokens: Vec<i32>,
        render_special: bool,
    ) -> wasmtime::Result<Result<Vec<Vec<u8>>, Error>> {
        if tokens.len() > MAX_TOKENS {
            return Ok(Err(too_long("the token list", tokens.len(), MAX_TOKENS)));
        }
        let model = self.llm_model(&name).await;
        Ok(model.and_then(|m| m.token_bytes(&tokens, render_special).map_err(from_engine)))
    }

    async fn apply_chat_template(
        &mut self,
        name: String,
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
    ) -> wasmtime::Result<Result<String, Error>> {
        let size: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
        if size > MAX_TEXT_BYTES {
            return Ok(Err(too_long("the conversation", size, MAX_TEXT_BYTES)));
        }
        let model = self.llm_model(&name).await;
        Ok(model.and_then(|m| {
            let messages: Vec<(String, String)> = messages.into_iter().map(|c| (c.role, c.content)).collect();
            m.apply_chat_template(&messages, add_generation_prompt).map_err(from_engine)
        }))
    }
}
