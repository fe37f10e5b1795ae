//! The plugin runtime: a directory of wasm components served per request.
//!
//! Each component is validated, compiled once (cached on disk by content hash, wasmtime
//! version and configuration) and pre-linked. Each request runs in a fresh instance from the
//! pooling allocator, in its own store with a memory limit, a deadline (epoch interruption
//! plus a timeout around host calls), no filesystem, no sockets, and outgoing HTTP only to
//! hosts its manifest allows. The directory is watched; a reload swaps the whole set
//! atomically.

mod deploy;
mod invoke;
mod manifest;
mod pool;
mod registry;
mod store;
mod versions;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, InstanceAllocationStrategy};

pub use deploy::{DeployError, Deployed};
pub use invoke::{BodyError, InvokeError, PluginBody, RequestAccount, TrapKind};
pub use manifest::{PluginManifest, RESERVED_PREFIXES};
pub use pool::{ComponentNeeds, PoolSize};
pub use registry::{Plugin, PluginFailure, PluginSet};
pub use store::PluginState;
pub use versions::{VersionError, VersionInfo, VERSIONS_DIR};

use crate::engine::Engine;
use crate::nn::NnObserver;
use pool::SlotBudget;
use registry::Loader;
use versions::VersionStore;

/// Observes plugin runs; every method has an empty default.
pub trait PluginObserver: Send + Sync {
    fn instantiated(&self, _plugin: &str, _took: Duration) {}
    /// Time a request waited for its pool slots (zero unless the pool was full).
    fn slots_acquired(&self, _plugin: &str, _waited: Duration) {}
    /// Time from the start of a request's instantiation to the guest's first call into
    /// the host (only with [`RuntimeConfig::probe_first_host_call`]).
    fn first_host_call(&self, _plugin: &str, _since_start: Duration) {}
    fn trapped(&self, _plugin: &str, _kind: &TrapKind) {}
    /// CPU time one request's guest ran on the host's threads.
    fn guest_cpu(&self, _plugin: &str, _spent: Duration) {}
}

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub plugin_dir: PathBuf,
    /// Where compiled plugins are cached; `None` compiles at every start.
    pub cache_dir: Option<PathBuf>,
    /// How often to look for changed plugin files; `None` disables hot reload.
    pub reload_interval: Option<Duration>,
    /// Instances that may exist at once (the pooling allocator's slots).
    pub max_instances: u32,
    /// The largest memory any plugin may be given.
    pub max_memory_mb: u64,
    /// Report each request's time to its first host call (a store call hook; for benches).
    pub probe_first_host_call: bool,
    /// Versions kept per plugin (the live one always is).
    pub keep_versions: usize,
}

impl RuntimeConfig {
    pub fn new(plugin_dir: impl Into<PathBuf>) -> Self {
        Self {
            plugin_dir: plugin_dir.into(),
            cache_dir: None,
            reload_interval: Some(Duration::from_secs(1)),
            max_instances: 256,
            max_memory_mb: 1024,
            probe_first_host_call: false,
            keep_versions: 10,
        }
    }
}

/// Summary of a (re)load.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReloadReport {
    pub loaded: Vec<String>,
    pub failed: Vec<PluginFailure>,
}

pub struct PluginRuntime {
    pub(crate) wasm: wasmtime::Engine,
    linker: Linker<PluginState>,
    pub(crate) engine: Arc<Engine>,
    config: RuntimeConfig,
    current: RwLock<Arc<PluginSet>>,
    reload_lock: tokio::sync::Mutex<u64>,
    pub(crate) observer: Arc<dyn PluginObserver>,
    pub(crate) nn_observer: Arc<dyn NnObserver>,
    /// The pool's free slots; each request takes what its plugin's component needs.
    pub(crate) slots: SlotBudget,
    pool_size: PoolSize,
    /// Every component that went live, by number.
    versions: VersionStore,
    /// Stops the epoch thread when the runtime goes away.
    _ticker: EpochTicker,
}

/// Advances the engine's epoch every few milliseconds: the clock for guest deadlines.
struct EpochTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub const EPOCH_TICK: Duration = Duration::from_millis(10);

fn wasm_engine(config: &RuntimeConfig) -> anyhow::Result<wasmtime::Engine> {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true);
    cfg.epoch_interruption(true);
    cfg.cranelift_opt_level(wasmtime::OptLevel::Speed);
    let max_memory = usize::try_from(config.max_memory_mb.saturating_mul(1 << 20))?;
    let pool = PoolSize::for_instances(config.max_instances).pooling_config(max_memory);
    cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(wasmtime::Engine::new(&cfg)?)
}

/// What a plugin may import: WASI (with no capabilities granted per request), wasi-http and
/// the inference interfaces.
fn plugin_linker(wasm: &wasmtime::Engine) -> anyhow::Result<Linker<PluginState>> {
    let mut linker = Linker::<PluginState>::new(wasm);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    crate::nn::add_to_linker(&mut linker, PluginState::nn_view)?;
    Ok(linker)
}

/// A plugin file checked the way the server loads it (manifest beside it, compile or cache,
/// pool fit, link against the host's world), without serving it.
#[derive(Debug, serde::Serialize)]
pub struct PluginCheck {
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
    pub needs: ComponentNeeds,
    pub from_cache: bool,
    pub load_ms: f64,
}

/// Check one plugin file; the error says why the server would refuse it.
pub async fn check_plugin(path: &std::path::Path, config: &RuntimeConfig) -> Result<PluginCheck, String> {
    let wasm = wasm_engine(config).map_err(|e| format!("{e:#}"))?;
    let linker = plugin_linker(&wasm).map_err(|e| format!("{e:#}"))?;
    let loader = Loader {
        wasm: &wasm,
        linker: &linker,
        cache_dir: config.cache_dir.as_deref(),
        max_memory_mb: config.max_memory_mb,
        pool: PoolSize::for_instances(config.max_instances),
        versions: None,
    };
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
    let started = std::time::Instant::now();
    let plugin = loader.load_one(&name, path, &PluginSet::default()).await?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(PluginCheck {
        name,
        sha256: plugin.sha256.clone(),
        bytes,
        needs: plugin.needs,
        from_cache: plugin.from_cache,
        load_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

impl PluginRuntime {
    /// Create the runtime and load the plugin directory once.
    pub async fn start(
        engine: Arc<Engine>,
        config: RuntimeConfig,
        observer: Arc<dyn PluginObserver>,
        nn_observer: Arc<dyn NnObserver>,
    ) -> anyhow::Result<Arc<Self>> {
        let wasm = wasm_engine(&config)?;
        let linker = plugin_linker(&wasm)?;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (wasm, stop) = (wasm.clone(), stop.clone());
            std::thread::Builder::new().name("epoch-ticker".into()).spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    wasm.increment_epoch();
                }
            })?;
        }
        let pool_size = PoolSize::for_instances(config.max_instances);
        let versions = VersionStore::new(&config.plugin_dir, config.keep_versions);
        let runtime = Arc::new(Self {
            wasm,
            linker,
            engine,
            config,
            current: RwLock::new(Arc::new(PluginSet::default())),
            reload_lock: tokio::sync::Mutex::new(0),
            observer,
            nn_observer,
            slots: SlotBudget::new(pool_size),
            pool_size,
            versions,
            _ticker: EpochTicker { stop },
        });
        let report = runtime.reload().await;
        tracing::info!(loaded = ?report.loaded, failed = report.failed.len(), "plugins loaded");
        Ok(runtime)
    }

    /// The plugins serving now. Requests keep the `Arc` they got, so a reload never
    /// disturbs them.
    pub fn plugins(&self) -> Arc<PluginSet> {
        self.current.read().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Rescan the plugin directory and swap in the new set.
    pub async fn reload(&self) -> ReloadReport {
        let mut seen = self.reload_lock.lock().await;
        self.reload_locked(&mut seen).await
    }

    /// `reload` for a caller that holds the reload lock (its guarded fingerprint is `seen`).
    async fn reload_locked(&self, seen: &mut u64) -> ReloadReport {
        *seen = registry::fingerprint(&self.config.plugin_dir);
        let old = self.plugins();
        let set = self.loader(true).load_dir(&self.config.plugin_dir, &old).await;
        let report = ReloadReport { loaded: set.plugins.keys().cloned().collect(), failed: set.failures.clone() };
        match self.current.write() {
            Ok(mut cur) => *cur = Arc::new(set),
            Err(p) => *p.into_inner() = Arc::new(set),
        }
        report
    }

    /// Reload whenever the directory's files change.
    pub fn watch(self: &Arc<Self>) {
        let Some(every) = self.config.reload_interval else { return };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(rt) = weak.upgrade() else { return };
                let now = registry::fingerprint(&rt.config.plugin_dir);
                let seen = *rt.reload_lock.lock().await;
                if now != seen {
                    let report = rt.reload().await;
                    tracing::info!(loaded = ?report.loaded, failed = report.failed.len(), "plugin directory changed; reloaded");
                }
            }
        });
    }
}
