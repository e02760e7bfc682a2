#!/usr/bin/env bash
# Weir quickstart: builds Weir, starts a control plane (on a local etcd when
# one is installed, on the embedded dev store otherwise, and says which),
# registers sample instances, shows them, and keeps running until Ctrl-C so
# you can look around with weirctl. `--exit` stops after showing them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

exit_after=0
[ "${1:-}" = "--exit" ] && exit_after=1

ensure_deps 0   # cargo and protoc; etcd is optional here
weir_log "building weir-control-plane and weirctl (first build takes a few minutes)"
cargo build --quiet -p weir-control-plane -p weir-client --bins
BIN=target/debug
CP_PID= ; KA_PID=

cleanup() {
  [ -n "$KA_PID" ] && kill "$KA_PID" 2>/dev/null && wait "$KA_PID" 2>/dev/null
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

ctl() { "$BIN/weirctl" "$@"; }
for n in 1 2 3; do
  ctl register --namespace shop --service orders --id "orders-$n" --host 127.0.0.1 --port $((8080 + n)) \
    --version 1.4.2 --zone "zone-$(( (n % 2) + 1 ))" --meta team=checkout --topic order.created >/dev/null
done
for n in 1 2; do
  ctl register --namespace shop --service payments --id "payments-$n" --host 127.0.0.1 --port $((9090 + n)) \
    --protocol grpc --version 2.0.0 --topic payment.requested >/dev/null
done
# One ephemeral instance kept alive by weirctl's heartbeat loop (TTL 5 s).
ctl register --namespace shop --service inventory --id inventory-1 --host 127.0.0.1 --port 7001 \
  --ephemeral --ttl 5 --keep-alive >"$LOG_DIR/keepalive.log" 2>&1 &
KA_PID=$!
for _ in $(seq 1 50); do ctl get --namespace shop --service inventory 2>/dev/null | grep -q inventory-1 && break; sleep 0.1; done

echo
echo "== weirctl list --namespace shop"
ctl list --namespace shop
echo
echo "== weirctl get --namespace shop --service orders"
ctl get --namespace shop --service orders
echo
cat <<MSG
Weir is running. In another terminal:
  export WEIR_ENDPOINT=$WEIR_ENDPOINT
  $BIN/weirctl list                                  # services
  $BIN/weirctl get --namespace shop --service orders  # instances
  $BIN/weirctl watch --namespace shop                # live changes (Ctrl-C to stop)
  $BIN/weirctl deregister --namespace shop --service orders --id orders-3
  curl http://$http/readyz
  grpcurl -plaintext 127.0.0.1:$port list            # server reflection, if you have grpcurl
inventory-1 is ephemeral (TTL 5 s) and heartbeats from this script; it disappears
within 5 s once this script stops. Ctrl-C here stops everything.
MSG
if [ "$exit_after" = 1 ]; then exit 0; fi
wait "$CP_PID"
