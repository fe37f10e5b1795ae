#!/usr/bin/env bash
# HTTP serving against the engine, in one session on this machine:
#   1. flywheel bench engine at N = 1 and 16 (no server running),
#   2. the server with the default model and example plugins on a free port,
#   3. flywheel bench http at concurrency 1, 4 and 16 through /v1/completions,
# then the two checks: tok/s at 16 >= 0.9x engine, TTFT p50 at 1 <= 1.2x engine prefill.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --release --bin flywheel
bash scripts/build-plugins.sh >/dev/null
out="${BENCH_OUT:-target/bench}"
mkdir -p "$out"

./target/release/flywheel bench engine --n 1,16 --json | tee "$out/engine.jsonl"

. scripts/serve-in-background.sh
start_server "$out/server.log"
./target/release/flywheel bench http --url "http://127.0.0.1:$port" --concurrency 1,4,16 "$@" | tee "$out/http.table"
./target/release/flywheel bench http --url "http://127.0.0.1:$port" --concurrency 1,16 --json "$@" > "$out/http.jsonl"

python3 - "$out/engine.jsonl" "$out/http.jsonl" <<'PY'
import json, sys
engine = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
http = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
e16 = next(r for r in engine if r["mode"] == "engine" and r["n"] == 16)
e1 = next(r for r in engine if r["mode"] == "engine" and r["n"] == 1)
h16 = next(r for r in http if r["n"] == 16)
h1 = next(r for r in http if r["n"] == 1)
ratio = h16["tok_s"] / e16["tok_s"]
ttft = h1["ttft_ms"] / e1["ttft_ms"]
print(f"http tok/s at 16: {h16['tok_s']:.1f} vs engine {e16['tok_s']:.1f} -> {ratio:.3f}x (need >= 0.9)")
print(f"http ttft p50 at 1: {h1['ttft_ms']:.1f} ms vs engine prefill {e1['ttft_ms']:.1f} ms -> {ttft:.3f}x (need <= 1.2)")
sys.exit(0 if ratio >= 0.9 and ttft <= 1.2 else 1)
PY
