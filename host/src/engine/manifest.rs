//! Model manifests: one TOML file per model in `models/`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EngineError;

/// A model as its manifest describes it. Relative paths are resolved against the
/// manifest's folder.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// Name guests and clients use (`load-by-name`, OpenAI `model`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The GGUF file.
    pub file: PathBuf,
    /// Expected sha256 of `file`, checked at load. Absent for generated test models.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Most tokens one sequence may hold (prompt plus generated).
    #[serde(default = "defaults::context_length")]
    pub context_length: usize,
    /// llama.cpp threads for decoding.
    #[serde(default = "defaults::threads")]
    pub threads: i32,
    /// Layers offloaded to the GPU (needs the `cuda` build).
    #[serde(default)]
    pub n_gpu_layers: u32,
    /// The GPU that holds the whole model with `split_mode = "none"`, or the intermediate
    /// results with `"row"` (an index among the GPUs used).
    #[serde(default)]
    pub main_gpu: i32,
    /// How offloaded layers spread over several GPUs: `"layer"` (default: whole layers and
    /// their KV per GPU), `"row"` (rows of each matrix, where supported), `"none"`.
    #[serde(default)]
    pub split_mode: SplitMode,
    /// Backend devices to offload to, by name (`/admin/models` lists them, e.g. `CUDA0`);
    /// empty: every GPU.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Proportions of the offloaded layers (rows with `split_mode = "row"`) each GPU takes,
    /// in the order of `devices` (or of the node's GPUs; with `"row"`, CUDA's device
    /// order), e.g. `[3, 1]`. Empty (default): llama.cpp splits by each GPU's free memory.
    /// Ignored on a node without GPUs.
    #[serde(default)]
    pub tensor_split: Vec<f32>,
    /// Element type of the KV cache: `"f16"` (default) or `"q8_0"` (about half the memory,
    /// with a small loss of precision; needs flash attention).
    #[serde(default)]
    pub kv_cache_type: KvCacheKind,
    /// Flash attention: `"on"` (default), `"off"`, or `"auto"` (llama.cpp decides per device).
    #[serde(default)]
    pub flash_attention: FlashAttention,
    /// Sequences that may be open at once; further opens queue.
    #[serde(default = "defaults::max_sequences")]
    pub max_sequences: usize,
    /// Share (above 0, at most 1) of the memory free on the devices holding the KV cache,
    /// measured once the weights are loaded, that the cache may take: the GPUs for
    /// offloaded layers, host memory for the rest. Set, `max_sequences` becomes a cap and
    /// the model opens as many sequences of `context_length` as fit; a load where not one
    /// fits fails saying what one needs. Leave room for llama.cpp's compute buffers.
    #[serde(default)]
    pub kv_memory_fraction: Option<f64>,
    /// Tokens per llama.cpp batch: the most a step computes. A load whose compute buffers
    /// do not fit in memory at this size halves it (never below `max_sequences` or 32) until
    /// they do; `/admin/models` shows the size the model runs with.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// KV cells for all sequences together. Unset: `context_length x max_sequences`, one
    /// stream per sequence. Fewer: one pool shared by every sequence (less memory, more
    /// sequences than fit at full length); when it runs out the newest sequence is
    /// preempted and resumes once others finish.
    #[serde(default)]
    pub kv_cells: Option<usize>,
    /// Chat template: a llama.cpp built-in name (`chatml`, `gemma`, `llama3`, ...) or a
    /// template text. Overrides the GGUF's `tokenizer.chat_template`.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// A Hugging Face `tokenizer.json` to tokenize with instead of the GGUF vocabulary.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Opens allowed to wait for a free sequence before new ones are refused.
    #[serde(default)]
    pub max_queue: Option<usize>,
    /// How long an open may wait for a free sequence.
    #[serde(default = "defaults::queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// Host memory (MiB) for the KV state of closed sequences, reused when a new prompt
    /// starts with the same tokens (multi-turn chat). 0 disables it.
    #[serde(default = "defaults::prefix_cache_mb")]
    pub prefix_cache_mb: usize,
    /// Shortest closed sequence worth caching; shorter ones are cheaper to recompute than
    /// to keep.
    #[serde(default = "defaults::prefix_cache_min_tokens")]
    pub prefix_cache_min_tokens: usize,
    /// Shortest common prefix worth sharing between sequences.
    #[serde(default = "defaults::min_shared_prefix")]
    pub min_shared_prefix: usize,
    /// Longest wait, after a step, for sequences about to submit their next token.
    #[serde(default = "defaults::max_batch_wait_us")]
    pub max_batch_wait_us: u64,
    /// Once a step holds a whole prompt and at least this many tokens, the prompts after
    /// it wait for the next step. A burst of prompts then gets its first tokens out a few
    /// at a time rather than all at the end of the burst; a lone long prompt still fills
    /// `batch_size`. `batch_size` or more packs every step full; 0 takes one whole prompt
    /// per step. Smaller values lower the median time to first token of a burst and delay
    /// its last prompt, which costs throughput (README, "Against llama-server").
    #[serde(default = "defaults::prompt_step_tokens")]
    pub prompt_step_tokens: usize,
    /// How an embedding pools the hidden states of its input.
    #[serde(default)]
    pub embedding_pooling: Pooling,
    /// Tokens of one embedding batch, which is also the longest input; default
    /// `context_length`, at most 512. Its context is created on the first embedding and costs
    /// about vocabulary x this x 4 bytes for logits llama.cpp reserves beside the embeddings.
    #[serde(default)]
    pub embedding_batch: Option<usize>,
    /// Inputs computed in one embedding batch.
    #[serde(default = "defaults::embedding_max_inputs")]
    pub embedding_max_inputs: usize,
    /// How long the model stays loaded after its last use: `-1` keeps it loaded (and loads
    /// it at start), `0` unloads it after each use, `"5m"` after five idle minutes. Unset:
    /// the server's `models.keep_alive`.
    #[serde(default)]
    pub keep_alive: Option<super::KeepAlive>,
    /// Where `models/fetch.py` gets the weights; the host ignores it.
    #[serde(default)]
    pub source: Option<toml::Table>,
}

/// How offloaded layers spread over several GPUs.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SplitMode {
    None,
    #[default]
    Layer,
    Row,
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheKind {
    #[default]
    F16,
    Q8_0,
}

impl KvCacheKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheKind::F16 => "f16",
            KvCacheKind::Q8_0 => "q8_0",
        }
    }
}

/// Whether attention uses llama.cpp's flash attention kernels.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttention {
    #[default]
    On,
    Off,
    Auto,
}

/// How an embedding is pooled from the hidden states of its input's tokens.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The average over every token (what a generative model's embedding usually means).
    #[default]
    Mean,
    /// The first token's (BERT-style models).
    Cls,
    /// The last token's.
    Last,
}

/// llama.cpp's `llama_max_devices()`: the longest `tensor_split` it reads.
pub(crate) const MAX_GPUS: usize = 16;

mod defaults {
    pub fn context_length() -> usize {
        2048
    }
    pub fn threads() -> i32 {
        std::thread::available_parallelism().map_or(2, |n| n.get().min(8) as i32)
    }
    pub fn max_sequences() -> usize {
        16
    }
    pub fn batch_size() -> usize {
        512
    }
    pub fn queue_timeout_ms() -> u64 {
        30_000
    }
    pub fn prefix_cache_mb() -> usize {
        256
    }
    pub fn prefix_cache_min_tokens() -> usize {
        64
    }
    pub fn min_shared_prefix() -> usize {
        8
    }
    pub fn max_batch_wait_us() -> u64 {
        5_000
    }
    pub fn prompt_step_tokens() -> usize {
        256
    }
    pub fn embedding_max_inputs() -> usize {
        16
    }
}

impl ModelManifest {
    /// Parse and validate a manifest file; paths come back absolute.
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let err = |message: String| EngineError::Manifest { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut m: ModelManifest = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        m.file = dir.join(&m.file);
        m.tokenizer = m.tokenizer.map(|t| dir.join(t));
        m.validate().map_err(err)?;
        Ok(m)
    }

    /// A manifest for a GGUF file with every other setting at its default.
    pub fn for_file(name: &str, file: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_string(),
            description: String::new(),
            file: file.into(),
            sha256: None,
            context_length: defaults::context_length(),
            threads: defaults::threads(),
            n_gpu_layers: 0,
            main_gpu: 0,
            split_mode: SplitMode::default(),
            devices: Vec::new(),
            tensor_split: Vec::new(),
            kv_cache_type: KvCacheKind::default(),
            flash_attention: FlashAttention::default(),
            max_sequences: defaults::max_sequences(),
            kv_memory_fraction: None,
            batch_size: defaults::batch_size(),
            kv_cells: None,
            chat_template: None,
            tokenizer: None,
            max_queue: None,
            queue_timeout_ms: defaults::queue_timeout_ms(),
            prefix_cache_mb: defaults::prefix_cache_mb(),
            prefix_cache_min_tokens: defaults::prefix_cache_min_tokens(),
            min_shared_prefix: defaults::min_shared_prefix(),
            max_batch_wait_us: defaults::max_batch_wait_us(),
            prompt_step_tokens: defaults::prompt_step_tokens(),
            embedding_pooling: Pooling::default(),
            embedding_batch: None,
            embedding_max_inputs: defaults::embedding_max_inputs(),
            keep_alive: None,
            source: None,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("name {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'", self.name));
        }
        if let Some(h) = &self.sha256 {
            if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!("sha256 {h:?} is not 64 hex digits"));
            }
        }
        let positive = [
            ("context_length", self.context_length),
            ("max_sequences", self.max_sequences),
            ("batch_size", self.batch_size),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if let Some(f) = self.kv_memory_fraction {
            if f.is_nan() || f <= 0.0 || f > 1.0 {
                return Err(format!("kv_memory_fraction ({f}) must be above 0 and at most 1"));
            }
            if self.kv_cells.is_some() {
                return Err("kv_cells sizes the KV cache itself: set it or kv_memory_fraction, not both".into());
            }
        }
        if self.threads < 1 {
            return Err("threads must be at least 1".into());
        }
        if self.batch_size < self.max_sequences {
            return Err(format!(
                "batch_size ({}) must be at least max_sequences ({}) so every sequence can decode each step",
                self.batch_size, self.max_sequences
            ));
        }
        if let Some(cells) = self.kv_cells {
            let full = self.context_length * self.max_sequences;
            if cells < self.context_length || cells > full {
                return Err(format!(
                    "kv_cells ({cells}) must be between context_length ({}) and context_length x max_sequences ({full})",
                    self.context_length
                ));
            }
        }
        if self.kv_cache_type != KvCacheKind::F16 && self.flash_attention == FlashAttention::Off {
            return Err(format!(
                "kv_cache_type = \"{}\" needs flash attention (llama.cpp quantizes the V cache only with it): \
                 set flash_attention to \"on\" or \"auto\"",
                self.kv_cache_type.as_str()
            ));
        }
        if self.main_gpu < 0 {
            return Err("main_gpu must be 0 or more".into());
        }
        if let Some(bad) = self.tensor_split.iter().find(|p| !p.is_finite() || **p < 0.0) {
            return Err(format!("tensor_split holds {bad}: each proportion must be a finite number, 0 or more"));
        }
        if self.tensor_split.len() > MAX_GPUS {
            return Err(format!(
                "tensor_split has {} entries; llama.cpp takes at most {MAX_GPUS}",
                self.tensor_split.len()
            ));
        }
        if self.split_mode == SplitMode::None && self.tensor_split.iter().any(|p| *p > 0.0) {
            return Err("tensor_split spreads a model over several GPUs, but split_mode = \"none\" keeps it on \
                        main_gpu: set split_mode to \"layer\" or \"row\", or drop tensor_split"
                .into());
        }
        if self.max_sequences > 256 {
            return Err("max_sequences must be at most 256 (llama.cpp's limit)".into());
        }
        if self.embedding_max_inputs == 0 || self.embedding_max_inputs > 256 {
            return Err("embedding_max_inputs must be between 1 and 256 (llama.cpp's limit)".into());
        }
        if self.embedding_batch == Some(0) {
            return Err("embedding_batch must be at least 1".into());
        }
        Ok(())
    }

    /// Tokens of one embedding batch, and the longest input it takes.
    pub fn embedding_tokens(&self) -> usize {
        self.embedding_batch.unwrap_or(self.context_length.min(512))
    }

    /// Opens allowed to wait for a sequence.
    pub fn queue_limit(&self) -> usize {
        self.max_queue.unwrap_or(self.max_sequences * 4)
    }

    /// Total KV cells: by default every sequence can reach `context_length` at once.
    pub fn total_kv_cells(&self) -> usize {
        self.kv_cells.unwrap_or(self.context_length * self.max_sequences)
    }

    /// Load every `*.toml` manifest in a folder, sorted by file name.
    pub fn load_dir(dir: &Path) -> Result<Vec<Self>, EngineError> {
        let entries = std::fs::read_dir(dir).map_err(|e| EngineError::Manifest {
            path: dir.to_path_buf(),
            message: format!("cannot read folder: {e}"),
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        paths.iter().map(|p| Self::from_file(p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("flywheel-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.toml");
        std::fs::write(&p, "name = \"m\"\nfile = \"m.gguf\"\ncontext_lenght = 5\n").unwrap();
        let e = ModelManifest::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("context_lenght"), "{e}");
        std::fs::write(&p, "name = \"m\"\nfile = \"m.gguf\"\nmax_sequences = 0\n").unwrap();
        let e = ModelManifest::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("max_sequences"), "{e}");
        std::fs::write(&p, "name = \"m\"\nfile = \"m.gguf\"\n").unwrap();
        let m = ModelManifest::from_file(&p).unwrap();
        assert_eq!(m.file, dir.join("m.gguf"));
    }
}
