# Sourced by the benchmark scripts: start_server LOG starts ./target/release/flywheel serve
# (the default config: the default model and the example plugins) on a free port, waits
# until it is ready, and stops it when the script exits. Sets $port and $server.
start_server() {
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ./target/release/flywheel serve --listen "127.0.0.1:$port" >"$1" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "the server did not become ready; see $1" >&2
  return 1
}
