#!/usr/bin/env bash
# A local 3-node RabbitMQ cluster beside the shared broker, for the cluster
# tests (libs/testkit/src/cluster.rs runs this script) and `make cluster`.
#
#   cluster.sh start            start c1..c3 (AMQP 5681-5683) and join them; reuses a healthy cluster
#   cluster.sh stop             stop every node gracefully and delete the data directory
#   cluster.sh status           exit 0 when all three nodes run in one cluster
#   cluster.sh urls             the multi-address AMQP_URL of the cluster
#   cluster.sh start-node N     start node cN again (it rejoins with its own data)
#   cluster.sh stop-node N      stop node cN gracefully
#   cluster.sh kill-node N      SIGKILL node cN's Erlang VM (a crash)
#   cluster.sh pid N            the OS pid of node cN's Erlang VM
#   cluster.sh leader QUEUE     the node leading quorum queue QUEUE, e.g. c2@localhost
#   cluster.sh members QUEUE    the nodes holding a replica of QUEUE, one per line
#   cluster.sh queues           every queue: leader, ready and unacked messages, consumers
#
# Node cN: node name cN@localhost, AMQP port 568N, distribution port 2568N,
# data, logs and pid file under $CLUSTER_DIR/cN (default
# /tmp/orderflow-cluster). The nodes run as the `rabbitmq` user, so they
# share its Erlang cookie with each other and with rabbitmqctl; they read a
# config and env file of their own, never /etc/rabbitmq's. The shared broker
# (rabbit@<host>, port 5672) is never touched: nodes are stopped by name and
# killed by their own pid, never by process name.
set -euo pipefail

CLUSTER_DIR=${CLUSTER_DIR:-/tmp/orderflow-cluster}
NODES=(1 2 3)
SBIN=/usr/lib/rabbitmq/bin

node() { echo "c$1@localhost"; }
amqp_port() { echo $((5680 + $1)); }
dist_port() { echo $((25680 + $1)); }

die() { echo "cluster.sh: $*" >&2; exit 1; }

# Runs a RabbitMQ command as the rabbitmq user (its cookie), with node N's
# environment.
as_rabbitmq() {
  local n=$1; shift
  local dir="$CLUSTER_DIR/c$n"
  local cmd
  printf -v cmd '%q ' "$@"
  su rabbitmq -s /bin/sh -c "ulimit -n 20000 2>/dev/null || true; cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq \
    RABBITMQ_NODENAME=$(node "$n") RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$(amqp_port "$n") \
    RABBITMQ_DIST_PORT=$(dist_port "$n") RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log \
    RABBITMQ_PID_FILE=$dir/pid RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf \
    RABBITMQ_CONF_ENV_FILE=$CLUSTER_DIR/rabbitmq-env.conf RABBITMQ_ENABLED_PLUGINS_FILE=$CLUSTER_DIR/enabled_plugins \
    RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced.config \
    $cmd"
}

ctl() { local n=$1; shift; as_rabbitmq "$n" "$SBIN/rabbitmqctl" -q -n "$(node "$n")" "$@"; }

require_rabbitmq() {
  [ -x "$SBIN/rabbitmq-server" ] || die "RabbitMQ is not installed (apt-get install rabbitmq-server; 'make services' does)"
  id rabbitmq >/dev/null 2>&1 || die "no rabbitmq user: is the rabbitmq-server package installed?"
  [ "$(id -u)" = 0 ] || die "run as root (the nodes run as the rabbitmq user through su)"
}

layout() {
  mkdir -p "$CLUSTER_DIR"
  # Only what differs from the defaults; the shared broker's files in
  # /etc/rabbitmq are not read (they name rabbit@localhost and port 5672).
  cat >"$CLUSTER_DIR/rabbitmq-env.conf" <<'EOF'
ERL_EPMD_ADDRESS=127.0.0.1
EOF
  echo '[].' >"$CLUSTER_DIR/enabled_plugins"
  for n in "${NODES[@]}"; do
    mkdir -p "$CLUSTER_DIR/c$n/mnesia" "$CLUSTER_DIR/c$n/log"
    cat >"$CLUSTER_DIR/c$n/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
loopback_users = none
EOF
    echo '[].' >"$CLUSTER_DIR/c$n/advanced.config"
  done
  chown -R rabbitmq:rabbitmq "$CLUSTER_DIR"
}

running() { ctl "$1" eval 'ok.' >/dev/null 2>&1; }

# The OS pid of node N's VM, asked of the node itself (its pid file may be
# stale after a kill).
pid_of() {
  local pid
  pid=$(ctl "$1" eval 'os:getpid().' 2>/dev/null | tr -d '"') || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  echo "$pid"
}

# Pid $2 is node N's VM: its environment names the node (the command line
# does not).
is_node_vm() {
  tr '\0' '\n' <"/proc/$2/environ" 2>/dev/null | grep -qx "RABBITMQ_NODENAME=$(node "$1")"
}

start_node() {
  local n=$1
  running "$n" && return 0
  # 9>&-: the node must not inherit the start lock, or it holds it forever.
  as_rabbitmq "$n" "$SBIN/rabbitmq-server" -detached >/dev/null 2>&1 9>&- ||
    die "c$n did not start: see $CLUSTER_DIR/c$n/log"
  # `wait` follows the pid file until the node has booted (await_startup
  # fails at once while the node is not yet registered).
  ctl "$n" wait "$CLUSTER_DIR/c$n/pid" --timeout 120 >/dev/null ||
    die "c$n did not finish booting within 120s: see $CLUSTER_DIR/c$n/log"
}

# Node N is in c1's cluster (running or not).
member() {
  ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"$(node "$1")\""
}

join() {
  local n=$1
  member "$n" && return 0
  ctl "$n" stop_app >/dev/null
  ctl "$n" join_cluster "$(node 1)" >/dev/null || die "c$n could not join c1's cluster"
  ctl "$n" start_app >/dev/null
  ctl "$n" await_startup --timeout 120 >/dev/null
}

healthy() {
  local status
  for n in "${NODES[@]}"; do running "$n" || return 1; done
  status=$(ctl 1 cluster_status --formatter json 2>/dev/null) || return 1
  for n in "${NODES[@]}"; do
    # running_nodes lists every node once it runs in c1's cluster
    grep -o '"running_nodes":\[[^]]*\]' <<<"$status" | grep -q "\"$(node "$n")\"" || return 1
  done
}

start() {
  require_rabbitmq
  exec 9>"/tmp/orderflow-cluster.start.lock"
  flock 9
  if healthy; then
    urls
    return 0
  fi
  layout
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in 2 3; do join "$n"; done
  healthy || die "the nodes run but do not form one cluster: see $CLUSTER_DIR/c*/log"
  urls
}

stop() {
  for n in "${NODES[@]}"; do
    if running "$n"; then
      ctl "$n" stop >/dev/null 2>&1 || true
    fi
    # A node that does not answer but left a VM behind (e.g. a half-started
    # one): its own pid file names it.
    local pidfile="$CLUSTER_DIR/c$n/pid"
    if [ -f "$pidfile" ]; then
      local pid
      pid=$(cat "$pidfile")
      if [[ "$pid" =~ ^[0-9]+$ ]] && is_node_vm "$n" "$pid"; then
        kill -9 "$pid" 2>/dev/null || true
      fi
    fi
  done
  # Only ever our own directory.
  case "$CLUSTER_DIR" in /tmp/*) rm -rf "$CLUSTER_DIR" ;; *) echo "left $CLUSTER_DIR in place" >&2 ;; esac
}

urls() {
  local list=()
  for n in "${NODES[@]}"; do list+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
  (IFS=,; echo "${list[*]}")
}

kill_node() {
  local n=$1 pid
  pid=$(pid_of "$n") || die "c$n is not running"
  # Make sure the pid is c$n's VM before killing anything.
  is_node_vm "$n" "$pid" || die "pid $pid is not c$n's VM"
  kill -9 "$pid"
  for _ in $(seq 1 100); do
    [ -d "/proc/$pid" ] || return 0
    sleep 0.1
  done
  die "c$n (pid $pid) is still alive after SIGKILL"
}

queue_info() {
  local queue=$1 n
  # Ask any node that runs.
  for n in "${NODES[@]}"; do
    if running "$n"; then
      ctl "$n" list_queues name leader members --formatter json 2>/dev/null | tr -d '\n' |
        grep -o "{\"name\":\"$queue\"[^}]*}" && return 0
    fi
  done
  return 1
}

queues() {
  local n
  for n in "${NODES[@]}"; do
    if running "$n"; then
      ctl "$n" list_queues name leader messages_ready messages_unacknowledged consumers
      return 0
    fi
  done
  die "no node runs"
}

leader() {
  local info
  info=$(queue_info "$1") || die "no running node knows queue $1"
  sed -n 's/.*"leader":"\([^"]*\)".*/\1/p' <<<"$info"
}

members() {
  local info
  info=$(queue_info "$1") || die "no running node knows queue $1"
  sed -n 's/.*"members":\[\([^]]*\)\].*/\1/p' <<<"$info" | tr -d '"' | tr ',' '\n'
}

check_n() { [[ "${1:-}" =~ ^[123]$ ]] || die "node number 1, 2 or 3 expected, not '${1:-}'"; }

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) healthy ;;
  urls) urls ;;
  start-node) check_n "${2:-}"; start_node "$2" ;;
  stop-node) check_n "${2:-}"; ctl "$2" stop >/dev/null ;;
  kill-node) check_n "${2:-}"; kill_node "$2" ;;
  pid) check_n "${2:-}"; pid_of "$2" ;;
  leader) [ -n "${2:-}" ] || die "leader QUEUE"; leader "$2" ;;
  members) [ -n "${2:-}" ] || die "members QUEUE"; members "$2" ;;
  queues) queues ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
