#!/usr/bin/env bash
# Install the pinned toolchains that build Python and JavaScript plugins, under
# .flywheel/toolchains (idempotent: an installed pin is kept). Usage: plugin-toolchains.sh [py] [js]
set -euo pipefail
cd "$(dirname "$0")/.."
COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_JS_VERSION=0.23.0
root=.flywheel/toolchains
langs=("$@")
[ ${#langs[@]} -eq 0 ] && langs=(py js)
for lang in "${langs[@]}"; do
  case "$lang" in
    py)
      venv="$root/py"
      if ! "$venv/bin/componentize-py" --version 2>/dev/null | grep -q "$COMPONENTIZE_PY_VERSION"; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
      fi
      ;;
    js)
      # componentize-js and everything under it, as scripts/js-toolchain/package-lock.json pins.
      dir="$root/js"
      want="\"version\": \"$COMPONENTIZE_JS_VERSION\""
      if ! grep -qs "$want" "$dir/node_modules/@bytecodealliance/componentize-js/package.json" \
        || ! cmp -s scripts/js-toolchain/package-lock.json "$dir/package-lock.json"; then
        mkdir -p "$dir"
        cp scripts/js-toolchain/package.json scripts/js-toolchain/package-lock.json "$dir/"
        npm ci --prefix "$dir" --no-audit --no-fund --silent
      fi
      ;;
    *) echo "unknown toolchain: $lang (py or js)" >&2; exit 2 ;;
  esac
done
