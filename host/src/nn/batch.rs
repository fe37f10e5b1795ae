//! `flywheel:llm/batch`: computes on several execution contexts in one batch step, and
//! embeddings.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use wasmtime::component::Resource;

use super::bindings::flywheel::llm::batch;
use super::{ErrorCode, ExecutionContext, GraphHandle, NamedTensor, NnError, NnView};

/// Most inputs one `embed` call takes (OpenAI's limit for one request).
const MAX_EMBED_INPUTS: usize = 2048;

impl NnView<'_> {
    /// Take a refused request's input tensors out of the table, as a compute would.
    fn discard(&mut self, inputs: Vec<NamedTensor>) -> wasmtime::Result<()> {
        for (_, handle) in inputs {
            let t = self.table.delete(handle)?;
            self.ctx.tensor_bytes = self.ctx.tensor_bytes.saturating_sub(t.data.len());
        }
        Ok(())
    }
}

impl batch::Host for NnView<'_> {
    async fn compute_many(
        &mut self,
        requests: Vec<(Resource<ExecutionContext>, Vec<NamedTensor>)>,
    ) -> wasmtime::Result<Vec<Result<Vec<NamedTensor>, Resource<NnError>>>> {
        self.ctx.note_call();
        // Submit every feed before waiting for any, so they all join the next step.
        let mut seen = HashSet::new();
        let mut submitted = Vec::with_capacity(requests.len());
        for (ctx, inputs) in requests {
            let feed = if seen.insert(ctx.rep()) {
                self.submit(&ctx, inputs)?
            } else {
                self.discard(inputs)?;
                let msg = "an execution context is listed twice in one compute-many";
                Err((ErrorCode::InvalidArgument, msg.to_string()).into())
            };
            submitted.push((ctx, feed));
        }
        let mut results = Vec::with_capacity(submitted.len());
        for (ctx, feed) in submitted {
            results.push(match feed {
                Ok(pending) => self.complete(&ctx, pending).await?,
                Err(refusal) => Err(self.refuse(refusal)?),
            });
        }
        Ok(results)
    }

    async fn embed(
        &mut self,
        graph: Resource<GraphHandle>,
        inputs: Vec<Vec<i32>>,
    ) -> wasmtime::Result<Result<Vec<Vec<f32>>, Resource<NnError>>> {
        self.ctx.note_call();
        if inputs.len() > MAX_EMBED_INPUTS {
            let msg = format!("{} inputs to embed; at most {MAX_EMBED_INPUTS} per call", inputs.len());
            return Ok(Err(self.error(ErrorCode::InvalidArgument, msg)?));
        }
        if self.ctx.abandoned.load(Ordering::Relaxed) {
            let msg = "the client went away; this request is abandoned";
            return Ok(Err(self.error(ErrorCode::RuntimeError, msg)?));
        }
        let model = self.table.get(&graph)?.model.clone();
        let account = self.ctx.account.clone();
        match model.embed_charged(inputs, account.as_deref()).await {
            Ok(vectors) => Ok(Ok(vectors)),
            Err(e) => Ok(Err(self.refuse(e)?)),
        }
    }
}
