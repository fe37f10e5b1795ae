//! Running one request in a fresh, limited instance of a plugin.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::AbortHandle;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use super::registry::Plugin;
use super::store::{sandboxed_wasi, MemoryLimit, OutgoingPolicy, PluginState};
use super::PluginRuntime;
use crate::engine::TokenAccount;
use crate::nn::NnCtx;

/// Who a request runs for, as the HTTP layer decided: charged by the engine for the tokens
/// its guest computes, and told the CPU time its guest used.
pub trait RequestAccount: TokenAccount {
    fn guest_cpu(&self, spent: Duration);
}

/// Why a guest stopped before finishing its request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrapKind {
    /// The request deadline passed.
    Deadline,
    /// The guest tried to grow memory past its limit.
    MemoryLimit,
    /// The guest panicked or reached `unreachable`.
    Panic,
    StackOverflow,
    /// Any other trap or host-side failure, with its message.
    Other(String),
}

impl TrapKind {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TrapKind::Deadline => "deadline",
            TrapKind::MemoryLimit => "memory_limit",
            TrapKind::Panic => "panic",
            TrapKind::StackOverflow => "stack_overflow",
            TrapKind::Other(_) => "other",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("plugin {plugin} is at its concurrency limit of {limit}")]
    Busy { plugin: String, limit: usize },
    #[error("plugin {plugin} did not finish within its deadline of {deadline:?}")]
    Deadline { plugin: String, deadline: Duration },
    #[error("plugin {plugin} failed: {kind:?}")]
    Trap { plugin: String, kind: TrapKind },
    #[error("plugin {plugin} returned without sending a response")]
    NoResponse { plugin: String },
    #[error("plugin {plugin} answered with an error: {code}")]
    GuestError { plugin: String, code: String },
    #[error("no instance of plugin {plugin} could be created: {message}")]
    Instantiate { plugin: String, message: String },
    #[error("plugin {plugin} could not get an instance slot within its deadline of {deadline:?}: the host is at plugins.max_instances")]
    PoolFull { plugin: String, deadline: Duration },
    #[error("bad request: {0}")]
    BadRequest(String),
}

/// The response body a plugin streams. Dropping it (the client went away, or the body is
/// done) stops the guest at once, which frees its sequences and KV cells.
///
/// The body only ends cleanly once the guest has returned successfully: a guest that traps,
/// panics or runs out of time while streaming ends the body with an error, never with a
/// clean end of stream, so the client can tell the answer was cut.
pub struct PluginBody {
    inner: HyperOutgoingBody,
    /// The guest's run; awaited when its body stream ends.
    guest: Option<tokio::task::JoinHandle<RunResult>>,
    inner_done: bool,
    plugin: String,
    _abort: AbortOnDrop,
}

/// Why a plugin's response body ended before it was complete.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The guest stopped (trap, panic, deadline, memory limit) before finishing its body.
    #[error("{0}")]
    Guest(InvokeError),
    /// The guest abandoned its body without finishing it, or wrote a body that breaks its
    /// own content-length.
    #[error("plugin {plugin} ended its response body without finishing it: {message}")]
    Unfinished { plugin: String, message: String },
}

/// Stops a guest run when dropped. The abandonment flag stops its inference calls at once;
/// the abort itself only takes effect when the executor next polls the run.
struct AbortOnDrop {
    run: AbortHandle,
    abandoned: Arc<AtomicBool>,
}
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::Relaxed);
        self.run.abort();
    }
}

impl Body for PluginBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if !this.inner_done {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => return Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(e))) => {
                    this.inner_done = true;
                    this.guest = None;
                    let err = BodyError::Unfinished { plugin: this.plugin.clone(), message: e.to_string() };
                    tracing::warn!(error = %err, "response cut");
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(None) => this.inner_done = true,
            }
        }
        // The stream ended: it is complete only if the guest returned without failing.
        let Some(guest) = this.guest.as_mut() else { return Poll::Ready(None) };
        let outcome = match Pin::new(guest).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(outcome) => outcome,
        };
        this.guest = None;
        let failure = match outcome {
            Ok(Ok(())) => return Poll::Ready(None),
            Ok(Err(e)) => e,
            Err(join) => InvokeError::Trap { plugin: this.plugin.clone(), kind: TrapKind::Other(join.to_string()) },
        };
        tracing::warn!(error = %failure, "plugin failed after sending its response headers; response cut");
        Poll::Ready(Some(Err(BodyError::Guest(failure))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner_done && self.guest.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a finished guest run amounted to.
type RunResult = Result<(), InvokeError>;

/// Host resources one instance may hold at once (live handles in its resource table).
const MAX_HOST_RESOURCES: usize = 10_000;

impl PluginRuntime {
    /// Serve one request with a fresh instance of `plugin`.
    pub async fn invoke<B>(
        &self,
        plugin: &Arc<Plugin>,
        req: hyper::Request<B>,
        account: Option<Arc<dyn RequestAccount>>,
    ) -> Result<hyper::Response<PluginBody>, InvokeError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let name = plugin.name.clone();
        let permit = plugin
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| InvokeError::Busy { plugin: name.clone(), limit: plugin.manifest.max_concurrency })?;
        let deadline_after = Duration::from_millis(plugin.manifest.deadline_ms);
        let deadline = Instant::now() + deadline_after;
        // Wait in line for the pool slots this component takes (the pool is shared by all plugins).
        let waiting = Instant::now();
        let slots = tokio::time::timeout_at(deadline.into(), self.slots.acquire(plugin.needs))
            .await
            .map_err(|_| InvokeError::PoolFull { plugin: name.clone(), deadline: deadline_after })?;
        self.observer.slots_acquired(&name, waiting.elapsed());
        let m = &plugin.manifest;
        let memory_bytes = usize::try_from(m.memory_limit_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        // Every handle a guest holds (errors, graphs, tensors, streams) is host memory: bound
        // their number so a guest that never drops them traps instead of growing the host.
        let mut table = wasmtime::component::ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        let state = PluginState {
            table,
            wasi: sandboxed_wasi(&m.config),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            outgoing: OutgoingPolicy { allowed_hosts: plugin.allowed_hosts.clone() },
            limits: MemoryLimit { max_bytes: memory_bytes, max_table_elements: 100_000, hit: false },
            nn: NnCtx::new(
                self.engine.clone(),
                name.as_str().into(),
                plugin.allowed_models.clone(),
                m.max_contexts,
                memory_bytes,
                self.nn_observer.clone(),
                account.clone().map(|a| a as Arc<dyn TokenAccount>),
            ),
        };
        let abandoned = state.nn.abandonment();
        let mut store = Store::new(&self.wasm, state);
        store.limiter(|s| &mut s.limits);
        // Every epoch tick, a running guest yields to the executor; past the deadline it traps.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });
        if self.config().probe_first_host_call {
            let (observer, plugin_name, created) = (self.observer.clone(), name.clone(), Instant::now());
            let mut seen = false;
            store.call_hook(move |_, hook| {
                if !seen && matches!(hook, wasmtime::CallHook::CallingHost) {
                    seen = true;
                    observer.first_host_call(&plugin_name, created.elapsed());
                }
                Ok(())
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)
            .map_err(|e| InvokeError::BadRequest(format!("{e:#}")))?;
        let out = store
            .data_mut()
            .http()
            .new_response_outparam(tx)
            .map_err(|e| InvokeError::Instantiate { plugin: name.clone(), message: format!("{e:#}") })?;

        let pre = plugin.pre.clone();
        let observer = self.observer.clone();
        let task_name = name.clone();
        let task = tokio::spawn(async move {
            let mut store = store;
            let run = async {
                let started = Instant::now();
                let proxy = pre.instantiate_async(&mut store).await.map_err(|e| (true, e))?;
                observer.instantiated(&task_name, started.elapsed());
                proxy.wasi_http_incoming_handler().call_handle(&mut store, req, out).await.map_err(|e| (false, e))
            };
            let (outcome, cpu) = {
                let mut timed = CpuTimed { run: std::pin::pin!(run), spent: Duration::ZERO };
                let outcome = tokio::time::timeout_at(deadline.into(), &mut timed).await;
                (outcome, timed.spent)
            };
            observer.guest_cpu(&task_name, cpu);
            if let Some(account) = &account {
                account.guest_cpu(cpu);
            }
            let result = classify(&task_name, outcome, &store, deadline_after);
            if let Err(InvokeError::Trap { kind, .. }) = &result {
                observer.trapped(&task_name, kind);
            } else if let Err(InvokeError::Deadline { .. }) = &result {
                observer.trapped(&task_name, &TrapKind::Deadline);
            }
            // Open sequences close and their KV cells are freed with the store; its pool
            // slots are free only after it is gone, so give back the permits after it.
            drop(store);
            drop(slots);
            drop(permit);
            result
        });
        // Until the response is handed over, dropping this future (the client went away)
        // stops the guest too; afterwards the response body carries the guard.
        let guard = AbortOnDrop { run: task.abort_handle(), abandoned };
        match rx.await {
            Ok(Ok(response)) => Ok(response.map(|inner| PluginBody {
                inner,
                guest: Some(task),
                inner_done: false,
                plugin: name,
                _abort: guard,
            })),
            Ok(Err(code)) => {
                // The answer is decided; whatever the guest does next does not matter.
                drop(guard);
                Err(InvokeError::GuestError { plugin: name, code: error_code_text(&code) })
            }
            Err(_) => match task.await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(InvokeError::NoResponse { plugin: name }),
                Err(join) => Err(InvokeError::Trap { plugin: name, kind: TrapKind::Other(join.to_string()) }),
            },
        }
    }
}

/// A guest's run, adding up the CPU time of the threads that poll it: what the guest
/// computed, not the time it spent waiting on the engine or the client.
struct CpuTimed<F> {
    run: F,
    spent: Duration,
}

impl<F: Future + Unpin> Future for CpuTimed<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let started = crate::sys::thread_cpu_time();
        let poll = Pin::new(&mut self.run).poll(cx);
        self.spent += crate::sys::thread_cpu_time().saturating_sub(started);
        poll
    }
}

fn error_code_text(code: &ErrorCode) -> String {
    format!("{code:?}")
}

/// Sort a finished run into success or a failure kind.
fn classify(
    plugin: &str,
    outcome: Result<Result<(), (bool, wasmtime::Error)>, tokio::time::error::Elapsed>,
    store: &Store<PluginState>,
    deadline: Duration,
) -> RunResult {
    let plugin = plugin.to_string();
    let (instantiating, err) = match outcome {
        Err(_) => return Err(InvokeError::Deadline { plugin, deadline }),
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e,
    };
    if store.data().limits.hit || store.data().nn.memory_limit_hit() {
        return Err(InvokeError::Trap { plugin, kind: TrapKind::MemoryLimit });
    }
    let kind = match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return Err(InvokeError::Deadline { plugin, deadline }),
        Some(Trap::UnreachableCodeReached) => TrapKind::Panic,
        Some(Trap::StackOverflow) => TrapKind::StackOverflow,
        Some(other) => TrapKind::Other(other.to_string()),
        None if instantiating => {
            return Err(InvokeError::Instantiate { plugin, message: format!("{err:#}") });
        }
        None => TrapKind::Other(format!("{err:#}")),
    };
    tracing::warn!(plugin = %plugin, kind = kind.label(), error = %format!("{err:#}"), "guest trapped");
    Err(InvokeError::Trap { plugin, kind })
}
