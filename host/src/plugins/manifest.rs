//! Plugin manifests: `<name>.toml` beside `<name>.wasm`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// Paths the host serves itself; a plugin route may not shadow them.
pub const RESERVED_PREFIXES: &[&str] = &["/fn/", "/healthz", "/readyz", "/metrics", "/admin"];

/// What a plugin may do and use. Every field has a safe default, so a plugin without a
/// manifest gets no network, no models it does not name... and all models when it names none.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    /// Extra path prefixes served by this plugin besides `/fn/<name>/` (e.g. `/v1/`).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Models the plugin may load; absent means every loaded model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Linear memory limit of one instance.
    #[serde(default = "defaults::memory_limit_mb")]
    pub memory_limit_mb: u64,
    /// Wall-clock limit of one request, streaming included.
    #[serde(default = "defaults::deadline_ms")]
    pub deadline_ms: u64,
    /// Instances running at once; further requests are refused with 429.
    #[serde(default = "defaults::max_concurrency")]
    pub max_concurrency: usize,
    /// Execution contexts (sequences) one instance may hold at once.
    #[serde(default = "defaults::max_contexts")]
    pub max_contexts: usize,
    /// Values the guest reads as environment variables.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Hosts the guest may call over outgoing HTTP (`host` or `host:port`); none by default.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Bearer keys that may call this plugin, besides the server's global keys.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Served without an API key even when the server has keys (a page whose data comes
    /// from endpoints that need keys of their own). A request that does send a valid key is
    /// metered under it.
    #[serde(default)]
    pub public: bool,
}

mod defaults {
    pub fn memory_limit_mb() -> u64 {
        128
    }
    pub fn deadline_ms() -> u64 {
        120_000
    }
    pub fn max_concurrency() -> usize {
        64
    }
    pub fn max_contexts() -> usize {
        4
    }
}

impl Default for PluginManifest {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            models: None,
            memory_limit_mb: defaults::memory_limit_mb(),
            deadline_ms: defaults::deadline_ms(),
            max_concurrency: defaults::max_concurrency(),
            max_contexts: defaults::max_contexts(),
            config: BTreeMap::new(),
            allowed_hosts: Vec::new(),
            api_keys: Vec::new(),
            public: false,
        }
    }
}

impl PluginManifest {
    /// Parse a manifest; errors name the key and line.
    pub fn parse(text: &str, path: &Path) -> Result<Self, String> {
        let m: PluginManifest = toml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
        m.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), String> {
        for r in &self.routes {
            if !r.starts_with('/') {
                return Err(format!("route {r:?} must start with '/'"));
            }
            if r == "/" {
                return Err("route \"/\" would shadow every path; name a prefix such as \"/v1/\"".into());
            }
            if let Some(p) = RESERVED_PREFIXES.iter().find(|p| r.starts_with(*p) || p.starts_with(r.as_str())) {
                return Err(format!("route {r:?} overlaps the host's own {p:?}"));
            }
        }
        if self.memory_limit_mb == 0 || self.deadline_ms == 0 || self.max_concurrency == 0 || self.max_contexts == 0 {
            return Err("memory_limit_mb, deadline_ms, max_concurrency and max_contexts must be at least 1".into());
        }
        for h in &self.allowed_hosts {
            if h.is_empty() || h.contains('/') {
                return Err(format!("allowed host {h:?} must be a host or host:port"));
            }
        }
        for key in self.config.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(format!("config key {key:?} cannot be an environment variable name"));
            }
        }
        Ok(())
    }
}
