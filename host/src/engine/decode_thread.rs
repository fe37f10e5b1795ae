//! The decode thread: one OS thread owns every loaded model's llama.cpp context and runs
//! their batch steps in turn. Models join it when they load and leave when they unload.
//!
//! One thread for all models, not one per model: libgomp throttles its spin-waiting once
//! it manages more threads than there are CPUs, and two decoding thread teams on a small
//! machine fight over the same cores anyway. Measured on 2 cores: once a second model had
//! decoded, SmolLM2 dropped from 83 to 56 tok/s with a thread per model.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;

use super::backend::{backend, CONTEXT_CREATION};
use super::embedder::{EmbedJob, Embedder};
use super::fit::batch_sizes;
use super::kv::{context_params, sliding_window};
use super::model::EngineStats;
use super::scheduler::{Command, Scheduler};
use super::{EngineError, ModelManifest, StepObserver};

pub(crate) enum Message {
    /// Create the context of a model whose weights are loaded, under a new id.
    /// The reply is the batch size the context was created with.
    Load { id: u64, setup: Box<ModelSetup>, reply: Sender<Result<usize, EngineError>> },
    /// Drop a model's context (its sequences are all closed). The weights go with the last
    /// reference to them, which is usually the one this thread held.
    Unload { id: u64 },
    /// A command for the model with this id.
    Model(u64, Command),
    /// Inputs to embed with the model with this id.
    Embed(u64, EmbedJob),
    /// Work that must run on the decode thread between steps (the native bench loop).
    Exclusive(Box<dyn FnOnce() + Send>),
}

/// The decode thread, as the engine sees it.
#[derive(Clone)]
pub(crate) struct DecodeThread {
    tx: Sender<Message>,
    alive: Arc<AtomicBool>,
    next_id: Arc<AtomicU64>,
}

/// One loaded model's way to its scheduler. Ids are never reused, so a message for a
/// model that has been unloaded (and perhaps loaded again) reaches nothing and its reply
/// is dropped, which callers read as "stopped".
#[derive(Clone)]
pub(crate) struct Link {
    id: u64,
    tx: Sender<Message>,
}

impl Link {
    /// False when the decode thread is gone.
    pub(crate) fn send(&self, cmd: Command) -> bool {
        self.tx.send(Message::Model(self.id, cmd)).is_ok()
    }

    /// False when the decode thread is gone.
    pub(crate) fn embed(&self, job: EmbedJob) -> bool {
        self.tx.send(Message::Embed(self.id, job)).is_ok()
    }

    pub(crate) fn run_exclusive(&self, work: Box<dyn FnOnce() + Send>) -> bool {
        self.tx.send(Message::Exclusive(work)).is_ok()
    }

    /// Drop this model's context on the decode thread.
    pub(crate) fn unload(&self) {
        let _ = self.tx.send(Message::Unload { id: self.id });
    }
}

/// What the decode thread needs to serve one model.
pub(crate) struct ModelSetup {
    pub manifest: ModelManifest,
    pub llama: Arc<LlamaModel>,
    pub n_vocab: usize,
    pub stats: Arc<EngineStats>,
}

impl DecodeThread {
    /// Start the thread with no model; it stops once the engine and every model are gone.
    pub(crate) fn start(observer: Arc<dyn StepObserver>) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::channel();
        let alive = Arc::new(AtomicBool::new(true));
        let thread_alive = alive.clone();
        std::thread::Builder::new()
            .name("decode".into())
            .spawn(move || {
                let mut workers = BTreeMap::new();
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut workers, &rx, &observer)));
                if outcome.is_err() {
                    // Health checks report it, so the process gets restarted.
                    thread_alive.store(false, Ordering::Relaxed);
                    tracing::error!("the decode thread panicked; no model can be served");
                }
                tracing::debug!("decode thread stopped");
            })
            .map_err(|e| EngineError::ContextCreate {
                model: "*".into(),
                message: format!("cannot spawn the decode thread: {e}"),
            })?;
        Ok(Self { tx, alive, next_id: Arc::new(AtomicU64::new(1)) })
    }

    /// False once the decode thread has died (a panic in llama.cpp's binding, say).
    pub(crate) fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Create a model's context on the decode thread and wait for it (blocking). Returns the
    /// link and the batch size the context runs with (see `create_context`).
    pub(crate) fn load(&self, setup: ModelSetup) -> Result<(Link, usize), EngineError> {
        let name = setup.manifest.name.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = mpsc::channel();
        let gone =
            || EngineError::ContextCreate { model: name.clone(), message: "the decode thread has stopped".into() };
        self.tx.send(Message::Load { id, setup: Box::new(setup), reply }).map_err(|_| gone())?;
        let batch = rx.recv().map_err(|_| gone())??;
        Ok((Link { id, tx: self.tx.clone() }, batch))
    }
}

/// What the decode thread runs for one model: its generation batches and its embeddings.
struct Worker<'m> {
    scheduler: Scheduler<'m>,
    embedder: Embedder<'m>,
}

impl Worker<'_> {
    fn has_work(&self) -> bool {
        self.scheduler.has_work() || self.embedder.has_work()
    }
}

self_cell::self_cell!(
    /// A worker together with the weights its contexts borrow, so it can be dropped (and
    /// the memory given back) while the thread goes on.
    struct LoadedWorker {
        owner: Arc<LlamaModel>,
        #[not_covariant]
        dependent: Worker,
    }
);

/// The worker for a model, and the batch size its context got.
fn create_worker(setup: ModelSetup, observer: &Arc<dyn StepObserver>) -> Result<(LoadedWorker, usize), EngineError> {
    let ModelSetup { mut manifest, llama, n_vocab, stats } = setup;
    let worker = LoadedWorker::try_new(llama, |llama| {
        let ctx = create_context(llama, &mut manifest)?;
        let n_swa = sliding_window(llama);
        Ok::<_, EngineError>(Worker {
            scheduler: Scheduler::new(&manifest, ctx, n_vocab, n_swa, stats.clone(), observer.clone()),
            embedder: Embedder::new(&manifest, llama, stats),
        })
    })?;
    Ok((worker, manifest.batch_size))
}

/// The model's context at the manifest's batch size or, where llama.cpp cannot allocate
/// that batch's compute buffers, at the largest halving of it that fits (written back to
/// `manifest.batch_size`). The buffers grow with the batch (without flash attention, with
/// the batch times the context), and llama.cpp measures them against the memory actually
/// free on each device, so this fits the batch to a node without guessing its needs.
/// After a refusal the smallest batch is tried first: a failure that no batch size cures
/// (a KV cache too large, a KV type the model cannot take) then fails the load after two
/// tries rather than one per halving, each holding up the decode thread.
fn create_context<'m>(llama: &'m LlamaModel, manifest: &mut ModelManifest) -> Result<LlamaContext<'m>, EngineError> {
    let _guard = CONTEXT_CREATION.lock().unwrap_or_else(|p| p.into_inner());
    let backend = backend()?;
    let requested = manifest.batch_size;
    let sizes = batch_sizes(manifest);
    let attempt = |batch: usize, manifest: &mut ModelManifest| {
        manifest.batch_size = batch;
        llama.new_context(backend, context_params(manifest))
    };
    let refused = |e: &dyn std::fmt::Display, tried: &[usize], manifest: &ModelManifest| {
        let cells = manifest.total_kv_cells();
        let hint = match manifest.kv_cache_type {
            super::KvCacheKind::F16 => String::new(),
            other => format!(", or does kv_cache_type {} not suit this model's head size", other.as_str()),
        };
        let tried: Vec<String> = tried.iter().map(usize::to_string).collect();
        EngineError::ContextCreate {
            model: manifest.name.clone(),
            message: format!(
                "{e}: llama.cpp refused {cells} KV cells with batches of {} tokens (too large for memory{hint}?)",
                tried.join(", ")
            ),
        }
    };
    let first = match attempt(requested, manifest) {
        Ok(ctx) => return Ok(ctx),
        Err(e) => e,
    };
    let Some(&smallest) = sizes.last().filter(|&&b| b < requested) else {
        return Err(refused(&first, &[requested], manifest));
    };
    if let Err(e) = attempt(smallest, manifest) {
        return Err(refused(&e, &[requested, smallest], manifest));
    }
    // The smallest fits: take the largest that does (the probe's context is dropped first,
    // so it does not hold memory the larger ones need).
    for &batch in &sizes[1..] {
        if let Ok(ctx) = attempt(batch, manifest) {
            tracing::warn!(
                model = %manifest.name,
                batch_size = batch,
                requested,
                "the compute buffers of the manifest's batch do not fit in memory: running smaller batches"
            );
            return Ok(ctx);
        }
    }
    Err(refused(&first, &sizes, manifest))
}

fn dispatch(workers: &mut BTreeMap<u64, LoadedWorker>, msg: Message, observer: &Arc<dyn StepObserver>) {
    match msg {
        Message::Load { id, setup, reply } => match create_worker(*setup, observer) {
            Ok((worker, batch)) => {
                workers.insert(id, worker);
                let _ = reply.send(Ok(batch));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        Message::Unload { id } => {
            if workers.remove(&id).is_some() {
                // Context, KV cells and (usually) the weights are freed by now; hand the
                // freed heap back to the system so the process shrinks.
                crate::sys::release_free_memory();
            }
        }
        Message::Model(id, cmd) => {
            if let Some(w) = workers.get_mut(&id) {
                w.with_dependent_mut(|_, w| w.scheduler.handle(cmd));
            }
        }
        Message::Embed(id, job) => match workers.get_mut(&id) {
            Some(w) => w.with_dependent_mut(|_, w| w.embedder.push(job)),
            None => drop(job),
        },
        Message::Exclusive(work) => work(),
    }
}

/// Steps every model with work, in turn, until the engine and every model are gone.
fn run(workers: &mut BTreeMap<u64, LoadedWorker>, rx: &Receiver<Message>, observer: &Arc<dyn StepObserver>) {
    loop {
        if !workers.values().any(|w| w.with_dependent(|_, w| w.has_work())) {
            // Nothing to compute: sleep until a caller asks for something.
            match rx.recv() {
                Ok(msg) => dispatch(workers, msg, observer),
                Err(_) => return,
            }
            continue;
        }
        while let Ok(msg) = rx.try_recv() {
            dispatch(workers, msg, observer);
        }
        // Let sequences answered by their model's last step join the next one (bounded).
        loop {
            let now = Instant::now();
            let deadline = workers
                .values()
                .filter_map(|w| {
                    w.with_dependent(|_, w| {
                        let s = &w.scheduler;
                        (s.has_work() && s.awaiting_any()).then(|| s.wait_deadline())
                    })
                })
                .filter(|d| *d > now)
                .min();
            let Some(deadline) = deadline else { break };
            match rx.recv_timeout(deadline - now) {
                Ok(msg) => dispatch(workers, msg, observer),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        for w in workers.values_mut() {
            w.with_dependent_mut(|_, w| {
                // Embeddings first: one batch for everything queued, then the generation step.
                if w.embedder.has_work() {
                    w.embedder.run();
                }
                if w.scheduler.has_work() {
                    w.scheduler.step();
                }
            });
        }
    }
}
