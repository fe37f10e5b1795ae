//! `flywheel.toml`: the server's configuration. `flywheel.example.toml` at the repository
//! root documents every key with its default; unknown keys and bad values are errors that
//! name the key and line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{KeepAlive, Lifecycle};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub models: ModelsConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub usage: UsageConfig,
    /// OCI registries plugins are pushed to and pulled from (`[[registries]]`); a registry
    /// not listed is used anonymously over HTTPS.
    #[serde(default)]
    pub registries: Vec<RegistryConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Largest request body; larger ones get 413.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long a client may take to send its request body (408 after).
    #[serde(default = "defaults::body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// Requests served at once across all plugins.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// Requests that may wait for a serving slot; beyond that, 503 with Retry-After.
    #[serde(default = "defaults::max_queue")]
    pub max_queue: usize,
    /// How long a queued request waits before 503.
    #[serde(default = "defaults::queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Open client connections at most; past it, new ones get 503 and are closed. Unset:
    /// sized from the process's open-file limit.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// How long a client may take to send a request's headers (the connection is closed
    /// after); also how long an HTTP/1.1 connection may wait between requests.
    #[serde(default = "defaults::header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// How long a connection with no request in flight and no traffic stays open.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// How long a response may wait on a client that does not read before the connection
    /// is closed (and the plugin instance serving it is stopped).
    #[serde(default = "defaults::write_stall_timeout_ms")]
    pub write_stall_timeout_ms: u64,
}

/// Descriptors kept back from client connections for models, plugins, the cache and logs.
const RESERVED_FILES: usize = 256;

impl ServerConfig {
    /// The connection cap: as configured, or what the open-file limit leaves room for.
    pub fn connection_limit(&self) -> usize {
        self.max_connections.unwrap_or_else(|| crate::sys::open_file_limit().saturating_sub(RESERVED_FILES).max(64))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Folder of model manifests.
    #[serde(default = "defaults::models_dir")]
    pub dir: PathBuf,
    /// Which manifests to serve, by model name; empty serves all of them.
    #[serde(default = "defaults::model_names")]
    pub load: Vec<String>,
    /// How long a model stays loaded after its last use, unless its manifest says: `-1`
    /// (loaded at start and kept), `0` (unloaded after each use) or a duration like `5m`.
    #[serde(default = "defaults::keep_alive")]
    pub keep_alive: KeepAlive,
    /// Models loaded at once at most; a model that must load unloads the least recently
    /// used idle one. Unset: no limit.
    #[serde(default)]
    pub max_loaded_models: Option<usize>,
}

impl ModelsConfig {
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle { keep_alive: self.keep_alive, max_loaded_models: self.max_loaded_models }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Folder of `<name>.wasm` components and optional `<name>.toml` manifests.
    #[serde(default = "defaults::plugins_dir")]
    pub dir: PathBuf,
    /// Where compiled plugins are cached; empty disables the cache.
    #[serde(default = "defaults::cache_dir")]
    pub cache_dir: PathBuf,
    /// How often to look for changed plugins; 0 disables hot reload.
    #[serde(default = "defaults::reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// Plugin instances that may exist at once.
    #[serde(default = "defaults::max_instances")]
    pub max_instances: u32,
    /// The largest memory limit a plugin manifest may ask for.
    #[serde(default = "defaults::max_memory_mb")]
    pub max_memory_mb: u64,
    /// Versions kept per plugin for rollback (the live one always is).
    #[serde(default = "defaults::keep_versions")]
    pub keep_versions: usize,
    /// The largest component the deploy API accepts.
    #[serde(default = "defaults::max_component_mb")]
    pub max_component_mb: u64,
    /// Plugins pulled from an OCI registry and deployed at start (`[[plugins.pull]]`).
    #[serde(default)]
    pub pull: Vec<PluginPull>,
}

/// One plugin to pull at start.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginPull {
    pub name: String,
    /// `registry/repository@sha256:…` (a tag works too, and is pinned when pulled).
    pub reference: String,
}

/// How to reach one OCI registry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry as references name it: `ghcr.io`, `registry.internal:5000`.
    pub host: String,
    #[serde(default)]
    pub username: Option<String>,
    /// The password or token; prefer `password_env`, which keeps it out of the file.
    #[serde(default)]
    pub password: Option<String>,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Plain HTTP instead of HTTPS (a registry on loopback or a private network only).
    #[serde(default)]
    pub insecure: bool,
}

impl RegistryConfig {
    /// The password, from the file or the environment variable `password_env` names.
    pub fn password(&self) -> Result<Option<String>, String> {
        match (&self.password, &self.password_env) {
            (Some(_), Some(_)) => Err(format!("registry {}: set password or password_env, not both", self.host)),
            (Some(p), None) => Ok(Some(p.clone())),
            (None, Some(var)) => std::env::var(var).map(Some).map_err(|_| {
                format!("registry {}: the environment variable {var} (password_env) is not set", self.host)
            }),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer keys accepted for every plugin; empty means no key is needed (unless a
    /// plugin's manifest lists its own keys).
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Bearer key for `/admin/...`; without one the admin API is off.
    #[serde(default)]
    pub admin_key: Option<String>,
    /// Named keys (`[[auth.keys]]`), each with its own quotas; accepted for every plugin.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
}

/// One named API key and its quotas. Metrics, logs and usage reports show its name, never
/// the key.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    /// The key; prefer `key_env`, which keeps it out of the file.
    #[serde(default)]
    pub key: Option<String>,
    /// An environment variable holding the key.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Requests started per minute (a bucket of this size that refills evenly).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Prompt and generated tokens per minute; a generation that runs out is stopped.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// Requests (streams included) in flight at once.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

impl KeyConfig {
    /// The key, from the file or the environment variable `key_env` names.
    pub fn secret(&self) -> Result<String, String> {
        let key = match (&self.key, &self.key_env) {
            (Some(_), Some(_)) => return Err(format!("auth.keys {:?}: set key or key_env, not both", self.name)),
            (Some(k), None) => k.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                format!("auth.keys {:?}: the environment variable {var} (key_env) is not set", self.name)
            })?,
            (None, None) => return Err(format!("auth.keys {:?}: set key or key_env", self.name)),
        };
        if key.trim().is_empty() {
            return Err(format!("auth.keys {:?}: the key is empty", self.name));
        }
        Ok(key)
    }
}

// Keys never reach a log, not even through `{:?}` of the configuration.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("api_keys", &format_args!("[{} keys]", self.api_keys.len()))
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<set>"))
            .field("keys", &self.keys)
            .finish()
    }
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConfig")
            .field("name", &self.name)
            .field("key", &self.key.as_ref().map(|_| "<set>"))
            .field("key_env", &self.key_env)
            .field("requests_per_minute", &self.requests_per_minute)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("max_concurrent", &self.max_concurrent)
            .finish()
    }
}

/// Usage metering (`/admin/usage`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// How far back `/admin/usage` can look: per-minute records older than this are dropped.
    #[serde(default = "defaults::usage_retention_hours")]
    pub retention_hours: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self { retention_hours: defaults::usage_retention_hours() }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default = "defaults::log_format")]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `flywheel=debug,warn`; `RUST_LOG` overrides it.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

mod defaults {
    use std::path::PathBuf;
    pub fn listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 8080))
    }
    pub fn max_body_bytes() -> usize {
        1 << 20
    }
    pub fn body_timeout_ms() -> u64 {
        10_000
    }
    pub fn max_in_flight() -> usize {
        256
    }
    pub fn max_queue() -> usize {
        512
    }
    pub fn queue_timeout_ms() -> u64 {
        30_000
    }
    pub fn shutdown_grace_ms() -> u64 {
        30_000
    }
    pub fn header_timeout_ms() -> u64 {
        10_000
    }
    pub fn idle_timeout_ms() -> u64 {
        60_000
    }
    pub fn write_stall_timeout_ms() -> u64 {
        30_000
    }
    pub fn models_dir() -> PathBuf {
        "models".into()
    }
    pub fn model_names() -> Vec<String> {
        vec!["smollm2".into()]
    }
    pub fn keep_alive() -> crate::engine::KeepAlive {
        crate::engine::KeepAlive::Forever
    }
    pub fn usage_retention_hours() -> u64 {
        24
    }
    pub fn plugins_dir() -> PathBuf {
        ".flywheel/plugins".into()
    }
    pub fn cache_dir() -> PathBuf {
        ".flywheel/cache".into()
    }
    pub fn reload_interval_ms() -> u64 {
        1000
    }
    pub fn max_instances() -> u32 {
        256
    }
    pub fn max_memory_mb() -> u64 {
        1024
    }
    pub fn keep_versions() -> usize {
        10
    }
    pub fn max_component_mb() -> u64 {
        64
    }
    pub fn log_format() -> super::LogFormat {
        super::LogFormat::Text
    }
    pub fn log_level() -> String {
        "info,llama-cpp-2=warn".into()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            dir: defaults::models_dir(),
            load: defaults::model_names(),
            keep_alive: defaults::keep_alive(),
            max_loaded_models: None,
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: defaults::plugins_dir(),
            cache_dir: defaults::cache_dir(),
            reload_interval_ms: defaults::reload_interval_ms(),
            max_instances: defaults::max_instances(),
            max_memory_mb: defaults::max_memory_mb(),
            keep_versions: defaults::keep_versions(),
            max_component_mb: defaults::max_component_mb(),
            pull: Vec::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: defaults::log_format(), level: defaults::log_level() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Read and validate a config file. Relative paths inside it are resolved against the
    /// file's folder.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Parse config text (errors carry the key and line from the TOML parser).
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.models.dir);
        fix(&mut self.plugins.dir);
        fix(&mut self.plugins.cache_dir);
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.server;
        let positive = [
            ("server.max_body_bytes", s.max_body_bytes as u64),
            ("server.body_timeout_ms", s.body_timeout_ms),
            ("server.max_in_flight", s.max_in_flight as u64),
            ("server.queue_timeout_ms", s.queue_timeout_ms),
            ("server.max_connections", s.max_connections.map_or(1, |n| n as u64)),
            ("server.header_timeout_ms", s.header_timeout_ms),
            ("server.idle_timeout_ms", s.idle_timeout_ms),
            ("server.write_stall_timeout_ms", s.write_stall_timeout_ms),
            ("plugins.max_instances", u64::from(self.plugins.max_instances)),
            ("plugins.max_memory_mb", self.plugins.max_memory_mb),
            ("plugins.keep_versions", self.plugins.keep_versions as u64),
            ("plugins.max_component_mb", self.plugins.max_component_mb),
            ("models.max_loaded_models", self.models.max_loaded_models.map_or(1, |n| n as u64)),
            ("usage.retention_hours", self.usage.retention_hours),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if self.auth.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err("auth.api_keys must not contain empty keys".into());
        }
        if self.auth.admin_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err("auth.admin_key must not be empty (omit it to turn the admin API off)".into());
        }
        let mut names = std::collections::HashSet::new();
        for k in &self.auth.keys {
            if k.name.is_empty() || !k.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(format!(
                    "auth.keys name {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                    k.name
                ));
            }
            if !names.insert(&k.name) {
                return Err(format!("auth.keys: two keys are named {:?}", k.name));
            }
            let limits = [
                ("requests_per_minute", k.requests_per_minute),
                ("tokens_per_minute", k.tokens_per_minute),
                ("max_concurrent", k.max_concurrent),
            ];
            for (key, v) in limits {
                if v == Some(0) {
                    return Err(format!("auth.keys {:?}: {key} must be at least 1 (omit it for no limit)", k.name));
                }
            }
            if k.key.is_some() && k.key_env.is_some() {
                return Err(format!("auth.keys {:?}: set key or key_env, not both", k.name));
            }
            if k.key.is_none() && k.key_env.is_none() {
                return Err(format!("auth.keys {:?}: set key or key_env", k.name));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| format!("log.level {:?} is not a valid filter: {e}", self.log.level))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.models.load, vec!["smollm2"]);
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let e = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nmax_bodyy = 3\n").unwrap_err();
        assert!(e.contains("max_bodyy") && e.contains("line 3"), "{e}");
        let e = Config::parse("[server]\nlisten = \"not an address\"\n").unwrap_err();
        assert!(e.contains("listen") || e.contains("line 2"), "{e}");
        let e = Config::parse("[server]\nmax_in_flight = 0\n").unwrap_err();
        assert!(e.contains("server.max_in_flight"), "{e}");
        let e = Config::parse("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(e.contains("xml") || e.contains("format"), "{e}");
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let c = Config::parse(
            "[auth]\napi_keys = [\"sk-plain\"]\nadmin_key = \"sk-admin\"\n[[auth.keys]]\nname = \"a\"\nkey = \"sk-named\"\n",
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("name: \"a\"") && !shown.contains("sk-"), "{shown}");
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../flywheel.example.toml");
        Config::parse(text).unwrap();
    }

    #[test]
    fn the_kubernetes_config_map_parses() {
        // The `flywheel.toml: |` block of the ConfigMap, its YAML indentation removed.
        let yaml = include_str!("../../deploy/kubernetes/flywheel.yaml");
        let block: String = yaml
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("flywheel.toml: |"))
            .skip(1)
            .take_while(|l| l.starts_with("    "))
            .map(|l| format!("{}\n", &l[4..]))
            .collect();
        let config = Config::parse(&block).unwrap();
        assert_eq!((config.plugins.pull.len(), config.registries.len()), (1, 1), "{block}");
    }
}
