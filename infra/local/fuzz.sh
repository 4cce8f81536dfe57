#!/usr/bin/env bash
# `make fuzz`: HTTP fuzzing of each service's OpenAPI contract with
# schemathesis. Starts order-service and processor-service on free ports,
# each on a fresh database and topology prefix, runs schemathesis against
# their /openapi.json (no 5xx, no status code, content type, header or body
# outside the documented contract), then removes everything it created.
#
#   BIN            directory of the built debug binaries (required)
#   FUZZ_EXAMPLES  examples per operation and phase (default 50)
#   FUZZ_SEED      schemathesis seed (default 1: the same cases every run)
#   FUZZ_VENV      virtualenv holding schemathesis (default ~/.cache/orderflow/venv)
#   LOGS           where the services' logs go (default .run)
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BIN:?set BIN to the directory of the built binaries}
EXAMPLES=${FUZZ_EXAMPLES:-50}
SEED=${FUZZ_SEED:-1}
# Pinned: a newer release may add checks or change the CLI; bump on purpose.
SCHEMATHESIS_VERSION=4.32.5
LOGS=${LOGS:-.run}
PG_URL=postgres://postgres@127.0.0.1:5432

infra/local/services.sh check
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)

# schemathesis in its own virtualenv, installed once and reused.
source "$(dirname "$0")/venv.sh"
ensure_venv "schemathesis==$SCHEMATHESIS_VERSION"

RUN_ID=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
PREFIX="fuzz$RUN_ID"
ORDERS_DB="orderflow_fuzz_orders_$RUN_ID"
PROCESSOR_DB="orderflow_fuzz_processor_$RUN_ID"
WORK=$(mktemp -d)
pids=()
st_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$st_pid" ]]; then kill -TERM "$st_pid" 2>/dev/null || true; fi
  # SIGTERM: the services drain, then exit; a stuck one is killed.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ ${#pids[@]} -gt 0 ]]; then
    for db in "$ORDERS_DB" "$PROCESSOR_DB"; do
      psql "$PG_URL/postgres" -qXc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 ||
        echo "could not drop database $db" >&2
    done
    # Every queue of the prefix, as the broker lists them (the retry tiers
    # are named by their delays), deleted over one AMQP connection by the
    # test kit's delete-queues (built with the workspace's binaries); each
    # rabbitmqctl call would start an Erlang VM.
    local deleter=("$BIN/delete-queues")
    [[ -x "$BIN/delete-queues" ]] || deleter=(xargs -r -P 5 -n 1 rabbitmqctl delete_queue -q)
    { rabbitmqctl list_queues name -q 2>/dev/null | grep "^$PREFIX\." || true; } | "${deleter[@]}" >/dev/null 2>&1 || true
    # rabbitmqctl has no delete_exchange, and the management plugin (for
    # rabbitmqadmin) may be off: ask the broker itself.
    rabbitmqctl eval -q \
      "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$PREFIX.events\">>), false, <<\"fuzz\">>)." \
      >/dev/null 2>&1 || echo "could not delete exchange $PREFIX.events" >&2
    if rabbitmqctl list_queues name -q 2>/dev/null | grep -q "^$PREFIX\."; then
      echo "queues $PREFIX.* are left over; delete them with rabbitmqctl delete_queue" >&2
    fi
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a service on port 0 and prints the port it bound, read from its
# JSON log line "... listening" once /health answers.
start() {
  local name=$1; shift
  local log="$LOGS/fuzz-$name.log"
  RUST_LOG=${RUST_LOG:-info} LOG_FORMAT=json "$BIN/$name" --http-addr 127.0.0.1:0 --topology-prefix "$PREFIX" "$@" \
    >"$log" 2>&1 &
  pids+=($!)
  local pid=$! port=""
  for _ in $(seq 1 120); do
    if [[ -z "$port" ]]; then
      port=$(grep -m1 'listening' "$log" 2>/dev/null | grep -o '"port":[0-9]*' | cut -d: -f2 || true)
    fi
    if [[ -n "$port" ]] && curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
      echo "$port"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "$name is not healthy after 60s; see $log" >&2
  return 1
}

# Not in a subshell ($(...)), so that the trap knows the pids.
start order-service --database-url "$PG_URL/$ORDERS_DB" >"$WORK/order-service.port"
# With a token, as in production: schemathesis sends it, and its auth
# checks see that a request without it, or with another, is refused.
ADMIN_TOKEN="fuzz-$RUN_ID"
start processor-service --database-url "$PG_URL/$PROCESSOR_DB" --admin-token "$ADMIN_TOKEN" >"$WORK/processor-service.port"

fuzz() {
  local name=$1 port
  port=$(cat "$WORK/$name.port")
  echo
  echo "=== schemathesis: $name (http://127.0.0.1:$port/openapi.json, $EXAMPLES examples per operation, seed $SEED)"
  # Run from a scratch directory, so that nothing schemathesis or hypothesis
  # may write lands in the checkout. `--checks all`: server errors, status
  # codes, content types, headers and bodies against the documented
  # responses, invalid input rejected (4xx) and valid input accepted, 405
  # with `Allow` for undocumented methods, and the stateful ones (a created
  # resource can be fetched); the auth checks have nothing to do here.
  # One worker: schemathesis's workers are threads, and Python 3.11's ast
  # module (which hypothesis uses to describe filters) is not thread-safe
  # ("AST constructor recursion depth mismatch"); it also keeps the run
  # deterministic for a given seed.
  # In the background and waited for, so that a signal to this script runs
  # its trap at once rather than after schemathesis is done.
  (cd "$WORK" && PYTHONPATH="$WORK" SCHEMATHESIS_HOOKS=orderflow_fuzz_hooks exec "$VENV/bin/st" run \
    "http://127.0.0.1:$port/openapi.json" \
    --checks all \
    --header "Authorization: Bearer $ADMIN_TOKEN" \
    --max-examples "$EXAMPLES" \
    --seed "$SEED" \
    --workers 1 \
    --request-timeout 10 \
    --no-color \
    --generation-database none) &
  st_pid=$!
  wait "$st_pid"
}

# Two rules JSON Schema cannot state, which the schemas state in words:
# - "no two items share a SKU" (uniqueItems compares whole items), so
#   schemathesis would count an order repeating a SKU as valid and expect it
#   accepted; order-service rightly rejects it (400 naming the duplicate);
# - "at most 2 decimal places" for a price sent as a JSON number (multipleOf
#   0.01 is judged in binary floating point, where 19.99 is no multiple of
#   0.01), so a generated 0.5700000000000001 counts as valid and the server
#   rightly refuses it (400: more than 2 decimal places).
# This hook teaches the generator those two rules: in cases meant to be
# valid, a repeated SKU is renamed and a numeric price is rounded to cents.
# It also caps a valid `wait` of GET /orders/{id} (a long poll, 0 to 30 s) at
# 1 s: no relay runs here, so the orders the fuzzer creates stay pending and
# each such request would last its whole wait (tests/tests/long_poll.rs
# tests the long poll itself). Cases meant to be invalid are left alone, no
# failure is filtered, and every check still runs on every case.
cat >"$WORK/orderflow_fuzz_hooks.py" <<'PY'
import schemathesis


def cents(price):
    # bool is an int in Python: leave it to the server to refuse.
    if isinstance(price, float):
        return round(price, 2)
    return price


@schemathesis.hook
def map_case(context, case):
    operation = context.operation
    meta = case.meta
    if operation is None or meta is None or not meta.generation.mode.is_positive:
        return case
    route = (operation.method.upper(), operation.path)
    if route == ("GET", "/orders/{id}"):
        wait = (case.query or {}).get("wait")
        if isinstance(wait, int) and not isinstance(wait, bool) and wait > 1:
            case.query = {**case.query, "wait": 1}
        return case
    if not isinstance(case.body, dict):
        return case
    if route == ("POST", "/products"):
        if "price" in case.body:
            case.body = {**case.body, "price": cents(case.body["price"])}
        return case
    if route != ("POST", "/orders") or not isinstance(case.body.get("items"), list):
        return case
    # A copy: the generator may share the drawn objects between cases.
    items = [dict(item) if isinstance(item, dict) else item for item in case.body["items"]]
    case.body = {**case.body, "items": items}
    for item in items:
        if isinstance(item, dict) and "price" in item:
            item["price"] = cents(item["price"])
    taken = {item.get("sku") for item in items if isinstance(item, dict)}
    seen = set()
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("sku"), str):
            continue
        sku = item["sku"]
        if sku in seen:
            # Still 1 to 64 of [A-Za-z0-9._-], and unused by any other line.
            n = index
            while sku in taken:
                sku = f"{item['sku'][:50]}.{n}"
                n += len(items)
            item["sku"] = sku
            taken.add(sku)
        seen.add(sku)
    return case
PY

status=0
fuzz order-service || status=1
fuzz processor-service || status=1
echo
if [[ $status -eq 0 ]]; then
  echo "fuzz: both services conform to their OpenAPI contracts"
else
  echo "fuzz: schemathesis found failures (service logs: $LOGS/fuzz-*.log)" >&2
fi
exit $status
