#!/usr/bin/env bash
# Runs Weir's whole test suite: unit tests, the store conformance suite on the
# embedded store and on a real etcd, and end-to-end tests with real
# control-plane processes. Installs protoc and etcd with apt when missing.
# Uses the etcd named by WEIR_TEST_ETCD_ENDPOINTS, or starts one on a free
# loopback port and stops it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_deps 1
if [ -z "${WEIR_TEST_ETCD_ENDPOINTS:-}" ]; then
  start_etcd
  trap stop_etcd EXIT
  export WEIR_TEST_ETCD_ENDPOINTS="$ETCD_URL"
fi
cargo build --workspace --bins
cargo test --workspace "$@"
