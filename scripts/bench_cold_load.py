"""Cold and warm first-token times and RSS of a running Flywheel server (see
scripts/bench-cold-load.sh, which starts the server and calls this)."""

import argparse
import http.client
import json
import statistics
import time
import urllib.parse
import urllib.request


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def admin(url, key, method, path):
    req = urllib.request.Request(url + path, method=method, headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def first_token_ms(url, model):
    """Send one streaming completion; milliseconds until its first token's event."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                       "temperature": 0, "stream": True})
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{model}: HTTP {resp.status}: {resp.read()[:300]!r}")
    first = None
    for line in resp:
        if line.startswith(b"data: ") and b'"text"' in line and first is None:
            first = (time.perf_counter() - started) * 1000
        if line.strip() == b"data: [DONE]":
            break
    conn.close()
    if first is None:
        raise SystemExit(f"{model}: the stream carried no token")
    return first


def wait_rss_settles(pid, seconds=2.0):
    """RSS once it stops falling (the decode thread frees memory just after an unload)."""
    last = rss_mib(pid)
    until = time.time() + seconds
    while time.time() < until:
        time.sleep(0.1)
        now = rss_mib(pid)
        if abs(now - last) < 1:
            return now
        last = now
    return last


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--admin-key", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("models", nargs="+")
    a = p.parse_args()
    rows = []
    for rnd in range(a.rounds):
        for model in a.models:
            for m in a.models:  # every model unloaded: the RSS below is this model's alone
                admin(a.url, a.admin_key, "POST", f"/admin/models/{m}/unload")
            unloaded = wait_rss_settles(a.pid)
            cold = first_token_ms(a.url, model)
            load_ms = admin(a.url, a.admin_key, "GET", f"/admin/models/{model}")["last_load_ms"]
            loaded = rss_mib(a.pid)
            warm = first_token_ms(a.url, model)
            rows.append({"round": rnd, "model": model, "cold_first_token_ms": cold, "warm_first_token_ms": warm,
                         "load_ms": load_ms, "rss_unloaded_mib": unloaded, "rss_loaded_mib": loaded})
            print(f"round {rnd} {model}: cold {cold:.0f} ms (load {load_ms} ms), warm {warm:.0f} ms, "
                  f"RSS {unloaded:.0f} -> {loaded:.0f} MiB", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print()
    print("| model | first token after unload (cold) | of which the load | first token, loaded (warm) "
          "| RSS unloaded | RSS loaded |")
    print("|---|---|---|---|---|---|")
    for model in a.models:
        rs = [r for r in rows if r["model"] == model]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"| {model} | {med('cold_first_token_ms'):.0f} ms | {med('load_ms'):.0f} ms "
              f"| {med('warm_first_token_ms'):.0f} ms | {med('rss_unloaded_mib'):.0f} MiB "
              f"| {med('rss_loaded_mib'):.0f} MiB |")
    print(f"\n(medians of {a.rounds} rounds; RSS of the whole server, every other model unloaded)")


if __name__ == "__main__":
    main()
