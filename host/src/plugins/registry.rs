//! Loading the plugin directory: validate, compile once (cached on disk), pre-link, and
//! swap the whole set atomically so in-flight requests finish on the version they started.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use super::manifest::PluginManifest;
use super::pool::{ComponentNeeds, PoolSize};
use super::store::PluginState;
use super::versions::{sha256_hex, VersionInfo, VersionStore};
use crate::nn::AllowedModels;

/// A plugin ready to serve: compiled, linked and with its limits.
pub struct Plugin {
    pub name: String,
    pub manifest: PluginManifest,
    pub sha256: String,
    pub path: PathBuf,
    pub loaded_at: SystemTime,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
    /// What one instance takes from the pool.
    pub needs: ComponentNeeds,
    /// The recorded version serving (none when loaded without a version store).
    pub version: Option<VersionInfo>,
    pub(crate) pre: ProxyPre<PluginState>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) allowed_models: AllowedModels,
    pub(crate) allowed_hosts: Arc<[String]>,
}

impl Plugin {
    /// Requests running in this plugin now.
    pub fn in_flight(&self) -> usize {
        self.manifest.max_concurrency - self.permits.available_permits()
    }
}

/// A file in the plugin directory that could not be loaded.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PluginFailure {
    pub name: String,
    pub path: PathBuf,
    pub error: String,
}

/// The plugins serving now, and the files that failed.
#[derive(Default)]
pub struct PluginSet {
    pub plugins: BTreeMap<String, Arc<Plugin>>,
    pub failures: Vec<PluginFailure>,
    /// Extra route prefixes, longest first.
    routes: Vec<(String, String)>,
}

impl PluginSet {
    /// The plugin that declares exactly this route prefix.
    pub(crate) fn route_owner(&self, route: &str) -> Option<&str> {
        self.routes.iter().find(|(p, _)| p == route).map(|(_, owner)| owner.as_str())
    }

    /// The plugin serving `path`: `/fn/<name>[/...]` or a manifest route prefix.
    pub fn route(&self, path: &str) -> Option<&Arc<Plugin>> {
        if let Some(rest) = path.strip_prefix("/fn/") {
            let name = rest.split('/').next().unwrap_or("");
            return self.plugins.get(name);
        }
        self.routes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()) || path == prefix.trim_end_matches('/'))
            .and_then(|(_, name)| self.plugins.get(name))
    }
}

/// What loading needs from the runtime.
pub(crate) struct Loader<'a> {
    pub wasm: &'a wasmtime::Engine,
    pub linker: &'a Linker<PluginState>,
    pub cache_dir: Option<&'a Path>,
    /// The pool's per-instance memory ceiling (`plugins.max_memory_mb`).
    pub max_memory_mb: u64,
    /// The pool's totals: a component that needs more than these can never run.
    pub pool: PoolSize,
    /// Where each component loaded from the directory is recorded as a version.
    pub versions: Option<&'a VersionStore>,
}

/// Plugin names become URL segments: keep them boring.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A cheap fingerprint of the directory (names, sizes, modification times) to notice changes.
pub(crate) fn fingerprint(dir: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "wasm" || x == "toml"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
                Some((e.file_name(), meta.len(), mtime))
            })
            .collect();
        files.sort();
        files.hash(&mut h);
    }
    h.finish()
}

impl Loader<'_> {
    /// Build a new set from the directory, reusing unchanged plugins of `old`.
    pub(crate) async fn load_dir(&self, dir: &Path, old: &PluginSet) -> PluginSet {
        let mut set = PluginSet::default();
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                set.failures.push(PluginFailure {
                    name: String::new(),
                    path: dir.to_path_buf(),
                    error: format!("cannot read the plugin directory: {e}"),
                });
                return set;
            }
        };
        paths.retain(|p| p.extension().is_some_and(|x| x == "wasm"));
        paths.sort();
        for path in paths {
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
            match self.load_one(&name, &path, old).await {
                Ok(plugin) => {
                    let clash = plugin.manifest.routes.iter().find_map(|r| {
                        set.routes.iter().find(|(p, _)| p == r).map(|(_, owner)| (r.clone(), owner.clone()))
                    });
                    if let Some((route, owner)) = clash {
                        set.failures.push(PluginFailure {
                            name: name.clone(),
                            path: path.clone(),
                            error: format!("route {route:?} is already served by plugin {owner:?}"),
                        });
                        continue;
                    }
                    for r in &plugin.manifest.routes {
                        set.routes.push((r.clone(), name.clone()));
                    }
                    set.plugins.insert(name, plugin);
                }
                Err(error) => {
                    tracing::error!(plugin = %name, path = %path.display(), %error, "plugin skipped");
                    set.failures.push(PluginFailure { name, path, error });
                }
            }
        }
        set.routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        set
    }

    pub(crate) async fn load_one(&self, name: &str, path: &Path, old: &PluginSet) -> Result<Arc<Plugin>, String> {
        if !valid_name(name) {
            return Err(format!("plugin file name {name:?} must use only ASCII letters, digits, '-' and '_'"));
        }
        let manifest_path = path.with_extension("toml");
        let manifest_text = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", manifest_path.display())),
        };
        let manifest = match &manifest_text {
            Some(text) => PluginManifest::parse(text, &manifest_path)?,
            None => PluginManifest::default(),
        };
        if manifest.memory_limit_mb > self.max_memory_mb {
            return Err(format!(
                "{}: memory_limit_mb = {} is above the server's plugins.max_memory_mb = {}",
                manifest_path.display(),
                manifest.memory_limit_mb,
                self.max_memory_mb
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let sha256 = sha256_hex(&bytes);
        if let Some(p) = old.plugins.get(name) {
            let same_version = match (&p.version, self.versions) {
                (Some(v), Some(_)) => {
                    v.manifest_sha256 == sha256_hex(manifest_text.as_deref().unwrap_or("").as_bytes())
                }
                _ => true,
            };
            if p.sha256 == sha256 && p.manifest == manifest && same_version {
                return Ok(p.clone());
            }
        }
        let (component, from_cache) = self.compile(&bytes, &sha256).await?;
        let needs = ComponentNeeds::of(&bytes, &component)?;
        needs.check_fits(&self.pool)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| format!("cannot link: {e:#} (the plugin imports something the host does not provide)"))?;
        let pre = ProxyPre::new(pre).map_err(|e| format!("not a wasi:http/proxy component: {e:#}"))?;
        // Recorded once it is known to load; a deploy recorded it already (with its deployer).
        let version = match self.versions {
            Some(store) => Some(
                store
                    .record(name, &bytes, manifest_text.as_deref(), "directory", "directory")
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let allowed_models = match &manifest.models {
            None => AllowedModels::All,
            Some(list) => AllowedModels::Only(list.clone().into()),
        };
        tracing::info!(
            plugin = %name,
            sha256 = %&sha256[..12],
            from_cache,
            version = version.as_ref().map_or(0, |v| v.version),
            core_instances = needs.core_instances,
            memories = needs.memories,
            tables = needs.tables,
            "plugin loaded"
        );
        Ok(Arc::new(Plugin {
            name: name.to_string(),
            permits: Arc::new(Semaphore::new(manifest.max_concurrency)),
            allowed_hosts: manifest.allowed_hosts.clone().into(),
            allowed_models,
            manifest,
            sha256,
            path: path.to_path_buf(),
            loaded_at: SystemTime::now(),
            from_cache,
            needs,
            version,
            pre,
        }))
    }

    /// Compile a component, or load its compiled form from the cache. The key covers the
    /// bytes, the wasmtime version and the engine configuration.
    async fn compile(&self, bytes: &[u8], sha256: &str) -> Result<(Component, bool), String> {
        if wasmparser_is_not_component(bytes) {
            return Err("not a WebAssembly component (build for wasm32-wasip2)".into());
        }
        let cache_path = self.cache_dir.map(|dir| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.wasm.precompile_compatibility_hash().hash(&mut h);
            dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()))
        });
        if let Some(p) = cache_path.as_ref().filter(|p| p.exists()) {
            // SAFETY: the cache directory is private to the host, and files there are only ever
            // written by `Component::serialize` below; wasmtime checks version and config.
            match unsafe { Component::deserialize_file(self.wasm, p) } {
                Ok(c) => return Ok((c, true)),
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "compiled cache entry unusable; recompiling"),
            }
        }
        let wasm = self.wasm.clone();
        let owned = bytes.to_vec();
        let component = tokio::task::spawn_blocking(move || Component::new(&wasm, owned))
            .await
            .map_err(|e| format!("compilation task failed: {e}"))?
            .map_err(|e| format!("invalid or incompatible component: {e:#}"))?;
        if let Some(p) = cache_path {
            if let Err(e) = write_cache(&p, &component) {
                tracing::warn!(path = %p.display(), error = %e, "cannot write compiled cache entry");
            }
        }
        Ok((component, false))
    }
}

/// A component starts with the wasm magic and a layer field of 1 (modules have 0).
fn wasmparser_is_not_component(bytes: &[u8]) -> bool {
    !(bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[6] == 1 && bytes[7] == 0)
}

fn write_cache(path: &Path, component: &Component) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = component.serialize()?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
