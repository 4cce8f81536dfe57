#!/usr/bin/env bash
# PostgreSQL and RabbitMQ on this machine.
#   services.sh check   one line per unreachable service, with how to start it; exit 1 if any
#   services.sh ensure  install (apt) what is missing, start what is down, wait until both answer
#   services.sh pgbench install pgbench (apt, PostgreSQL's contrib package) if missing (make bench)
#   services.sh browser install chromium and chromedriver (apt) if missing: the relay console's
#                       browser test (outbox-relay/tests/console.rs) drives them (make tools)
set -euo pipefail

PG_HOST=127.0.0.1 PG_PORT=5432 AMQP_HOST=127.0.0.1 AMQP_PORT=5672

listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

pg_start_cmd() {
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  echo "pg_ctlcluster --skip-systemctl-redirect ${version:-15} main start"
}

check() {
  local ok=0
  if ! listening "$PG_HOST" "$PG_PORT"; then
    echo "PostgreSQL is not reachable at $PG_HOST:$PG_PORT: start it with '$(pg_start_cmd)' (or 'make infra-up' where Docker runs)" >&2
    ok=1
  fi
  if ! listening "$AMQP_HOST" "$AMQP_PORT"; then
    echo "RabbitMQ is not reachable at $AMQP_HOST:$AMQP_PORT: start it with 'rabbitmq-server -detached' (or 'make infra-up' where Docker runs)" >&2
    ok=1
  fi
  return $ok
}

wait_for() {
  local name=$1 host=$2 port=$3
  for _ in $(seq 1 120); do
    listening "$host" "$port" && return 0
    sleep 1
  done
  echo "$name did not start listening on $host:$port within 120s" >&2
  return 1
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
}

ensure() {
  if ! listening "$PG_HOST" "$PG_PORT"; then
    command -v pg_ctlcluster >/dev/null || apt_install postgresql postgresql-contrib
    # Tests connect as postgres without a password over TCP.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      grep -q '^host all all 127.0.0.1/32 trust' "$hba" ||
        sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    done
    echo "starting PostgreSQL"
    $(pg_start_cmd) || true
    wait_for PostgreSQL "$PG_HOST" "$PG_PORT"
  fi
  # A broker started with the default 1024 descriptors (as a boot script
  # starts it) runs out of file handles once a few hundred quorum queues
  # exist: it still accepts TCP connections but never answers the AMQP
  # handshake. Restart such a broker, and a wedged one, with more.
  if listening "$AMQP_HOST" "$AMQP_PORT"; then
    local beam limit
    beam=$(pgrep -f beam.smp | head -n 1 || true)
    limit=$( [[ -n "$beam" && -r /proc/$beam/limits ]] && awk '/Max open files/ {print $4}' "/proc/$beam/limits" || echo unknown)
    if ! amqp_answers; then
      echo "RabbitMQ accepts connections but does not answer the AMQP handshake: restarting it" >&2
      stop_rabbitmq
    elif [[ "$limit" =~ ^[0-9]+$ && "$limit" -lt 4096 && "$(ulimit -Hn)" -ge 4096 && $(id -u) -eq 0 ]]; then
      echo "RabbitMQ runs with $limit file descriptors (too few for the tests' quorum queues): restarting it with $(ulimit -Hn)" >&2
      stop_rabbitmq
    fi
  fi
  if ! listening "$AMQP_HOST" "$AMQP_PORT"; then
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    echo "starting RabbitMQ"
    # Every quorum queue holds files open; at the default 1024 descriptors
    # a broker with many (test) queues stops accepting connections. Start it
    # with as many as the hard limit allows.
    # `su` keeps our limits: raise the soft one to the hard one first.
    if [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] && id rabbitmq >/dev/null 2>&1; then
      su rabbitmq -s /bin/sh -c "ulimit -n $(ulimit -Hn); /usr/lib/rabbitmq/bin/rabbitmq-server -detached" || true
    else
      (ulimit -n "$(ulimit -Hn)" 2>/dev/null; rabbitmq-server -detached) || true
    fi
    wait_for RabbitMQ "$AMQP_HOST" "$AMQP_PORT"
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do amqp_answers && break; sleep 1; done
  fi
}

# True when the broker answers the AMQP protocol header within 5 s.
amqp_answers() {
  timeout 5 bash -c "exec 3<>/dev/tcp/$AMQP_HOST/$AMQP_PORT && printf 'AMQP\\x00\\x00\\x09\\x01' >&3 && head -c 1 <&3 >/dev/null" 2>/dev/null
}

stop_rabbitmq() {
  timeout 60 rabbitmqctl stop >/dev/null 2>&1 || pkill -9 -f beam.smp || true
  for _ in $(seq 1 60); do listening "$AMQP_HOST" "$AMQP_PORT" || return 0; sleep 1; done
  pkill -9 -f beam.smp || true
}

ensure_pgbench() {
  command -v pgbench >/dev/null && return 0
  echo "installing pgbench (postgresql-contrib)"
  apt_install postgresql-contrib
  command -v pgbench >/dev/null || { echo "pgbench is still missing: install PostgreSQL's client tools" >&2; return 1; }
}

ensure_browser() {
  if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    return 0
  fi
  echo "installing chromium and chromedriver (browser tests of the relay console)"
  apt_install chromium chromium-driver
  command -v chromedriver >/dev/null || { echo "chromedriver is still missing: install Debian's chromium-driver" >&2; return 1; }
}

case "${1:-check}" in
  check) check ;;
  ensure) ensure ;;
  pgbench) ensure_pgbench ;;
  browser) ensure_browser ;;
  *) echo "usage: $0 check|ensure|pgbench|browser" >&2; exit 2 ;;
esac
