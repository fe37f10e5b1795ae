#!/usr/bin/env bash
# Models that scale to zero: what a cold start costs, and what unloading gives back.
#
# Serves the models with `keep_alive = "10m"` (nothing unloads by itself during the run),
# then for each model, ROUNDS times: unload it (admin API), read the server's RSS, send one
# streaming completion and time its first token (the cold start: the request waits for the
# load), read the RSS while loaded, and send the same request again (warm). Prints a table
# of medians and writes every measurement to $BENCH_OUT/cold-load.json.
#
# Settings (environment): MODELS ("smollm2 gemma3-270m"), ROUNDS (5), BENCH_OUT, and
# KV_CACHE_TYPES ("f16"): with "f16 q8_0", each model is also served as <model>-q8_0, its
# manifest with kv_cache_type = "q8_0" and flash attention on, so the table compares the
# KV cache types' memory side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-"smollm2 gemma3-270m"}
ROUNDS=${ROUNDS:-5}
KV_CACHE_TYPES=${KV_CACHE_TYPES:-f16}
out=${BENCH_OUT:-target/bench/cold-load}
mkdir -p "$out/models"
out=$(cd "$out" && pwd)

bash scripts/setup.sh >&2
# shellcheck disable=SC2086
python3 models/fetch.py $MODELS 2>&1 | grep -v verifying >&2 || true
cargo build --release --bin flywheel >&2
bash scripts/build-plugins.sh >/dev/null

# The manifests served: the models' own, and a variant per other KV cache type.
rm -f "$out"/models/*.toml
served=""
for model in $MODELS; do
  for kv in $KV_CACHE_TYPES; do
    name=$model
    [ "$kv" = f16 ] || name="$model-$kv"
    python3 - "$model" "$name" "$kv" "$out/models" <<'PY'
import pathlib, sys
model, name, kv, dest = sys.argv[1:]
src = pathlib.Path("models") / f"{model}.toml"
lines = []
for line in src.read_text().splitlines():
    key = line.split("=", 1)[0].strip()
    if key == "name":
        line = f'name = "{name}"'
    elif key == "file":
        rel = line.split("=", 1)[1].strip().strip('"')
        line = f'file = "{(src.parent / rel).resolve()}"'
    elif key in ("kv_cache_type", "flash_attention"):
        continue
    elif line.startswith("["):
        # Top-level keys must come before the first table.
        if kv != "f16":
            lines += [f'kv_cache_type = "{kv}"', 'flash_attention = "on"']
            kv = "f16"
    lines.append(line)
if kv != "f16":
    lines += [f'kv_cache_type = "{kv}"', 'flash_attention = "on"']
(pathlib.Path(dest) / f"{name}.toml").write_text("\n".join(lines) + "\n")
PY
    served="$served $name"
  done
done

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# shellcheck disable=SC2086
load=$(printf '"%s", ' $served)
cat >"$out/flywheel.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[models]
dir = "$out/models"
load = [${load%, }]
keep_alive = "10m"
[plugins]
dir = "$PWD/.flywheel/plugins"
cache_dir = "$PWD/.flywheel/cache"
[auth]
admin_key = "bench"
[log]
level = "warn"
EOF
./target/release/flywheel serve --config "$out/flywheel.toml" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
# shellcheck disable=SC2086
python3 scripts/bench_cold_load.py --url "http://127.0.0.1:$port" --pid "$server" --admin-key bench \
  --rounds "$ROUNDS" --json "$out/cold-load.json" $served
