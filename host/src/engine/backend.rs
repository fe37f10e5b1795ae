//! The process-wide llama.cpp backend.
//!
//! `backend()` starts it on first use; everything that loads models goes through it.
//!
//! llama-cpp-2 allows one `LlamaBackend` at a time, and creating contexts mutates the
//! model through a shared pointer, so both are serialized here.

use std::sync::{Mutex, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;

use super::EngineError;

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// Held while a llama.cpp context is created.
pub static CONTEXT_CREATION: Mutex<()> = Mutex::new(());

pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    let b = BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        LlamaBackend::init().map_err(|e| e.to_string())
    });
    b.as_ref().map_err(|message| EngineError::ModelLoad {
        path: Default::default(),
        message: format!("llama.cpp backend failed to start: {message}"),
    })
}

/// Whether this build can offload layers to a GPU.
pub fn supports_gpu_offload() -> bool {
    backend().map(|b| b.supports_gpu_offload()).unwrap_or(false)
}
