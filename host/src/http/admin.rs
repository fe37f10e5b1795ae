//! The admin API, behind the admin key: plugins and models with their state, reload, and
//! deploys (upload, versions, rollback, removal; see `plugins::deploy`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::body::{read_limited, ServerBody};
use super::errors::ApiError;
use super::{json_response, AppState};
use crate::engine::{EngineError, ModelHandle, ModelStatus};
use crate::plugins::DeployError;

pub async fn handle(state: &AppState, req: Request<Incoming>) -> Result<Response<ServerBody>, ApiError> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let query = req.uri().query().unwrap_or("").to_string();
    let rest = path.strip_prefix("/admin").unwrap_or(&path).trim_end_matches('/');
    if let Some(tail) = rest.strip_prefix("/plugins/") {
        if let Some(resp) = deploys(state, &method, tail, req).await? {
            return Ok(resp);
        }
    }
    if let Some(tail) = rest.strip_prefix("/models/") {
        return model_lifecycle(state, &method, tail).await;
    }
    match (&method, rest) {
        (&Method::GET, "/plugins") => Ok(json_response(StatusCode::OK, plugins(state))),
        (&Method::GET, "/models") => Ok(json_response(StatusCode::OK, models(state))),
        (&Method::GET, "/usage") => usage(state, &query),
        (&Method::POST, "/reload") => {
            let report = state.runtime.reload().await;
            Ok(json_response(StatusCode::OK, json!(report)))
        }
        (&Method::POST, r) if r.starts_with("/plugins/") && r.ends_with("/reload") => {
            // Reloading is atomic over the whole directory; report this plugin's outcome.
            let name = r.strip_prefix("/plugins/").and_then(|r| r.strip_suffix("/reload")).unwrap_or("");
            let report = state.runtime.reload().await;
            if let Some(f) = report.failed.iter().find(|f| f.name == name) {
                return Ok(json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({ "plugin": name, "error": f.error }),
                ));
            }
            if !report.loaded.iter().any(|l| l == name) {
                return Err(ApiError::not_found(format!("no plugin named {name:?} in the plugin directory")));
            }
            Ok(json_response(StatusCode::OK, json!({ "plugin": name, "state": "loaded" })))
        }
        _ => Err(ApiError::not_found(format!("no admin endpoint {method} {path}"))),
    }
}

fn plugins(state: &AppState) -> serde_json::Value {
    let set = state.runtime.plugins();
    let loaded: Vec<_> = set
        .plugins
        .values()
        .map(|p| {
            let m = &p.manifest;
            json!({
                "name": p.name,
                "state": "loaded",
                "sha256": p.sha256,
                "path": p.path,
                "routes": std::iter::once(format!("/fn/{}/", p.name)).chain(m.routes.iter().cloned()).collect::<Vec<_>>(),
                "models": m.models,
                "loaded_at": p.loaded_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "compiled_from_cache": p.from_cache,
                // What one instance takes from the shared pool.
                "pool_needs": p.needs,
                "in_flight": p.in_flight(),
                "version": p.version,
                "limits": {
                    "memory_limit_mb": m.memory_limit_mb,
                    "deadline_ms": m.deadline_ms,
                    "max_concurrency": m.max_concurrency,
                    "max_contexts": m.max_contexts,
                    "allowed_hosts": m.allowed_hosts,
                },
            })
        })
        .collect();
    let failed: Vec<_> = set
        .failures
        .iter()
        .map(|f| json!({ "name": f.name, "state": "failed", "path": f.path, "error": f.error }))
        .collect();
    json!({ "plugins": loaded, "failed": failed })
}

fn unix(t: Option<std::time::SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs())
}

fn model_json(m: &ModelHandle, status: ModelStatus) -> serde_json::Value {
    let (manifest, s) = (m.manifest(), m.stats());
    json!({
        "name": m.name(),
        "state": status.state.as_str(),
        "pinned": status.pinned,
        "keep_alive": status.keep_alive.describe(),
        "leases": status.users,
        "idle_seconds": status.idle_for.map(|d| d.as_secs_f64()),
        "loaded_at": unix(status.loaded_at),
        "last_load_ms": status.last_load_time.map(|d| d.as_millis() as u64),
        "loads": m.load_count(),
        "last_error": status.last_error,
        "description": manifest.description,
        "vocab_size": status.info.as_ref().map(|i| i.vocab_size),
        "weights_bytes": status.info.as_ref().map(|i| i.weights_bytes),
        "layers": status.info.as_ref().map(|i| i.layers),
        // Where the model sat at its last load: layers on the GPUs, its KV cache on each side.
        "offloaded_layers": status.info.as_ref().map(|i| i.offloaded_layers),
        "kv_bytes": status.info.as_ref().map(|i| json!({ "gpu": i.kv_bytes_gpu, "cpu": i.kv_bytes_cpu })),
        "gpu": {
            "n_gpu_layers": manifest.n_gpu_layers,
            "main_gpu": manifest.main_gpu,
            "split_mode": format!("{:?}", manifest.split_mode).to_lowercase(),
            "devices": manifest.devices,
            "tensor_split": manifest.tensor_split,
        },
        "kv_cache_type": manifest.kv_cache_type.as_str(),
        "flash_attention": format!("{:?}", manifest.flash_attention).to_lowercase(),
        "context_length": manifest.context_length,
        // What the loaded model opens: `kv_memory_fraction` may size it below the manifest's cap.
        "max_sequences": status.info.as_ref().map_or(manifest.max_sequences, |i| i.max_sequences),
        "kv_memory_fraction": manifest.kv_memory_fraction,
        // What its last load runs with: a batch whose compute buffers did not fit is halved.
        "batch_size": status.info.as_ref().map_or(manifest.batch_size, |i| i.batch_size),
        "kv_bytes_per_sequence": status.info.as_ref().map(|i| i.kv_bytes_per_sequence),
                "active_sequences": s.active_sequences.load(Ordering::Relaxed),
                "waiting_opens": s.waiting_opens.load(Ordering::Relaxed),
                "kv_tokens": s.kv_tokens.load(Ordering::Relaxed),
                "kv_retained_tokens": s.retained_tokens.load(Ordering::Relaxed),
                "prefix_cache_entries": s.cached_prefixes.load(Ordering::Relaxed),
                "generated_tokens": s.decode_tokens.load(Ordering::Relaxed),
                "prefill_tokens": s.prefill_tokens.load(Ordering::Relaxed),
        "reused_prefix_tokens": s.reused_tokens.load(Ordering::Relaxed),
        "embedding_tokens": s.embedded_tokens.load(Ordering::Relaxed),
    })
}

fn models(state: &AppState) -> serde_json::Value {
    let engine = state.runtime.engine();
    let models: Vec<_> = engine.models().map(|m| model_json(m, m.status())).collect();
    let lifecycle = engine.lifecycle();
    json!({
        "models": models,
        "devices": crate::engine::devices(),
        "gpu_offload": crate::engine::supports_gpu_offload(),
        "keep_alive": lifecycle.keep_alive.describe(),
        "max_loaded_models": lifecycle.max_loaded_models,
    })
}

/// `POST /admin/models/<name>/load | unload | pin | unpin`, `GET /admin/models/<name>`.
async fn model_lifecycle(state: &AppState, method: &Method, tail: &str) -> Result<Response<ServerBody>, ApiError> {
    let engine = state.runtime.engine();
    let (name, action) = tail.split_once('/').unwrap_or((tail, ""));
    let handle = engine.model(name).map_err(|e| ApiError::not_found(e.to_string()))?;
    let failed = |e: EngineError| {
        let status = match &e {
            EngineError::ModelBusy { .. } | EngineError::Lifecycle(_) => StatusCode::CONFLICT,
            EngineError::NoRoomToLoad { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
        ApiError::new(status, kind, e.to_string())
    };
    let status = match (method, action) {
        (&Method::GET, "") => handle.status(),
        // The state while loaded (with keep_alive 0 it unloads right after).
        (&Method::POST, "load") => engine.load_model(name).await.map_err(failed)?,
        (&Method::POST, "unload") => {
            engine.unload_model(name).map_err(failed)?;
            handle.status()
        }
        (&Method::POST, "pin") => engine.pin_model(name, true).await.map_err(failed)?,
        (&Method::POST, "unpin") => engine.pin_model(name, false).await.map_err(failed)?,
        _ => return Err(ApiError::not_found(format!("no admin endpoint {method} /admin/models/{tail}"))),
    };
    Ok(json_response(StatusCode::OK, model_json(handle, status)))
}

/// `GET /admin/usage?since=<unix seconds | RFC 3339>&key=<name>&plugin=<name>`.
fn usage(state: &AppState, query: &str) -> Result<Response<ServerBody>, ApiError> {
    let mut since = 0;
    let (mut key, mut plugin) = (None, None);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "since" => since = parse_time(&v)?,
            "key" => key = Some(v.into_owned()),
            "plugin" => plugin = Some(v.into_owned()),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}; use since, key or plugin"
                )))
            }
        }
    }
    let report = state.tenants.ledger().report(since, key.as_deref(), plugin.as_deref());
    Ok(json_response(StatusCode::OK, json!(report)))
}

/// `since` as unix seconds or an RFC 3339 time.
fn parse_time(v: &str) -> Result<u64, ApiError> {
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(secs);
    }
    let t = humantime::parse_rfc3339_weak(v).map_err(|e| {
        ApiError::bad_request(format!("since={v:?} is neither unix seconds nor an RFC 3339 time ({e})"))
    })?;
    Ok(unix(Some(t)).unwrap_or(0))
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        let status = match &e {
            DeployError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            DeployError::NoPlugin(_) | DeployError::Version(crate::plugins::VersionError::Missing { .. }) => {
                StatusCode::NOT_FOUND
            }
            DeployError::Conflict(_) => StatusCode::CONFLICT,
            DeployError::Version(_) | DeployError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
        ApiError::new(status, kind, e.to_string())
    }
}

/// `/admin/plugins/<name>` (PUT: deploy, DELETE: stop serving), `…/versions` (GET),
/// `…/versions/<n>` (DELETE), `…/rollback` (POST). `None`: not a deploy endpoint.
async fn deploys(
    state: &AppState,
    method: &Method,
    tail: &str,
    req: Request<Incoming>,
) -> Result<Option<Response<ServerBody>>, ApiError> {
    let parts: Vec<&str> = tail.split('/').collect();
    let runtime = &state.runtime;
    let resp = match (method, parts.as_slice()) {
        (&Method::PUT, [name]) => {
            let upload = read_upload(state, req).await?;
            let deployed = runtime
                .deploy(name, &upload.component, upload.manifest.as_deref(), &upload.deployed_by, &upload.source)
                .await?;
            json_response(StatusCode::CREATED, json!(deployed))
        }
        (&Method::DELETE, [name]) => {
            runtime.remove(name).await?;
            json_response(StatusCode::OK, json!({ "plugin": name, "state": "removed" }))
        }
        (&Method::GET, [name, "versions"]) => {
            let (versions, live) = runtime.versions(name);
            if versions.is_empty() {
                return Err(DeployError::NoPlugin(name.to_string()).into());
            }
            json_response(StatusCode::OK, json!({ "plugin": name, "live": live, "versions": versions }))
        }
        (&Method::DELETE, [name, "versions", v]) => {
            let v: u64 = v.parse().map_err(|_| ApiError::bad_request(format!("version {v:?} is not a number")))?;
            runtime.delete_version(name, v).await?;
            json_response(StatusCode::OK, json!({ "plugin": name, "version": v, "state": "deleted" }))
        }
        (&Method::POST, [name, "rollback"]) => {
            let body = read_limited(req.into_body(), 4096, Duration::from_millis(state.server.body_timeout_ms)).await?;
            let to = if body.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
                match &v["version"] {
                    serde_json::Value::Null => None,
                    n => Some(
                        n.as_u64().ok_or_else(|| ApiError::bad_request("\"version\" must be a positive integer"))?,
                    ),
                }
            };
            let deployed = runtime.rollback(name, to).await?;
            json_response(StatusCode::OK, json!(deployed))
        }
        _ => return Ok(None),
    };
    Ok(Some(resp))
}

/// What a deploy puts live: `multipart/form-data` with a `component` part (the `.wasm`),
/// an optional `manifest` part (TOML) and an optional `deployed_by` part; or JSON naming
/// an OCI reference to pull (`{"oci": "registry/repo@sha256:…", "manifest"?, "deployed_by"?}`).
struct Upload {
    component: Vec<u8>,
    manifest: Option<String>,
    deployed_by: String,
    /// `api`, or the pinned OCI reference it was pulled from.
    source: String,
}

fn checked_deployer(deployed_by: Option<String>) -> Result<String, ApiError> {
    let deployed_by =
        deployed_by.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).unwrap_or_else(|| "admin".into());
    if deployed_by.len() > 128 {
        return Err(ApiError::bad_request("deployed_by is longer than 128 characters"));
    }
    Ok(deployed_by)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OciDeploy {
    oci: String,
    #[serde(default)]
    manifest: Option<String>,
    #[serde(default)]
    deployed_by: Option<String>,
}

impl From<crate::oci::OciError> for ApiError {
    fn from(e: crate::oci::OciError) -> Self {
        match e {
            crate::oci::OciError::Invalid(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", m)
            }
            // The registry is upstream of us: its failure (unreachable, refused, bytes that
            // do not match their digest) is a bad gateway, and nothing was deployed.
            e @ crate::oci::OciError::Registry(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "server_error", e.to_string())
            }
        }
    }
}

async fn pull_upload(state: &AppState, req: Request<Incoming>) -> Result<Upload, ApiError> {
    let body = read_limited(req.into_body(), 64 * 1024, Duration::from_millis(state.server.body_timeout_ms)).await?;
    let ask: OciDeploy = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("expected {{\"oci\": \"<registry>/<repo>:<tag>|@<digest>\"}}: {e}"))
    })?;
    let deployed_by = checked_deployer(ask.deployed_by)?;
    let pulled = state.registries.pull(&ask.oci, state.max_upload_bytes).await?;
    tracing::info!(reference = %ask.oci, pinned = %pulled.pinned, bytes = pulled.component.len(), "pulled plugin");
    Ok(Upload {
        component: pulled.component,
        manifest: ask.manifest.or(pulled.manifest),
        deployed_by,
        source: format!("{}{}", crate::oci::SCHEME, pulled.pinned),
    })
}

async fn read_upload(state: &AppState, req: Request<Incoming>) -> Result<Upload, ApiError> {
    let content_type = req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("application/json") {
        return pull_upload(state, req).await;
    }
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "send the plugin as multipart/form-data with a \"component\" part (and optionally \"manifest\"), or JSON {\"oci\": \"<reference>\"}",
        )
    })?;
    let limit = state.max_upload_bytes;
    let body =
        read_limited(req.into_body(), limit, Duration::from_millis(state.server.body_timeout_ms.max(60_000))).await?;
    let stream = http_body_util::BodyDataStream::new(http_body_util::Full::new(body));
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut component, mut manifest, mut deployed_by) = (None, None, None);
    let bad = |e: multer::Error| ApiError::bad_request(format!("malformed multipart body: {e}"));
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_string();
        let bytes = field.bytes().await.map_err(bad)?;
        let text = |what: &str| {
            String::from_utf8(bytes.to_vec())
                .map_err(|_| ApiError::bad_request(format!("the {what} part is not UTF-8")))
        };
        match name.as_str() {
            "component" => component = Some(bytes.to_vec()),
            "manifest" => manifest = Some(text("manifest")?),
            "deployed_by" => deployed_by = Some(text("deployed_by")?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown part {other:?}: expected component, manifest, deployed_by"
                )))
            }
        }
    }
    let component = component.ok_or_else(|| ApiError::bad_request("the upload has no \"component\" part"))?;
    let deployed_by = checked_deployer(deployed_by)?;
    Ok(Upload { component, manifest, deployed_by, source: "api".into() })
}
