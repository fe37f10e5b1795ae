//! The `wasi:nn` and `flywheel:llm` host implementation.
//!
//! Translates guest calls into engine calls: a graph is a model (`load-by-name`), an
//! execution context is one engine sequence with its own KV cells, and `compute` appends
//! tokens and returns logits (or the host-computed top-k) for the last position. Every
//! misuse becomes a wasi-nn `error` with a code and a message; nothing a guest sends can
//! panic the host.

mod batch;
mod bindings;
mod llm;
mod quota;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::engine::{
    Engine, EngineError, ModelLease, Output, PendingFeed, QuotaExceeded, Sequence, TokenAccount, Want,
};
use bindings::wasi::nn::errors::ErrorCode;
use bindings::wasi::nn::graph::{ExecutionTarget, GraphBuilder, GraphEncoding};
use bindings::wasi::nn::inference::NamedTensor;
use bindings::wasi::nn::tensor::{TensorData, TensorDimensions, TensorType};
use bindings::wasi::nn::{errors, graph, inference, tensor};

/// Why the host refuses a guest call: the wasi-nn code, a message, and the quota when one
/// is why (guests read it through `flywheel:llm/quota`).
struct Refusal {
    code: ErrorCode,
    message: String,
    quota: Option<QuotaExceeded>,
}

impl From<(ErrorCode, String)> for Refusal {
    fn from((code, message): (ErrorCode, String)) -> Self {
        Self { code, message, quota: None }
    }
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Self {
        let code = engine_error(&e);
        let message = e.to_string();
        let quota = match e {
            EngineError::QuotaExceeded(q) => Some(q),
            _ => None,
        };
        Self { code, message, quota }
    }
}

/// Input tensor names `compute` understands.
pub const INPUT_IDS: &str = "input_ids";
pub const TOP_K: &str = "top_k";
pub const ALLOWED_IDS: &str = "allowed_ids";
pub const LOGPROBS: &str = "logprobs";

/// Longest model name a guest may pass (names are echoed in error messages).
const MAX_MODEL_NAME: usize = 256;

/// A graph: a model this plugin may use, loaded and kept loaded while the graph lives.
pub struct GraphHandle {
    model: ModelLease,
}

/// An execution context: one engine sequence. Dropping it frees the KV cells.
pub struct ExecutionContext {
    sequence: Sequence,
}

pub struct TensorHandle {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

pub struct NnError {
    code: ErrorCode,
    message: String,
    quota: Option<QuotaExceeded>,
}

/// Which models a plugin may use.
#[derive(Clone, Debug)]
pub enum AllowedModels {
    All,
    Only(Arc<[String]>),
}

impl AllowedModels {
    fn allows(&self, name: &str) -> bool {
        match self {
            AllowedModels::All => true,
            AllowedModels::Only(list) => list.iter().any(|m| m == name),
        }
    }
}

/// Observes guest inference calls (metrics, benchmarks).
pub trait NnObserver: Send + Sync {
    /// Time from the store's creation to the guest's first inference import call.
    fn first_call(&self, _plugin: &str, _since_start: Duration) {}
    /// Time from the store's creation to the first logits row the guest receives: its
    /// time to first token.
    fn first_output(&self, _plugin: &str, _since_start: Duration) {}
}

pub struct NoNnObserver;
impl NnObserver for NoNnObserver {}

/// Per-instance state of the inference imports.
pub struct NnCtx {
    engine: Arc<Engine>,
    plugin: Arc<str>,
    allowed: AllowedModels,
    max_contexts: usize,
    open_contexts: usize,
    created: Instant,
    first_call_seen: bool,
    first_output_seen: bool,
    observer: Arc<dyn NnObserver>,
    /// Bytes of tensors this instance holds in host memory, and the most it may hold.
    tensor_bytes: usize,
    max_tensor_bytes: usize,
    /// The guest trapped for holding more tensor bytes than `max_tensor_bytes`.
    tensor_limit_hit: bool,
    /// Set when nobody waits for this instance's answer any more (the client went away):
    /// no further tokens are decoded for it, even before the instance itself is stopped.
    abandoned: Arc<AtomicBool>,
    /// Who the request runs for: charged by the engine for every token computed.
    account: Option<Arc<dyn TokenAccount>>,
    /// Models this instance has used, each kept loaded until the instance ends.
    leases: HashMap<String, ModelLease>,
}

impl NnCtx {
    /// `max_tensor_bytes`: host memory the guest may fill with tensors (its memory limit).
    pub fn new(
        engine: Arc<Engine>,
        plugin: Arc<str>,
        allowed: AllowedModels,
        max_contexts: usize,
        max_tensor_bytes: usize,
        observer: Arc<dyn NnObserver>,
        account: Option<Arc<dyn TokenAccount>>,
    ) -> Self {
        Self {
            engine,
            plugin,
            allowed,
            max_contexts,
            open_contexts: 0,
            created: Instant::now(),
            first_call_seen: false,
            first_output_seen: false,
            observer,
            tensor_bytes: 0,
            max_tensor_bytes,
            tensor_limit_hit: false,
            abandoned: Arc::new(AtomicBool::new(false)),
            account,
            leases: HashMap::new(),
        }
    }

    /// A flag that, once set, makes every further inference call of this instance fail.
    pub fn abandonment(&self) -> Arc<AtomicBool> {
        self.abandoned.clone()
    }

    fn note_call(&mut self) {
        if !self.first_call_seen {
            self.first_call_seen = true;
            self.observer.first_call(&self.plugin, self.created.elapsed());
        }
    }

    /// Whether the guest was stopped for exceeding its memory limit with tensors.
    pub fn memory_limit_hit(&self) -> bool {
        self.tensor_limit_hit
    }

    /// The model named `name`, if this plugin may use it: loaded first if it is not (the
    /// guest waits), and kept loaded until this instance ends.
    async fn model(&mut self, name: &str) -> Result<ModelLease, Refusal> {
        if name.len() > MAX_MODEL_NAME {
            let msg = format!("model names are at most {MAX_MODEL_NAME} bytes");
            return Err((ErrorCode::InvalidArgument, msg).into());
        }
        self.engine.model(name).map_err(|e| (ErrorCode::NotFound, e.to_string()))?;
        if !self.allowed.allows(name) {
            return Err((ErrorCode::Security, format!("plugin {} may not use model {name:?}", self.plugin)).into());
        }
        if let Some(lease) = self.leases.get(name) {
            return Ok(lease.clone());
        }
        if self.abandoned.load(Ordering::Relaxed) {
            return Err((ErrorCode::RuntimeError, "the client went away; this request is abandoned".into()).into());
        }
        let lease = self.engine.acquire(name).await?;
        self.leases.insert(name.to_string(), lease.clone());
        Ok(lease)
    }

    fn allowed_model_names(&self) -> Vec<String> {
        self.engine.models().map(|m| m.name().to_string()).filter(|n| self.allowed.allows(n)).collect()
    }
}

/// What the generated host traits are implemented on.
pub struct NnView<'a> {
    pub table: &'a mut ResourceTable,
    pub ctx: &'a mut NnCtx,
}

struct HasNn;
impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Add `wasi:nn` and `flywheel:llm` to a linker whose store data yields an [`NnView`].
pub fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> NnView<'_>) -> wasmtime::Result<()> {
    bindings::Imports::add_to_linker::<T, HasNn>(linker, get)
}

/// Maps engine failures to wasi-nn codes.
fn engine_error(e: &EngineError) -> ErrorCode {
    match e {
        EngineError::UnknownModel(_) => ErrorCode::NotFound,
        EngineError::ContextFull { .. } | EngineError::EmbeddingInputTooLong { .. } => ErrorCode::TooLarge,
        EngineError::InvalidToken { .. } | EngineError::InvalidArgument(_) | EngineError::SequenceBroken => {
            ErrorCode::InvalidArgument
        }
        // Busy, not the caller's fault: retrying later can succeed.
        EngineError::AdmissionTimeout { .. }
        | EngineError::QueueFull { .. }
        | EngineError::NoFreeSequence { .. }
        | EngineError::KvCacheFull { .. }
        | EngineError::NoRoomToLoad { .. }
        | EngineError::ModelLoadWait { .. }
        | EngineError::ModelUnloaded(_)
        | EngineError::SchedulerStopped(_) => ErrorCode::Timeout,
        // A quota that a later retry can meet is "busy"; one the request can never fit is
        // "too large".
        EngineError::QuotaExceeded(q) if q.retry_after.is_some() => ErrorCode::Timeout,
        EngineError::QuotaExceeded(_) => ErrorCode::TooLarge,
        _ => ErrorCode::RuntimeError,
    }
}

impl NnView<'_> {
    /// Count tensor data against the instance's limit: host memory a guest fills through
    /// tensors is still its memory. Past the limit the guest traps, as it would in wasm.
    fn hold_tensor_bytes(&mut self, bytes: usize) -> wasmtime::Result<()> {
        let total = self.ctx.tensor_bytes.saturating_add(bytes);
        if total > self.ctx.max_tensor_bytes {
            self.ctx.tensor_limit_hit = true;
            wasmtime::bail!(
                "memory limit: plugin {} holds {total} bytes of tensors, its limit is {}",
                self.ctx.plugin,
                self.ctx.max_tensor_bytes
            );
        }
        self.ctx.tensor_bytes = total;
        Ok(())
    }

    fn error(&mut self, code: ErrorCode, message: impl Into<String>) -> wasmtime::Result<Resource<NnError>> {
        self.refuse(Refusal { code, message: message.into(), quota: None })
    }

    fn refuse(&mut self, r: impl Into<Refusal>) -> wasmtime::Result<Resource<NnError>> {
        let Refusal { code, message, quota } = r.into();
        Ok(self.table.push(NnError { code, message, quota })?)
    }

    /// Parse `compute`'s inputs into tokens and what to return.
    fn parse_inputs(
        &mut self,
        inputs: Vec<NamedTensor>,
        vocab: usize,
    ) -> wasmtime::Result<Result<(Vec<i32>, Want), Refusal>> {
        let mut ids = None;
        let mut top_k = None;
        let mut allowed = None;
        let mut logprobs = false;
        let mut problem = None;
        for (name, handle) in inputs {
            // Inputs are owned by the host now: take them out of the table either way.
            let t = self.table.delete(handle)?;
            self.ctx.tensor_bytes = self.ctx.tensor_bytes.saturating_sub(t.data.len());
            if problem.is_some() {
                continue;
            }
            let parsed = match name.as_str() {
                INPUT_IDS => i32_vector(&name, &t).map(|v| ids = Some(v)),
                TOP_K => i32_vector(&name, &t).and_then(|v| match v.as_slice() {
                    [k] if *k >= 1 => {
                        top_k = Some((*k as usize).min(vocab));
                        Ok(())
                    }
                    _ => Err(format!("{TOP_K} must hold one integer >= 1, got {v:?}")),
                }),
                ALLOWED_IDS => i32_vector(&name, &t).and_then(|v| {
                    // More ids than the vocabulary holds can only be repeats.
                    if v.len() > vocab {
                        return Err(format!("{ALLOWED_IDS} lists {} ids; the vocabulary has {vocab}", v.len()));
                    }
                    allowed = Some(v);
                    Ok(())
                }),
                LOGPROBS => i32_vector(&name, &t).and_then(|v| match v.as_slice() {
                    [0] => Ok(()),
                    [1] => {
                        logprobs = true;
                        Ok(())
                    }
                    _ => Err(format!("{LOGPROBS} must hold one integer, 0 or 1, got {v:?}")),
                }),
                other => Err(format!(
                    "unknown input tensor {other:?}; expected {INPUT_IDS:?}, optionally {TOP_K:?}, {ALLOWED_IDS:?} \
                     and {LOGPROBS:?}"
                )),
            };
            if let Err(msg) = parsed {
                problem = Some(msg);
            }
        }
        if let Some(msg) = problem {
            return Ok(Err((ErrorCode::InvalidArgument, msg).into()));
        }
        let Some(ids) = ids else {
            return Ok(Err((ErrorCode::InvalidArgument, format!("missing input tensor {INPUT_IDS:?}")).into()));
        };
        let want = match (top_k, allowed) {
            (Some(k), allowed) => Want::TopK { k, allowed, logprobs },
            (None, None) if !logprobs => Want::Logits,
            (None, _) => {
                let msg = format!("{ALLOWED_IDS:?} and {LOGPROBS:?} need {TOP_K:?}");
                return Ok(Err((ErrorCode::InvalidArgument, msg).into()));
            }
        };
        Ok(Ok((ids, want)))
    }
}

impl NnView<'_> {
    /// Parse a compute's inputs and queue them on the context's sequence, without waiting.
    fn submit(
        &mut self,
        ctx: &Resource<ExecutionContext>,
        inputs: Vec<NamedTensor>,
    ) -> wasmtime::Result<Result<PendingFeed, Refusal>> {
        let vocab = self.table.get(ctx)?.sequence.model().info().vocab_size;
        let (ids, want) = match self.parse_inputs(inputs, vocab)? {
            Ok(parsed) => parsed,
            Err(refusal) => return Ok(Err(refusal)),
        };
        if self.ctx.abandoned.load(Ordering::Relaxed) {
            return Ok(Err((ErrorCode::RuntimeError, "the client went away; this request is abandoned".into()).into()));
        }
        let submitted = self.table.get_mut(ctx)?.sequence.submit(&ids, want);
        Ok(submitted.map_err(Refusal::from))
    }

    /// Wait for a submitted compute and hand its outputs to the guest as tensors.
    async fn complete(
        &mut self,
        ctx: &Resource<ExecutionContext>,
        pending: PendingFeed,
    ) -> wasmtime::Result<Result<Vec<NamedTensor>, Resource<NnError>>> {
        let out = match self.table.get_mut(ctx)?.sequence.complete(pending).await {
            Ok(out) => out,
            Err(e) => return Ok(Err(self.refuse(e)?)),
        };
        if !self.ctx.first_output_seen {
            self.ctx.first_output_seen = true;
            self.ctx.observer.first_output(&self.ctx.plugin, self.ctx.created.elapsed());
        }
        let tensors = match out {
            Output::Logits(row) => {
                vec![("logits", vec![row.len() as u32], TensorType::Fp32, le_bytes(&row, f32::to_le_bytes))]
            }
            Output::TopK { ids, logits, logprobs } => {
                let mut t = vec![
                    ("top_k_ids", vec![ids.len() as u32], TensorType::I32, le_bytes(&ids, i32::to_le_bytes)),
                    ("top_k_logits", vec![logits.len() as u32], TensorType::Fp32, le_bytes(&logits, f32::to_le_bytes)),
                ];
                if let Some(lp) = logprobs {
                    t.push((
                        "top_k_logprobs",
                        vec![lp.len() as u32],
                        TensorType::Fp32,
                        le_bytes(&lp, f32::to_le_bytes),
                    ));
                }
                t
            }
        };
        let mut named = Vec::with_capacity(tensors.len());
        for (name, dims, ty, data) in tensors {
            self.hold_tensor_bytes(data.len())?;
            named.push((name.to_string(), self.table.push(TensorHandle { dims, ty, data })?));
        }
        Ok(Ok(named))
    }
}

/// A rank-1 (or [1, n]) I32 tensor as integers.
fn i32_vector(name: &str, t: &TensorHandle) -> Result<Vec<i32>, String> {
    if t.ty != TensorType::I32 {
        return Err(format!("{name} must be an I32 tensor, got {:?}", t.ty));
    }
    let n: u64 = t.dims.iter().map(|&d| u64::from(d)).product();
    let shape_ok = matches!(t.dims.as_slice(), [_] | [1, _]);
    if !shape_ok || n == 0 {
        return Err(format!("{name} must have shape [n] (or [1, n]) with n >= 1, got {:?}", t.dims));
    }
    if t.data.len() as u64 != n * 4 {
        return Err(format!("{name}: shape {:?} needs {} bytes of data, got {}", t.dims, n * 4, t.data.len()));
    }
    Ok(t.data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A tensor's little-endian bytes: `le_bytes(&row, f32::to_le_bytes)`.
fn le_bytes<T: Copy>(values: &[T], to_le: fn(T) -> [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for &v in values {
        out.extend_from_slice(&to_le(v));
    }
    out
}

impl graph::Host for NnView<'_> {
    fn load(
        &mut self,
        _builder: Vec<GraphBuilder>,
        _encoding: GraphEncoding,
        _target: ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<GraphHandle>, Resource<NnError>>> {
        self.ctx.note_call();
        Ok(Err(self.error(
            ErrorCode::UnsupportedOperation,
            "loading model bytes is not supported; use load-by-name with a model the host serves",
        )?))
    }

    async fn load_by_name(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<GraphHandle>, Resource<NnError>>> {
        self.ctx.note_call();
        match self.ctx.model(&name).await {
            Ok(model) => Ok(Ok(self.table.push(GraphHandle { model })?)),
            Err(refusal) => Ok(Err(self.refuse(refusal)?)),
        }
    }
}

impl graph::HostGraph for NnView<'_> {
    async fn init_execution_context(
        &mut self,
        graph: Resource<GraphHandle>,
    ) -> wasmtime::Result<Result<Resource<ExecutionContext>, Resource<NnError>>> {
        self.ctx.note_call();
        if self.ctx.open_contexts >= self.ctx.max_contexts {
            let msg = format!(
                "plugin {} may hold at most {} execution contexts at once; drop one first",
                self.ctx.plugin, self.ctx.max_contexts
            );
            return Ok(Err(self.error(ErrorCode::RuntimeError, msg)?));
        }
        let model = self.table.get(&graph)?.model.clone();
        // Only the first context waits for a free sequence: an instance waiting for a second
        // while holding one could deadlock with others doing the same.
        let account = self.ctx.account.clone();
        let opened = if self.ctx.open_contexts == 0 {
            model.open_charged(account).await
        } else {
            model.open_now_charged(account).await
        };
        match opened {
            Ok(sequence) => {
                self.ctx.open_contexts += 1;
                Ok(Ok(self.table.push(ExecutionContext { sequence })?))
            }
            Err(e) => Ok(Err(self.refuse(e)?)),
        }
    }

    fn drop(&mut self, graph: Resource<GraphHandle>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl inference::Host for NnView<'_> {}

impl inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        ctx: Resource<ExecutionContext>,
        inputs: Vec<NamedTensor>,
    ) -> wasmtime::Result<Result<Vec<NamedTensor>, Resource<NnError>>> {
        self.ctx.note_call();
        let pending = match self.submit(&ctx, inputs)? {
            Ok(p) => p,
            Err(refusal) => return Ok(Err(self.refuse(refusal)?)),
        };
        self.complete(&ctx, pending).await
    }

    fn drop(&mut self, ctx: Resource<ExecutionContext>) -> wasmtime::Result<()> {
        // Dropping the sequence queues the release of its KV cells.
        self.table.delete(ctx)?;
        self.ctx.open_contexts = self.ctx.open_contexts.saturating_sub(1);
        Ok(())
    }
}

impl tensor::Host for NnView<'_> {}

impl tensor::HostTensor for NnView<'_> {
    fn new(
        &mut self,
        dims: TensorDimensions,
        ty: TensorType,
        data: TensorData,
    ) -> wasmtime::Result<Resource<TensorHandle>> {
        self.hold_tensor_bytes(data.len())?;
        Ok(self.table.push(TensorHandle { dims, ty, data })?)
    }

    fn dimensions(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<TensorDimensions> {
        Ok(self.table.get(&t)?.dims.clone())
    }

    fn ty(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&t)?.ty)
    }

    fn data(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<TensorData> {
        Ok(self.table.get(&t)?.data.clone())
    }

    fn drop(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<()> {
        let t = self.table.delete(t)?;
        self.ctx.tensor_bytes = self.ctx.tensor_bytes.saturating_sub(t.data.len());
        Ok(())
    }
}

impl errors::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    fn code(&mut self, e: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&e)?.code)
    }

    fn data(&mut self, e: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&e)?.message.clone())
    }

    fn drop(&mut self, e: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(e)?;
        Ok(())
    }
}
