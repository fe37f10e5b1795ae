//! The HTTP server: plugins at `/fn/<name>/…` and at the routes their manifests declare,
//! health, readiness, metrics and the admin API. HTTP/1.1 and HTTP/2 cleartext.

mod admin;
mod auth;
pub mod body;
mod conn;
mod errors;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::config::{AuthConfig, ServerConfig};
use crate::metrics::Metrics;
use crate::plugins::{PluginRuntime, RequestAccount};
use crate::tenants::{AuthError, Tenants};
use body::{full, read_limited, too_large, Ending, ResponseBody, ServerBody};
pub use conn::{serve, ConnLimits};
pub use errors::ApiError;

pub const REQUEST_ID: &str = "x-request-id";
/// The version of the plugin that served a response (see `GET /admin/plugins/<name>/versions`).
pub const PLUGIN_VERSION: &str = "x-flywheel-plugin-version";

/// Everything a request handler needs.
pub struct AppState {
    pub runtime: Arc<PluginRuntime>,
    pub metrics: Arc<Metrics>,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    /// The largest deploy upload (component and manifest together).
    pub max_upload_bytes: usize,
    /// Where deploys by OCI reference pull from.
    pub registries: crate::oci::Registries,
    /// API keys, their quotas and what they used.
    pub tenants: Arc<Tenants>,
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    next_id: AtomicU64,
    draining: AtomicBool,
}

impl AppState {
    pub fn new(
        runtime: Arc<PluginRuntime>,
        metrics: Arc<Metrics>,
        server: ServerConfig,
        auth: AuthConfig,
        max_upload_bytes: usize,
        registries: crate::oci::Registries,
        tenants: Arc<Tenants>,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_upload_bytes,
            registries,
            tenants,
            slots: Arc::new(Semaphore::new(server.max_in_flight)),
            runtime,
            metrics,
            server,
            auth,
            queued: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            draining: AtomicBool::new(false),
        })
    }

    /// Whether the server is shutting down (readiness fails, so balancers stop sending).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

fn request_id(state: &AppState, req: &Request<Incoming>) -> String {
    let given = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok());
    match given {
        Some(id) if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) => id.to_string(),
        // Unique per process; the pid in the high bits tells replicas apart in shared logs.
        _ => format!("{:08x}{:08x}", std::process::id(), state.next_id.fetch_add(1, Ordering::Relaxed)),
    }
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<ServerBody> {
    let id = request_id(&state, &req);
    // `key` is the API key's name (never the key), filled in once it is known.
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        key = tracing::field::Empty
    );
    let started = Instant::now();
    let mut resp = async {
        let (resp, plugin) = route(&state, req, started).await;
        let status = resp.status().as_u16();
        tracing::info!(
            status,
            plugin = plugin.as_deref().unwrap_or("-"),
            ms = started.elapsed().as_millis() as u64,
            "response"
        );
        resp
    }
    .instrument(span)
    .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

pub(crate) fn json_response(status: StatusCode, value: serde_json::Value) -> Response<ServerBody> {
    let mut resp = Response::new(full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Dispatch; returns the response and the plugin that served it, if any.
async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    started: Instant,
) -> (Response<ServerBody>, Option<String>) {
    let path = req.uri().path().to_string();
    let result = match path.as_str() {
        "/healthz" if state.runtime.engine().is_alive() => Ok(json_response(StatusCode::OK, json!({ "status": "ok" }))),
        "/healthz" => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the decode thread has stopped"))
        }
        "/readyz" => Ok(readiness(state)),
        "/metrics" => {
            let mut resp = Response::new(full(state.metrics.encode()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            Ok(resp)
        }
        p if p == "/admin" || p.starts_with("/admin/") => match &state.auth.admin_key {
            None => Err(ApiError::not_found("the admin API is off: set auth.admin_key")),
            Some(key) => match auth::check_admin(req.headers(), key) {
                Ok(()) => admin::handle(state, req).await,
                Err(e) => Err(e),
            },
        },
        _ => return serve_plugin(state, req, started).await,
    };
    (result.unwrap_or_else(ApiError::into_response), None)
}

fn readiness(state: &AppState) -> Response<ServerBody> {
    let models: Vec<String> = state.runtime.engine().models().map(|m| m.name().to_string()).collect();
    let set = state.runtime.plugins();
    let plugins: Vec<&String> = set.plugins.keys().collect();
    let alive = state.runtime.engine().is_alive();
    let ready = alive && !state.draining() && !models.is_empty() && !plugins.is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let reason = if state.draining() {
        Some("shutting down")
    } else if !alive {
        Some("the decode thread has stopped")
    } else if models.is_empty() {
        Some("no model loaded")
    } else if plugins.is_empty() {
        Some("no plugin loaded")
    } else {
        None
    };
    json_response(
        status,
        json!({
            "status": if ready { "ready" } else { "not ready" },
            "reason": reason,
            "models": models,
            "plugins": plugins,
            "failed_plugins": set.failures.iter().map(|f| &f.name).collect::<Vec<_>>(),
        }),
    )
}

/// Counts a request in `flywheel_in_flight_requests` from the moment it holds a slot until
/// its response body is done.
struct InFlight(Arc<Metrics>);

impl InFlight {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.in_flight_requests.inc();
        Self(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight_requests.dec();
    }
}

struct Dequeue<'a>(&'a AppState);

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.queued_requests.dec();
    }
}

/// A slot among `max_in_flight`, or a bounded wait for one.
async fn acquire_slot(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    if let Ok(p) = state.slots.clone().try_acquire_owned() {
        return Ok(p);
    }
    let busy = |msg: &str| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", msg).retry_after(Duration::from_secs(1))
    };
    if state.queued.fetch_add(1, Ordering::Relaxed) >= state.server.max_queue {
        state.queued.fetch_sub(1, Ordering::Relaxed);
        return Err(busy("the server is at capacity and its queue is full; retry later"));
    }
    state.metrics.queued_requests.inc();
    // Leaves the queue however the wait ends, the client going away included.
    let _queued = Dequeue(state);
    let wait = Duration::from_millis(state.server.queue_timeout_ms);
    let permit = tokio::time::timeout(wait, state.slots.clone().acquire_owned()).await;
    match permit {
        Ok(Ok(p)) => Ok(p),
        _ => Err(busy("the server is at capacity; no slot became free in time")),
    }
}

async fn serve_plugin(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    started: Instant,
) -> (Response<ServerBody>, Option<String>) {
    let path = req.uri().path().to_string();
    let Some(plugin) = state.runtime.plugins().route(&path).cloned() else {
        let e = if let Some(name) = path.strip_prefix("/fn/").map(|r| r.split('/').next().unwrap_or("")) {
            ApiError::not_found(format!("no plugin named {name:?}"))
        } else {
            ApiError::not_found(format!("nothing is served at {path}"))
        };
        return (e.into_response(), None);
    };
    let name = plugin.name.clone();
    let result = async {
        let tenant = match state.tenants.authenticate(req.headers(), &plugin.name, &plugin.manifest.api_keys) {
            Ok(tenant) => tenant,
            Err(_) if plugin.manifest.public => state.tenants.anonymous(),
            Err(e @ (AuthError::Missing | AuthError::Invalid)) => return Err(ApiError::unauthorized(e.to_string())),
        };
        tracing::Span::current().record("key", tracing::field::display(tenant.name()));
        let limit = state.server.max_body_bytes;
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large(limit));
        }
        let (mut parts, incoming) = req.into_parts();
        let bytes = read_limited(incoming, limit, Duration::from_millis(state.server.body_timeout_ms)).await?;
        if parts.uri.authority().is_none() && !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, HeaderValue::from_static("localhost"));
        }
        let admission = state.tenants.admit(&tenant, &name).map_err(|refused| {
            tracing::info!(key = %tenant.name(), quota = refused.quota, "request refused by a quota");
            ApiError::quota(tenant.name(), &refused)
        })?;
        let account: Arc<dyn RequestAccount> = admission.account.clone();
        let slot = (acquire_slot(state).await?, InFlight::new(&state.metrics), admission);
        let guest_req = Request::from_parts(parts, Full::new(bytes));
        let resp = state.runtime.invoke(&plugin, guest_req, Some(account)).await?;
        Ok((resp, slot))
    }
    .await;
    match result {
        Ok((resp, slot)) => {
            let status = resp.status().as_u16();
            let metrics = state.metrics.clone();
            let plugin_name = name.clone();
            let (mut parts, b) = resp.into_parts();
            if let Some(v) = plugin.version.as_ref().and_then(|v| HeaderValue::from_str(&v.version.to_string()).ok()) {
                parts.headers.insert(PLUGIN_VERSION, v);
            }
            let inner = b.map_err(|e| Box::new(e) as body::BoxError).boxed_unsync();
            // Recorded when the body is done (or the client left): streaming included.
            let tracked = ResponseBody::new(inner, &parts.headers, slot, move |ending, _slot| {
                metrics.record_request(&plugin_name, status, started.elapsed());
                match ending {
                    Ending::Complete => {}
                    Ending::Cut(reason) => metrics.record_cut(&plugin_name, reason),
                    Ending::ClientGone => metrics.record_cut(&plugin_name, "client_gone"),
                }
            });
            (Response::from_parts(parts, tracked.boxed_unsync()), Some(name))
        }
        Err(e) => {
            state.metrics.record_request(&name, e.status.as_u16(), started.elapsed());
            (e.into_response(), Some(name))
        }
    }
}

pub use body::BoxError;
