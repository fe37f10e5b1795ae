#!/usr/bin/env bash
# The whole test suite: install what is missing, check formatting and lints, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# The tests drive the OpenAI API with the official Python client.
if ! python3 -c "import openai" >/dev/null 2>&1; then
  echo "setup: installing the openai Python client"
  python3 -m pip install -q --disable-pip-version-check "openai==3.57.0"
fi

guests=(-p flywheel-guest -p complete -p json -p stream -p openai -p hostile)
cargo fmt --all --check
cargo clippy --release --all-targets -- -D warnings
cargo clippy --profile guest --target wasm32-wasip2 "${guests[@]}" -- -D warnings
cargo build --profile guest --target wasm32-wasip2 "${guests[@]}"
cargo test --release -p flywheel-guest
cargo test --release "$@"
