# Shared shell helpers for Weir's scripts (sourced, not run).
# ensure_deps: installs protoc, curl and etcd with apt when missing.
# start_etcd / stop_etcd: a private etcd on a free loopback port.

weir_log() { printf '\033[1;34m[weir]\033[0m %s\n' "$*" >&2; }

weir_sudo() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else
    weir_log "need root to run: $* (install it yourself, then run this again)"; return 1
  fi
}

# ensure_deps [need_etcd]: cargo must exist; protoc is needed to build,
# curl by the quickstart; etcd (etcd-server) and prometheus (the metrics
# scrape test) are needed when need_etcd=1.
ensure_deps() {
  local need_etcd=${1:-1} pkgs=()
  if ! command -v cargo >/dev/null 2>&1; then
    weir_log "cargo not found: install Rust (https://rustup.rs) and run this again"; return 1
  fi
  command -v protoc >/dev/null 2>&1 || pkgs+=(protobuf-compiler)
  command -v curl >/dev/null 2>&1 || pkgs+=(curl)
  if [ "$need_etcd" = 1 ]; then
    command -v etcd >/dev/null 2>&1 || pkgs+=(etcd-server)
    command -v etcdctl >/dev/null 2>&1 || pkgs+=(etcd-client)
    command -v prometheus >/dev/null 2>&1 || pkgs+=(prometheus)
  fi
  if [ ${#pkgs[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
      weir_log "missing ${pkgs[*]} and no apt-get here: install them with your package manager"; return 1
    fi
    weir_log "installing ${pkgs[*]} with apt-get"
    weir_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    weir_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
}

weir_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null \
    || echo $(( 20000 + RANDOM % 20000 ))
}

# start_etcd: sets ETCD_URL, ETCD_PID, ETCD_DIR. Extra flags may be given.
start_etcd() {
  local cport pport
  cport=$(weir_free_port); pport=$(weir_free_port)
  while [ "$pport" = "$cport" ]; do pport=$(weir_free_port); done
  ETCD_DIR=$(mktemp -d -t weir-etcd.XXXXXX)
  ETCD_URL="http://127.0.0.1:${cport}"
  etcd --name weir --data-dir "$ETCD_DIR/data" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:${pport}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${pport}" \
    --initial-cluster "weir=http://127.0.0.1:${pport}" \
    --auto-compaction-mode=revision --auto-compaction-retention=10000 \
    --log-level error "$@" >"$ETCD_DIR/etcd.log" 2>&1 &
  ETCD_PID=$!
  for _ in $(seq 1 100); do
    if ETCDCTL_API=3 etcdctl --endpoints "$ETCD_URL" endpoint health >/dev/null 2>&1; then
      weir_log "etcd $(etcd --version | head -1 | awk '{print $3}') on $ETCD_URL (pid $ETCD_PID)"
      return 0
    fi
    if ! kill -0 "$ETCD_PID" 2>/dev/null; then break; fi
    sleep 0.1
  done
  weir_log "etcd did not start; its log:"; cat "$ETCD_DIR/etcd.log" >&2
  return 1
}

stop_etcd() {
  if [ -n "${ETCD_PID:-}" ]; then
    kill "$ETCD_PID" 2>/dev/null || true
    wait "$ETCD_PID" 2>/dev/null || true
    ETCD_PID=
  fi
  if [ -n "${ETCD_DIR:-}" ]; then rm -rf "$ETCD_DIR"; ETCD_DIR=; fi
}
