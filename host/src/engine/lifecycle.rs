//! Models that load on first use and unload when idle (scale to zero).
//!
//! Every configured model has a [`ModelHandle`] for the engine's whole life; its weights
//! and llama.cpp context exist only while it is loaded. A caller works with a model through
//! a [`ModelLease`] ([`super::Engine::acquire`] loads the model first if it must), and
//! every open sequence holds one too. Once the last lease is gone the model is idle: it
//! unloads after its `keep_alive` unless it is pinned. The engine's reaper thread does the
//! unloading; loads and evictions (`max_loaded_models`) are in `mod.rs`.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::{EngineError, EngineStats, Model, ModelInfo, ModelManifest, Sequence, TokenAccount};

/// How long a model stays loaded after its last use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    /// Never unloaded for being idle (`-1`); loaded when the engine starts.
    Forever,
    /// Unloaded once idle this long; zero unloads it as soon as its last user is done.
    For(Duration),
}

impl KeepAlive {
    /// `-1` (forever), a number of seconds, or a duration such as `30s`, `5m` or `1h30m`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t == "-1" {
            return Ok(KeepAlive::Forever);
        }
        if let Ok(secs) = t.parse::<u64>() {
            return Ok(KeepAlive::For(Duration::from_secs(secs)));
        }
        humantime::parse_duration(t)
            .map(KeepAlive::For)
            .map_err(|e| format!("keep_alive {text:?} is not -1, a number of seconds or a duration like \"5m\" ({e})"))
    }

    /// As config files and the admin API show it: `-1` or a duration like `5m`.
    pub fn describe(&self) -> String {
        match self {
            KeepAlive::Forever => "-1".into(),
            KeepAlive::For(d) => humantime::format_duration(*d).to_string(),
        }
    }
}

impl<'de> serde::Deserialize<'de> for KeepAlive {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(-1) => Ok(KeepAlive::Forever),
            Raw::Number(n) if n >= 0 => Ok(KeepAlive::For(Duration::from_secs(n as u64))),
            Raw::Number(n) => {
                Err(serde::de::Error::custom(format!("keep_alive {n}: use -1 (forever) or seconds >= 0")))
            }
            Raw::Text(t) => KeepAlive::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// The engine-wide lifecycle settings (a manifest's own `keep_alive` wins over the default).
#[derive(Clone, Debug)]
pub struct Lifecycle {
    pub keep_alive: KeepAlive,
    /// Models loaded at once at most; `None` for no limit.
    pub max_loaded_models: Option<usize>,
}

impl Default for Lifecycle {
    /// Every model loads at start and stays, as llama-server's models do.
    fn default() -> Self {
        Self { keep_alive: KeepAlive::Forever, max_loaded_models: None }
    }
}

/// Where a model is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Unloaded,
    Loading,
    Loaded,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Unloaded => "unloaded",
            ModelState::Loading => "loading",
            ModelState::Loaded => "loaded",
        }
    }
}

/// Why a model was unloaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnloadReason {
    /// Idle for its `keep_alive`.
    Idle,
    /// Room was needed for another model (`max_loaded_models`).
    Evicted,
    /// The admin API asked.
    Admin,
}

impl UnloadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            UnloadReason::Idle => "idle",
            UnloadReason::Evicted => "evicted",
            UnloadReason::Admin => "admin",
        }
    }
}

/// Who is using a model right now. Shared by its handle and each load of it.
pub(crate) struct Activity {
    users: AtomicUsize,
    /// When the last user left (for `keep_alive` and least-recently-used eviction).
    idle_since: Mutex<Instant>,
    wake: Arc<Wake>,
}

impl Activity {
    pub(crate) fn new(wake: Arc<Wake>) -> Self {
        Self { users: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()), wake }
    }

    pub(crate) fn users(&self) -> usize {
        self.users.load(Ordering::SeqCst)
    }

    /// When the model was last used; now if it is in use.
    pub(crate) fn last_used(&self) -> Instant {
        if self.users() > 0 {
            Instant::now()
        } else {
            *lock(&self.idle_since)
        }
    }

    fn enter(&self) {
        self.users.fetch_add(1, Ordering::SeqCst);
    }

    fn leave(&self) {
        if self.users.fetch_sub(1, Ordering::SeqCst) == 1 {
            *lock(&self.idle_since) = Instant::now();
            // The reaper may have an unload to do, and a load may wait for room.
            self.wake.notify();
        }
    }
}

/// Wakes the reaper thread and the loads waiting for room.
pub(crate) struct Wake {
    generation: Mutex<u64>,
    cond: Condvar,
    pub(crate) idle: tokio::sync::Notify,
}

impl Wake {
    pub(crate) fn new() -> Self {
        Self { generation: Mutex::new(0), cond: Condvar::new(), idle: tokio::sync::Notify::new() }
    }

    pub(crate) fn notify(&self) {
        *lock(&self.generation) += 1;
        self.cond.notify_all();
        self.idle.notify_waiters();
    }

    /// How many notifications there have been; pass it to `wait` to miss none after it.
    pub(crate) fn generation(&self) -> u64 {
        *lock(&self.generation)
    }

    /// Sleep until notified after generation `seen`, or until `timeout` passes.
    pub(crate) fn wait(&self, seen: u64, timeout: Duration) {
        let guard = lock(&self.generation);
        let _unused = self.cond.wait_timeout_while(guard, timeout, |g| *g == seen);
    }
}

/// A model in use: loaded, and kept loaded until every lease is dropped. Derefs to the
/// model.
pub struct ModelLease {
    model: Arc<Model>,
}

impl ModelLease {
    /// The first lease on a model just loaded (under its handle's state lock).
    pub(crate) fn fresh(model: &Arc<Model>) -> Self {
        model.activity.enter();
        Self { model: model.clone() }
    }

    /// A lease on a model held without one (tests, benches, the CLI): refused once it was
    /// unloaded. Requests open sequences from the lease they hold instead, which cannot fail.
    pub(crate) fn on(model: &Arc<Model>) -> Result<Self, EngineError> {
        model.activity.enter();
        if model.retired.load(Ordering::SeqCst) {
            model.activity.leave();
            return Err(EngineError::ModelUnloaded(model.name().to_string()));
        }
        Ok(Self { model: model.clone() })
    }
}

impl ModelLease {
    /// Open a sequence on this model, waiting (bounded) for a free slot, its tokens charged
    /// to `account`. The sequence holds a lease of its own.
    pub async fn open_charged(&self, account: Option<Arc<dyn TokenAccount>>) -> Result<Sequence, EngineError> {
        self.model.open_with(self.clone(), account, true).await
    }

    /// As [`ModelLease::open_charged`], but only if a slot is free right now (a caller that
    /// already holds a sequence must not wait: it could deadlock with others doing the same).
    pub async fn open_now_charged(&self, account: Option<Arc<dyn TokenAccount>>) -> Result<Sequence, EngineError> {
        self.model.open_with(self.clone(), account, false).await
    }
}

impl Clone for ModelLease {
    fn clone(&self) -> Self {
        // A lease exists, so the model cannot be unloaded in between.
        self.model.activity.enter();
        Self { model: self.model.clone() }
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        self.model.activity.leave();
    }
}

impl Deref for ModelLease {
    type Target = Arc<Model>;
    fn deref(&self) -> &Arc<Model> {
        &self.model
    }
}

/// Size and modification time of a model file whose sha256 was checked: a reload of the
/// same, unchanged file skips hashing it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        Self { len: meta.len(), modified: meta.modified().ok() }
    }
}

pub(crate) enum Slot {
    Unloaded,
    Loading,
    Loaded(Arc<Model>),
}

pub(crate) struct HandleState {
    pub(crate) slot: Slot,
    /// Pinned by the admin API: stays loaded whatever its `keep_alive`.
    pub(crate) pinned: bool,
    /// The last load's failure, for the admin API (cleared by a successful load).
    pub(crate) last_error: Option<String>,
    /// Load attempts finished so far; a caller that waited for an attempt that failed gets
    /// its error instead of trying again at once.
    pub(crate) attempts: u64,
    pub(crate) failed_attempt: u64,
    pub(crate) loaded_at: Option<SystemTime>,
    pub(crate) last_load_time: Option<Duration>,
    /// Facts from the last load (known once the model has loaded once).
    pub(crate) info: Option<ModelInfo>,
}

/// A configured model, loaded or not.
pub struct ModelHandle {
    pub(crate) manifest: ModelManifest,
    pub(crate) keep_alive: KeepAlive,
    pub(crate) stats: Arc<EngineStats>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) state: Mutex<HandleState>,
    /// One load of this model at a time; later callers wait for it.
    pub(crate) load_lock: tokio::sync::Mutex<()>,
    pub(crate) verified: Mutex<Option<FileStamp>>,
    pub(crate) loads: AtomicUsize,
}

/// A model's state as the admin API and metrics show it.
#[derive(Clone, Debug)]
pub struct ModelStatus {
    pub state: ModelState,
    pub pinned: bool,
    pub keep_alive: KeepAlive,
    /// Leases held now (requests and open sequences).
    pub users: usize,
    pub idle_for: Option<Duration>,
    pub loaded_at: Option<SystemTime>,
    pub last_load_time: Option<Duration>,
    pub last_error: Option<String>,
    pub info: Option<ModelInfo>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ModelHandle {
    pub(crate) fn new(manifest: ModelManifest, lifecycle: &Lifecycle, wake: Arc<Wake>) -> Self {
        Self {
            keep_alive: manifest.keep_alive.unwrap_or(lifecycle.keep_alive),
            manifest,
            stats: Arc::new(EngineStats::default()),
            activity: Arc::new(Activity::new(wake)),
            state: Mutex::new(HandleState {
                slot: Slot::Unloaded,
                pinned: false,
                last_error: None,
                attempts: 0,
                failed_attempt: 0,
                loaded_at: None,
                last_load_time: None,
                info: None,
            }),
            load_lock: tokio::sync::Mutex::new(()),
            verified: Mutex::new(None),
            loads: AtomicUsize::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// Counters and gauges of this model, kept across loads.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn keep_alive(&self) -> KeepAlive {
        self.keep_alive
    }

    /// The loaded model, if it is loaded (admin, metrics, tests; requests take a lease).
    pub fn loaded(&self) -> Option<Arc<Model>> {
        match &lock(&self.state).slot {
            Slot::Loaded(m) => Some(m.clone()),
            _ => None,
        }
    }

    /// Whether it must stay loaded: pinned by the admin API or kept alive forever.
    pub fn is_pinned(&self) -> bool {
        self.keep_alive == KeepAlive::Forever || lock(&self.state).pinned
    }

    /// How many times it has loaded.
    pub fn load_count(&self) -> usize {
        self.loads.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> ModelStatus {
        let s = lock(&self.state);
        let state = match s.slot {
            Slot::Unloaded => ModelState::Unloaded,
            Slot::Loading => ModelState::Loading,
            Slot::Loaded(_) => ModelState::Loaded,
        };
        let users = self.activity.users();
        ModelStatus {
            state,
            pinned: s.pinned || self.keep_alive == KeepAlive::Forever,
            keep_alive: self.keep_alive,
            users,
            idle_for: (users == 0 && state == ModelState::Loaded).then(|| self.activity.last_used().elapsed()),
            loaded_at: s.loaded_at,
            last_load_time: s.last_load_time,
            last_error: s.last_error.clone(),
            info: s.info.clone(),
        }
    }

    /// A lease on the model if it is loaded now.
    pub(crate) fn lease_if_loaded(&self) -> Option<ModelLease> {
        let s = lock(&self.state);
        match &s.slot {
            Slot::Loaded(m) => {
                // Under the state lock, so an unload cannot slip in between.
                m.activity.enter();
                Some(ModelLease { model: m.clone() })
            }
            _ => None,
        }
    }

    /// When it becomes due for unloading by `keep_alive`, if it is loaded, idle and not pinned.
    pub(crate) fn unload_due(&self) -> Option<Instant> {
        let KeepAlive::For(keep) = self.keep_alive else { return None };
        let s = lock(&self.state);
        if s.pinned || !matches!(s.slot, Slot::Loaded(_)) || self.activity.users() > 0 {
            return None;
        }
        Some(self.activity.last_used() + keep)
    }

    /// Unload now if nobody uses it (and, unless `force`, it is not pinned). Returns whether
    /// it unloaded. The context is dropped on the decode thread; the weights go with the
    /// last reference.
    pub(crate) fn unload_if_idle(&self, force: bool) -> bool {
        let mut s = lock(&self.state);
        let Slot::Loaded(model) = &s.slot else { return false };
        if !force && (s.pinned || self.keep_alive == KeepAlive::Forever) {
            return false;
        }
        if self.activity.users() > 0 {
            return false;
        }
        // Retire, then look at the users again: a lease taken from a bare model in between
        // sees the flag and backs off (see `ModelLease::on`).
        model.retired.store(true, Ordering::SeqCst);
        if self.activity.users() > 0 {
            model.retired.store(false, Ordering::SeqCst);
            return false;
        }
        let Slot::Loaded(model) = std::mem::replace(&mut s.slot, Slot::Unloaded) else { return false };
        s.loaded_at = None;
        drop(s);
        // Our references go first, so the decode thread's is the last one to the weights:
        // it frees them, then gives the memory back.
        let link = model.link().clone();
        drop(model);
        link.unload();
        true
    }
}
