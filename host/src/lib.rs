//! Flywheel: a serverless WebAssembly runtime for LLM inference.
//!
//! Data flows one way: HTTP → plugin instance → wasi-nn → engine scheduler → llama.cpp.

pub mod bench;
pub mod config;
pub mod engine;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod nn;
pub mod oci;
pub mod plugins;
pub mod server;
pub mod synthetic;
pub mod sys;
pub mod tenants;
