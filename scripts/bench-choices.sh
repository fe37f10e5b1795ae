#!/usr/bin/env bash
# Several choices (n) and embeddings through the openai plugin, with the official client:
# wall time and tok/s for n = 1, 4, 8 (chat, 128 tokens per choice), embedding latency and
# input tokens/s for batches of 1, 16 and 64, and a similarity sanity check. Medians of
# REPEAT runs (default 3). Needs a release build and the plugins (scripts/serve.sh builds both).
#   MODEL=smollm2 REPEAT=3 scripts/bench-choices.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/serve-in-background.sh
mkdir -p target/bench
start_server target/bench/choices-server.log
python3 - "$port" "${MODEL:-smollm2}" "${REPEAT:-3}" <<'PY'
import statistics
import sys
import time

from openai import OpenAI

port, model, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def median_time(call):
    times = []
    for _ in range(repeat):
        start = time.time()
        result = call()
        times.append(time.time() - start)
    return statistics.median(times), result


print("| n | wall | completion tokens | tok/s |")
print("|---|---|---|---|")
for n in (1, 4, 8):
    wall, r = median_time(lambda: client.chat.completions.create(
        model=model, messages=messages, n=n, max_tokens=128, temperature=0.8, seed=1,
        extra_body={"ignore_eos": True}))
    tokens = r.usage.completion_tokens
    print(f"| {n} | {wall:.2f} s | {tokens} | {tokens / wall:.1f} |")

texts = [f"sentence number {i} about the sea and ships" for i in range(64)]
client.embeddings.create(model=model, input="warm up")
print()
print("| inputs | wall | input tokens/s | dimensions |")
print("|---|---|---|---|")
for batch in (1, 16, 64):
    wall, r = median_time(lambda: client.embeddings.create(model=model, input=texts[:batch]))
    print(f"| {batch} | {wall * 1000:.0f} ms | {r.usage.prompt_tokens / wall:.0f} | {len(r.data[0].embedding)} |")
e = client.embeddings.create(model=model, input=[
    "The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew by 8 percent."]).data
cos = lambda a, b: sum(x * y for x, y in zip(a.embedding, b.embedding))
print(f"\ncosine: cat/kitten {cos(e[0], e[1]):.3f}, cat/revenue {cos(e[0], e[2]):.3f}")
PY
