#!/usr/bin/env bash
# `make run`: the services (order-service, processor-service, and the
# example loyalty-service) and one relay per database on the local
# PostgreSQL and RabbitMQ, in the foreground; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BIN:?set BIN to the directory of the built binaries}
export RUST_LOG=${RUST_LOG:-info}
export LOG_FORMAT=${LOG_FORMAT:-pretty}
ORDERS_DB=${ORDER_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderflow_orders}
PROCESSOR_DB=${PROCESSOR_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderflow_processor}
LOYALTY_DB=${LOYALTY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderflow_loyalty}
LOGS=${LOGS:-.run}
mkdir -p "$LOGS"

infra/local/services.sh check

pids=()
stop() {
  local rc=$1
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  # SIGTERM: every process drains (in-flight requests, messages, batches).
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped"
  exit "$rc"
}
# Ctrl-C and SIGTERM are a normal stop; any other exit keeps its status.
trap 'stop 0' INT TERM
trap 'stop $?' EXIT

start() {
  local name=$1; shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  pids+=($!)
}

wait_healthy() {
  local name=$1 url=$2
  for _ in $(seq 1 60); do
    curl -fsS "$url" >/dev/null 2>&1 && return 0
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then
      echo "$name exited; last lines of $LOGS/$name.log:" >&2
      tail -n 20 "$LOGS/$name.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "$name is not healthy after 30s; see $LOGS/$name.log" >&2
  exit 1
}

# The services create and migrate their databases and declare their queues.
start order-service "$BIN/order-service" --database-url "$ORDERS_DB"
wait_healthy order-service http://127.0.0.1:8000/health
start processor-service "$BIN/processor-service" --database-url "$PROCESSOR_DB"
wait_healthy processor-service http://127.0.0.1:8001/health
start loyalty-service "$BIN/loyalty-service" --database-url "$LOYALTY_DB"
wait_healthy loyalty-service http://127.0.0.1:8002/health
start relay-orders "$BIN/outbox-relay" run --database-url "$ORDERS_DB" --relay-id orders-1 --metrics-addr 127.0.0.1:9100 \
  --consumers-file contracts/consumers.json --consumer orders
start relay-processor "$BIN/outbox-relay" run --database-url "$PROCESSOR_DB" --relay-id processor-1 --metrics-addr 127.0.0.1:9101 \
  --consumers-file contracts/consumers.json --consumer inventory,payment,shipping,notification
start relay-loyalty "$BIN/outbox-relay" run --database-url "$LOYALTY_DB" --relay-id loyalty-1 --metrics-addr 127.0.0.1:9102 \
  --consumer loyalty
wait_healthy relay-orders http://127.0.0.1:9100/health
wait_healthy relay-processor http://127.0.0.1:9101/health
wait_healthy relay-loyalty http://127.0.0.1:9102/health

cat <<MSG

orderflow is running (logs in $LOGS/):
  order-service      http://127.0.0.1:8000   (Swagger UI: http://127.0.0.1:8000/swagger-ui/)
  processor-service  http://127.0.0.1:8001   (Swagger UI: http://127.0.0.1:8001/swagger-ui/)
  loyalty-service    http://127.0.0.1:8002   (the example service: GET /customers/{id}/points)
  relay (orders)     http://127.0.0.1:9100/metrics   (console: http://127.0.0.1:9100/console)
  relay (processor)  http://127.0.0.1:9101/metrics   (console: http://127.0.0.1:9101/console)
  relay (loyalty)    http://127.0.0.1:9102/metrics   (console: http://127.0.0.1:9102/console)
  RabbitMQ           amqp://127.0.0.1:5672   PostgreSQL 127.0.0.1:5432

Try:
  curl -s -XPOST localhost:8000/orders -H 'content-type: application/json' \\
    -d '{"order_id":"ord-001","customer_id":"cust-123","items":[{"sku":"laptop","quantity":1,"price":1200.0}]}'
  curl -s localhost:8000/orders/ord-001
  curl -s localhost:8002/customers/cust-123/points     # once it is confirmed

$(if [[ -n "${ADMIN_TOKEN:-}" ]]; then
  echo "Product and stock writes need: Authorization: Bearer \$ADMIN_TOKEN"
else
  echo "Product and stock writes are open: ADMIN_TOKEN is not set (fine on this machine; set it anywhere else)."
fi)
$(if [[ -n "${RELAY_ADMIN_TOKEN:-}" ]]; then
  echo "The relay consoles' replays and requeues need the token \$RELAY_ADMIN_TOKEN."
else
  echo "The relay consoles are read-only: set RELAY_ADMIN_TOKEN to replay and requeue from them."
fi)

Ctrl-C stops everything.
MSG

# Stop the rest as soon as any process dies (the trap runs on exit).
wait -n "${pids[@]}" || true
echo "a process exited unexpectedly; see $LOGS/" >&2
exit 1
