//! Sequences sized to the memory a node has (`kv_memory_fraction`): the KV cache of one
//! sequence is known from the model's shape once its weights are loaded, and the devices
//! that will hold it report what is free. `max_sequences` is then a cap. And a batch whose
//! compute buffers do not fit is halved (`batch_sizes`).

use llama_cpp_2::model::LlamaModel;

use super::devices::{devices, model_gpus};
use super::{EngineError, KvCacheKind, ModelManifest};

/// KV bytes one sequence of `context_length` tokens takes, or the bytes free, on the GPUs
/// the model offloads to and on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Split {
    pub gpu: u64,
    pub cpu: u64,
}

/// The most sequences whose KV cache fits `fraction` of `free` on both sides, at most `cap`;
/// 0 when not even one does.
pub(crate) fn sequences_that_fit(need: Split, free: Split, fraction: f64, cap: usize) -> usize {
    let side = |need: u64, free: u64| {
        if need == 0 {
            return usize::MAX;
        }
        let usable = (free as f64 * fraction).floor() as u64;
        usize::try_from(usable / need).unwrap_or(usize::MAX)
    };
    side(need.gpu, free.gpu).min(side(need.cpu, free.cpu)).min(cap)
}

/// `manifest` with `max_sequences` lowered to what fits, when it sets `kv_memory_fraction`;
/// a clear error when not one sequence fits.
pub(crate) fn fit_sequences(mut manifest: ModelManifest, llama: &LlamaModel) -> Result<ModelManifest, EngineError> {
    let Some(fraction) = manifest.kv_memory_fraction else { return Ok(manifest) };
    let gpus = model_gpus(&manifest);
    let need = kv_split(llama, &manifest, manifest.context_length);
    let free = Split {
        gpu: gpus.iter().map(|d| d.memory_free_bytes).sum(),
        cpu: devices().iter().filter(|d| d.kind == "cpu").map(|d| d.memory_free_bytes).sum(),
    };
    let fits = sequences_that_fit(need, free, fraction, manifest.max_sequences);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    if fits == 0 {
        let side = |need: u64, free: u64, place: &str| {
            (need > 0).then(|| format!("{:.2} MiB of the {:.0} MiB free on {place}", mib(need), mib(free)))
        };
        let sides: Vec<String> =
            [side(need.gpu, free.gpu, "the GPUs"), side(need.cpu, free.cpu, "the CPU")].into_iter().flatten().collect();
        return Err(EngineError::ContextCreate {
            model: manifest.name.clone(),
            message: format!(
                "one sequence of {} tokens needs {} for its KV cache, and kv_memory_fraction = {fraction} allows \
                 less: lower context_length, use kv_cache_type = \"q8_0\", or raise kv_memory_fraction",
                manifest.context_length,
                sides.join(" and ")
            ),
        });
    }
    tracing::info!(
        model = %manifest.name,
        max_sequences = fits,
        cap = manifest.max_sequences,
        sequence_kv_mib = mib(need.gpu + need.cpu),
        gpu_free_mib = mib(free.gpu) as u64,
        cpu_free_mib = mib(free.cpu) as u64,
        "sequences sized to free memory"
    );
    manifest.max_sequences = fits;
    Ok(manifest)
}

/// The batch sizes a load may run with, largest first: the manifest's, then its halvings
/// while every open sequence still decodes each step and prompts go in useful chunks.
pub(crate) fn batch_sizes(manifest: &ModelManifest) -> Vec<usize> {
    let floor = manifest.max_sequences.max(MIN_BATCH);
    std::iter::successors(Some(manifest.batch_size), |b| Some(b / 2).filter(|h| *h >= floor)).collect()
}

/// The smallest batch a load shrinks to.
const MIN_BATCH: usize = 32;

/// KV cache bytes of one sequence of `context_length` tokens, wherever its layers are.
/// Sliding-window layers (Gemma 3) keep only their window; counting them in full errs on
/// the side of fewer sequences.
pub(crate) fn sequence_kv_bytes(llama: &LlamaModel, manifest: &ModelManifest) -> u64 {
    let split = kv_split(llama, manifest, manifest.context_length);
    split.gpu + split.cpu
}

/// Transformer layers llama.cpp places on the GPUs, none on a node without the model's GPUs.
/// The output layer is the first of `n_gpu_layers`: llama.cpp offloads the layers from
/// `n_layer + 1 - n_gpu_layers` on, so `n_layer + 1` (or more) offloads them all.
pub(crate) fn offloaded_layers(llama: &LlamaModel, manifest: &ModelManifest) -> u32 {
    if model_gpus(manifest).is_empty() {
        0
    } else {
        repeating_layers_offloaded(manifest.n_gpu_layers, llama.n_layer())
    }
}

fn repeating_layers_offloaded(n_gpu_layers: u32, n_layer: u32) -> u32 {
    n_gpu_layers.saturating_sub(1).min(n_layer)
}

/// KV bytes of `cells` cells on the model's GPUs and in host memory: llama.cpp keeps an
/// offloaded layer's cells on its GPU, the others' in host memory.
pub(crate) fn kv_split(llama: &LlamaModel, manifest: &ModelManifest, cells: usize) -> Split {
    let per_layer = layer_bytes(llama, manifest, cells);
    let offloaded = u64::from(offloaded_layers(llama, manifest));
    Split { gpu: per_layer * offloaded, cpu: per_layer * (u64::from(llama.n_layer()) - offloaded) }
}

/// KV bytes of one layer for `cells` tokens: keys and values of every KV head.
fn layer_bytes(llama: &LlamaModel, manifest: &ModelManifest, cells: usize) -> u64 {
    let arch = llama.meta_val_str("general.architecture").unwrap_or_default();
    let meta = |key: &str| llama.meta_val_str(&format!("{arch}.attention.{key}")).ok()?.parse::<u64>().ok();
    let heads = u64::from(llama.n_head().max(1));
    let key = meta("key_length").unwrap_or(u64::try_from(llama.n_embd()).unwrap_or(0) / heads);
    let value = meta("value_length").unwrap_or(key);
    let elements = cells as u64 * u64::from(llama.n_head_kv()) * (key + value);
    match manifest.kv_cache_type {
        KvCacheKind::F16 => elements * 2,
        // Blocks of 32 values: 32 bytes and a 2-byte scale.
        KvCacheKind::Q8_0 => elements.div_ceil(32) * 34,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn batches_halve_down_to_the_sequences_or_32() {
        let mut m = ModelManifest::for_file("m", "m.gguf");
        m.batch_size = 512;
        m.max_sequences = 16;
        assert_eq!(batch_sizes(&m), [512, 256, 128, 64, 32]);
        m.max_sequences = 48;
        assert_eq!(batch_sizes(&m), [512, 256, 128, 64]);
        m.batch_size = 20;
        m.max_sequences = 4;
        assert_eq!(batch_sizes(&m), [20], "already below the floor: only the manifest's");
    }

    #[test]
    fn the_output_layer_is_the_first_of_n_gpu_layers() {
        assert_eq!(repeating_layers_offloaded(0, 30), 0);
        assert_eq!(repeating_layers_offloaded(1, 30), 0, "the output layer only");
        assert_eq!(repeating_layers_offloaded(30, 30), 29);
        assert_eq!(repeating_layers_offloaded(31, 30), 30);
        assert_eq!(repeating_layers_offloaded(999, 30), 30);
    }

    #[test]
    fn the_tighter_side_and_the_cap_bound_the_count() {
        let need = Split { gpu: 100 * MIB, cpu: 0 };
        let free = Split { gpu: 1000 * MIB, cpu: 10 * MIB };
        assert_eq!(sequences_that_fit(need, free, 0.9, 64), 9, "900 MiB of GPU memory for 100 MiB each");
        assert_eq!(sequences_that_fit(need, free, 0.9, 4), 4, "max_sequences caps it");
        let partial = Split { gpu: 75 * MIB, cpu: 25 * MIB };
        assert_eq!(sequences_that_fit(partial, Split { gpu: 1000 * MIB, cpu: 100 * MIB }, 1.0, 64), 4);
        assert_eq!(sequences_that_fit(need, free, 0.05, 64), 0, "50 MiB holds no 100 MiB sequence");
    }
}
