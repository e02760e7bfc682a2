#!/usr/bin/env bash
# Weir quickstart: builds Weir, starts a control plane (on a local etcd when
# one is installed, on the embedded dev store otherwise, and says which),
# shows how to reach it, and keeps running until Ctrl-C. `--exit` stops
# after that.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

exit_after=0
[ "${1:-}" = "--exit" ] && exit_after=1

ensure_deps 0   # cargo and protoc; etcd is optional here
weir_log "building weir-control-plane (first build takes a few minutes)"
cargo build --quiet -p weir-control-plane --bins
BIN=target/debug
CP_PID=

cleanup() {
  [ -n "$CP_PID" ] && kill "$CP_PID" 2>/dev/null && wait "$CP_PID" 2>/dev/null
  stop_etcd
  [ -n "${LOG_DIR:-}" ] && rm -rf "$LOG_DIR"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if command -v etcd >/dev/null 2>&1; then
  start_etcd
  store_args=(--etcd-endpoints "$ETCD_URL")
  store_note="etcd at $ETCD_URL (a private one with a throw-away data dir)"
else
  store_args=(--dev)
  store_note="the embedded dev store (etcd is not installed: 'apt-get install etcd-server' to use it)"
fi

port=7070
if ! python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',$port))" 2>/dev/null; then port=$(weir_free_port); fi
LOG_DIR=$(mktemp -d -t weir-quickstart.XXXXXX)
"$BIN/weir-control-plane" "${store_args[@]}" --grpc-addr "127.0.0.1:$port" --http-addr 127.0.0.1:0 \
  >"$LOG_DIR/ready" 2>"$LOG_DIR/control-plane.log" &
CP_PID=$!
for _ in $(seq 1 100); do
  grep -q ready "$LOG_DIR/ready" 2>/dev/null && break
  kill -0 "$CP_PID" 2>/dev/null || { cat "$LOG_DIR/control-plane.log" >&2; exit 1; }
  sleep 0.1
done
grep -q ready "$LOG_DIR/ready" || { weir_log "control plane did not start"; cat "$LOG_DIR/control-plane.log" >&2; exit 1; }
http=$(sed -n 's/.*http=\([^ ]*\).*/\1/p' "$LOG_DIR/ready")
export WEIR_ENDPOINT="http://127.0.0.1:$port"
weir_log "control plane up: gRPC $WEIR_ENDPOINT, HTTP http://$http, store: $store_note"

# weirctl is not built yet: show the registry through its readiness probe
# and point at the gRPC API (server reflection is on).
echo
echo "== GET http://$http/readyz"
curl -s "http://$http/readyz" 2>/dev/null || python3 -c "import urllib.request;print(urllib.request.urlopen('http://$http/readyz').read().decode())"
echo
cat <<MSG
Weir's control plane is running:
  gRPC API   $WEIR_ENDPOINT  (weir.registry.v1.Registry, grpc.health.v1, server reflection)
  HTTP       http://$http/healthz  http://$http/readyz
Register and watch instances with any gRPC client, e.g. with grpcurl:
  grpcurl -plaintext -d '{"instance":{"service":"orders","host":"127.0.0.1","port":8080,"ephemeral":true,"ttl_seconds":10}}' 127.0.0.1:$port weir.registry.v1.Registry/Register
  grpcurl -plaintext -d '{"namespace":"default"}' 127.0.0.1:$port weir.registry.v1.Registry/Watch
(weirctl and the sample traffic come with the next changes.) Ctrl-C here stops everything.
MSG
if [ "$exit_after" = 1 ]; then exit 0; fi
wait "$CP_PID"
