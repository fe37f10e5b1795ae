#!/usr/bin/env bash
# The whole test suite: install what is missing, check formatting and lints, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# The tests drive the OpenAI API with the official Python client, and validate structured
# output with the reference JSON Schema validator.
for pkg in openai==3.57.0 jsonschema==4.26.0; do
  if ! python3 -c "import ${pkg%%=*}" >/dev/null 2>&1; then
    echo "setup: installing $pkg"
    # Debian's own python3 refuses system-wide installs (PEP 668): fall back to the user site.
    python3 -m pip install -q --disable-pip-version-check "$pkg" 2>/dev/null || \
      python3 -m pip install -q --disable-pip-version-check --user --break-system-packages "$pkg"
  fi
done

# The fleet test balances real nodes with Debian's nginx.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "setup: installing nginx"
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx-light >/dev/null || \
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx >/dev/null
fi
export FLYWHEEL_REQUIRE_NGINX=1

# The OCI test pushes to and pulls from Debian's docker-registry (distribution 2.8) on loopback.
if ! command -v docker-registry >/dev/null 2>&1; then
  echo "setup: installing docker-registry"
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-registry >/dev/null
fi
export FLYWHEEL_REQUIRE_REGISTRY=1

# Python and JavaScript plugins build with pinned componentize-py and componentize-js.
bash scripts/plugin-toolchains.sh py js

# The console is tested in Debian's Chromium, driven by a pinned playwright-core.
bash scripts/browser-toolchain.sh
export FLYWHEEL_REQUIRE_BROWSER=1

# Formatting and lint checks need these components (no-ops when present).
rustup component add rustfmt clippy >/dev/null 2>&1 || true

guests=(-p flywheel-guest -p complete -p json -p stream -p openai -p console -p hostile)
cargo fmt --all --check
cargo clippy --release --all-targets -- -D warnings
cargo clippy --profile guest --target wasm32-wasip2 "${guests[@]}" -- -D warnings
cargo build --profile guest --target wasm32-wasip2 "${guests[@]}"
cargo test --release -p flywheel-guest
# scripts/build-cuda.sh test runs the host tests as the CUDA build, through its environment.
${FLYWHEEL_TEST_RUNNER:-} cargo test --release "$@"
