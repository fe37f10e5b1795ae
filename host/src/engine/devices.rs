//! The compute devices llama.cpp sees on this node (the CPU, and GPUs in a GPU build), and
//! the choice of devices a model manifest makes.

use llama_cpp_2::model::params::{LlamaModelParams, LlamaSplitMode};
use llama_cpp_2::{list_llama_ggml_backend_devices, LlamaBackendDeviceType};
use serde::Serialize;

use super::backend::backend;
use super::manifest::SplitMode;
use super::{EngineError, ModelManifest};

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

/// The GPUs a model offloads to: those its manifest's `devices` names, or, as llama.cpp
/// chooses by default, every discrete GPU (integrated ones only where there is none).
pub(crate) fn model_gpus(manifest: &ModelManifest) -> Vec<DeviceInfo> {
    let gpus: Vec<DeviceInfo> = devices().into_iter().filter(|d| matches!(d.kind, "gpu" | "igpu")).collect();
    if !manifest.devices.is_empty() {
        return gpus.into_iter().filter(|d| manifest.devices.iter().any(|n| n.eq_ignore_ascii_case(&d.name))).collect();
    }
    let discrete = gpus.iter().any(|d| d.kind == "gpu");
    gpus.into_iter().filter(|d| !discrete || d.kind == "gpu").collect()
}

/// llama.cpp's placement settings for a manifest: layers offloaded, the GPUs, how a model
/// spreads over them and in what proportions.
pub(crate) fn placement_params(manifest: &ModelManifest) -> Result<LlamaModelParams, EngineError> {
    let split = match manifest.split_mode {
        SplitMode::None => LlamaSplitMode::None,
        SplitMode::Layer => LlamaSplitMode::Layer,
        SplitMode::Row => LlamaSplitMode::Row,
    };
    let mut params = LlamaModelParams::default()
        .with_n_gpu_layers(manifest.n_gpu_layers)
        .with_main_gpu(manifest.main_gpu)
        .with_split_mode(split);
    let refuse = |message: String| EngineError::Devices { model: manifest.name.clone(), message };
    if !manifest.devices.is_empty() {
        let indices = resolve(&manifest.name, &manifest.devices)?;
        params = params.with_devices(&indices).map_err(|e| refuse(e.to_string()))?;
    }
    if manifest.tensor_split.iter().any(|p| *p > 0.0) {
        let gpus = model_gpus(manifest);
        if gpus.is_empty() {
            tracing::warn!(model = %manifest.name, "the manifest sets tensor_split but this node has no GPU: ignored");
        } else if given_proportions(&manifest.tensor_split) > gpus.len() {
            // llama.cpp would read only the first proportions and place the model unlike
            // what the operator wrote.
            let names: Vec<&str> = gpus.iter().map(|d| d.name.as_str()).collect();
            return Err(refuse(format!(
                "tensor_split gives {} proportions, but the model offloads to {} GPU(s) ({})",
                given_proportions(&manifest.tensor_split),
                gpus.len(),
                names.join(", ")
            )));
        }
        params = params.with_tensor_split(&manifest.tensor_split).map_err(|e| refuse(e.to_string()))?;
    }
    Ok(params)
}

/// Proportions up to the last one above zero (trailing zeros change nothing).
fn given_proportions(split: &[f32]) -> usize {
    split.iter().rposition(|p| *p > 0.0).map_or(0, |i| i + 1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_split_reaches_llama_cpp_padded_to_its_device_count() {
        let mut manifest = ModelManifest::for_file("m", "m.gguf");
        assert!(placement_params(&manifest).unwrap().tensor_split().is_empty(), "default: split by free memory");
        // As many proportions as this node's GPUs (a CPU node ignores them), and a trailing 0.
        let given: Vec<f32> = (1..=model_gpus(&manifest).len().max(1)).map(|i| i as f32).collect();
        manifest.tensor_split = [given.as_slice(), &[0.0]].concat();
        let params = placement_params(&manifest).unwrap();
        let mut want = vec![0.0; crate::engine::manifest::MAX_GPUS];
        want[..given.len()].copy_from_slice(&given);
        assert_eq!(params.tensor_split(), want);
        assert_eq!(given_proportions(&[3.0, 1.0, 0.0, 0.0]), 2);
        assert_eq!(given_proportions(&[0.0, 0.0]), 0);
    }
}
