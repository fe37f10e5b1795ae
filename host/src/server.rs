//! Assembling a server from its configuration: engine, metrics, plugins, HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::engine::{Engine, ModelManifest};
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::plugins::{PluginRuntime, RuntimeConfig};
use crate::tenants::Tenants;

/// The manifests a config asks for.
pub fn select_models(config: &Config) -> anyhow::Result<Vec<ModelManifest>> {
    let all = ModelManifest::load_dir(&config.models.dir)?;
    if config.models.load.is_empty() {
        return Ok(all);
    }
    config
        .models
        .load
        .iter()
        .map(|name| {
            all.iter().find(|m| &m.name == name).cloned().with_context(|| {
                format!("models.load names {name:?}, but no manifest in {} has that name", config.models.dir.display())
            })
        })
        .collect()
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Load models and plugins, bind, and serve in the background.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let metrics = Metrics::new();
        let manifests = select_models(&config)?;
        let observer = metrics.clone();
        let lifecycle = config.models.lifecycle();
        let engine = tokio::task::spawn_blocking(move || Engine::start(manifests, observer, lifecycle)).await??;
        Self::start_with_engine(config, Arc::new(engine), metrics).await
    }

    /// Serve with an engine loaded beforehand (its step observer should be `metrics`).
    pub async fn start_with_engine(
        config: Config,
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Server> {
        metrics.watch_engine(&engine);
        let tenants = Arc::new(Tenants::new(&config.auth, &config.usage).map_err(anyhow::Error::msg)?);
        metrics.watch_usage(tenants.ledger());
        let p = &config.plugins;
        let runtime_config = RuntimeConfig {
            plugin_dir: p.dir.clone(),
            cache_dir: (!p.cache_dir.as_os_str().is_empty()).then(|| p.cache_dir.clone()),
            reload_interval: (p.reload_interval_ms > 0).then(|| Duration::from_millis(p.reload_interval_ms)),
            max_instances: p.max_instances,
            max_memory_mb: p.max_memory_mb,
            probe_first_host_call: false,
            keep_versions: p.keep_versions,
        };
        let runtime = PluginRuntime::start(engine, runtime_config, metrics.clone(), metrics.clone()).await?;
        runtime.watch();
        let max_upload = usize::try_from(p.max_component_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        let registries = crate::oci::Registries::new(&config.registries);
        for want in &p.pull {
            let context = || format!("plugins.pull {:?} ({})", want.name, want.reference);
            let pulled = registries.pull(&want.reference, max_upload).await.with_context(context)?;
            let source = format!("{}{}", crate::oci::SCHEME, pulled.pinned);
            let deployed = runtime
                .deploy(&want.name, &pulled.component, pulled.manifest.as_deref(), "config", &source)
                .await
                .with_context(context)?;
            tracing::info!(plugin = %want.name, version = deployed.version.version, %source, "plugin pulled");
        }
        let state = AppState::new(
            runtime,
            metrics,
            config.server.clone(),
            config.auth.clone(),
            max_upload,
            registries,
            tenants,
        );
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::http::serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, "listening");
        Ok(Server { addr, state, stop: Some(stop), task })
    }

    /// Stop accepting, let in-flight requests finish (within the grace period), return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?
    }

    /// Serve until the process is asked to stop (SIGTERM or Ctrl-C).
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        shutdown_signal().await;
        self.shutdown().await
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
