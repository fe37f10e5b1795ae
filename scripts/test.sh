#!/usr/bin/env bash
# The whole test suite: install what is missing, check formatting and lints, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release "$@"
