#!/usr/bin/env bash
# Build one plugin from its source folder and install it in a plugin directory.
#
#   scripts/build-plugin.sh <plugin-dir> [dest]      (dest defaults to .flywheel/plugins)
#
# The folder's language decides the toolchain: Cargo.toml (Rust, wasm32-wasip2), app.py
# (Python: componentize-py with guest/python) or app.js (JavaScript: componentize-js with
# guest/js). Pinned Python and JS toolchains are installed on first use (.flywheel/toolchains).
# The component is then checked the way the server loads it (`flywheel plugin check`: links
# against the host's imports, fits the pool, fills the compile cache), and installed as
# <name>.wasm with <name>.toml beside it, where <name> is the folder's name.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: $0 <plugin-dir> [dest]" >&2; exit 2; }
src=$(cd "$1" && pwd)
dest=${2:-$root/.flywheel/plugins}
name=$(basename "$src")
out_dir=$root/target/plugins
mkdir -p "$out_dir" "$dest"
out=$out_dir/$name.wasm
toolchains=$root/.flywheel/toolchains

if [ -f "$src/Cargo.toml" ]; then
  lang=rust
  pkg=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$src/Cargo.toml" | head -1)
  (cd "$root" && cargo build --quiet --profile guest --target wasm32-wasip2 -p "$pkg")
  cp "$root/target/wasm32-wasip2/guest/${pkg//-/_}.wasm" "$out"
elif [ -f "$src/app.py" ]; then
  lang=python
  bash "$root/scripts/plugin-toolchains.sh" py
  # The plugin's folder and the SDK are the module path; `app` is the module exporting
  # IncomingHandler. Modules are snapshotted at build time (see guest/python/README.md).
  (cd "$src" && "$toolchains/py/bin/componentize-py" -d "$root/wit" -w flywheel:llm/plugin \
    componentize -p "$root/guest/python" -p "$src" app -o "$out.tmp") >/dev/null
  mv "$out.tmp" "$out"
elif [ -f "$src/app.js" ]; then
  lang=javascript
  bash "$root/scripts/plugin-toolchains.sh" js
  # One ES module: `import ... from 'flywheel'` resolves to guest/js; WIT imports stay imports.
  cp "$root/scripts/bundle-js.mjs" "$toolchains/js/bundle-js.mjs"
  bundle=$out_dir/$name.bundle.js
  node "$toolchains/js/bundle-js.mjs" "$src/app.js" "$bundle" "$root/guest/js"
  "$toolchains/js/node_modules/.bin/componentize-js" "$bundle" --wit "$root/wit" \
    --world-name flywheel:llm/plugin -o "$out.tmp" >/dev/null
  mv "$out.tmp" "$out"
else
  echo "$src: no Cargo.toml, app.py or app.js: not a plugin folder" >&2
  exit 2
fi

# Check it as the server will load it, with its manifest beside it and the server's cache.
check_dir=$out_dir/check-$name
rm -rf "$check_dir" && mkdir -p "$check_dir"
cp "$out" "$check_dir/$name.wasm"
if [ -f "$src/$name.toml" ]; then cp "$src/$name.toml" "$check_dir/$name.toml"; fi
flywheel=${FLYWHEEL_BIN:-}
if [ -z "$flywheel" ]; then
  if [ -x "$root/target/release/flywheel" ]; then flywheel=$root/target/release/flywheel
  else (cd "$root" && cargo build --quiet --release --bin flywheel) && flywheel=$root/target/release/flywheel; fi
fi
RUST_LOG=${RUST_LOG:-warn} "$flywheel" plugin check "$check_dir/$name.wasm" --cache-dir "${FLYWHEEL_CACHE_DIR:-$root/.flywheel/cache}"
rm -rf "$check_dir"

# Copy to a temporary name and rename, so a running server's hot reload never sees half a file.
if [ -f "$src/$name.toml" ]; then cp "$src/$name.toml" "$dest/.$name.toml.tmp" && mv "$dest/.$name.toml.tmp" "$dest/$name.toml"; fi
cp "$out" "$dest/.$name.wasm.tmp" && mv "$dest/.$name.wasm.tmp" "$dest/$name.wasm"
echo "$name ($lang) installed in $dest"
