#!/usr/bin/env bash
# Models that scale to zero: what a cold start costs, and what unloading gives back.
#
# Serves the models with `keep_alive = "10m"` (nothing unloads by itself during the run),
# then for each model, ROUNDS times: unload it (admin API), read the server's RSS, send one
# streaming completion and time its first token (the cold start: the request waits for the
# load), read the RSS while loaded, and send the same request again (warm). Prints a table
# of medians and writes every measurement to $BENCH_OUT/cold-load.json.
#
# Settings (environment): MODELS ("smollm2 gemma3-270m"), ROUNDS (5), BENCH_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-"smollm2 gemma3-270m"}
ROUNDS=${ROUNDS:-5}
out=${BENCH_OUT:-target/bench/cold-load}
mkdir -p "$out"
out=$(cd "$out" && pwd)

bash scripts/setup.sh >&2
# shellcheck disable=SC2086
python3 models/fetch.py $MODELS 2>&1 | grep -v verifying >&2 || true
cargo build --release --bin flywheel >&2
bash scripts/build-plugins.sh >/dev/null

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
load=$(printf '"%s", ' $MODELS)
cat >"$out/flywheel.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[models]
dir = "$PWD/models"
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
  --rounds "$ROUNDS" --json "$out/cold-load.json" $MODELS
