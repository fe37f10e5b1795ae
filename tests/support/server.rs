//! Real servers for tests: the plugin directory, the server on 127.0.0.1:0, an HTTP client.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flywheel::config::Config;
use flywheel::engine::{Engine, Model, ModelManifest};
use flywheel::metrics::Metrics;
use flywheel::server::Server;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const GUESTS: &[&str] = &["complete", "json", "stream", "openai", "console", "hostile"];

/// The compiled guest component `name`. All guests are built once per test process with
/// the workspace's `guest` profile (a no-op when up to date).
pub fn guest_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(&root).args(["build", "--quiet", "--profile", "guest", "--target", "wasm32-wasip2"]);
        // Guests build as they always do, whatever flags and folder the host tests were built
        // with (scripts/build-cuda.sh test builds them for x86-64-v3 in target/cuda).
        cmd.env_remove("RUSTFLAGS").env_remove("CARGO_TARGET_DIR");
        for g in GUESTS {
            cmd.args(["-p", g]);
        }
        let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!("building guests failed:\n{}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(root.join("target/wasm32-wasip2/guest"))
    });
    match dir {
        Ok(d) => d.join(format!("{name}.wasm")),
        Err(e) => panic!("{e}"),
    }
}

/// A plugin to install: its name in the directory, the guest it is built from, its manifest.
pub struct PluginSpec {
    pub name: String,
    pub guest: String,
    pub manifest: Option<String>,
}

pub fn plugin(name: &str, guest: &str, manifest: Option<&str>) -> PluginSpec {
    PluginSpec { name: name.into(), guest: guest.into(), manifest: manifest.map(str::to_string) }
}

pub fn install(dir: &Path, spec: &PluginSpec) {
    std::fs::copy(guest_wasm(&spec.guest), dir.join(format!("{}.wasm", spec.name))).expect("copy plugin");
    if let Some(m) = &spec.manifest {
        std::fs::write(dir.join(format!("{}.toml", spec.name)), m).expect("write manifest");
    }
}

pub struct TestServer {
    pub server: Option<Server>,
    pub url: String,
    pub plugin_dir: PathBuf,
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Start a server over `models` with the given plugins; `configure` adjusts the config.
pub async fn start(
    models: Vec<ModelManifest>,
    plugins: &[PluginSpec],
    configure: impl FnOnce(&mut Config),
) -> TestServer {
    start_with_examples(models, plugins, &[], configure).await
}

/// As `start`, with Python and JavaScript examples installed too: (name, extra manifest lines).
pub async fn start_with_examples(
    models: Vec<ModelManifest>,
    plugins: &[PluginSpec],
    examples: &[(&str, &str)],
    configure: impl FnOnce(&mut Config),
) -> TestServer {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root = super::scratch_dir(&format!("server-{n}"));
    let plugin_dir = root.join("plugins");
    let _ = std::fs::remove_dir_all(&plugin_dir);
    std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
    for p in plugins {
        install(&plugin_dir, p);
    }
    for (name, extra) in examples {
        super::polyglot::install_example(&plugin_dir, name, extra);
    }
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.shutdown_grace_ms = 2_000;
    config.plugins.dir = plugin_dir.clone();
    config.plugins.cache_dir = root.join("cache");
    if !examples.is_empty() {
        // The big Python and JS components compile once, into a cache shared across runs.
        config.plugins.cache_dir = super::polyglot::cache_dir();
    }
    config.plugins.reload_interval_ms = 100;
    configure(&mut config);
    let metrics = Metrics::new();
    let observer = metrics.clone();
    let engine = Arc::new(Engine::start(models, observer, config.models.lifecycle()).expect("load models"));
    let server = Server::start_with_engine(config, engine.clone(), metrics.clone()).await.expect("start server");
    let url = format!("http://{}", server.addr);
    TestServer {
        server: Some(server),
        url,
        plugin_dir,
        engine,
        metrics,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

/// A cheap handle for requests from spawned tasks.
#[derive(Clone)]
pub struct TestClient {
    url: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    key: Option<String>,
}

impl TestClient {
    pub async fn post(&self, path: &str, body: &str) -> Resp {
        let mut req = http::Request::post(format!("{}{}", self.url, path)).header("content-type", "application/json");
        if let Some(key) = &self.key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).expect("request");
        let resp = self.client.request(req).await.expect("request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        Resp { status: parts.status.as_u16(), headers: parts.headers, body }
    }
}

impl TestServer {
    pub fn client(&self) -> TestClient {
        TestClient { url: self.url.clone(), client: self.client.clone(), key: None }
    }

    /// A client that sends `key` as its bearer key.
    pub fn clone_client_as(&self, key: &str) -> TestClient {
        TestClient { url: self.url.clone(), client: self.client.clone(), key: Some(key.to_string()) }
    }

    /// As `open`, with a bearer key.
    pub async fn open_as(&self, key: &str, path: &str, body: &str) -> hyper::Response<hyper::body::Incoming> {
        let req = http::Request::post(format!("{}{}", self.url, path))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.client.request(req).await.expect("request")
    }

    pub fn model(&self, name: &str) -> Arc<Model> {
        self.engine.model(name).expect("model").loaded().expect("model loaded")
    }

    pub async fn send(&self, req: http::Request<Full<Bytes>>) -> Resp {
        let resp = self.client.request(req).await.expect("request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        Resp { status: parts.status.as_u16(), headers: parts.headers, body }
    }

    pub async fn post(&self, path: &str, body: &str) -> Resp {
        let req = http::Request::post(format!("{}{}", self.url, path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.send(req).await
    }

    /// A request to the admin API with the key tests configure (`admin`).
    pub async fn admin(&self, method: &str, path: &str) -> Resp {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.url, path))
            .header("authorization", "Bearer admin")
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.send(req).await
    }

    /// A POST with a bearer key.
    pub async fn post_as(&self, key: &str, path: &str, body: &str) -> Resp {
        let req = http::Request::post(format!("{}{}", self.url, path))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.send(req).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        let req = http::Request::get(format!("{}{}", self.url, path)).body(Full::new(Bytes::new())).expect("request");
        self.send(req).await
    }

    /// Start a request and return the response with its body unread (for streaming).
    pub async fn open(&self, path: &str, body: &str) -> hyper::Response<hyper::body::Incoming> {
        let req = http::Request::post(format!("{}{}", self.url, path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.client.request(req).await.expect("request")
    }

    /// Sequences open across all models.
    pub fn active_sequences(&self) -> usize {
        self.engine.models().map(|m| m.stats().active_sequences.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }

    /// Wait until no sequence is open; false if that took longer than `within`.
    pub async fn wait_idle(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            let kv: usize =
                self.engine.models().map(|m| m.stats().kv_tokens.load(std::sync::atomic::Ordering::Relaxed)).sum();
            if self.active_sequences() == 0 && kv == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("shutdown");
        }
    }
}

/// Read server-sent events from a streaming response until `[DONE]`, the end of the body,
/// or `limit` events; returns the `data:` payloads.
pub async fn read_events(resp: &mut hyper::Response<hyper::body::Incoming>, limit: usize) -> Vec<String> {
    let mut events = Vec::new();
    let mut buf = String::new();
    while events.len() < limit {
        let Some(frame) = resp.body_mut().frame().await else { break };
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            buf.push_str(&String::from_utf8_lossy(data));
        }
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(d) = line.strip_prefix("data: ") {
                    events.push(d.to_string());
                }
            }
        }
        if events.last().is_some_and(|e| e == "[DONE]") {
            break;
        }
    }
    events
}
