#!/usr/bin/env bash
# Builds llama.cpp's own llama-server and llama-batched-bench, the baselines Flywheel is
# measured against, into .flywheel/llama.cpp/<build>/bin and prints that folder on the last
# line of stdout (all else goes to stderr):
#
#     bin=$(bash scripts/build-llama-server.sh)
#     "$bin/llama-server" --version
#
# Idempotent: when both binaries exist for the pinned source and flags, nothing is fetched
# or built. JOBS sets the build's parallelism (default 2).
#
# The source is the llama-cpp-python sdist from PyPI, which vendors a full llama.cpp tree
# (tools/server included) under vendor/llama.cpp; the sys crate's copy has tools/server
# stripped. llama-cpp-python 0.3.36 is the newest release and carries llama.cpp b11312
# (commit 0c1e57098, 2026-10-01, ggml 0.25.3). llama-cpp-sys-2 0.1.161 vendors a slightly
# newer tree (ggml 0.26.0, "v0.6.0", ~2026-10-05, >= b11320: it has the llm-jp-harmony
# parser and the clef model; LLAMA_SESSION_VERSION 11 vs 10, LLAMA_STATE_SEQ_VERSION 4 vs 3;
# llama.h otherwise identical; llama-kv-cache.cpp differs in ~110 diff lines, the K/V
# rotation size). Every older llama-cpp-python release is further away.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_CPP_BUILD_NUMBER=11312
LLAMA_CPP_COMMIT=0c1e57098

# Keep stdout for the one line callers read.
exec 3>&1 1>&2

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.flywheel/llama.cpp/b$LLAMA_CPP_BUILD_NUMBER"
src="$dest/src"
build="$dest/build"
bin="$dest/bin"
jobs="${JOBS:-2}"

cmake_flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=ON
  # Same CPU kernels as the host binary: ggml's AMX path crashes (see .cargo/config.toml).
  "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_APP=OFF
  # The web UI is either built with npm or downloaded from Hugging Face at build time;
  # neither is wanted (the server runs with --no-webui).
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  # The sdist has no .git: without these the version would read "b0-unknown".
  -DLLAMA_BUILD_NUMBER="$LLAMA_CPP_BUILD_NUMBER"
  -DLLAMA_BUILD_COMMIT="$LLAMA_CPP_COMMIT"
)
stamp="llama-cpp-python $LLAMA_CPP_PYTHON_VERSION $LLAMA_CPP_PYTHON_SHA256 ${cmake_flags[*]}"

if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-batched-bench" ] \
   && [ "$(cat "$dest/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$bin" >&3
  exit 0
fi

# Tools.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
{ command -v g++ >/dev/null 2>&1 && command -v make >/dev/null 2>&1; } || missing+=(build-essential)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "build-llama-server: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$dest"

# Source: fetched only when not already extracted.
if [ ! -f "$src/CMakeLists.txt" ] || [ ! -d "$src/tools/server" ]; then
  sdist="$dest/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [ ! -f "$sdist" ] || ! echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status; then
    echo "build-llama-server: downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (sdist, ~77 MB)"
    dl="$(mktemp -d "$dest/dl.XXXXXX")"
    python3 -m pip download --quiet --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$dl"
    mv "$dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" "$sdist"
    rm -rf "$dl"
  fi
  if ! echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status; then
    echo "build-llama-server: sha256 mismatch for $sdist (want $LLAMA_CPP_PYTHON_SHA256)" >&2
    rm -f "$sdist"
    exit 1
  fi
  echo "build-llama-server: extracting vendor/llama.cpp"
  tmp="$(mktemp -d "$dest/src.XXXXXX")"
  tar -xzf "$sdist" -C "$tmp" --strip-components=3 \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  rm -f "$tmp/.git"  # a submodule gitfile pointing at a .git/modules the sdist lacks
  rm -rf "$src" "$build"
  mv "$tmp" "$src"
  rm -f "$sdist"
fi

# Build. The ceiling keeps llama.cpp's git probes from finding this repository's .git.
echo "build-llama-server: building llama-server and llama-batched-bench (-j $jobs)"
start=$(date +%s)
export GIT_CEILING_DIRECTORIES="$dest"
cmake -S "$src" -B "$build" "${cmake_flags[@]}" >"$dest/cmake-configure.log" \
  || { cat "$dest/cmake-configure.log"; exit 1; }
cmake --build "$build" --target llama-server llama-batched-bench -j "$jobs"
mkdir -p "$bin"
for t in llama-server llama-batched-bench; do
  cp -f "$build/bin/$t" "$bin/$t.tmp"
  mv -f "$bin/$t.tmp" "$bin/$t"
done
echo "$stamp" >"$dest/stamp"
echo "build-llama-server: built in $(( $(date +%s) - start )) s"

echo "$bin" >&3
