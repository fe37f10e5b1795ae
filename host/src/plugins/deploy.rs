//! Deploying, rolling back and removing plugins while the server runs.
//!
//! A deploy validates, compiles (into the shared cache), pool-checks and links the new
//! component from a scratch folder first; only then are its files renamed into the plugin
//! directory and the set swapped, under the same lock the directory watcher takes, so the
//! watcher never sees half a deploy. Requests hold the `Arc<Plugin>` they started with and
//! finish on it.

use std::path::{Path, PathBuf};

use super::manifest::PluginManifest;
use super::registry::{valid_name, Loader, PluginSet};
use super::versions::{VersionError, VersionInfo};
use super::PluginRuntime;

/// Why a deploy, rollback or removal was refused. The live version keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The upload itself is bad: not a component, a manifest that does not parse, imports
    /// the host cannot link, a component the pool cannot hold.
    #[error("{0}")]
    Invalid(String),
    #[error("no plugin named {0:?}")]
    NoPlugin(String),
    #[error(transparent)]
    Version(#[from] VersionError),
    /// The request conflicts with the current state (deleting the live version, say).
    #[error("{0}")]
    Conflict(String),
    #[error("cannot write the plugin directory: {0}")]
    Io(String),
}

/// A deploy's outcome.
#[derive(Debug, serde::Serialize)]
pub struct Deployed {
    pub plugin: String,
    pub version: VersionInfo,
    pub previous: Option<u64>,
}

fn io_err(e: std::io::Error) -> DeployError {
    DeployError::Io(e.to_string())
}

/// Put a file in place by writing a hidden temporary and renaming it.
fn put(dir: &Path, file: &str, bytes: &[u8]) -> Result<(), DeployError> {
    let tmp = dir.join(format!(".{file}.deploy{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io_err)?;
    std::fs::rename(&tmp, dir.join(file)).map_err(io_err)
}

fn remove_if_present(path: &Path) -> Result<(), DeployError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(e)),
        _ => Ok(()),
    }
}

impl PluginRuntime {
    pub(super) fn loader(&self, versioned: bool) -> Loader<'_> {
        Loader {
            wasm: &self.wasm,
            linker: &self.linker,
            cache_dir: self.config.cache_dir.as_deref(),
            max_memory_mb: self.config.max_memory_mb,
            pool: self.pool_size,
            versions: versioned.then_some(&self.versions),
        }
    }

    /// The version of `name` serving now.
    fn live_version(&self, name: &str) -> Option<u64> {
        self.plugins().plugins.get(name).and_then(|p| p.version.as_ref().map(|v| v.version))
    }

    /// The kept versions of a plugin (oldest first) and the one serving now.
    pub fn versions(&self, name: &str) -> (Vec<VersionInfo>, Option<u64>) {
        (self.versions.list(name), self.live_version(name))
    }

    /// Validate and link `component` with `manifest`, record it as a new version and make
    /// it live.
    pub async fn deploy(
        &self,
        name: &str,
        component: &[u8],
        manifest: Option<&str>,
        deployed_by: &str,
        source: &str,
    ) -> Result<Deployed, DeployError> {
        if !valid_name(name) {
            return Err(DeployError::Invalid(format!(
                "plugin name {name:?} must use only ASCII letters, digits, '-' and '_'"
            )));
        }
        let mut seen = self.reload_lock.lock().await;
        let previous = self.live_version(name);
        self.validate(name, component, manifest, &self.plugins()).await?;
        let version = self.versions.record(name, component, manifest, deployed_by, source)?;
        self.activate(name, component, manifest, &mut seen).await?;
        tracing::info!(plugin = name, version = version.version, ?previous, deployed_by, source, "plugin deployed");
        Ok(Deployed { plugin: name.to_string(), version, previous })
    }

    /// Make a kept version live again (the version before the live one when `None`).
    pub async fn rollback(&self, name: &str, to: Option<u64>) -> Result<Deployed, DeployError> {
        let mut seen = self.reload_lock.lock().await;
        let (list, live) = self.versions(name);
        if list.is_empty() {
            return Err(DeployError::NoPlugin(name.to_string()));
        }
        let target = match to {
            Some(v) => v,
            None => {
                let before = live.and_then(|l| list.iter().rev().find(|v| v.version < l));
                before.map(|v| v.version).ok_or_else(|| {
                    DeployError::Conflict(format!("plugin {name:?} has no kept version before the live one"))
                })?
            }
        };
        let (bytes, manifest) = self.versions.contents(name, target)?;
        // Kept versions loaded once, but the host (its pool, its routes) may have changed since.
        self.validate(name, &bytes, manifest.as_deref(), &self.plugins()).await?;
        self.activate(name, &bytes, manifest.as_deref(), &mut seen).await?;
        let version = self.versions.get(name, target)?;
        tracing::info!(plugin = name, version = target, previous = ?live, "plugin rolled back");
        Ok(Deployed { plugin: name.to_string(), version, previous: live })
    }

    /// Stop serving a plugin; its versions are kept, so a rollback can bring it back.
    pub async fn remove(&self, name: &str) -> Result<(), DeployError> {
        let mut seen = self.reload_lock.lock().await;
        if !self.plugins().plugins.contains_key(name) {
            return Err(DeployError::NoPlugin(name.to_string()));
        }
        let dir = &self.config.plugin_dir;
        remove_if_present(&dir.join(format!("{name}.wasm")))?;
        remove_if_present(&dir.join(format!("{name}.toml")))?;
        self.reload_locked(&mut seen).await;
        tracing::info!(plugin = name, "plugin removed");
        Ok(())
    }

    /// Delete a kept version that is not serving.
    pub async fn delete_version(&self, name: &str, version: u64) -> Result<(), DeployError> {
        let _seen = self.reload_lock.lock().await;
        if self.live_version(name) == Some(version) {
            return Err(DeployError::Conflict(format!(
                "version {version} of {name:?} is serving; deploy or roll back to another first"
            )));
        }
        Ok(self.versions.delete(name, version)?)
    }

    /// Load the component from a scratch folder exactly as the directory load would, and
    /// check that its routes are free.
    async fn validate(
        &self,
        name: &str,
        component: &[u8],
        manifest: Option<&str>,
        current: &PluginSet,
    ) -> Result<(), DeployError> {
        if let Some(text) = manifest {
            let m = PluginManifest::parse(text, Path::new("manifest")).map_err(DeployError::Invalid)?;
            for r in &m.routes {
                if let Some(owner) = current.route_owner(r).filter(|o| *o != name) {
                    return Err(DeployError::Invalid(format!("route {r:?} is already served by plugin {owner:?}")));
                }
            }
        }
        let scratch = scratch_dir(&self.config.plugin_dir);
        std::fs::create_dir_all(&scratch).map_err(io_err)?;
        let staged = scratch.join(format!("{name}.wasm"));
        let result = async {
            std::fs::write(&staged, component).map_err(io_err)?;
            if let Some(text) = manifest {
                std::fs::write(scratch.join(format!("{name}.toml")), text).map_err(io_err)?;
            }
            self.loader(false).load_one(name, &staged, &PluginSet::default()).await.map_err(DeployError::Invalid)
        }
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        result.map(|_| ())
    }

    /// Rename the files into the plugin directory and swap the set. Called with the reload
    /// lock held; if the swap does not bring the plugin up, the previous files go back.
    async fn activate(
        &self,
        name: &str,
        component: &[u8],
        manifest: Option<&str>,
        seen: &mut u64,
    ) -> Result<(), DeployError> {
        let dir = &self.config.plugin_dir;
        let (wasm_path, toml_path) = (dir.join(format!("{name}.wasm")), dir.join(format!("{name}.toml")));
        let before = (std::fs::read(&wasm_path).ok(), std::fs::read(&toml_path).ok());
        let install = |wasm: Option<&[u8]>, toml: Option<&[u8]>| -> Result<(), DeployError> {
            // The manifest first: a watcher racing us sees the new limits with the old code
            // at worst, never new code with stale limits (and it waits on the lock anyway).
            match toml {
                Some(t) => put(dir, &format!("{name}.toml"), t)?,
                None => remove_if_present(&toml_path)?,
            }
            match wasm {
                Some(w) => put(dir, &format!("{name}.wasm"), w),
                None => remove_if_present(&wasm_path),
            }
        };
        install(Some(component), manifest.map(str::as_bytes))?;
        let report = self.reload_locked(seen).await;
        if let Some(f) = report.failed.iter().find(|f| f.name == name) {
            let error = f.error.clone();
            install(before.0.as_deref(), before.1.as_deref())?;
            self.reload_locked(seen).await;
            return Err(DeployError::Invalid(error));
        }
        Ok(())
    }
}

fn scratch_dir(plugin_dir: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    plugin_dir.join(super::versions::VERSIONS_DIR).join(format!(".staging-{}-{n}", std::process::id()))
}
