//! The process-wide llama.cpp backend.
//!
//! `backend()` starts it on first use; everything that loads models goes through it.
//!
//! llama-cpp-2 allows one `LlamaBackend` at a time, and creating contexts mutates the
//! model through a shared pointer, so both are serialized here.

use std::sync::{Mutex, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;

use super::EngineError;

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// Held while a llama.cpp context is created.
pub static CONTEXT_CREATION: Mutex<()> = Mutex::new(());

pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    let b = BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        modules::load()?;
        let backend = LlamaBackend::init().map_err(|e| e.to_string())?;
        log_devices();
        Ok(backend)
    });
    b.as_ref().map_err(|message| EngineError::ModelLoad {
        path: Default::default(),
        message: format!("llama.cpp backend failed to start: {message}"),
    })
}

/// Names the devices llama.cpp found, and says so when a GPU build found no GPU.
fn log_devices() {
    let devices = llama_cpp_2::list_llama_ggml_backend_devices();
    let names: Vec<String> = devices.iter().map(|d| format!("{} ({})", d.name, d.description)).collect();
    let gpus = devices.iter().filter(|d| is_gpu(d.device_type)).count();
    if cfg!(feature = "cuda") && gpus == 0 {
        tracing::warn!(devices = ?names, "no CUDA device found (no GPU, or no driver): serving on the CPU");
    } else {
        tracing::info!(devices = ?names, "compute devices");
    }
}

/// llama.cpp's backends as loadable modules, in the CUDA build: `libggml-cpu.so` and
/// `libggml-cuda.so` sit beside the executable (or in `FLYWHEEL_BACKENDS_DIR`), and a module
/// that cannot load here (no CUDA runtime or driver) is skipped, so one artifact serves on
/// GPU and CPU-only nodes alike. The CPU-only build links its one backend statically.
#[cfg(feature = "cuda")]
mod modules {
    use std::ffi::CString;
    use std::path::PathBuf;

    pub fn load() -> Result<(), String> {
        let dir = match std::env::var_os("FLYWHEEL_BACKENDS_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(PathBuf::from))
                .ok_or("cannot find the executable's folder; set FLYWHEEL_BACKENDS_DIR")?,
        };
        let path = CString::new(dir.to_string_lossy().as_bytes())
            .map_err(|_| format!("backend folder {} has a NUL in its name", dir.display()))?;
        // SAFETY: a valid C string that outlives the call; ggml copies what it keeps.
        unsafe { llama_cpp_sys_2::ggml_backend_load_all_from_path(path.as_ptr()) };
        // SAFETY: reads ggml's registry, which the call above finished writing.
        let devices = unsafe { llama_cpp_sys_2::ggml_backend_dev_count() };
        if devices == 0 {
            return Err(format!(
                "no compute backend could be loaded from {}: the CUDA build needs libggml-cpu.so \
                 (and libggml-cuda.so for GPUs) there",
                dir.display()
            ));
        }
        tracing::info!(folder = %dir.display(), "llama.cpp backend modules loaded");
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod modules {
    pub fn load() -> Result<(), String> {
        Ok(())
    }
}

fn is_gpu(kind: llama_cpp_2::LlamaBackendDeviceType) -> bool {
    use llama_cpp_2::LlamaBackendDeviceType::{Gpu, IntegratedGpu};
    matches!(kind, Gpu | IntegratedGpu)
}

/// Whether this build can offload layers to a GPU.
pub fn supports_gpu_offload() -> bool {
    backend().map(|b| b.supports_gpu_offload()).unwrap_or(false)
}
