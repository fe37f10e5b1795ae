//! The Flywheel guest SDK: write an inference plugin as a WebAssembly component.
//!
//! A plugin is an HTTP handler (`wasi:http/proxy`) that runs inference through `wasi:nn`
//! and tokenizes through `flywheel:llm`. This crate wraps both:
//!
//! * [`Model`] and [`Session`]: open a model, tokenize, render chat templates, and feed
//!   tokens to an execution context (one sequence in the host's shared batch).
//! * [`Sampler`]: greedy, temperature, top-k, top-p, min-p, repetition / frequency /
//!   presence penalties, logit bias and a seeded RNG. By default the host returns only
//!   the best candidates of each step, which is much cheaper than copying a full logits
//!   row into the sandbox.
//! * [`Generation`]: the decode loop, with stop sequences, UTF-8-safe incremental text,
//!   token limits and optional constrained decoding ([`JsonConstraint`]).
//! * [`Request`], [`Responder`], [`SseStream`]: read a JSON body, answer JSON or stream
//!   server-sent events.
//!
//! ```ignore
//! use flywheel_guest::*;
//!
//! struct Hello;
//! impl Handler for Hello {
//!     fn handle(req: Request, res: Responder) -> Result<(), HttpError> {
//!         let body: serde_json::Value = req.json()?;
//!         let model = Model::open("smollm2")?;
//!         let prompt = model.tokenize(body["prompt"].as_str().unwrap_or("Hello"))?;
//!         let mut gen = model.generate(&prompt, Sampler::new().temperature(0.7), GenerateOptions::max_tokens(64))?;
//!         let mut sse = res.sse()?;
//!         while let Some(text) = gen.next_text()? {
//!             sse.send_json(&serde_json::json!({ "text": text }))?;
//!         }
//!         sse.done()
//!     }
//! }
//! export_plugin!(Hello);
//! ```

mod choices;
mod constraint;
mod error;
mod generate;
mod http;
mod logprobs;
mod model;
mod params;
mod sampling;
mod text;

/// Raw bindings of `wasi:nn` and `flywheel:llm`, for what the wrappers do not cover.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "flywheel:llm/imports",
        // wasi:nn lives in a dependency package; generate it here too.
        generate_all,
    });
}

pub use choices::Choices;
pub use constraint::{Constraint, JsonConstraint, SchemaConstraint, SchemaError, Vocab};
pub use error::{Error, HttpError};
pub use generate::{FinishReason, GenerateOptions, Generation};
pub use http::{from_json_value, serve, Handler, Request, Responder, SseStream};
pub use logprobs::TokenLogprob;
pub use model::{feed_together, Candidates, ChatMessage, Model, ModelInfo, Session, Want};
pub use params::{max_tokens, SamplingParams, Stop};
pub use sampling::Sampler;
pub use text::TextDecoder;
pub use wasip2;

/// Export a [`Handler`] as the component's `wasi:http/incoming-handler`.
#[macro_export]
macro_rules! export_plugin {
    ($handler:ty) => {
        struct __FlywheelIncomingHandler;
        impl $crate::wasip2::exports::http::incoming_handler::Guest for __FlywheelIncomingHandler {
            fn handle(
                request: $crate::wasip2::http::types::IncomingRequest,
                response_out: $crate::wasip2::http::types::ResponseOutparam,
            ) {
                $crate::serve::<$handler>(request, response_out)
            }
        }
        $crate::wasip2::http::proxy::export!(__FlywheelIncomingHandler);
    };
}
