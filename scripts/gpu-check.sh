#!/usr/bin/env bash
# The GPU check: the CUDA build, fully offloaded, on a random-weight model of a 1B llama's
# shape, measured by the project's own benchmarks. Three steps, one script:
#
#   bash scripts/gpu-check.sh --pack   # here: bundle the CUDA artifact (scripts/build-cuda.sh)
#                                      # and the openai plugin into .flywheel/gpu-check/
#   bash scripts/gpu-check.sh --cpu    # here: the same run on this CPU node, small, from the
#                                      # bundle, so the GPU run cannot fail on a typo
#   bash scripts/gpu-check.sh          # on the GPU node (the device tool carries
#                                      # .flywheel/gpu-check): rows as JSON under $OUT
#
# The run writes the model with `flywheel models synth` (weights cannot travel), then
#   - `flywheel bench engine` at N = 1, 16 and 64: the engine against the native
#     llama-cpp-2 lockstep loop, same process, alternating;
#   - `flywheel serve` with the openai plugin, and `flywheel bench http` at c = 16 and 64
#     (streaming completions, 64 prompt + 128 generated tokens): tok/s and TTFT.
# It needs the node's CUDA 13 runtime and cuBLAS (the toolkit beside nvcc, or
# CUDA_LIB_DIR), and finishes in ~6 minutes on an H100. llama-server is not built there:
# the bundle brings no llama.cpp source, and building ggml-cuda would take the whole budget.
#
# OUT      where rows and logs go (default target/gpu-check)
# SHAPE    synthetic model shape (default llama-1b; --cpu: tiny)
# WEIGHTS  f16 or q8_0 (default f16)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bundle_dir="$root/.flywheel/gpu-check"
bundle="$bundle_dir/flywheel-cuda.tar.xz"
# What the device tool carries, in all.
carry_limit=$((64 * 1024 * 1024))

mode=gpu
case "${1:-}" in
  --pack) mode=pack ;;
  --cpu) mode=cpu ;;
  "") ;;
  *) echo "usage: $0 [--pack | --cpu]" >&2; exit 2 ;;
esac

pack() {
  local dist="${CUDA_DIST:-$root/target/cuda/dist}" plugins="$root/.flywheel/plugins" stage
  [[ -x "$dist/flywheel" && -f "$dist/libggml-cuda.so" ]] ||
    { echo "gpu-check: no CUDA artifact in $dist; run scripts/build-cuda.sh first" >&2; exit 1; }
  [[ -f "$plugins/openai.wasm" ]] ||
    { echo "gpu-check: no $plugins/openai.wasm; run scripts/build-plugins.sh first" >&2; exit 1; }
  stage=$(mktemp -d)
  mkdir -p "$stage/flywheel/plugins"
  # cuBLAS (700 MB) comes from the node's toolkit, beside its nvcc; cudart (1 MB) travels.
  cp -P "$dist/flywheel" "$dist"/libllama*.so* "$dist"/libggml*.so* "$stage/flywheel/"
  cp -L "$dist"/libcudart.so.* "$stage/flywheel/" 2>/dev/null || true
  find "$stage/flywheel" -maxdepth 1 -type f -exec strip --strip-unneeded {} +
  cp "$plugins/openai.wasm" "$plugins/openai.toml" "$stage/flywheel/plugins/"
  mkdir -p "$bundle_dir"
  tar -C "$stage" -cf - flywheel | xz -T0 -9 >"$bundle.tmp"
  rm -rf "$stage"
  mv "$bundle.tmp" "$bundle"
  local size
  size=$(stat -c %s "$bundle")
  echo "gpu-check: $bundle, $((size / 1024 / 1024)) MiB (the device carries at most 64 MiB):"
  tar -tvJf "$bundle"
  if ((size > carry_limit)); then
    echo "gpu-check: the bundle is over the carry limit" >&2
    exit 1
  fi
}

if [[ "$mode" == pack ]]; then
  pack
  exit 0
fi

# --- The run (GPU node, or --cpu here) ---
out="${OUT:-$root/target/gpu-check}"
mkdir -p "$out"
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

[[ -f "$bundle" ]] || { echo "gpu-check: no bundle at $bundle; run $0 --pack on the build machine" >&2; exit 1; }
tar -C "$work" -xJf "$bundle"
fw="$work/flywheel/flywheel"

if [[ "$mode" == gpu ]]; then
  shape="${SHAPE:-llama-1b}" ns="1,16,64" cs="16,64" ngl=999 seqs=64 repeat=2 rounds=2
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
  nvcc_dir=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")
  cuda_lib=""
  for dir in ${CUDA_LIB_DIR:-} "$nvcc_dir/../lib64" "$nvcc_dir/../targets/x86_64-linux/lib" \
    /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do
    if [[ -e "$dir/libcublas.so.13" ]]; then cuda_lib=$(cd "$dir" && pwd); break; fi
  done
  [[ -n "$cuda_lib" ]] || { echo "gpu-check: no libcublas.so.13 on this node; set CUDA_LIB_DIR" >&2; exit 1; }
else
  # Small enough for 2 CPU cores; the same steps, the same binaries, the same flags.
  shape="${SHAPE:-tiny}" ns="1,16" cs="16" ngl=999 seqs=16 repeat=1 rounds=1
  cuda_lib="${CUDA_LIB_DIR:-$root/.flywheel/cuda/13.0/site/nvidia/cu13/lib}"
fi
export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
weights="${WEIGHTS:-f16}"
echo "gpu-check: mode $mode, shape $shape ($weights), CUDA libraries from $cuda_lib" | tee "$out/summary.txt"

models="$work/models"
mkdir -p "$models"
"$fw" models synth "$models/synth.gguf" --shape "$shape" --type "$weights" --context-length 1024 \
  --n-gpu-layers "$ngl" --max-sequences "$seqs" | tee -a "$out/summary.txt"
vocab=$(awk '/tokens of vocabulary/ {for (i = 1; i < NF; i++) if ($(i + 1) == "tokens") print $i}' "$out/summary.txt" | tr -d '(,')

# One token first: it shows the devices, and stops a GPU run that found none before the benches.
"$fw" generate --models-dir "$models" --model synth --max-tokens 1 hello >"$out/first-token.log" 2>&1
grep -iE "compute devices|no CUDA device|offload" "$out/first-token.log" | tee -a "$out/summary.txt" || true
if [[ "$mode" == gpu ]] && ! grep -q "CUDA0" "$out/first-token.log"; then
  echo "gpu-check: llama.cpp found no CUDA device here; see $out/first-token.log" >&2
  exit 1
fi

echo "gpu-check: bench engine, N = $ns" | tee -a "$out/summary.txt"
timeout 300 "$fw" bench engine --models-dir "$models" --model synth --n "$ns" --repeat "$repeat" --json \
  >"$out/bench-engine.json" 2>"$out/bench-engine.log"
cat "$out/bench-engine.json" | tee -a "$out/summary.txt"

cat >"$work/flywheel.toml" <<EOF
[server]
listen = "127.0.0.1:18080"
[models]
dir = "$models"
load = ["synth"]
[plugins]
dir = "$work/flywheel/plugins"
cache_dir = "$work/cache"
EOF
http_ok() {
  if command -v curl >/dev/null; then
    curl -fs "$1" >/dev/null 2>&1
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" >/dev/null 2>&1
  fi
}
"$fw" serve --config "$work/flywheel.toml" >"$out/serve.log" 2>&1 &
server_pid=$!
ready=""
for _ in $(seq 1 300); do
  if http_ok http://127.0.0.1:18080/readyz; then
    ready=1
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 1
done
[[ -n "$ready" ]] || { echo "gpu-check: the server did not serve; its log:" >&2; tail -40 "$out/serve.log" >&2; exit 1; }
grep -iE "device|cuda|gpu|offload" "$out/serve.log" | head -20 | tee -a "$out/summary.txt" || true
if [[ "$mode" == gpu ]] && grep -q "no CUDA device found" "$out/serve.log"; then
  echo "gpu-check: the CUDA module found no GPU here (see serve.log); the figures would be the CPU's" >&2
  exit 1
fi

echo "gpu-check: bench http, c = $cs" | tee -a "$out/summary.txt"
timeout 300 "$fw" bench http --url http://127.0.0.1:18080 --model synth --concurrency "$cs" --rounds "$rounds" \
  --vocab "$vocab" --json >"$out/bench-http.json" 2>"$out/bench-http.log"
cat "$out/bench-http.json" | tee -a "$out/summary.txt"
kib=$(awk '/VmHWM/ {print $2}' "/proc/$server_pid/status")
echo "{\"bench\":\"rss\",\"peak_rss_kib\":$kib}" | tee -a "$out/summary.txt"
echo "gpu-check: done; rows in $out"
