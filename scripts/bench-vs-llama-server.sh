#!/usr/bin/env bash
# Flywheel against llama.cpp's llama-server, side by side on this machine.
#
# Both serve the same GGUF with the same slots and per-sequence context (16 x 2048) and get
# the same streaming OpenAI requests from `flywheel bench http`. Both run through a round
# together and take each load in turn, alternating which goes first. Workloads:
#   distinct  every request its own 64-token prompt, 128 generated
#   shared    a 300-token system prompt common to the run, then a distinct 64-token question
#   chat      conversations of 4 turns (16 at c=16), each turn resending the whole history
#   long      a distinct 1,500-token prompt
# at concurrency 1, 4 and 16. Each round also runs llama.cpp's llama-batched-bench (the
# ceiling: 16 sequences in lockstep, 64 + 128 tokens) and `flywheel bench engine` at N=16.
# Prints one table of medians and ratios and writes every row to $BENCH_OUT/rows.jsonl.
#
# Settings (environment): ROUNDS (3), MODELS ("smollm2 gemma3-270m"), WORKLOADS (all),
# CONCURRENCY ("1 4 16"), LONG_CONCURRENCY (the same; 16 x 1,500 prompt tokens take about
# two minutes per server here), GEMMA_WORKLOADS ("distinct shared", at c=16 only),
# GEMMA_ROUNDS (ROUNDS), BENCH_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-"smollm2 gemma3-270m"}
WORKLOADS=${WORKLOADS:-"distinct shared chat long"}
CONCURRENCY=${CONCURRENCY:-"1 4 16"}
LONG_CONCURRENCY=${LONG_CONCURRENCY:-$CONCURRENCY}
GEMMA_WORKLOADS=${GEMMA_WORKLOADS:-"distinct shared"}
GEMMA_ROUNDS=${GEMMA_ROUNDS:-$ROUNDS}
SLOTS=16
CTX=2048
out=${BENCH_OUT:-target/bench/vs-llama-server}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rows="$out/rows.jsonl"
: >"$rows"

bash scripts/setup.sh >&2
# shellcheck disable=SC2086
python3 models/fetch.py $MODELS 2>&1 | grep -v verifying >&2 || true
cargo build --release --bin flywheel >&2
bash scripts/build-plugins.sh >/dev/null
llama_bin=$(bash scripts/build-llama-server.sh)
flywheel="$root/target/release/flywheel"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gguf_of() { python3 - "$1" <<'PY'
import sys, tomllib, pathlib
m = tomllib.loads(pathlib.Path(f"models/{sys.argv[1]}.toml").read_text())
print((pathlib.Path("models") / m["file"]).resolve())
PY
}
vocab_of() { case "$1" in gemma3-270m) echo 262144 ;; *) echo 49152 ;; esac; }

declare -A pids ports
stop_servers() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
trap stop_servers EXIT

# start_server NAME MODEL PORT: starts it in the background and waits until it answers.
start_server() {
  local name=$1 model=$2 port=$3 log="$out/$1-$2.log"
  if [ "$name" = flywheel ]; then
    cat >"$out/flywheel-$model.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[models]
dir = "$root/models"
load = ["$model"]
[plugins]
dir = "$root/.flywheel/plugins"
cache_dir = "$root/.flywheel/cache"
[log]
level = "warn"
EOF
    "$flywheel" serve --config "$out/flywheel-$model.toml" >"$log" 2>&1 &
  else
    "$llama_bin/llama-server" -m "$(gguf_of "$model")" --alias "$model" --host 127.0.0.1 --port "$port" \
      -np "$SLOTS" -c $((SLOTS * CTX)) -t 2 -tb 2 -fa on --no-webui >"$log" 2>&1 &
  fi
  local server_pid=$!
  pids[$name]=$server_pid
  for _ in $(seq 1 600); do
    if curl -fs "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then echo "$name exited; see $log" >&2; exit 1; fi
    sleep 0.2
  done
  echo "$name did not become ready; see $log" >&2
  exit 1
}

# load NAME MODEL PORT ROUND WORKLOAD C: one bench http run, its row tagged and appended.
load() {
  local name=$1 model=$2 port=$3 round=$4 workload=$5 c=$6
  local jobs=$((c == 1 ? 4 : 1)) args=(--workload "$workload")
  case "$workload" in
    long) args=(--workload distinct --prompt-tokens 1500); jobs=$((c == 1 ? 2 : 1)) ;;
    chat) jobs=1 ;;
  esac
  # The same prompts for both servers in a round, fresh ones every round, and none shared
  # between workloads: with one seed, a long prompt began with the shared workload's
  # 364-token prompt, so a server that still held it computed less of the "long" prompt.
  local kind
  case "$workload" in distinct) kind=1 ;; shared) kind=2 ;; chat) kind=3 ;; *) kind=4 ;; esac
  local seed=$((round * 1000 + c * 10 + kind))
  "$flywheel" bench http --url "http://127.0.0.1:$port" --model "$model" --vocab "$(vocab_of "$model")" \
    --concurrency "$c" --rounds "$jobs" --seed "$seed" --json "${args[@]}" |
    python3 -c '
import json, sys
tag = dict(server=sys.argv[1], model=sys.argv[2], round=int(sys.argv[3]), workload=sys.argv[4])
for line in sys.stdin:
    if line.startswith("{"):
        row = json.loads(line); row.update(tag); print(json.dumps(row))
' "$name" "$model" "$round" "$workload" >>"$rows"
  tail -n 1 "$rows" | python3 -c 'import json, sys; r = json.loads(sys.stdin.read()); print("  %-12s %-12s round %d %-8s c=%-3d %7.1f tok/s  ttft p50 %8.1f ms  errors %d" % (r["server"], r["model"], r["round"], r["workload"], r["n"], r["tok_s"], r["ttft_ms"], r["errors"]))' >&2
}

peak_rss_row() { # NAME MODEL ROUND
  local kib
  kib=$(awk '/VmHWM/ {print $2}' "/proc/${pids[$1]}/status")
  echo "{\"bench\":\"rss\",\"server\":\"$1\",\"model\":\"$2\",\"round\":$3,\"peak_rss_kib\":$kib}" >>"$rows"
}

for model in $MODELS; do
  workloads=$WORKLOADS; concs=$CONCURRENCY
  rounds=$ROUNDS
  if [ "$model" = gemma3-270m ]; then workloads=$GEMMA_WORKLOADS; concs=16; rounds=$GEMMA_ROUNDS; fi
  for round in $(seq 1 "$rounds"); do
    order="flywheel llama-server"
    if [ $((round % 2)) -eq 0 ]; then order="llama-server flywheel"; fi
    # Both servers stay up for the round (an idle one takes no CPU) and take each load in
    # turn, so a slow spell of this shared VM, which lasts minutes, falls on both.
    for name in flywheel llama-server; do
      ports[$name]=$(free_port)
      echo "round $round: $name serving $model on port ${ports[$name]}" >&2
      start_server "$name" "$model" "${ports[$name]}"
    done
    for w in $workloads; do
      cs=$concs
      if [ "$w" = long ] && [ "$model" != gemma3-270m ]; then cs=$LONG_CONCURRENCY; fi
      for c in $cs; do
        for name in $order; do
          load "$name" "$model" "${ports[$name]}" "$round" "$w" "$c"
        done
      done
    done
    for name in flywheel llama-server; do peak_rss_row "$name" "$model" "$round"; done
    stop_servers
    if [ "$model" = smollm2 ]; then
      # The ceiling and the native loop, same shape, no server running.
      "$llama_bin/llama-batched-bench" -m "$(gguf_of "$model")" -c 4096 -b 512 -ub 512 -npp 64 -ntg 128 -npl 16 \
        -t 2 -tb 2 -fa on --output-format jsonl 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line)
        print(json.dumps(dict(bench="batched-bench", model=sys.argv[1], round=int(sys.argv[2]), n=r["pl"],
                              tok_s=r["speed_tg"], total_tok_s=r["speed"], gen_tok_s=r["pl"] * r["tg"] / r["t"])))
' "$model" "$round" >>"$rows"
      "$flywheel" bench engine --model "$model" --n 16 --repeat 1 --json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line); r.update(model=sys.argv[1], round=int(sys.argv[2])); print(json.dumps(r))
' "$model" "$round" >>"$rows"
    fi
  done
done

python3 scripts/bench_compare_table.py "$rows" | tee "$out/table.md"
