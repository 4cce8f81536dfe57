#!/usr/bin/env bash
# Pipeline throughput with 1, 2 and 3 processor-service (consumer) replicas
# on a RabbitMQ cluster (docs/cluster.md, "Measured: consumer replicas").
#
#   BIN=<dir of release binaries> infra/local/replicas.sh [REPLICAS...]   (default: 1 2 3)
#
# For each count: fresh databases and topology prefix; one order-service,
# REPLICAS processor-services and 2 relays per database, all with the
# cluster's multi-address AMQP_URL (default: `make cluster`'s); then
# loadgen offers RATE orders/s (default 150, above capacity) for DURATION
# (default 30s) over 100 products and reports the completed rate after the
# warm-up. Everything is stopped and the databases dropped afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BIN:?set BIN to the directory of the release binaries (order-service, processor-service, outbox-relay, loadgen)}
RATE=${RATE:-150}
DURATION=${DURATION:-30s}
AMQP_URL=${AMQP_URL:-$(infra/local/cluster.sh urls)}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
LOGS=${LOGS:-$(mktemp -d /tmp/orderflow-replicas.XXXX)}
export AMQP_URL RUST_LOG=${RUST_LOG:-warn} LOG_FORMAT=json
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1 2 3)

# 100 products with stock for any run, so no order fails for stock.
catalog=$(python3 -c 'import json; print(json.dumps([{"sku": f"P{i:03}", "name": f"Product {i}", "price": 10.0, "on_hand": 10000000} for i in range(100)]))')

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap stop_all EXIT

healthy() {
  for _ in $(seq 1 120); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "not healthy: $1 (logs in $LOGS)" >&2
  exit 1
}

for n in "${counts[@]}"; do
  tag="rep${n}x$(date +%s)"
  orders_db="of_${tag}_orders" processor_db="of_${tag}_processor"
  export ORDERFLOW_PREFIX=$tag
  "$BIN/order-service" --http-addr 127.0.0.1:18000 --database-url "$PG/$orders_db" >"$LOGS/$tag-orders.log" 2>&1 &
  pids+=($!)
  healthy http://127.0.0.1:18000/health
  for r in $(seq 1 "$n"); do
    "$BIN/processor-service" --http-addr "127.0.0.1:$((18000 + r))" --database-url "$PG/$processor_db" \
      --catalog "$catalog" >"$LOGS/$tag-processor-$r.log" 2>&1 &
    pids+=($!)
    healthy "http://127.0.0.1:$((18000 + r))/health"
  done
  for r in 1 2; do
    "$BIN/outbox-relay" run --database-url "$PG/$orders_db" --relay-id "orders-$r" --metrics-addr off \
      >"$LOGS/$tag-relay-orders-$r.log" 2>&1 &
    pids+=($!)
    "$BIN/outbox-relay" run --database-url "$PG/$processor_db" --relay-id "processor-$r" --metrics-addr off \
      >"$LOGS/$tag-relay-processor-$r.log" 2>&1 &
    pids+=($!)
  done
  for r in $(seq 1 "$n"); do healthy "http://127.0.0.1:$((18000 + r))/ready"; done
  echo "== $n processor-service replica(s), $RATE orders/s offered for $DURATION"
  "$BIN/loadgen" --url http://127.0.0.1:18000 --rate "$RATE" --duration "$DURATION" --drain 120s \
    --catalog "$catalog" --tag "$tag" | tee "$LOGS/$tag-loadgen.txt"
  stop_all
  for db in "$orders_db" "$processor_db"; do
    psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" || true
  done
done
echo "logs: $LOGS"
