//! The version history of each plugin, on disk beside the plugin directory's live files:
//! `<plugin_dir>/.versions/<name>/<version>/` holds `<name>.wasm`, `<name>.toml` (when the
//! version has a manifest) and `version.json`. Every component that went live, by the
//! deploy API or by a file dropped into the directory, gets a number; the newest
//! `keep` versions are kept, and the live one always.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The folder (inside the plugin directory) where versions live; the loader ignores it.
pub const VERSIONS_DIR: &str = ".versions";

/// One recorded version of a plugin.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VersionInfo {
    pub version: u64,
    pub sha256: String,
    /// Hash of the manifest text (empty text when the version has none).
    pub manifest_sha256: String,
    /// Seconds since the Unix epoch.
    pub deployed_at: u64,
    /// Who deployed it (the deploy request's `deployed_by`), or `directory`.
    pub deployed_by: String,
    /// `api`, `directory`, or the OCI reference it was pulled from.
    pub source: String,
    pub bytes: u64,
    /// The manifest as deployed (TOML), if any.
    pub manifest: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("plugin {name:?} has no version {version}")]
    Missing { name: String, version: u64 },
    #[error("cannot store plugin versions in {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VersionError + '_ {
    move |source| VersionError::Io { path: path.to_path_buf(), source }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// The version store of one plugin directory.
#[derive(Clone, Debug)]
pub struct VersionStore {
    root: PathBuf,
    keep: usize,
}

impl VersionStore {
    pub fn new(plugin_dir: &Path, keep: usize) -> Self {
        Self { root: plugin_dir.join(VERSIONS_DIR), keep: keep.max(1) }
    }

    fn plugin_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The folder of one version; its component is `<folder>/<name>.wasm`.
    pub fn folder(&self, name: &str, version: u64) -> PathBuf {
        self.plugin_dir(name).join(format!("{version:06}"))
    }

    /// Every kept version of a plugin, oldest first.
    pub fn list(&self, name: &str) -> Vec<VersionInfo> {
        let Ok(entries) = std::fs::read_dir(self.plugin_dir(name)) else { return Vec::new() };
        let mut out: Vec<VersionInfo> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
            .filter_map(|e| std::fs::read(e.path().join("version.json")).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect();
        out.sort_by_key(|v: &VersionInfo| v.version);
        out
    }

    pub fn get(&self, name: &str, version: u64) -> Result<VersionInfo, VersionError> {
        self.list(name)
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| VersionError::Missing { name: name.to_string(), version })
    }

    /// The newest kept version with exactly these contents.
    pub fn find(&self, name: &str, sha256: &str, manifest: Option<&str>) -> Option<VersionInfo> {
        let manifest_sha = sha256_hex(manifest.unwrap_or("").as_bytes());
        self.list(name).into_iter().rev().find(|v| v.sha256 == sha256 && v.manifest_sha256 == manifest_sha)
    }

    /// The version these contents already have, or a new one (then older versions beyond
    /// `keep` are pruned, never `live`).
    pub fn record(
        &self,
        name: &str,
        component: &[u8],
        manifest: Option<&str>,
        deployed_by: &str,
        source: &str,
    ) -> Result<VersionInfo, VersionError> {
        let sha256 = sha256_hex(component);
        if let Some(v) = self.find(name, &sha256, manifest) {
            return Ok(v);
        }
        let dir = self.plugin_dir(name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        // Numbers are never reused, even after a version is deleted: `last` remembers the highest.
        let last_path = dir.join("last");
        let last = std::fs::read_to_string(&last_path).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0);
        let version = self.list(name).last().map_or(0, |v| v.version).max(last) + 1;
        std::fs::write(&last_path, version.to_string()).map_err(io(&last_path))?;
        let info = VersionInfo {
            version,
            sha256,
            manifest_sha256: sha256_hex(manifest.unwrap_or("").as_bytes()),
            deployed_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            deployed_by: deployed_by.to_string(),
            source: source.to_string(),
            bytes: component.len() as u64,
            manifest: manifest.map(str::to_string),
        };
        // Written into a scratch folder and renamed, so a crash never leaves half a version.
        let scratch = dir.join(format!(".new-{}-{version}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(io(&scratch))?;
        let write = |file: &str, bytes: &[u8]| std::fs::write(scratch.join(file), bytes).map_err(io(&scratch));
        write(&format!("{name}.wasm"), component)?;
        if let Some(m) = manifest {
            write(&format!("{name}.toml"), m.as_bytes())?;
        }
        let json = serde_json::to_vec_pretty(&info)
            .map_err(|e| VersionError::Io { path: scratch.clone(), source: std::io::Error::other(e) })?;
        write("version.json", &json)?;
        let folder = self.folder(name, version);
        std::fs::rename(&scratch, &folder).map_err(io(&folder))?;
        self.prune(name, version);
        Ok(info)
    }

    /// Drop the oldest versions beyond `keep`, never `live`.
    fn prune(&self, name: &str, live: u64) {
        let all = self.list(name);
        let excess = all.len().saturating_sub(self.keep);
        for v in all.iter().filter(|v| v.version != live).take(excess) {
            if let Err(e) = std::fs::remove_dir_all(self.folder(name, v.version)) {
                tracing::warn!(plugin = name, version = v.version, error = %e, "cannot prune plugin version");
            }
        }
    }

    /// Delete one version's files.
    pub fn delete(&self, name: &str, version: u64) -> Result<(), VersionError> {
        self.get(name, version)?;
        let folder = self.folder(name, version);
        std::fs::remove_dir_all(&folder).map_err(io(&folder))
    }

    /// The component bytes and manifest text of a version.
    pub fn contents(&self, name: &str, version: u64) -> Result<(Vec<u8>, Option<String>), VersionError> {
        let info = self.get(name, version)?;
        let path = self.folder(name, version).join(format!("{name}.wasm"));
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        Ok((bytes, info.manifest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(keep: usize) -> (VersionStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("flywheel-versions-{}-{keep}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (VersionStore::new(&dir, keep), dir)
    }

    #[test]
    fn same_contents_keep_their_version_and_old_ones_are_pruned() {
        let (s, dir) = store(2);
        let v1 = s.record("p", b"one", None, "a", "api").unwrap();
        assert_eq!(s.record("p", b"one", None, "b", "api").unwrap().version, v1.version);
        // A different manifest is a different version.
        let v2 = s.record("p", b"one", Some("routes = []"), "a", "api").unwrap();
        assert_eq!((v1.version, v2.version), (1, 2));
        let v3 = s.record("p", b"three", None, "a", "directory").unwrap();
        assert_eq!(s.list("p").iter().map(|v| v.version).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.contents("p", 2).unwrap(), (b"one".to_vec(), Some("routes = []".into())));
        assert_eq!(s.record("p", b"four", None, "a", "api").unwrap().version, v3.version + 1);
        assert!(matches!(s.get("p", 1), Err(VersionError::Missing { .. })));
        s.delete("p", 3).unwrap();
        assert_eq!(s.list("p").len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
