#!/usr/bin/env bash
# Weir quickstart: builds Weir, starts a control plane (on a local etcd when
# one is installed, on the embedded dev store otherwise, and says which),
# registers a few instances with weirctl (one of them ephemeral, kept alive
# by a background `weirctl register --keep-alive`), then starts two agents
# (node-a, node-b) and sample services built from this workspace
# (weir-sample): four `orders` instances, two per node, one of them answering
# every 10th event with 503 and one answering 20 ms late, and one `checkout`
# per node sending CloudEvents to `orders` through its own node's agent. The
# agents keep a durable outbox (--data-dir, --durable-by-default true), and
# two more samples, `billing` (node-a) and `shipping` (node-b), subscribe to
# the topic orders.created: the script publishes 100 events to it through
# node-a's agent, stops shipping for a while partway and starts it again,
# and shows that both got every event. Before
# the traffic starts it sets a policy for `orders` with weirctl (peak EWMA
# balancing, retries with a budget, a total timeout, a circuit breaker per
# instance, a rate limit on sample.bulk events) and waits until both
# agents applied it. It sends a burst of sample.bulk events (the limit
# refuses most with 429) and makes orders-a1 fail for 3 s (the agents'
# breakers for it open, and close again once it recovers). It shows the registry, how many events each orders
# instance got, how many the agents retried, what the senders saw (no failed
# events), what billing and shipping received and the outboxes' pending
# deliveries, says what to try, and keeps running until Ctrl-C. `--exit` stops
# after printing (exit status 1 when a subscriber missed topic events).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

exit_after=0
[ "${1:-}" = "--exit" ] && exit_after=1

ensure_deps 0   # cargo, protoc and curl; etcd is optional here
weir_log "building weir-control-plane, weirctl, weir-agent and weir-sample (first build takes a few minutes)"
cargo build --quiet -p weir-control-plane -p weirctl -p weir-agent -p weir-tests --bins
BIN=$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)
RATE=20             # events per second from each checkout
REPORT_EVERY=5      # seconds between checkout's report lines
FAIL_EVERY=10       # orders-a2 answers every FAIL_EVERY-th event with 503
SLOW_MS=20          # orders-b2 answers every event SLOW_MS late
TOPIC=orders.created
TOPIC_EVENTS=100    # published to TOPIC through node-a's agent,
TOPIC_RATE=20       # at about TOPIC_RATE events per second
AWAY_AFTER=30       # shipping-b1 stops once it has this many events
BACK_AFTER=70       # and starts again after this many were published

# Stopped in this order: samples and the keeper deregister their instances
# on SIGTERM, agents close their sessions, then the control plane goes.
SAMPLE_PIDS=()
AGENT_PIDS=()
CP_PIDS=()
LOG_DIR=

stop_pids() {
  local pid
  for pid in "$@"; do kill "$pid" 2>/dev/null; done
  for pid in "$@"; do wait "$pid" 2>/dev/null; done
}

cleanup() {
  set +e
  stop_pids ${SAMPLE_PIDS[@]+"${SAMPLE_PIDS[@]}"}
  stop_pids ${AGENT_PIDS[@]+"${AGENT_PIDS[@]}"}
  stop_pids ${CP_PIDS[@]+"${CP_PIDS[@]}"}
  stop_etcd
  [ -n "$LOG_DIR" ] && rm -rf "$LOG_DIR"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
LOG_DIR=$(mktemp -d -t weir-quickstart.XXXXXX)

# start_ready NAME GROUP COMMAND...: starts COMMAND in the background
# (stdout to $LOG_DIR/NAME.out, stderr to $LOG_DIR/NAME.log), adds its pid
# to the array GROUP (for cleanup), and waits up to 30 s for the ready line
# Weir's binaries print first on stdout. Sets READY_PID and READY_LINE.
start_ready() {
  local name=$1 group=$2 _
  shift 2
  "$@" >"$LOG_DIR/$name.out" 2>"$LOG_DIR/$name.log" &
  READY_PID=$!
  eval "$group+=(\"\$READY_PID\")"
  for _ in $(seq 1 300); do
    READY_LINE=$(head -n 1 "$LOG_DIR/$name.out" 2>/dev/null)
    case $READY_LINE in *" ready "*) return 0 ;; esac
    if ! kill -0 "$READY_PID" 2>/dev/null; then
      weir_log "$name exited before it was ready; its log:"
      tail -n 20 "$LOG_DIR/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
  weir_log "$name printed no ready line within 30 s; its log:"
  tail -n 20 "$LOG_DIR/$name.log" >&2
  return 1
}

# ready_field NAME: the value after NAME= in the last ready line.
ready_field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$READY_LINE"; }

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
start_ready control-plane CP_PIDS "$BIN/weir-control-plane" "${store_args[@]}" \
  --grpc-addr "127.0.0.1:$port" --http-addr 127.0.0.1:0 || exit 1
http=$(ready_field http)
export WEIR_ENDPOINT="http://127.0.0.1:$port"
weir_log "control plane up: gRPC $WEIR_ENDPOINT, HTTP http://$http, store: $store_note"

weirctl() { "$BIN/weirctl" "$@"; }
weir_log "registering instances with weirctl"
weirctl register payments --host 127.0.0.1 --port 9090 --id payments-1 --protocol grpc --topic payments.requested >/dev/null
# Two actively checked ones: the control plane's own HTTP endpoint (healthy),
# and a TCP check on a port nothing listens on (goes CRITICAL in ~2 s).
weirctl register status-page --host 127.0.0.1 --port "${http##*:}" --id status-1 --check http:/healthz >/dev/null
weirctl register legacy --host 127.0.0.1 --port "$(weir_free_port)" --id legacy-1 --check tcp >/dev/null
# An ephemeral instance on a 6 s lease, renewed in the background by weirctl.
"$BIN/weirctl" register inventory --host 127.0.0.1 --port 8090 --id inventory-1 --ttl 6 --keep-alive \
  >/dev/null 2>"$LOG_DIR/keeper.log" &
SAMPLE_PIDS+=($!)

# Two agents, one per "node"; each prints its ingress and admin addresses.
# Each keeps its outbox (what is published to topics) in its own data dir,
# and fsyncs every publish before answering it. They keep one trace in 10
# (and every failed or slow one) to show; the default is 1%.
for node in a b; do
  start_ready "agent-$node" AGENT_PIDS "$BIN/weir-agent" --node-id "node-$node" --zone "$node" \
    --control-plane "$WEIR_ENDPOINT" --ingress-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
    --registry-addr 127.0.0.1:0 --data-dir "$LOG_DIR/agent-$node-data" --durable-by-default true \
    --trace-sample-rate 0.1 || exit 1
  printf -v "INGRESS_$node" '%s' "$(ready_field ingress)"
  printf -v "ADMIN_$node" '%s' "$(ready_field admin)"
  printf -v "REGISTRY_$node" '%s' "$(ready_field registry)"
done
weir_log "agents up: node-a ingress http://$INGRESS_a, node-b ingress http://$INGRESS_b"

# start_sample ZONE ID [FLAGS...]: weir-sample instance ID of the service
# ID names (orders-a1: orders) on node-ZONE, registered with node-ZONE's
# agent, which holds it on its node session. Sets PID_<id> and ADDR_<id>
# (dashes as underscores).
start_sample() {
  local zone=$1 id=$2 registry
  shift 2
  registry=REGISTRY_$zone
  start_ready "$id" SAMPLE_PIDS "$BIN/weir-sample" --service "${id%-*}" --instance-id "$id" \
    --zone "$zone" --node "node-$zone" --registry "http://${!registry}" "$@" || exit 1
  printf -v "PID_${id//-/_}" '%s' "$READY_PID"
  printf -v "ADDR_${id//-/_}" '%s' "$(ready_field addr)"
}
ORDERS=(orders-a1 orders-a2 orders-b1 orders-b2)
# The zone is the letter in the id: orders-a1 and orders-a2 on node-a,
# orders-b1 and orders-b2 on node-b. Each node has one normal instance and
# one that misbehaves: orders-a2 fails now and then, orders-b2 is slow.
declare -A ORDERS_FLAGS=([orders-a2]="--fail-every $FAIL_EVERY" [orders-b2]="--delay-ms $SLOW_MS")
declare -A ORDERS_ROLE=([orders-a2]="503 every ${FAIL_EVERY}th" [orders-b2]="${SLOW_MS} ms late")
for id in "${ORDERS[@]}"; do
  read -ra flags <<<"${ORDERS_FLAGS[$id]:-}"
  start_sample "${id: -2:1}" "$id" ${flags[@]+"${flags[@]}"}
done
# The subscribers of TOPIC: one billing instance on node-a, one shipping
# instance on node-b.
start_sample a billing-a1 --topic "$TOPIC"
start_sample b shipping-b1 --topic "$TOPIC"

# routes_to ADMIN SERVICE: how many endpoints that agent routes SERVICE to.
routes_to() {
  curl -fsS "http://$1/v1/state" 2>/dev/null \
    | sed -n "s/.*\"service\":\"$2\",[^]]*\"endpoints\":\[\([^]]*\)\].*/\1/p" \
    | grep -o '"id":' | wc -l
}
for node in a b; do
  admin_var=ADMIN_$node
  for _ in $(seq 1 100); do
    [ "$(routes_to "${!admin_var}" orders)" -eq ${#ORDERS[@]} ] && break
    sleep 0.1
  done
  if [ "$(routes_to "${!admin_var}" orders)" -ne ${#ORDERS[@]} ]; then
    weir_log "after 10 s agent node-$node does not route orders to ${#ORDERS[@]} instances:"
    curl -fsS "http://${!admin_var}/v1/state" >&2 || true
    exit 1
  fi
done
weir_log "both agents route orders to ${ORDERS[*]}"
# subscribed NODE SERVICE: whether node-NODE's agent has SERVICE subscribed
# to TOPIC through a registered instance listing it.
subscribed() {
  local admin_var=ADMIN_$1
  curl -fsS "http://${!admin_var}/v1/state" 2>/dev/null \
    | grep -q "\"topic\":\"$TOPIC\",\"service\":\"$2\",\"listed\":true"
}
for node in a b; do
  admin_var=ADMIN_$node
  for _ in $(seq 1 100); do
    subscribed "$node" billing && subscribed "$node" shipping && break
    sleep 0.1
  done
  if ! { subscribed "$node" billing && subscribed "$node" shipping; }; then
    weir_log "after 10 s agent node-$node does not have billing and shipping subscribed to $TOPIC:"
    curl -fsS "http://${!admin_var}/v1/state" >&2 || true
    exit 1
  fi
done
weir_log "both agents have billing and shipping subscribed to $TOPIC"

# json_num NAME JSON: the number after "NAME": in JSON.
json_num() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" <<<"$2"; }

# The policy for orders, set before any traffic: the agents balance by peak
# EWMA (latency-aware), retry a 503, a refused connection or a reset on
# another instance (3 attempts, retries at most 20% of requests) and give
# each event 2 s in all; each instance has a circuit breaker (open after 3
# failures in a row, for 2 s and doubling while its probes fail), and
# events of type sample.bulk are limited to 5/s (burst 5) per agent.
cat >"$LOG_DIR/orders-policy.yaml" <<'YAML'
service: orders
loadBalancer: { algorithm: PEAK_EWMA }
retry: { attempts: 3, retryOn: [CONNECT_FAILURE, HTTP_5XX, RESET], budgetPercent: 20 }
timeout: { totalMs: 2000 }
circuitBreaker: { consecutiveFailures: 3, openMs: 2000, maxEjectionPercent: 50 }
rules:
  - name: bulk
    match: { typeExact: sample.bulk }
    rateLimit: { requestsPerSecond: 5, burst: 5 }
YAML
echo
echo "\$ cat orders-policy.yaml && weirctl policy set -f orders-policy.yaml"
cat "$LOG_DIR/orders-policy.yaml"
weirctl policy set -f "$LOG_DIR/orders-policy.yaml"
for _ in $(seq 1 100); do
  [ "$(json_num applied "$(weirctl policy status orders -o json 2>/dev/null)")" = 2 ] && break
  sleep 0.1
done
echo "\$ weirctl policy status orders"
weirctl policy status orders
if [ "$(json_num applied "$(weirctl policy status orders -o json 2>/dev/null)")" != 2 ]; then
  weir_log "after 10 s the two agents have not both applied the orders policy"
  exit 1
fi

weir_log "starting the checkouts ($RATE events/s each)"
start_sample a checkout-a1 --emit-to orders --agent "http://$INGRESS_a" --rate "$RATE" --report-every "$REPORT_EVERY"
start_sample b checkout-b1 --emit-to orders --agent "http://$INGRESS_b" --rate "$RATE" --report-every "$REPORT_EVERY"

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

# The topic, while the checkouts run: TOPIC_EVENTS events published to
# TOPIC through node-a's agent. shipping-b1 stops (SIGTERM: it deregisters;
# the subscription is retained) once it has AWAY_AFTER events and starts
# again after BACK_AFTER were published; what was published meanwhile
# waits in node-a's outbox.
# received_by ID: the events sample ID received (its /stats), 0 if down.
received_by() {
  local addr_var=ADDR_${1//-/_} n
  n=$(json_num received "$(curl -fsS "http://${!addr_var}/stats" 2>/dev/null || echo '{}')")
  echo "${n:-0}"
}
# outbox_pending NODE: node-NODE's agent's pending deliveries (/v1/state).
outbox_pending() {
  local admin_var=ADMIN_$1
  curl -fsS "http://${!admin_var}/v1/state" 2>/dev/null | grep -o '"outbox":{[^}]*}' \
    | sed -n 's/.*"pending":\([0-9]*\).*/\1/p'
}
# stop_sample ID: stops sample ID (SIGTERM: it deregisters) and forgets
# its pid.
stop_sample() {
  local pid_var=PID_${1//-/_} pid keep=()
  stop_pids "${!pid_var}" || true
  for pid in "${SAMPLE_PIDS[@]}"; do [ "$pid" = "${!pid_var}" ] || keep+=("$pid"); done
  SAMPLE_PIDS=(${keep[@]+"${keep[@]}"})
}
# publish SEQ: publishes event SEQ; prints the HTTP status (000: no answer).
publish() {
  curl -sS -o "$LOG_DIR/publish.json" -w '%{http_code}' --max-time 5 \
    "http://$INGRESS_a/v1/topics/$TOPIC" -H 'ce-specversion: 1.0' -H "ce-id: order-$1" \
    -H 'ce-source: /quickstart' -H "ce-type: $TOPIC" -H 'content-type: application/json' \
    -d "{\"order\":$1}" 2>>"$LOG_DIR/publish.log" || true
}
weir_log "publishing $TOPIC_EVENTS events to $TOPIC through node-a's agent ($TOPIC_RATE/s); shipping-b1 goes away for a while"
# start_pace SEQ: the publishing runs at TOPIC_RATE/s from now on, after
# event SEQ. pace_from SEQ: after event SEQ, sleeps until the next is due.
start_pace() { pace_t0=$EPOCHREALTIME pace_seq=$1; }
pace_from() {
  sleep "$(awk -v t0="${pace_t0/,/.}" -v now="${EPOCHREALTIME/,/.}" -v n=$(( $1 - pace_seq )) -v r="$TOPIC_RATE" \
    'BEGIN { d = t0 + n / r - now; printf "%.3f", (d > 0 ? d : 0) }')"
}
published=0 publish_codes='' first_answer='' shipping_before=0 away_pending='?' away_sub=
start_pace 0
for seq in $(seq 1 "$TOPIC_EVENTS"); do
  if [ "$seq" = $(( AWAY_AFTER + 1 )) ]; then
    # Stop shipping-b1 once it has all published so far, so its count
    # before it went away is known.
    for _ in $(seq 1 50); do
      [ "$(received_by shipping-b1)" -ge "$published" ] && break
      sleep 0.1
    done
    shipping_before=$(received_by shipping-b1)
    stop_sample shipping-b1
    mv "$LOG_DIR/shipping-b1.log" "$LOG_DIR/shipping-b1.1.log"
    weir_log "stopped shipping-b1 after $shipping_before events; publishing on"
    start_pace "$AWAY_AFTER"
  fi
  if [ "$seq" = $(( BACK_AFTER + 1 )) ]; then
    away_pending=$(outbox_pending a)
    admin_var=ADMIN_a
    away_sub=$(curl -fsS "http://${!admin_var}/v1/state" 2>/dev/null \
      | grep -o "\"topic\":\"$TOPIC\",\"service\":\"shipping\",\"listed\":[a-z]*" | sed 's/.*://')
    start_sample b shipping-b1 --topic "$TOPIC"
    weir_log "started shipping-b1 again (node-a's outbox holds ${away_pending:-?} deliveries for it)"
    start_pace "$BACK_AFTER"
  fi
  code=$(publish "$seq")
  if [ "$code" = 202 ]; then
    published=$(( published + 1 ))
    [ -n "$first_answer" ] || first_answer=$(cat "$LOG_DIR/publish.json")
  else
    publish_codes+=" $seq:$code"
  fi
  pace_from "$seq"
done
# Wait, at most 15 s, until billing and shipping have every event and no
# delivery is pending.
topic_done() {
  [ "$(received_by billing-a1)" -ge "$published" ] \
    && [ $(( shipping_before + $(received_by shipping-b1) )) -ge "$published" ] \
    && [ "$(outbox_pending a)" = 0 ] && [ "$(outbox_pending b)" = 0 ]
}
for _ in $(seq 1 150); do
  topic_done && break
  sleep 0.1
done

# A rate limit biting: BULK_EVENTS events of type sample.bulk sent one after
# another through node-a's agent, against the bulk rule's 5/s (burst 5).
BULK_EVENTS=30
weir_log "sending $BULK_EVENTS sample.bulk events to orders through node-a's agent (limited to 5/s)"
bulk_ok=0 bulk_limited=0 bulk_other=0
for seq in $(seq 1 "$BULK_EVENTS"); do
  code=$(curl -sS -o /dev/null -D "$LOG_DIR/bulk.headers" -w '%{http_code}' --max-time 5 \
    "http://$INGRESS_a/v1/services/orders/events" -H 'ce-specversion: 1.0' -H "ce-id: bulk-$seq" \
    -H 'ce-source: /quickstart' -H 'ce-type: sample.bulk' -d '{}' 2>>"$LOG_DIR/bulk.log" || true)
  case $code in
    2??) bulk_ok=$(( bulk_ok + 1 )) ;;
    429) bulk_limited=$(( bulk_limited + 1 )); cp "$LOG_DIR/bulk.headers" "$LOG_DIR/bulk-429.headers" ;;
    *) bulk_other=$(( bulk_other + 1 )) ;;
  esac
done

# A breaker opening: orders-a1 answers every event 503 for OUTAGE_MS (its
# POST /outage); each agent's breaker for it opens after 3 failures in a row
# and its events go to the other three; half-open probes bring it back.
OUTAGE_MS=3000
# breaker_states: each agent's breaker for orders-a1 ("node-a open, node-b
# closed"), from weirctl governance.
breaker_states() {
  weirctl governance orders --all -o json 2>/dev/null | grep -o '{[^{}]*"instance_id":"orders-a1"[^{}]*}' \
    | sed -n 's/.*"node":"\([^"]*\)".*"state":"\([^"]*\)".*/\1 \2/p' | sort | paste -sd, - | sed 's/,/, /g'
}
weir_log "orders-a1 answers every event 503 for $OUTAGE_MS ms"
curl -fsS -X POST "http://$ADDR_orders_a1/outage?ms=$OUTAGE_MS" >/dev/null
breaker_open=
for _ in $(seq 1 50); do
  if weirctl governance orders -o json 2>/dev/null | grep -q '"instance_id":"orders-a1"[^}]*"state":"open"'; then
    breaker_open=1
    break
  fi
  sleep 0.1
done
echo
echo "\$ weirctl governance orders     # while orders-a1 is failing"
weirctl governance orders || true
breaker_closed=
for _ in $(seq 1 150); do
  if [ -n "$breaker_open" ] && ! weirctl governance orders -o json 2>/dev/null | grep -q '"state":"\(open\|half_open\)"'; then
    breaker_closed=1
    break
  fi
  sleep 0.1
done

# The checkouts' first report lines come after REPORT_EVERY seconds.
for _ in $(seq 1 $(( (REPORT_EVERY + 5) * 10 ))); do
  if grep -q 'weir-sample report' "$LOG_DIR/checkout-a1.out" \
    && grep -q 'weir-sample report' "$LOG_DIR/checkout-b1.out"; then break; fi
  sleep 0.1
done

# ewma_of ADMIN ID: that agent's peak EWMA latency estimate for endpoint
# ID, in ms with one decimal ("-" before it has one).
ewma_of() {
  curl -fsS "http://$1/v1/state" 2>/dev/null | grep -o "\"id\":\"$2\"[^}]*" \
    | sed -n 's/.*"ewma_ms":\([0-9.]*\).*/\1/p' | awk '{ printf "%.1f", $1; f = 1 } END { if (!f) printf "-" }'
}
# orders_metric ADMIN NAME: the sum of the agent's series NAME for orders,
# and for a labelled counter also its non-zero series as label=value.
orders_metric() {
  curl -fsS "http://$1/metrics" 2>/dev/null | awk -v name="$2" '
    index($0, name "{") == 1 && /service="orders"/ {
      sum += $NF
      if ($NF != 0 && match($0, /on="[^"]*"/)) by = by " " substr($0, RSTART + 4, RLENGTH - 5) "=" $NF
    }
    END { printf "%d%s", sum, by }'
}

echo
echo "Event traffic: checkout-a1 (node-a) and checkout-b1 (node-b) each send $RATE CloudEvents/s to"
echo "orders through their own node's agent; each agent balances them by peak EWMA over all four"
echo "instances (ewma: node-a's/node-b's latency estimate in ms, from /v1/state):"
total=0
declare -A received from
for id in "${ORDERS[@]}"; do
  addr_var=ADDR_${id//-/_}
  stats=$(curl -fsS "http://${!addr_var}/stats" || echo '{}')
  received[$id]=$(json_num received "$stats")
  received[$id]=${received[$id]:-0}
  from[$id]=$(grep -o '"/checkout/[^"]*":[0-9]*' <<<"$stats" | sed 's|"/checkout/\([^"]*\)":\([0-9]*\)|\1 \2|' | paste -sd, - | sed 's/,/, /g')
  total=$(( total + received[$id] ))
done
failed_503=$(( ${received[orders-a2]} / FAIL_EVERY ))
for id in "${ORDERS[@]}"; do
  ewma=
  for node in a b; do
    admin_var=ADMIN_$node
    ewma+="${ewma:+/}$(ewma_of "${!admin_var}" "$id")"
  done
  awk -v id="$id" -v node="node-${id: -2:1}" -v role="${ORDERS_ROLE[$id]:-normal}" -v n="${received[$id]}" \
    -v t="$total" -v ewma="$ewma" -v from="${from[$id]}" \
    'BEGIN { printf "  %-10s %-7s %-15s %5d events %5.1f%%  ewma %-9s  from %s\n", id, node, role, n, t ? 100 * n / t : 0, ewma, from }'
done
retries=0 retries_by='' budget=0 timeouts=0 ejections=0
for node in a b; do
  admin_var=ADMIN_$node
  read -r n by <<<"$(orders_metric "${!admin_var}" weir_agent_retries_total)"
  retries=$(( retries + n ))
  retries_by+="${retries_by:+, }node-$node ${by:-none}"
  budget=$(( budget + $(orders_metric "${!admin_var}" weir_agent_retry_budget_exhausted_total) ))
  timeouts=$(( timeouts + $(orders_metric "${!admin_var}" weir_agent_timeouts_total) ))
  ejections=$(( ejections + $(orders_metric "${!admin_var}" weir_agent_ejections_total) ))
done
echo "orders-a2 answered $failed_503 events with 503; the agents made $retries retries, each on another instance"
echo "(weir_agent_retries_total: $retries_by); refused by the retry budget: $budget, timeouts: $timeouts, ejections: $ejections."
echo "What the senders saw (/stats emitted, and their latest report line, every ${REPORT_EVERY} s):"
senders_failed=0
for id in checkout-a1 checkout-b1; do
  addr_var=ADDR_${id//-/_}
  emitted=$(curl -fsS "http://${!addr_var}/stats" || echo '{}')   # its "emitted" totals
  sent=$(json_num sent "$emitted") failed=$(json_num failed "$emitted")
  senders_failed=$(( senders_failed + ${failed:-0} ))
  line=$(grep 'weir-sample report' "$LOG_DIR/$id.out" | tail -n 1)
  printf '  %-11s sent %4s, failed %s   last %s s: %s\n' "$id" "${sent:-?}" "${failed:-?}" "$REPORT_EVERY" \
    "${line:+${line#* to=orders }}"
done
if [ "$senders_failed" = 0 ]; then
  echo "No event failed: the 503s were retried on another instance, so the senders saw none."
else
  echo "$senders_failed events failed (the reasons: by_reason in each checkout's /stats)."
fi
echo
echo "Topic $TOPIC: node-a's agent accepted $published of $TOPIC_EVENTS events (202, each fsync'd first:"
echo "--durable-by-default true); the first answer: $first_answer"
[ -z "$publish_codes" ] || echo "Not accepted (event:status):$publish_codes (curl's errors: $LOG_DIR/publish.log)"
case $away_sub in
  false) away_sub="its subscription retained (listed: false)" ;;
  '') away_sub="its subscription gone" ;;
  *) away_sub="its subscription listed: $away_sub" ;;
esac
echo "shipping-b1 stopped after event $AWAY_AFTER and started again after event $BACK_AFTER; meanwhile, with"
echo "$away_sub, node-a's outbox held ${away_pending:-?} pending deliveries."
echo "What the subscribers received (/stats):"
billing=$(received_by billing-a1)
shipping_after=$(received_by shipping-b1)
shipping=$(( shipping_before + shipping_after ))
topic_missing=0
for sub in "billing billing-a1 node-a $billing" "shipping shipping-b1 node-b $shipping"; do
  read -r svc id node n <<<"$sub"
  note=
  [ "$svc" = shipping ] && note=" ($shipping_before before it stopped, $shipping_after after it came back)"
  if [ "$n" -lt "$published" ]; then
    note+="  MISSING $(( published - n ))"
    topic_missing=1
  fi
  printf '  %-9s %-12s %-7s received %3d of %d%s\n' "$svc" "$id" "$node" "$n" "$published" "$note"
done
echo "  outbox pending: node-a $(outbox_pending a), node-b $(outbox_pending b)"
if [ "$topic_missing" = 0 ] && [ "$published" = "$TOPIC_EVENTS" ]; then
  echo "Both subscribers got every event, shipping too: what was published while it was away waited in the outbox."
else
  topic_missing=1
  weir_log "topic $TOPIC: not every event was published and received within 15 s (see above)"
fi
echo
echo "Rate limit: of $BULK_EVENTS sample.bulk events sent one after another, $bulk_ok were accepted and $bulk_limited"
echo "refused at once (429) by the bulk rule's 5/s, burst 5${bulk_other:+; other answers: $bulk_other}. A refusal's headers:"
grep -i '^\(HTTP\|weir-reason\|weir-limit\|retry-after\)' "$LOG_DIR/bulk-429.headers" 2>/dev/null | tr -d '\r' | sed 's/^/  /' || true
if [ -n "$breaker_open" ]; then
  echo "Circuit breaker: orders-a1's breaker opened on the agents within a few failures of its outage, its"
  echo "events went to the other instances, and half-open probes brought it back once the outage ended"
  echo "(${breaker_closed:+closed again: }$(breaker_states))."
else
  echo "Circuit breaker: no agent opened a breaker for orders-a1 within 5 s of its outage (see weirctl governance orders)."
fi
echo
echo "Telemetry: the agents report every request, publish and delivery to the control plane each"
echo "second; any replica answers for the cluster (docs/telemetry.md)."
echo "\$ weirctl stats orders"
weirctl stats orders || true
echo
echo "\$ weirctl topology"
weirctl topology || true
trace_id=$(weirctl traces --service billing --limit 1 -o json 2>/dev/null \
  | grep -o '"trace_id": *"[0-9a-f]*"' | head -1 | grep -o '[0-9a-f]\{32\}' || true)
if [ -n "$trace_id" ]; then
  echo
  echo "\$ weirctl traces show $trace_id     # a publish and its deliveries: one trace"
  weirctl traces show "$trace_id" || true
fi
echo
echo "Agents (admin API: /v1/state /metrics /readyz /healthz):"
for node in a b; do
  ingress_var=INGRESS_$node admin_var=ADMIN_$node
  echo "  node-$node  ingress http://${!ingress_var}  admin http://${!admin_var}/v1/state"
  curl -fsS "http://${!admin_var}/metrics" 2>/dev/null \
    | awk '/^weir_agent_((requests|rejections|upstream_errors|retries|retry_budget_exhausted|timeouts|ejections|outbox_published|outbox_deliveries|rate_limit_decisions|breaker_transitions)_total|outbox_pending_deliveries)/ && $NF != 0 { print "    " $0 }' || true
done
echo
# shellcheck disable=SC2154  # INGRESS_*, ADMIN_* and PID_* are set with printf -v
cat <<MSG
Weir is running: a control plane, two agents, four orders instances, two checkouts, billing and shipping.
  control plane  $WEIR_ENDPOINT (gRPC: weir.registry.v1.Registry, health, reflection)
                 http://$http/readyz   store: $store_note
  logs           $LOG_DIR (one .out and one .log per process)
Try, in another terminal (WEIR_ENDPOINT=$WEIR_ENDPOINT; weirctl is $BIN/weirctl):
  tail -f $LOG_DIR/checkout-a1.out   # which orders instance answered, every ${REPORT_EVERY} s
  kill $PID_orders_a1          # orders-a1 deregisters: the split moves to the other three at once
  kill -9 $PID_orders_b1       # no deregistration: the agents retry its events elsewhere and eject it
  weirctl get orders                 # instances, zones, leases
  weirctl watch orders               # every change, live
  curl -i http://$INGRESS_a/v1/services/orders/events -H 'ce-specversion: 1.0' -H 'ce-id: hand-1' \\
    -H 'ce-source: /you' -H 'ce-type: sample.manual' -H 'content-type: application/json' -d '{"hi":1}'
  curl -i http://$INGRESS_a/v1/services/orders/events -H 'ce-specversion: 1.0' -H 'ce-id: hand-2' \\
    -H 'ce-source: /you' -d '{}'     # 400, weir-reason: bad-event, "header ce-type is required"
  curl -s http://$ADMIN_b/v1/state   # node-b's agent: routes (balancer, failure) and endpoints
                                     # (in_flight, ewma_ms, ejected_ms while ejected, ejections)
  curl -s http://$ADMIN_b/metrics | grep -E '^weir_agent_(retr|timeouts|ejec)'
  curl -i http://$INGRESS_a/v1/topics/$TOPIC -H 'ce-specversion: 1.0' -H 'ce-id: hand-3' \\
    -H 'ce-source: /you' -H 'ce-type: $TOPIC' -d '{}'   # 202: billing and shipping each get it
  curl -s http://$ADMIN_a/v1/state   # also subscriptions (listed or retained) and outbox (pending)
  curl -s http://$ADMIN_a/metrics | grep '^weir_agent_outbox'
  weirctl health legacy              # status history with reasons
  curl -X POST http://$ADDR_orders_a1/outage?ms=5000   # orders-a1 fails for 5 s: its breakers open
  weirctl governance orders          # which breakers are open where, which limits bite
  weirctl policy set -f docs/examples/orders-policy.yaml && weirctl policy status orders
                                     # a fuller policy: "partly", the agents name what they do not enforce yet
  weirctl stats --window 15m         # traffic per service and edge: rate, errors, p50/p90/p99
  weirctl topology                   # who sends to whom, through which topic
  weirctl traces --outcome error     # recent failed traces; weirctl traces show ID draws one
  curl -s http://$http/api/v1/topology   # the same as JSON; also /api/v1/stats, /api/v1/traces
  curl -s http://$http/metrics | grep '^weir_cluster'   # the control plane's Prometheus text
The dashboard comes with the next stage. Ctrl-C here stops everything.
MSG
if [ "$exit_after" = 1 ]; then exit "$topic_missing"; fi
wait "${CP_PIDS[0]}"
