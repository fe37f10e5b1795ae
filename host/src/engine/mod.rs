//! The inference engine: models, sequences and the continuous-batching scheduler.
//!
//! Knows nothing of WebAssembly or HTTP. Callers are async; every model's llama.cpp
//! context lives on one decode thread, reached through a channel.

mod backend;
mod decode_thread;
mod embedder;
mod error;
mod kv;
mod manifest;
mod model;
mod prefix_cache;
pub(crate) mod scheduler;
mod sequence;
mod tokenizer;
pub mod topk;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use backend::{backend as backend_ref, supports_gpu_offload, CONTEXT_CREATION};
pub use error::EngineError;
pub use kv::context_params;
pub use manifest::{ModelManifest, Pooling};
pub use model::{EngineStats, Model, ModelInfo};
pub use sequence::{Output, PendingFeed, Sequence, Want};

/// One batch the scheduler ran.
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// Batch entries (a prefix shared by several sequences counts once).
    pub tokens: usize,
    /// Sequences that advanced.
    pub sequences: usize,
    /// Generated tokens decoded (one per generating sequence).
    pub decode_tokens: usize,
    /// Prompt tokens computed.
    pub prefill_tokens: usize,
    pub duration: Duration,
}

/// Told about every batch the scheduler runs (metrics hook it).
pub trait StepObserver: Send + Sync {
    fn on_step(&self, model: &str, step: &StepInfo);
}

/// An observer that ignores everything.
pub struct NoObserver;
impl StepObserver for NoObserver {
    fn on_step(&self, _: &str, _: &StepInfo) {}
}

/// All loaded models, by name.
#[derive(Default)]
pub struct Engine {
    models: BTreeMap<String, Arc<Model>>,
}

impl Engine {
    /// Load every manifest and start the decode thread; the first failure stops the load
    /// and names its model.
    pub fn load(manifests: Vec<ModelManifest>, observer: Arc<dyn StepObserver>) -> Result<Self, EngineError> {
        let mut prepared = Vec::with_capacity(manifests.len());
        for m in manifests {
            if prepared.iter().any(|p: &model::Prepared| p.manifest.name == m.name) {
                return Err(EngineError::Manifest {
                    path: m.file.clone(),
                    message: format!("two manifests name the model {:?}", m.name),
                });
            }
            prepared.push(Model::prepare(m)?);
        }
        let setups = prepared.iter().map(model::Prepared::setup).collect();
        let links = decode_thread::start(setups, observer)?;
        let models = prepared
            .into_iter()
            .zip(links)
            .map(|(p, link)| {
                let model = p.finish(link);
                (model.name().to_string(), model)
            })
            .collect();
        Ok(Self { models })
    }

    pub fn model(&self, name: &str) -> Result<&Arc<Model>, EngineError> {
        self.models.get(name).ok_or_else(|| EngineError::UnknownModel(name.to_string()))
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.values()
    }

    /// Whether the decode thread still runs (health checks use this).
    pub fn is_alive(&self) -> bool {
        self.models.values().all(|m| m.link().alive())
    }
}
