#!/usr/bin/env bash
# Weir quickstart: builds Weir, starts a control plane (on a local etcd when
# one is installed, on the embedded dev store otherwise, and says which),
# registers a few sample instances with weirctl (one of them ephemeral, kept
# alive by a background `weirctl register --keep-alive`), shows them, and
# keeps running until Ctrl-C. `--exit` stops after that.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

exit_after=0
[ "${1:-}" = "--exit" ] && exit_after=1

ensure_deps 0   # cargo and protoc; etcd is optional here
weir_log "building weir-control-plane and weirctl (first build takes a few minutes)"
cargo build --quiet -p weir-control-plane -p weirctl --bins
BIN=target/debug
CP_PID=
KEEPER_PID=

cleanup() {
  set +e
  # The keeper deregisters its instance on SIGTERM; then the control plane.
  for pid in $KEEPER_PID $CP_PID; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
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

weirctl() { "$BIN/weirctl" "$@"; }
weir_log "registering sample instances"
weirctl register orders --host 127.0.0.1 --port 8081 --id orders-1 --version 1.4.0 --zone a --meta team=shop >/dev/null
weirctl register orders --host 127.0.0.1 --port 8082 --id orders-2 --version 1.4.0 --zone b --meta team=shop >/dev/null
weirctl register payments --host 127.0.0.1 --port 9090 --id payments-1 --protocol grpc --topic payments.requested >/dev/null
# Two actively checked ones: the control plane's own HTTP endpoint (healthy),
# and a TCP check on a port nothing listens on (goes CRITICAL in ~2 s).
http_port=${http##*:}
weirctl register status-page --host 127.0.0.1 --port "$http_port" --id status-1 --check http:/healthz >/dev/null
weirctl register legacy --host 127.0.0.1 --port "$(weir_free_port)" --id legacy-1 --check tcp >/dev/null
# An ephemeral instance on a 6 s lease, renewed in the background by weirctl.
"$BIN/weirctl" register inventory --host 127.0.0.1 --port 8090 --id inventory-1 --ttl 6 --keep-alive \
  >/dev/null 2>"$LOG_DIR/keeper.log" &
KEEPER_PID=$!
for _ in $(seq 1 50); do
  weirctl get inventory 2>/dev/null | grep -q inventory-1 && break
  sleep 0.1
done

echo
echo "\$ weirctl list"
weirctl list
echo
echo "\$ weirctl get orders"
weirctl get orders
for _ in $(seq 1 50); do
  weirctl get legacy 2>/dev/null | grep -q critical && break
  sleep 0.1
done
echo
echo "\$ weirctl get legacy"
weirctl get legacy
echo
echo "\$ weirctl health status-page"
weirctl health status-page
echo
echo "\$ weirctl policy set -f docs/examples/orders-policy.yaml"
weirctl policy set -f docs/examples/orders-policy.yaml
echo "\$ weirctl policy list"
weirctl policy list
echo
cat <<MSG
Weir's control plane is running:
  gRPC API   $WEIR_ENDPOINT  (weir.registry.v1.Registry, grpc.health.v1, server reflection)
  HTTP       http://$http/healthz  http://$http/readyz
  store      $store_note
Try, in another terminal (WEIR_ENDPOINT=$WEIR_ENDPOINT; weirctl is $PWD/$BIN/weirctl):
  weirctl watch                        # live changes in the default namespace
  weirctl get inventory -o json        # the ephemeral one, on a lease weirctl renews
  weirctl register orders --host 127.0.0.1 --port 8083 --ttl 5   # gone after 5 s: no heartbeats
  weirctl deregister orders orders-2
  weirctl health legacy                # status history with reasons
  weirctl policy get orders            # the traffic policy the agents will enforce
  weirctl policy status orders         # which agents run it (none until the agent lands)
grpcurl works too, without the .proto (server reflection):
  grpcurl -plaintext -d '{"namespace":"default"}' 127.0.0.1:$port weir.registry.v1.Registry/Watch
Agents, sample event traffic and the dashboard come with later stages. Ctrl-C here stops everything.
MSG
if [ "$exit_after" = 1 ]; then exit 0; fi
wait "$CP_PID"
