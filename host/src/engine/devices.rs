//! The compute devices llama.cpp sees on this node (the CPU, and GPUs in a GPU build), and
//! the choice of devices a model manifest makes.

use llama_cpp_2::{list_llama_ggml_backend_devices, LlamaBackendDeviceType};
use serde::Serialize;

use super::backend::backend;
use super::EngineError;

/// One device, as `/admin/models` and `/metrics` show it.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    /// As model manifests name it in `devices` (`CPU`, `CUDA0`, ...).
    pub name: String,
    pub description: String,
    /// The backend that drives it (`CPU`, `CUDA`, ...).
    pub backend: String,
    /// `cpu`, `gpu`, `igpu`, `accelerator`.
    pub kind: &'static str,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

/// Every device, with its memory now.
pub fn devices() -> Vec<DeviceInfo> {
    if backend().is_err() {
        return Vec::new();
    }
    list_llama_ggml_backend_devices()
        .into_iter()
        .map(|d| {
            // llama.cpp reports the CPU's whole memory as free; the kernel knows better.
            let free = match d.device_type {
                LlamaBackendDeviceType::Cpu => crate::sys::available_memory().unwrap_or(d.memory_free as u64),
                _ => d.memory_free as u64,
            };
            (d, free)
        })
        .map(|(d, free)| DeviceInfo {
            kind: match d.device_type {
                LlamaBackendDeviceType::Cpu => "cpu",
                LlamaBackendDeviceType::Gpu => "gpu",
                LlamaBackendDeviceType::IntegratedGpu => "igpu",
                LlamaBackendDeviceType::Accelerator => "accelerator",
                LlamaBackendDeviceType::Unknown => "unknown",
            },
            name: d.name,
            description: d.description,
            backend: d.backend,
            memory_total_bytes: d.memory_total as u64,
            memory_free_bytes: free,
        })
        .collect()
}

/// The backend indices of the devices a manifest names, or a clear error naming those this
/// node has.
pub(crate) fn resolve(model: &str, names: &[String]) -> Result<Vec<usize>, EngineError> {
    let all = list_llama_ggml_backend_devices();
    names
        .iter()
        .map(|name| {
            all.iter().find(|d| d.name.eq_ignore_ascii_case(name)).map(|d| d.index).ok_or_else(|| {
                let have: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
                EngineError::Devices {
                    model: model.to_string(),
                    message: format!("no device named {name:?}; this node has {}", have.join(", ")),
                }
            })
        })
        .collect()
}
