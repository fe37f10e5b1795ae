#!/usr/bin/env bash
# Build the example plugins (Rust, Python and JavaScript) and install them, with their
# manifests, in a plugin directory (default .flywheel/plugins, which flywheel.example.toml serves).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.flywheel/plugins}"
plugins=(complete json stream openai console)
args=()
for p in "${plugins[@]}"; do args+=(-p "$p"); done
# The Rust examples in one cargo run (faster than one build-plugin.sh each).
cargo build --profile guest --target wasm32-wasip2 "${args[@]}"
mkdir -p "$dest"
for p in "${plugins[@]}"; do
  # Copy to a temporary name and rename, so a running server's hot reload never sees half a file.
  cp "target/wasm32-wasip2/guest/$p.wasm" "$dest/.$p.wasm.tmp" && mv "$dest/.$p.wasm.tmp" "$dest/$p.wasm"
  if [ -f "examples/$p/$p.toml" ]; then cp "examples/$p/$p.toml" "$dest/$p.toml"; fi
done
# Python and JavaScript examples: pinned toolchains, build, check against the host, install.
polyglot=(py-complete py-chat py-classify js-complete)
for p in "${polyglot[@]}"; do bash scripts/build-plugin.sh "examples/$p" "$dest"; done
echo "plugins installed in $dest: ${plugins[*]} ${polyglot[*]}"
