//! The inference engine: models, sequences and the continuous-batching scheduler.
//!
//! Knows nothing of WebAssembly or HTTP. Callers are async; every loaded model's llama.cpp
//! context lives on one decode thread, reached through a channel. Models load on first use
//! and unload when idle, as their `keep_alive` says (`lifecycle.rs`).

mod account;
mod backend;
mod decode_thread;
mod devices;
mod embedder;
mod error;
mod fit;
mod kv;
mod lifecycle;
mod manifest;
mod model;
mod prefix_cache;
pub(crate) mod scheduler;
mod sequence;
mod slots;
mod tokenizer;
pub mod topk;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

pub use account::{QuotaExceeded, TokenAccount};
pub use backend::{backend as backend_ref, supports_gpu_offload, CONTEXT_CREATION};
pub use devices::{devices, DeviceInfo};
pub use error::EngineError;
pub use kv::context_params;
pub use lifecycle::{KeepAlive, Lifecycle, ModelHandle, ModelLease, ModelState, ModelStatus, UnloadReason};
pub use manifest::{FlashAttention, KvCacheKind, ModelManifest, Pooling, SplitMode};
pub use model::{EngineStats, Model, ModelInfo};
pub use sequence::{Output, PendingFeed, Sequence, Want};

use decode_thread::DecodeThread;
use lifecycle::{lock, Slot, Wake};

/// One batch the scheduler ran.
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// Batch entries (a prefix shared by several sequences counts once).
    pub tokens: usize,
    /// Sequences that advanced.
    pub sequences: usize,
    /// Generated tokens decoded (one per generating sequence).
    pub decode_tokens: usize,
    /// Prompt tokens computed.
    pub prefill_tokens: usize,
    pub duration: Duration,
}

/// Told about every batch the scheduler runs and every model that loads or unloads
/// (metrics hook it).
pub trait StepObserver: Send + Sync {
    fn on_step(&self, model: &str, step: &StepInfo);
    /// A model finished loading: weights read and context created, `took` in all.
    fn model_loaded(&self, _model: &str, _took: Duration) {}
    fn model_load_failed(&self, _model: &str) {}
    fn model_unloaded(&self, _model: &str, _reason: UnloadReason) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl StepObserver for NoObserver {
    fn on_step(&self, _: &str, _: &StepInfo) {}
}

/// Every configured model, loaded or not, and the decode thread that runs the loaded ones.
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    models: BTreeMap<String, Arc<ModelHandle>>,
    decode: DecodeThread,
    observer: Arc<dyn StepObserver>,
    lifecycle: Lifecycle,
    wake: Arc<Wake>,
    /// Held while a model loads: room is made and taken one load at a time.
    room: tokio::sync::Mutex<()>,
    stopping: AtomicBool,
}

impl Engine {
    /// Every model loaded now and kept loaded (the default lifecycle); the first failure
    /// stops the load and names its model.
    pub fn load(manifests: Vec<ModelManifest>, observer: Arc<dyn StepObserver>) -> Result<Self, EngineError> {
        Self::start(manifests, observer, Lifecycle::default())
    }

    /// Check every manifest's file, start the decode thread, and load the models kept
    /// alive forever (blocking); the others load on first use.
    pub fn start(
        manifests: Vec<ModelManifest>,
        observer: Arc<dyn StepObserver>,
        lifecycle: Lifecycle,
    ) -> Result<Self, EngineError> {
        let wake = Arc::new(Wake::new());
        let mut models = BTreeMap::new();
        for m in manifests {
            if models.contains_key(&m.name) {
                return Err(EngineError::Manifest {
                    path: m.file.clone(),
                    message: format!("two manifests name the model {:?}", m.name),
                });
            }
            let handle = ModelHandle::new(m, &lifecycle, wake.clone());
            if handle.keep_alive() != KeepAlive::Forever {
                // Loaded on first use: a missing or foreign file is found now, not by the
                // first request. (The others load below, which checks everything.)
                model::check_model_file(handle.manifest())?;
            }
            models.insert(handle.name().to_string(), Arc::new(handle));
        }
        let resident = models.values().filter(|h| h.keep_alive() == KeepAlive::Forever).count();
        if let Some(max) = lifecycle.max_loaded_models {
            let on_demand = models.len() - resident;
            if resident > max || (resident == max && on_demand > 0) {
                return Err(EngineError::Lifecycle(format!(
                    "{resident} models have keep_alive = -1 (always loaded) and max_loaded_models is {max}: \
                     the {on_demand} others could never load"
                )));
            }
        }
        let decode = DecodeThread::start(observer.clone())?;
        let inner = Arc::new(Inner {
            models,
            decode,
            observer,
            lifecycle,
            wake,
            room: tokio::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
        });
        for handle in inner.models.values().filter(|h| h.keep_alive() == KeepAlive::Forever) {
            drop(inner.load_blocking(handle)?);
        }
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("model-reaper".into())
            .spawn(move || reap(weak))
            .map_err(|e| EngineError::Lifecycle(format!("cannot spawn the model reaper thread: {e}")))?;
        Ok(Self { inner })
    }

    /// A configured model, loaded or not.
    pub fn model(&self, name: &str) -> Result<&Arc<ModelHandle>, EngineError> {
        self.inner.models.get(name).ok_or_else(|| EngineError::UnknownModel(name.to_string()))
    }

    /// Every configured model, by name.
    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelHandle>> {
        self.inner.models.values()
    }

    /// Whether the decode thread still runs (health checks use this).
    pub fn is_alive(&self) -> bool {
        self.inner.decode.alive()
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.inner.lifecycle
    }

    /// The model, loaded and kept loaded while the lease lives. A model that is not loaded
    /// is loaded first: the caller waits for it, and for room under `max_loaded_models`
    /// (an idle model is unloaded to make it) within the model's `queue_timeout_ms`.
    pub async fn acquire(&self, name: &str) -> Result<ModelLease, EngineError> {
        let handle = self.model(name)?.clone();
        if let Some(lease) = handle.lease_if_loaded() {
            return Ok(lease);
        }
        // Attempts finished so far: if the next one to finish fails, this caller reports it
        // instead of trying again itself.
        let seen = lock(&handle.state).attempts;
        let deadline = Instant::now() + Duration::from_millis(handle.manifest.queue_timeout_ms);
        // The load runs as a task of its own, so a caller that gives up (its client went
        // away) does not leave it half done.
        let inner = self.inner.clone();
        let task = tokio::spawn(async move { inner.load_for_lease(&handle, seen, deadline).await });
        task.await.map_err(|e| EngineError::ModelLoadFailed { model: name.to_string(), message: e.to_string() })?
    }

    /// Load a model now (admin); it then stays for its `keep_alive`.
    pub async fn load_model(&self, name: &str) -> Result<ModelStatus, EngineError> {
        let lease = self.acquire(name).await?;
        // As it is now, while loaded: with keep_alive 0 it unloads once the lease is gone.
        let status = self.model(name)?.status();
        drop(lease);
        Ok(status)
    }

    /// Unload a model now (admin), pinned or not. Refused while requests use it. Returns
    /// false when it was not loaded.
    pub fn unload_model(&self, name: &str) -> Result<bool, EngineError> {
        let handle = self.model(name)?;
        if handle.loaded().is_none() {
            return Ok(false);
        }
        if handle.unload_if_idle(true) {
            self.inner.unloaded(handle, UnloadReason::Admin);
            return Ok(true);
        }
        let users = handle.activity.users();
        if users > 0 {
            return Err(EngineError::ModelBusy { model: name.to_string(), users });
        }
        // It unloaded or started loading in between.
        Ok(handle.loaded().is_none())
    }

    /// Pin a model (admin): it loads now if it must, and stays loaded whatever its
    /// `keep_alive`, until unpinned. Unpinning lets `keep_alive` apply again.
    pub async fn pin_model(&self, name: &str, pinned: bool) -> Result<ModelStatus, EngineError> {
        let handle = self.model(name)?.clone();
        if pinned {
            if let Some(max) = self.inner.lifecycle.max_loaded_models {
                let others = self.models().filter(|h| h.name() != name && h.is_pinned()).count();
                if others >= max {
                    return Err(EngineError::Lifecycle(format!(
                        "{others} other models are pinned and max_loaded_models is {max}: unpin one first"
                    )));
                }
            }
            let lease = self.acquire(name).await?;
            lock(&handle.state).pinned = true;
            drop(lease);
        } else {
            lock(&handle.state).pinned = false;
            // Its keep_alive may already have run out.
            self.inner.wake.notify();
        }
        Ok(handle.status())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        self.inner.wake.notify();
    }
}

impl Inner {
    /// Load `handle` (blocking): weights, then its context on the decode thread. Records
    /// the outcome in the handle's state and returns a lease taken under the state lock, so
    /// the reaper cannot unload the model before its caller holds it.
    fn load_blocking(&self, handle: &ModelHandle) -> Result<ModelLease, EngineError> {
        let started = Instant::now();
        lock(&handle.state).slot = Slot::Loading;
        let mut weights = Duration::ZERO;
        // A panic in llama.cpp's binding must not leave the model "loading" for ever.
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let prepared = model::Model::prepare(handle.manifest.clone(), handle.stats.clone(), &handle.verified)?;
            weights = started.elapsed();
            let (link, batch_size) = self.decode.load(prepared.setup())?;
            Ok(prepared.finish(link, batch_size, handle.activity.clone()))
        }))
        .unwrap_or_else(|_| {
            Err(EngineError::ModelLoadFailed {
                model: handle.name().to_string(),
                message: "the load panicked (see the log)".into(),
            })
        });
        let took = started.elapsed();
        let mut s = lock(&handle.state);
        s.attempts += 1;
        match loaded {
            Ok(model) => {
                let lease = ModelLease::fresh(&model);
                s.slot = Slot::Loaded(model.clone());
                s.last_error = None;
                s.loaded_at = Some(SystemTime::now());
                s.last_load_time = Some(took);
                s.info = Some(model.info().clone());
                drop(s);
                handle.loads.fetch_add(1, Ordering::Relaxed);
                // Weights: file check, memory map, vocabulary; context: KV cache, compute buffers.
                tracing::info!(
                    model = %handle.name(),
                    vocab = model.info().vocab_size,
                    context_length = handle.manifest.context_length,
                    max_sequences = model.info().max_sequences,
                    ms = took.as_millis() as u64,
                    weights_ms = weights.as_millis() as u64,
                    context_ms = took.saturating_sub(weights).as_millis() as u64,
                    "model loaded"
                );
                self.observer.model_loaded(handle.name(), took);
                Ok(lease)
            }
            Err(e) => {
                s.slot = Slot::Unloaded;
                s.last_error = Some(e.to_string());
                s.failed_attempt = s.attempts;
                drop(s);
                tracing::error!(model = %handle.name(), error = %e, "model failed to load");
                self.observer.model_load_failed(handle.name());
                // Loads waiting for room may go on.
                self.wake.notify();
                Err(e)
            }
        }
    }

    /// The slow path of `Engine::acquire`: one load per model at a time, and one load in
    /// the engine at a time (room is made under `room`).
    async fn load_for_lease(
        self: &Arc<Self>,
        handle: &Arc<ModelHandle>,
        seen_attempts: u64,
        deadline: Instant,
    ) -> Result<ModelLease, EngineError> {
        let timed_out = || EngineError::ModelLoadWait {
            model: handle.name().to_string(),
            waited: Duration::from_millis(handle.manifest.queue_timeout_ms),
        };
        let _one = tokio::time::timeout_at(deadline.into(), handle.load_lock.lock()).await.map_err(|_| timed_out())?;
        if let Some(lease) = handle.lease_if_loaded() {
            return Ok(lease);
        }
        {
            // A load this caller waited for failed: report it instead of trying again.
            let s = lock(&handle.state);
            if s.failed_attempt > seen_attempts {
                let message = s.last_error.clone().unwrap_or_default();
                return Err(EngineError::ModelLoadFailed { model: handle.name().to_string(), message });
            }
        }
        let _room = tokio::time::timeout_at(deadline.into(), self.room.lock()).await.map_err(|_| timed_out())?;
        self.make_room(handle, deadline).await?;
        let this = self.clone();
        let h = handle.clone();
        tokio::task::spawn_blocking(move || this.load_blocking(&h))
            .await
            .map_err(|e| EngineError::ModelLoadFailed { model: handle.name().to_string(), message: e.to_string() })?
    }

    /// Under `max_loaded_models`, unload the least recently used idle models until `handle`
    /// fits, or wait for one to become idle until `deadline`.
    async fn make_room(&self, handle: &ModelHandle, deadline: Instant) -> Result<(), EngineError> {
        let Some(max) = self.lifecycle.max_loaded_models else { return Ok(()) };
        loop {
            let idle = self.wake.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let loaded: Vec<&Arc<ModelHandle>> =
                self.models.values().filter(|h| h.name() != handle.name() && h.loaded().is_some()).collect();
            if loaded.len() < max {
                return Ok(());
            }
            let victim = loaded
                .iter()
                .filter(|h| !h.is_pinned() && h.activity.users() == 0)
                .min_by_key(|h| h.activity.last_used());
            if let Some(victim) = victim {
                if victim.unload_if_idle(false) {
                    tracing::info!(model = %victim.name(), to_load = %handle.name(), "model evicted to make room");
                    self.unloaded(victim, UnloadReason::Evicted);
                }
                continue;
            }
            if tokio::time::timeout_at(deadline.into(), idle).await.is_err() {
                let busy = loaded.iter().map(|h| h.name().to_string()).collect();
                return Err(EngineError::NoRoomToLoad { model: handle.name().to_string(), max, busy });
            }
        }
    }

    fn unloaded(&self, handle: &ModelHandle, reason: UnloadReason) {
        tracing::info!(model = %handle.name(), reason = reason.as_str(), "model unloaded");
        self.observer.model_unloaded(handle.name(), reason);
        // A load waiting for room may go on.
        self.wake.notify();
    }
}

/// The reaper thread: unloads models idle for their `keep_alive`. Sleeps until the next
/// one is due or a model becomes idle; stops with the engine.
fn reap(engine: Weak<Inner>) {
    const MAX_SLEEP: Duration = Duration::from_secs(60);
    loop {
        let Some(inner) = engine.upgrade() else { return };
        if inner.stopping.load(Ordering::Relaxed) {
            return;
        }
        let seen = inner.wake.generation();
        let now = Instant::now();
        let mut next = now + MAX_SLEEP;
        for handle in inner.models.values() {
            let Some(due) = handle.unload_due() else { continue };
            if due <= now {
                if handle.unload_if_idle(false) {
                    inner.unloaded(handle, UnloadReason::Idle);
                }
            } else {
                next = next.min(due);
            }
        }
        let wake = inner.wake.clone();
        drop(inner);
        wake.wait(seen, next.saturating_duration_since(Instant::now()));
    }
}
