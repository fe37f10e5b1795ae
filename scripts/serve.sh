#!/usr/bin/env bash
# Quick start: install what is missing, build, and serve the default model with the example
# plugins on 127.0.0.1:8080 (flywheel.toml, when present, overrides the defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin flywheel
bash scripts/build-plugins.sh
exec ./target/release/flywheel serve "$@"
