//! How a model's KV cells are laid out, and the one way a prefix is copied in each layout.
//!
//! - `Streams` (the default): one stream of `context_length` cells per sequence
//!   (llama.cpp's `kv_unified = false`, llama-server's layout with `-np N`). Attention scans
//!   only the sequence's own cells. llama.cpp copies between streams only whole streams and
//!   aborts the process on a partial range, so a prefix is copied as sequence state
//!   (`state_seq_get` / `state_seq_set`, then the tail trimmed): a few milliseconds.
//! - `Pool`: one unified cache of `kv_cells` shared by every sequence, for manifests that
//!   give fewer cells than `context_length x max_sequences`. A prefix is shared by
//!   `seq_cp` (metadata only), and the pool can run out, which the scheduler handles by
//!   preempting a sequence.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::{LlamaStateSeqFlags, SeqState};

use super::manifest::{FlashAttention, KvCacheKind};
use super::ModelManifest;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    Streams,
    Pool,
}

impl Layout {
    pub(crate) fn of(m: &ModelManifest) -> Self {
        if m.total_kv_cells() < m.context_length * m.max_sequences {
            Layout::Pool
        } else {
            Layout::Streams
        }
    }

    /// Give `dst` (holding no cells) the first `n` cells of `src`.
    pub(crate) fn copy_prefix(self, ctx: &mut LlamaContext<'_>, src: i32, dst: i32, n: usize) -> Result<(), String> {
        let n = u32::try_from(n).map_err(|e| e.to_string())?;
        match self {
            Layout::Pool => ctx.copy_kv_cache_seq(src, dst, None, Some(n)).map_err(|e| e.to_string()),
            Layout::Streams => {
                let state = ctx.state_seq_get(src, LlamaStateSeqFlags::empty()).map_err(|e| e.to_string())?;
                load_prefix(ctx, &state, dst, n as usize)
            }
        }
    }
}

/// Load `state` into `seq`'s cells (llama.cpp clears them first) and keep its first `n`
/// tokens: how a prefix from another stream or from host memory is taken over.
pub(crate) fn load_prefix(ctx: &mut LlamaContext<'_>, state: &SeqState, seq: i32, n: usize) -> Result<(), String> {
    let n = u32::try_from(n).map_err(|e| e.to_string())?;
    ctx.state_seq_set(state, seq).map_err(|e| e.to_string())?;
    ctx.clear_kv_cache_seq(Some(seq as u32), Some(n), None).map(|_| ()).map_err(|e| e.to_string())
}

/// KV cells llama.cpp allocates for a manifest: it rounds the context up to 256 cells,
/// and with one stream per sequence each stream too.
pub(crate) fn allocated_cells(m: &ModelManifest) -> usize {
    let pad = |n: usize| n.div_ceil(256) * 256;
    let total = pad(m.total_kv_cells());
    match Layout::of(m) {
        Layout::Pool => total,
        Layout::Streams => pad(total / m.max_sequences.max(1)) * m.max_sequences,
    }
}

/// Context settings shared by the scheduler and the native baseline of `bench engine`.
pub fn context_params(m: &ModelManifest) -> LlamaContextParams {
    let n_ctx = u32::try_from(m.total_kv_cells()).unwrap_or(u32::MAX);
    let n_batch = u32::try_from(m.batch_size).unwrap_or(u32::MAX);
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(m.max_sequences as u32)
        .with_kv_unified(Layout::of(m) == Layout::Pool)
        // Sliding-window layers (Gemma 3) keep only their window, as llama-server does.
        .with_swa_full(false)
        .with_n_threads(m.threads)
        .with_n_threads_batch(m.threads)
        .with_type_k(kv_type(m.kv_cache_type))
        .with_type_v(kv_type(m.kv_cache_type))
        .with_flash_attention_policy(flash_attention(m.flash_attention))
}

fn kv_type(kind: KvCacheKind) -> KvCacheType {
    match kind {
        KvCacheKind::F16 => KvCacheType::F16,
        KvCacheKind::Q8_0 => KvCacheType::Q8_0,
    }
}

/// llama.cpp's flash attention policy for the manifest's setting.
pub(crate) fn flash_attention(setting: FlashAttention) -> llama_cpp_sys_2::llama_flash_attn_type {
    match setting {
        FlashAttention::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        FlashAttention::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        FlashAttention::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
    }
}

/// The model's sliding attention window in tokens, 0 when it attends to everything.
pub(crate) fn sliding_window(model: &LlamaModel) -> usize {
    let Ok(arch) = model.meta_val_str("general.architecture") else { return 0 };
    model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
