//! Host bindings for what a plugin imports besides WASI: `wasi:nn` and `flywheel:llm`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "flywheel:llm/imports",
    imports: {
        // These wait on the engine (a model's load, admission, a batch step); everything
        // else is immediate.
        "wasi:nn/graph.load-by-name": async | trappable,
        "flywheel:llm/model.info": async | trappable,
        "flywheel:llm/model.tokenize": async | trappable,
        "flywheel:llm/model.detokenize": async | trappable,
        "flywheel:llm/model.token-bytes": async | trappable,
        "flywheel:llm/model.apply-chat-template": async | trappable,
        "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
        "wasi:nn/graph.[method]graph.init-execution-context": async | trappable,
        "flywheel:llm/batch.compute-many": async | trappable,
        "flywheel:llm/batch.embed": async | trappable,
        default: trappable,
    },
    with: {
        "wasi:nn/graph.graph": super::GraphHandle,
        "wasi:nn/tensor.tensor": super::TensorHandle,
        "wasi:nn/inference.graph-execution-context": super::ExecutionContext,
        "wasi:nn/errors.error": super::NnError,
    },
});
