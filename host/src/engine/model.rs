//! A loaded model: facts, tokenization, admission control and the handle to its scheduler.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Semaphore};

use super::backend::backend;
use super::decode_thread::{Link, ModelSetup};
use super::embedder::EmbedJob;
use super::lifecycle::{Activity, FileStamp, ModelLease};
use super::scheduler::Command;
use super::tokenizer::{Tokenizer, Vocab};
use super::{EngineError, ModelManifest, Sequence, TokenAccount, Want};

/// Facts about a model that guests and clients need.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub description: String,
    pub vocab_size: usize,
    pub context_length: usize,
    pub bos: Option<i32>,
    pub eos: Option<i32>,
    pub eot: Option<i32>,
    /// Every end-of-generation token.
    pub end_of_generation: Vec<i32>,
    pub adds_bos: bool,
    pub chat_template: Option<String>,
    /// Sequences open at once: the manifest's, or what fits with `kv_memory_fraction`.
    pub max_sequences: usize,
    /// KV cache bytes one sequence of `context_length` tokens takes.
    pub kv_bytes_per_sequence: u64,
    /// Bytes of the weights (wherever they are placed).
    pub weights_bytes: u64,
    /// Transformer layers; `n_gpu_layers` of them are offloaded (at most this many).
    pub layers: u32,
    /// Layers llama.cpp placed on the GPUs: `n_gpu_layers` at most, 0 on a node without GPUs.
    pub offloaded_layers: u32,
    /// KV cache bytes of all the model's cells on its GPUs (offloaded layers) and in host
    /// memory (the others). An estimate from the model's shape: sliding-window layers
    /// (Gemma 3) count in full though llama.cpp keeps only their window.
    pub kv_bytes_gpu: u64,
    pub kv_bytes_cpu: u64,
    /// Tokens per llama.cpp batch: the manifest's, or less where its compute buffers did
    /// not fit in memory.
    pub batch_size: usize,
}

/// Live counters of one model's engine; cheap to read from any thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences open now.
    pub active_sequences: AtomicUsize,
    /// Opens waiting for a free sequence.
    pub waiting_opens: AtomicUsize,
    /// Tokens in the KV cells of open sequences (shared prefixes count once per sequence).
    pub kv_tokens: AtomicUsize,
    /// Tokens in the KV cells closed sequences left in their slots (kept until the slot
    /// is needed again, for prompts that continue them).
    pub retained_tokens: AtomicUsize,
    /// Closed sequences whose KV state is cached in host memory for prefix reuse.
    pub cached_prefixes: AtomicUsize,
    /// Bytes those cached states take.
    pub cached_bytes: AtomicUsize,
    /// Prompt tokens computed.
    pub prefill_tokens: AtomicU64,
    /// Prompt tokens taken from KV cells another sequence had already computed.
    pub reused_tokens: AtomicU64,
    /// Generated tokens decoded.
    pub decode_tokens: AtomicU64,
    /// llama.cpp batches run.
    pub steps: AtomicU64,
    pub sequences_opened: AtomicU64,
    /// Sequences whose cells were taken away because a shared KV pool ran out.
    pub preemptions: AtomicU64,
    /// Tokens computed for embeddings.
    pub embedded_tokens: AtomicU64,
}

/// A loaded model: its weights, vocabulary and the link to its scheduler. It exists from
/// a load to the matching unload; its handle (`ModelHandle`) outlives it.
pub struct Model {
    manifest: ModelManifest,
    info: ModelInfo,
    vocab: Vocab,
    link: Link,
    admission: Arc<Semaphore>,
    stats: Arc<EngineStats>,
    /// Leases held on this model's handle (requests, open sequences).
    pub(crate) activity: Arc<Activity>,
    /// Set when it is being unloaded: no new lease may be taken on it.
    pub(crate) retired: AtomicBool,
}

/// A model whose weights are loaded, waiting for its context on the decode thread.
pub(crate) struct Prepared {
    pub(crate) manifest: ModelManifest,
    info: ModelInfo,
    vocab: Vocab,
    stats: Arc<EngineStats>,
}

impl Prepared {
    pub(crate) fn setup(&self) -> ModelSetup {
        ModelSetup {
            manifest: self.manifest.clone(),
            llama: self.vocab.llama.clone(),
            n_vocab: self.vocab.n_vocab,
            stats: self.stats.clone(),
        }
    }

    /// The loaded model, running batches of `batch_size` tokens (what its context got).
    pub(crate) fn finish(mut self, link: Link, batch_size: usize, activity: Arc<Activity>) -> Arc<Model> {
        self.manifest.batch_size = batch_size;
        self.info.batch_size = batch_size;
        Arc::new(Model {
            admission: Arc::new(Semaphore::new(self.manifest.max_sequences)),
            manifest: self.manifest,
            info: self.info,
            vocab: self.vocab,
            link,
            stats: self.stats,
            activity,
            retired: AtomicBool::new(false),
        })
    }
}

fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn missing(manifest: &ModelManifest, reason: String) -> EngineError {
    EngineError::ModelFileMissing {
        model: manifest.name.clone(),
        path: manifest.file.clone(),
        reason,
        expected: manifest.sha256.clone().unwrap_or_else(|| "(none given)".into()),
    }
}

fn file_metadata(manifest: &ModelManifest) -> Result<std::fs::Metadata, EngineError> {
    let meta = std::fs::metadata(&manifest.file).map_err(|e| missing(manifest, e.to_string()))?;
    if !meta.is_file() {
        return Err(missing(manifest, "not a regular file".into()));
    }
    Ok(meta)
}

/// What can be checked of a model's file without reading it all: that it is there and
/// starts like a GGUF file. The engine checks every manifest at start, loaded or not.
pub(crate) fn check_model_file(manifest: &ModelManifest) -> Result<(), EngineError> {
    file_metadata(manifest)?;
    check_gguf_header(&manifest.file)
}

/// Why llama.cpp may refuse to load a model file: it is not a model it reads, or, when
/// layers are offloaded, they do not fit in the GPUs' free memory (llama.cpp then fails
/// the load rather than crash).
fn load_failure_causes(manifest: &ModelManifest, file_bytes: u64) -> String {
    let gpus = super::devices::model_gpus(manifest);
    if manifest.n_gpu_layers == 0 || gpus.is_empty() {
        return "the file is not a model llama.cpp can read".into();
    }
    let mib = |b: u64| b / (1024 * 1024);
    let free: u64 = gpus.iter().map(|d| d.memory_free_bytes).sum();
    let names: Vec<&str> = gpus.iter().map(|d| d.name.as_str()).collect();
    format!(
        "the file is not a model llama.cpp can read, or the layers n_gpu_layers = {} offloads do not fit \
         in the {} MiB free on {} (the whole file is {} MiB): lower n_gpu_layers",
        manifest.n_gpu_layers,
        mib(free),
        names.join(", "),
        mib(file_bytes)
    )
}

fn opt_token(t: LlamaToken) -> Option<i32> {
    (t.0 >= 0).then_some(t.0)
}

impl Model {
    /// Verify the file (its sha256 once per unchanged file) and load the weights and
    /// tokenizer. `stats` are the handle's, kept across loads.
    pub(crate) fn prepare(
        manifest: ModelManifest,
        stats: Arc<EngineStats>,
        verified: &Mutex<Option<FileStamp>>,
    ) -> Result<Prepared, EngineError> {
        let path = manifest.file.clone();
        let meta = file_metadata(&manifest)?;
        if let Some(want) = &manifest.sha256 {
            let stamp = FileStamp::of(&meta);
            let mut known = verified.lock().unwrap_or_else(|p| p.into_inner());
            if *known != Some(stamp) {
                let actual = sha256_file(&path).map_err(|e| missing(&manifest, e.to_string()))?;
                if !actual.eq_ignore_ascii_case(want) {
                    return Err(EngineError::ModelFileCorrupt {
                        model: manifest.name.clone(),
                        path,
                        actual,
                        expected: want.clone(),
                    });
                }
                *known = Some(stamp);
            }
        }
        check_gguf_header(&path)?;

        let backend = backend()?;
        if manifest.n_gpu_layers > 0 && !backend.supports_gpu_offload() {
            tracing::warn!(
                model = %manifest.name,
                n_gpu_layers = manifest.n_gpu_layers,
                "the manifest offloads layers but this node has no GPU: the model runs on the CPU"
            );
        }
        let params = super::devices::placement_params(&manifest)?;
        let llama = LlamaModel::load_from_file(backend, &path, &params).map_err(|e| EngineError::ModelLoad {
            path: path.clone(),
            message: format!("{e} ({}; see the log above)", load_failure_causes(&manifest, meta.len())),
        })?;
        let manifest = super::fit::fit_sequences(manifest, &llama)?;
        let llama = Arc::new(llama);
        let tokenizer = Tokenizer::load(&manifest.name, manifest.tokenizer.as_deref())?;
        let n_vocab = usize::try_from(llama.n_vocab()).unwrap_or(0);
        let info = model_info(&manifest, &llama, n_vocab);
        let vocab = Vocab { name: manifest.name.clone(), llama: llama.clone(), tokenizer, n_vocab };
        Ok(Prepared { manifest, info, vocab, stats })
    }

    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// Run `work` on the decode thread between batch steps and wait for it (blocking). The
    /// native baseline of `bench engine` uses this, so llama.cpp's thread team is the one the
    /// engine uses: a second team on another thread would throttle both.
    pub fn run_on_decode_thread<R: Send + 'static>(&self, work: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self.link.run_exclusive(Box::new(move || {
            let _ = tx.send(work());
        }));
        if !sent {
            return None;
        }
        rx.recv().ok()
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// The llama.cpp model, for code that drives llama.cpp directly (the native bench baseline).
    pub fn llama(&self) -> &Arc<LlamaModel> {
        &self.vocab.llama
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Open a sequence only if one is free right now. A caller that already holds a
    /// sequence uses this: waiting while holding one could deadlock with others doing the same.
    pub async fn open_now(self: &Arc<Self>) -> Result<Sequence, EngineError> {
        self.open_with(ModelLease::on(self)?, None, false).await
    }

    /// Open a sequence, waiting (bounded) for a free slot.
    pub async fn open(self: &Arc<Self>) -> Result<Sequence, EngineError> {
        self.open_with(ModelLease::on(self)?, None, true).await
    }

    /// Open a sequence held by `lease` (which keeps this model loaded while it is open);
    /// the engine charges its tokens to `account` and refuses any feed the account refuses.
    /// `wait`: wait (bounded) for a free slot, or fail at once if none is free.
    pub(crate) async fn open_with(
        self: &Arc<Self>,
        lease: ModelLease,
        account: Option<Arc<dyn TokenAccount>>,
        wait: bool,
    ) -> Result<Sequence, EngineError> {
        let permit = match self.admission.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if !wait => return Err(EngineError::NoFreeSequence { model: self.name().to_string() }),
            Err(_) => {
                let limit = self.manifest.queue_limit();
                let waiting = self.stats.waiting_opens.fetch_add(1, Ordering::Relaxed);
                let _queued = DecrementOnDrop(&self.stats.waiting_opens);
                if waiting >= limit {
                    return Err(EngineError::QueueFull { model: self.name().to_string(), waiting, limit });
                }
                let waited = Duration::from_millis(self.manifest.queue_timeout_ms);
                match tokio::time::timeout(waited, self.admission.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(self.stopped()),
                    Err(_) => return Err(EngineError::AdmissionTimeout { model: self.name().to_string(), waited }),
                }
            }
        };
        self.start_sequence(lease, permit, account).await
    }

    async fn start_sequence(
        self: &Arc<Self>,
        lease: ModelLease,
        permit: tokio::sync::OwnedSemaphorePermit,
        account: Option<Arc<dyn TokenAccount>>,
    ) -> Result<Sequence, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Open { reply })?;
        let mut pending = PendingOpen { model: self, rx };
        let seq_id = (&mut pending.rx).await.map_err(|_| self.stopped())??;
        self.stats.active_sequences.fetch_add(1, Ordering::Relaxed);
        self.stats.sequences_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Sequence::new(lease, seq_id, permit, account))
    }

    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>, EngineError> {
        self.vocab.tokenize(text, add_special, parse_special)
    }

    pub fn detokenize(&self, tokens: &[i32], render_special: bool) -> Result<String, EngineError> {
        self.vocab.detokenize(tokens, render_special)
    }

    pub fn token_bytes(&self, tokens: &[i32], render_special: bool) -> Result<Vec<Vec<u8>>, EngineError> {
        self.vocab.token_bytes(tokens, render_special)
    }

    pub fn is_end_of_generation(&self, token: i32) -> bool {
        self.info.end_of_generation.contains(&token)
    }

    /// Render `(role, content)` messages with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self.info.chat_template.as_deref().ok_or_else(|| {
            EngineError::ChatTemplate(format!(
                "model {} has no chat template; set chat_template in its manifest",
                self.name()
            ))
        })?;
        let template = LlamaChatTemplate::new(template)
            .map_err(|_| EngineError::ChatTemplate("the chat template contains a NUL byte".into()))?;
        let messages = messages
            .iter()
            .map(|(role, content)| LlamaChatMessage::new(role.clone(), content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| EngineError::InvalidArgument("a chat message contains a NUL byte".into()))?;
        self.vocab.llama.apply_chat_template(&template, &messages, add_generation_prompt).map_err(|e| {
            EngineError::ChatTemplate(format!(
                "llama.cpp cannot apply the chat template of model {} ({e}); name a built-in template such as \"chatml\" in its manifest",
                self.name()
            ))
        })
    }

    /// Check a feed before it reaches the scheduler thread.
    pub(crate) fn validate_feed(&self, tokens: &[i32], want: &Want) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidArgument("no tokens to feed".into()));
        }
        let vocab = self.info.vocab_size;
        let bad = |t: &i32| *t < 0 || *t as usize >= vocab;
        if let Some(&token) = tokens.iter().find(|t| bad(t)) {
            return Err(EngineError::InvalidToken { token, vocab });
        }
        if let Want::TopK { k, allowed, .. } = want {
            if *k == 0 {
                return Err(EngineError::InvalidArgument("top_k must be at least 1".into()));
            }
            if let Some(allowed) = allowed {
                if allowed.is_empty() {
                    return Err(EngineError::InvalidArgument("allowed_ids is empty".into()));
                }
                if let Some(&token) = allowed.iter().find(|t| bad(t)) {
                    return Err(EngineError::InvalidToken { token, vocab });
                }
            }
        }
        Ok(())
    }

    /// One unit-length embedding per input (token ids), pooled as the manifest says. The
    /// inputs compute in one batch with every other embedding waiting at the same time.
    pub async fn embed(&self, inputs: Vec<Vec<i32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        self.embed_charged(inputs, None).await
    }

    /// As [`Model::embed`], charging the input tokens to `account` first.
    pub async fn embed_charged(
        &self,
        inputs: Vec<Vec<i32>>,
        account: Option<&dyn TokenAccount>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        // Positions past the training context would read outside a learned position table.
        let trained = usize::try_from(self.llama().n_ctx_train()).unwrap_or(usize::MAX);
        let limit = self.manifest.embedding_tokens().min(trained);
        let vocab = self.info.vocab_size;
        for (index, input) in inputs.iter().enumerate() {
            if input.is_empty() {
                return Err(EngineError::InvalidArgument(format!("embedding input {index} has no tokens")));
            }
            if input.len() > limit {
                return Err(EngineError::EmbeddingInputTooLong { index, tokens: input.len(), limit });
            }
            if let Some(&token) = input.iter().find(|&&t| t < 0 || t as usize >= vocab) {
                return Err(EngineError::InvalidToken { token, vocab });
            }
        }
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(account) = account {
            let tokens: usize = inputs.iter().map(Vec::len).sum();
            account.charge(tokens as u64, 0)?;
        }
        let (reply, rx) = oneshot::channel();
        if !self.link.embed(EmbedJob { inputs, reply }) {
            return Err(self.stopped());
        }
        rx.await.map_err(|_| self.stopped())?
    }

    pub(crate) fn send(&self, cmd: Command) -> Result<(), EngineError> {
        if self.link.send(cmd) {
            Ok(())
        } else {
            Err(self.stopped())
        }
    }

    pub(crate) fn stopped(&self) -> EngineError {
        EngineError::SchedulerStopped(self.name().to_string())
    }
}

struct DecrementOnDrop<'a>(&'a AtomicUsize);
impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Refuse files that are not GGUF before llama.cpp sees them (its loader only logs why).
fn check_gguf_header(path: &std::path::Path) -> Result<(), EngineError> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match read {
        Ok(()) if &magic[..4] == b"GGUF" => Ok(()),
        Ok(()) => Err(EngineError::ModelLoad {
            path: path.to_path_buf(),
            message: "not a GGUF file (bad magic bytes)".into(),
        }),
        Err(e) => Err(EngineError::ModelLoad {
            path: path.to_path_buf(),
            message: format!("file too short to be a GGUF model: {e}"),
        }),
    }
}

fn model_info(manifest: &ModelManifest, llama: &LlamaModel, n_vocab: usize) -> ModelInfo {
    let vocab = llama.vocab();
    let end_of_generation = (0..n_vocab as i32).filter(|&t| vocab.is_eog(LlamaToken(t))).collect();
    let chat_template = manifest.chat_template.clone().or_else(|| llama.meta_val_str("tokenizer.chat_template").ok());
    let kv = super::fit::kv_split(llama, manifest, super::kv::allocated_cells(manifest));
    ModelInfo {
        name: manifest.name.clone(),
        description: manifest.description.clone(),
        vocab_size: n_vocab,
        context_length: manifest.context_length,
        bos: opt_token(vocab.bos()),
        eos: opt_token(vocab.eos()),
        eot: opt_token(vocab.eot()),
        end_of_generation,
        adds_bos: vocab.should_add_bos(),
        chat_template,
        max_sequences: manifest.max_sequences,
        kv_bytes_per_sequence: super::fit::sequence_kv_bytes(llama, manifest),
        weights_bytes: llama.size(),
        layers: llama.n_layer(),
        offloaded_layers: super::fit::offloaded_layers(llama, manifest),
        kv_bytes_gpu: kv.gpu,
        kv_bytes_cpu: kv.cpu,
        batch_size: manifest.batch_size,
    }
}

/// An open whose reply has not been read yet. If the caller gives up (its future is dropped)
/// after the scheduler already answered, the slot it was given is closed here; if the
/// scheduler has not answered yet, closing the channel makes its send fail and it frees the
/// slot itself.
struct PendingOpen<'a> {
    model: &'a Model,
    rx: oneshot::Receiver<Result<i32, EngineError>>,
}

impl Drop for PendingOpen<'_> {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(Ok(seq)) = self.rx.try_recv() {
            let _ = self.model.send(Command::Close { seq });
        }
    }
}
