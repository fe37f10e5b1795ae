//! Flywheel: a serverless WebAssembly runtime for LLM inference.
//!
//! Data flows one way: HTTP → plugin instance → wasi-nn → engine scheduler → llama.cpp.

pub mod bench;
pub mod engine;
