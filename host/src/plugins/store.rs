//! Per-request store data: WASI with no capabilities, wasi-http with an outgoing-host
//! allowlist, inference imports, and memory limits that record why they refused.

use std::future::Future;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::nn::{NnCtx, NnView};

pub struct PluginState {
    pub(crate) table: ResourceTable,
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) outgoing: OutgoingPolicy,
    pub(crate) limits: MemoryLimit,
    pub(crate) nn: NnCtx,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for PluginState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outgoing }
    }
}

impl PluginState {
    pub(crate) fn nn_view(&mut self) -> NnView<'_> {
        NnView { table: &mut self.table, ctx: &mut self.nn }
    }
}

/// Linear-memory and table limits of one instance.
pub struct MemoryLimit {
    pub(crate) max_bytes: usize,
    pub(crate) max_table_elements: usize,
    pub(crate) hit: bool,
}

/// Growth past the limit fails the grow (`memory.grow` returns -1), as the WebAssembly
/// spec allows, rather than trapping: a guest that handles allocation failure can still
/// answer. `hit` remembers it, so a guest that traps afterwards is reported as out of memory.
impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            tracing::debug!(desired, limit = self.max_bytes, "guest memory growth refused at its limit");
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_table_elements {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }
}

/// Outgoing HTTP: denied unless the request's authority is on the plugin's allowlist.
pub struct OutgoingPolicy {
    pub(crate) allowed_hosts: Arc<[String]>,
}

impl OutgoingPolicy {
    fn allows(&self, uri: &http::Uri) -> bool {
        let Some(authority) = uri.authority() else { return false };
        let host = authority.host();
        self.allowed_hosts.iter().any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(authority.as_str()))
    }
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<wasmtime_wasi_http::WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for OutgoingPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        if !self.allows(request.uri()) {
            tracing::warn!(uri = %request.uri(), "outgoing request denied: host not in the plugin's allowed_hosts");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((res.map(BodyExt::boxed_unsync), Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// A WASI context with nothing: no files, no sockets, no inherited environment; only the
/// plugin's configured values as environment variables.
pub(crate) fn sandboxed_wasi(config: &std::collections::BTreeMap<String, String>) -> WasiCtx {
    let mut b = WasiCtx::builder();
    b.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
    for (k, v) in config {
        b.env(k, v);
    }
    b.build()
}
