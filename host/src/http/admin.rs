//! The admin API, behind the admin key: plugins and models with their state, and reload.

use std::sync::atomic::Ordering;

use http::{Method, Response, StatusCode};
use serde_json::json;

use super::body::ServerBody;
use super::errors::ApiError;
use super::{json_response, AppState};

pub async fn handle(state: &AppState, method: &Method, path: &str) -> Result<Response<ServerBody>, ApiError> {
    let rest = path.strip_prefix("/admin").unwrap_or(path).trim_end_matches('/');
    match (method, rest) {
        (&Method::GET, "/plugins") => Ok(json_response(StatusCode::OK, plugins(state))),
        (&Method::GET, "/models") => Ok(json_response(StatusCode::OK, models(state))),
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

fn models(state: &AppState) -> serde_json::Value {
    let models: Vec<_> = state
        .runtime
        .engine()
        .models()
        .map(|m| {
            let (i, s) = (m.info(), m.stats());
            json!({
                "name": i.name,
                "state": "loaded",
                "description": i.description,
                "vocab_size": i.vocab_size,
                "context_length": i.context_length,
                "max_sequences": i.max_sequences,
                "active_sequences": s.active_sequences.load(Ordering::Relaxed),
                "waiting_opens": s.waiting_opens.load(Ordering::Relaxed),
                "kv_tokens": s.kv_tokens.load(Ordering::Relaxed),
                "prefix_cache_entries": s.cached_prefixes.load(Ordering::Relaxed),
                "generated_tokens": s.decode_tokens.load(Ordering::Relaxed),
                "prefill_tokens": s.prefill_tokens.load(Ordering::Relaxed),
                "reused_prefix_tokens": s.reused_tokens.load(Ordering::Relaxed),
                "embedding_tokens": s.embedded_tokens.load(Ordering::Relaxed),
            })
        })
        .collect();
    json!({ "models": models })
}
