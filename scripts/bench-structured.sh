#!/usr/bin/env bash
# Constrained decoding against plain decoding, through the server and the `openai` plugin:
# the same single-turn chat requests (about 64-token questions, 128 tokens generated,
# greedy) with no response_format, with `json_object`, and with a JSON Schema, at
# concurrency 1 and 16, alternating and repeated (REPEAT, default 3). Prints medians and the
# ratios to plain; the issue's bar is schema tok/s >= 0.9x plain at 16.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-3}
bash scripts/setup.sh >/dev/null
cargo build --release --bin flywheel >&2
bash scripts/build-plugins.sh >/dev/null
out="${BENCH_OUT:-target/bench/structured}"
mkdir -p "$out"
: >"$out/rows.jsonl"

. scripts/serve-in-background.sh
start_server "$out/server.log"

# At least 64 records of a string, a number and an enum: no answer can complete within the
# 128 tokens, so every request generates as many tokens as a plain one and the comparison
# is per token (json_object answers may end early: their row is shown, not judged).
schema='{"type": "json_schema", "json_schema": {"name": "records", "strict": true, "schema": {
  "type": "object", "additionalProperties": false, "required": ["records"],
  "properties": {"records": {"type": "array", "minItems": 64, "items": {
    "type": "object", "additionalProperties": false, "required": ["name", "score", "level"],
    "properties": {
      "name": {"type": "string"},
      "score": {"type": "number"},
      "level": {"enum": ["low", "medium", "high"]}}}}}}}}'
object='{"type": "json_object"}'

seed=5000
for r in $(seq 1 "$REPEAT"); do
  for mode in plain json_object schema; do
    seed=$((seed + 10))
    args=(--url "http://127.0.0.1:$port" --workload chat --turns 1 --rounds 2 --concurrency 1,16 --seed "$seed" --json)
    case $mode in
      json_object) args+=(--response-format "$object") ;;
      schema) args+=(--response-format "$schema") ;;
    esac
    ./target/release/flywheel bench http "${args[@]}" |
      python3 -c 'import json,sys; [print(json.dumps({**json.loads(l), "format": sys.argv[1], "round": int(sys.argv[2])})) for l in sys.stdin if l.startswith("{")]' "$mode" "$r" |
      tee -a "$out/rows.jsonl" >&2
  done
done

python3 - "$out/rows.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(fmt, n, key):
    return statistics.median(r[key] for r in rows if r["format"] == fmt and r["n"] == n)
def decode(fmt, n):
    # Per-request generation speed (1 / time per output token), times concurrency.
    return n * 1000.0 / med(fmt, n, "step_ms")
# Generation tok/s: concurrency / time per output token, which leaves prompt time out.
print("| format | c | tok/s | generation tok/s | TTFT p50 | tok/s / plain | generation / plain |")
print("|---|---|---|---|---|---|---|")
ok = True
for n in (1, 16):
    for fmt in ("plain", "json_object", "schema"):
        t, g = med(fmt, n, "tok_s"), decode(fmt, n)
        rt, rg = t / med("plain", n, "tok_s"), g / decode("plain", n)
        print(f"| {fmt} | {n} | {t:.1f} | {g:.1f} | {med(fmt, n, 'ttft_ms'):.0f} ms | {rt:.2f} | {rg:.2f} |")
        if fmt == "schema" and n == 16 and rt < 0.9:
            ok = False
print(f"schema tok/s at 16 vs plain: {'ok' if ok else 'BELOW 0.9x'} (need >= 0.9x)")
sys.exit(0 if ok else 1)
PY
