#!/usr/bin/env bash
# Installs what building and running Flywheel needs on a fresh Debian machine.
# Idempotent: each step checks first and does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# llama.cpp builds with cmake and make; bindgen needs libclang; the model fetcher and the
# tests' OpenAI client run on python3 with pip; the registry client's TLS links OpenSSL.
packages=(build-essential cmake clang libclang-dev pkg-config curl libssl-dev)
if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
  packages+=(python3 python3-pip)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust with rustup first" >&2
  exit 1
fi

# Plugins are WebAssembly components.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi

# The default model (verified by sha256; a present, verified file is kept).
python3 models/fetch.py "${FLYWHEEL_MODELS:-smollm2}"
