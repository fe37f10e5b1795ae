//! Everything the engine can refuse or fail at, each with the facts a caller needs.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },

    #[error("model file {path} is missing or unreadable ({reason}); fetch it with `python3 models/fetch.py {model}` (expected sha256 {expected})")]
    ModelFileMissing { model: String, path: PathBuf, reason: String, expected: String },

    #[error("model file {path} is corrupt or truncated: sha256 is {actual}, expected {expected}; fetch it again with `python3 models/fetch.py {model}`")]
    ModelFileCorrupt { model: String, path: PathBuf, actual: String, expected: String },

    #[error("llama.cpp could not load model file {path}: {message}")]
    ModelLoad { path: PathBuf, message: String },

    #[error("model {model}: {message}")]
    Devices { model: String, message: String },

    #[error("llama.cpp could not create a context for model {model}: {message}")]
    ContextCreate { model: String, message: String },

    #[error("tokenizer for model {model}: {message}")]
    Tokenizer { model: String, message: String },

    #[error("unknown model {0:?}")]
    UnknownModel(String),

    #[error("model {model} is busy: {waiting} requests already wait for a sequence (queue limit {limit})")]
    QueueFull { model: String, waiting: usize, limit: usize },

    #[error("model {model} has no free sequence right now, and this caller already holds one")]
    NoFreeSequence { model: String },

    #[error("model {model} is busy: no sequence became free within {waited:?}")]
    AdmissionTimeout { model: String, waited: Duration },

    #[error("context full: the sequence would hold {requested} tokens, the limit is {limit}")]
    ContextFull { requested: usize, limit: usize },

    #[error("embedding input {index} has {tokens} tokens; this model embeds at most {limit} per input")]
    EmbeddingInputTooLong { index: usize, tokens: usize, limit: usize },

    #[error("the KV cache of model {model} is full; retry later or with a shorter prompt")]
    KvCacheFull { model: String },

    #[error("token id {token} is out of range for a vocabulary of {vocab}")]
    InvalidToken { token: i32, vocab: usize },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("this sequence was interrupted by a cancelled call and can no longer be used")]
    SequenceBroken,

    #[error("llama.cpp decode failed: {0}")]
    Decode(String),

    #[error("the scheduler of model {0} has stopped")]
    SchedulerStopped(String),

    #[error("model {0} was unloaded; open it again")]
    ModelUnloaded(String),

    #[error("model {model} could not be loaded: {message}")]
    ModelLoadFailed { model: String, message: String },

    #[error("model {model} cannot load: max_loaded_models is {max} and no loaded model became idle in time (in use: {})", busy.join(", "))]
    NoRoomToLoad { model: String, max: usize, busy: Vec<String> },

    #[error("model {model} is loading for another request and did not finish within {waited:?}")]
    ModelLoadWait { model: String, waited: Duration },

    #[error("model {model} is in use by {users} requests or sequences; it can be unloaded once they finish")]
    ModelBusy { model: String, users: usize },

    #[error("model lifecycle: {0}")]
    Lifecycle(String),

    #[error("{0}")]
    QuotaExceeded(#[from] super::QuotaExceeded),
}
