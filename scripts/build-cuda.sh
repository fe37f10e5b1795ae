#!/usr/bin/env bash
# Builds the CUDA host: one artifact that offloads to NVIDIA GPUs where a driver and a GPU
# are present and serves on the CPU everywhere else. Prints the artifact's folder on the
# last line of stdout (all else goes to stderr):
#
#     dist=$(bash scripts/build-cuda.sh)
#     "$dist/flywheel" serve --config flywheel.toml
#
#     bash scripts/build-cuda.sh test     # then runs the whole test suite on this build
#
# CUDA_ARCHITECTURES   CMake's list (default "90-real;80-virtual", see below)
# JOBS                 the build's parallelism (default: every core)
# CUDA_TARGET_DIR      cargo's target folder for this build (default target/cuda)
# SKIP_CUDA_LIBS=1     leave cudart and cuBLAS out of the artifact (nodes bring their own)
#
# The toolkit: CUDA 13.0's compiler, runtime and cuBLAS come from PyPI wheels, installed with
# --no-deps into .flywheel/cuda/<version>/ (~840 MB, once). The wheels lack what CMake's
# FindCUDAToolkit and the linker expect of a toolkit tree, so this script adds it: a lib64
# link and unversioned links for cudart, cuBLAS and cuBLASLt.
#
# The mechanism: llama.cpp is built as shared libraries with its backends as loadable
# modules (GGML_BACKEND_DL): libggml-cpu.so and libggml-cuda.so sit next to the binary, and
# the host loads them at start (engine/backend.rs). On a node without a driver, or without
# cudart, the CUDA module fails to load or finds no device, the host logs it and serves on
# the CPU module. The binary links only libllama/libggml (rpath $ORIGIN), never CUDA.
# cuBLAS and cudart are linked dynamically (their static archives are not on PyPI), and the
# driver's VMM API is left out (GGML_CUDA_NO_VMM, the `cuda-no-vmm` feature): the driver
# library has no wheel to link against, and without VMM nothing links it at build time
# (cudart opens it at run time). ggml then uses its plain pooled cudaMalloc allocator.
#
# Architectures: building ggml-cuda takes ~45-50 min per real architecture on 2 cores.
# The default builds sm_90 machine code (H100/H200, the GPUs this project is lent) and one
# PTX copy for compute_80, which the driver compiles once (and caches) on sm_80/sm_86/sm_89
# GPUs: every Ampere, Ada and Hopper card runs the artifact, at the cost of a first-start
# JIT on the non-Hopper ones. "80-real;89-real;90-real" removes that JIT at three times the
# build time.
#
# The CPU module is built for x86-64-v3 (AVX2, FMA, F16C, BMI2), not for this machine's
# CPU, so the artifact runs on any server of the last decade.
#
# Idempotent: the toolkit installs once; cargo rebuilds nothing that has not changed.
set -euo pipefail
exec 3>&1 1>&2

CUDA_VERSION=13.0
CUDA_WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.1.0.3
)

root="$(cd "$(dirname "$0")/.." && pwd)"
toolkit_dir="$root/.flywheel/cuda/$CUDA_VERSION"
cu="$toolkit_dir/site/nvidia/cu13"
archs="${CUDA_ARCHITECTURES:-90-real;80-virtual}"
jobs="${JOBS:-$(nproc)}"
target_dir="${CUDA_TARGET_DIR:-$root/target/cuda}"
dist="$target_dir/dist"

install_toolkit() {
  local stamp="$toolkit_dir/.installed" want="${CUDA_WHEELS[*]}"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  echo "build-cuda: installing the CUDA $CUDA_VERSION toolkit wheels into $toolkit_dir"
  rm -rf "$toolkit_dir"
  mkdir -p "$toolkit_dir"
  python3 -m pip install --quiet --no-deps --target "$toolkit_dir/site" "${CUDA_WHEELS[@]}"
  # What a toolkit tree has and the wheels do not.
  ln -sfn lib "$cu/lib64"
  for lib in cudart cublas cublasLt; do
    local versioned
    versioned=$(cd "$cu/lib" && ls "lib$lib.so."* | sort | head -1)
    ln -sfn "$versioned" "$cu/lib/lib$lib.so"
  done
  "$cu/bin/nvcc" --version | tail -2
  echo "$want" >"$stamp"
}

cuda_env() {
  export PATH="$cu/bin:$PATH" CUDA_PATH="$cu" CUDAToolkit_ROOT="$cu"
  # CMAKE_* and GGML_* variables reach llama.cpp's CMake through the sys crate's build script.
  export CMAKE_CUDA_COMPILER="$cu/bin/nvcc" CMAKE_CUDA_ARCHITECTURES="$archs"
  export CMAKE_BUILD_PARALLEL_LEVEL="$jobs" CMAKE_INSTALL_RPATH='$ORIGIN' GGML_BACKEND_DL=ON
  export CARGO_TARGET_DIR="$target_dir" CARGO_BUILD_JOBS="$jobs"
  # A portable CPU level, and libraries found beside the binary. RUSTFLAGS replaces
  # .cargo/config.toml's target-cpu=native (ggml refuses GGML_NATIVE with loadable backends).
  export RUSTFLAGS='-C target-cpu=x86-64-v3 -C link-arg=-Wl,-rpath,$ORIGIN'
}

build_host() {
  echo "build-cuda: building the host with --features cuda for CUDA architectures $archs ($jobs jobs)"
  local started=$SECONDS stamp="$target_dir/.cuda-architectures"
  # The sys crate's build script does not rerun when CMAKE_* variables change: a new
  # architecture list needs its CMake build redone.
  if [[ -f "$stamp" && "$(cat "$stamp")" != "$archs" ]]; then
    echo "build-cuda: architectures changed from $(cat "$stamp"); rebuilding llama.cpp"
    cargo clean --release -p llama-cpp-sys-2
  fi
  mkdir -p "$target_dir"
  echo "$archs" >"$stamp"
  cargo build --release -p flywheel --features cuda --bin flywheel
  echo "build-cuda: built in $((SECONDS - started)) s"
}

# The llama.cpp libraries and backend modules the sys crate's CMake build installed.
llama_out() {
  local newest
  newest=$(ls -td "$target_dir"/release/build/llama-cpp-sys-2-*/out/lib/libllama.so 2>/dev/null | head -1)
  [[ -n "$newest" ]] || { echo "build-cuda: no libllama.so under $target_dir" >&2; exit 1; }
  dirname "$(dirname "$newest")"
}

assemble() {
  local out
  out=$(llama_out)
  rm -rf "$dist"
  mkdir -p "$dist"
  cp "$target_dir/release/flywheel" "$dist/"
  # Keep the soname links as links: copies would triple each library.
  cp -P "$out"/lib/lib*.so* "$dist/"
  # With GGML_BACKEND_DL the modules install beside the executables CMake would build.
  find "$out" -name 'libggml-*.so' -path '*/bin/*' -exec cp -L {} "$dist/" \;
  [[ -f "$dist/libggml-cpu.so" ]] || { echo "build-cuda: libggml-cpu.so was not built" >&2; exit 1; }
  [[ -f "$dist/libggml-cuda.so" ]] || { echo "build-cuda: libggml-cuda.so was not built" >&2; exit 1; }
  # Tests run from target/.../deps and spawn target/.../flywheel: both find the modules.
  for module in libggml-cpu.so libggml-cuda.so; do
    cp --remove-destination "$dist/$module" "$target_dir/release/"
    cp --remove-destination "$dist/$module" "$target_dir/release/deps/"
  done
  if [[ "${SKIP_CUDA_LIBS:-0}" != 1 ]]; then
    cp -L "$cu/lib/libcudart.so.13" "$cu/lib/libcublas.so.13" "$cu/lib/libcublasLt.so.13" "$dist/"
  fi
  find "$dist" -maxdepth 1 -type f \( -name flywheel -o -name '*.so*' \) -exec strip --strip-debug {} +
  echo "build-cuda: the artifact ($(du -sh "$dist" | cut -f1)):"
  ls -la "$dist"
}

install_toolkit
if [[ "${1:-}" == exec ]]; then
  # Runs a command in this build's environment (the test suite's host tests use it).
  shift
  cuda_env
  exec "$@" >&3
fi
(cuda_env && build_host)
assemble
if [[ "${1:-}" == test ]]; then
  # The whole suite, its host tests built and run as the CUDA build (on a node without a GPU
  # they run on the CPU module). Only the final `cargo test` gets this build's environment:
  # the guests and lints build as usual.
  shift
  started=$SECONDS
  FLYWHEEL_TEST_RUNNER="bash $root/scripts/build-cuda.sh exec" bash "$root/scripts/test.sh" --features flywheel/cuda "$@" >&3
  echo "build-cuda: the suite passed in $((SECONDS - started)) s"
fi
echo "$dist" >&3
