#!/usr/bin/env bash
# Quick start: install what is missing, build, and run Flywheel with the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin flywheel
exec ./target/release/flywheel generate "${@:-Tell me about edge computing in two sentences.}"
