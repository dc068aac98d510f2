#!/usr/bin/env bash
# Local infrastructure for gpuq on loopback: a 3-node RabbitMQ cluster and Redis.
#
#   scripts/stack.sh up            install what is missing, start what is not running, cluster
#   scripts/stack.sh down          stop everything started from this .stack dir
#   scripts/stack.sh status        print what runs; exit 0 only when everything is up
#   scripts/stack.sh node-stop N   stop RabbitMQ node N (1..3), keeping its data
#   scripts/stack.sh node-start N  start RabbitMQ node N again (it rejoins the cluster)
#   scripts/stack.sh redis-stop    stop Redis, keeping its data
#   scripts/stack.sh redis-start   start Redis again
#   scripts/stack.sh ctl N ARGS…   rabbitmqctl ARGS… against node N (with its cookie)
#   scripts/stack.sh credentials   the services' own URLs (least privilege), KEY=value lines
#
# Nodes: rabbitN@localhost, AMQP 5671+N, AMQPS (TLS) 5680+N, management 15671+N, prometheus
# 15691+N, Erlang distribution 25671+N. Redis: 127.0.0.1:6379, with TLS 127.0.0.1:6380 (no client
# certificates asked). Data and logs: <repo>/.stack/.
# TLS: `up` makes, once, a private dev CA and a server certificate for localhost and 127.0.0.1
# in <repo>/.stack/tls/ (ca.pem, server.pem, server.key; clients trust ca.pem). Kept across
# restarts; the server certificate is renewed when it expires within 30 days.
# The RabbitMQ nodes' recipe and its pitfalls: scripts/stack-rabbitmq.sh; TLS and users: stack-access.sh.
# Users: guest/guest (RabbitMQ) and Redis's password-less default user stay, for tests and
# operators; each service has its own user, limited to what it needs (gpuq-gateway, gpuq-worker,
# gpuq-manager; scripts/stack-access.sh), its password made once in .stack/credentials.
# Environment: GPUQ_STACK_START_TIMEOUT (seconds, default 120) bounds each wait;
# GPUQ_STACK_LOCK_TIMEOUT (default 600) bounds the wait for another stack.sh holding .stack/.lock.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/lib.sh"
# TLS certificates and the per-service users (sourced: it uses the variables set below).
# shellcheck source=scripts/stack-access.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/stack-access.sh"
# The RabbitMQ nodes: configuration, start, cluster, stop (sourced likewise).
# shellcheck source=scripts/stack-rabbitmq.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/stack-rabbitmq.sh"

ROOT="$GPUQ_REPO_ROOT"
STACK_DIR="$ROOT/.stack"
RMQ_BIN=/usr/lib/rabbitmq/bin
RMQ_TEMPLATE="$ROOT/deploy/rabbitmq/rabbitmq.local.conf"
NODES=(1 2 3)
START_TIMEOUT="${GPUQ_STACK_START_TIMEOUT:-120}"
STOP_TIMEOUT=60
REDIS_PORT=6379
REDIS_TLS_PORT=6380
REDIS_DIR="$STACK_DIR/redis"
TLS_DIR="$STACK_DIR/tls"

case "$ROOT" in
  *[[:space:]]*) die "the repository path '$ROOT' contains whitespace; RabbitMQ's scripts cannot cope with that" ;;
esac

node_name() { printf 'rabbit%s@localhost' "$1"; }
node_dir() { printf '%s/rabbit%s' "$STACK_DIR" "$1"; }
amqp_port() { printf '%s' $((5671 + $1)); }
amqps_port() { printf '%s' $((5680 + $1)); }
mgmt_port() { printf '%s' $((15671 + $1)); }
prom_port() { printf '%s' $((15691 + $1)); }
dist_port() { printf '%s' $((25671 + $1)); }
# Our processes are told from any other by their working directory: a node runs in its
# .stack/rabbitN dir, redis in .stack/redis/data.
REDIS_DATA="$REDIS_DIR/data"
# What runs with its working directory under .stack/ (for the leftover sweep of `down`).
STACK_PROC_NAMES=(beam.smp erl_child_setup inet_gethost rabbitmq-server erlexec redis-server)
node_procs() { pids_with_cwd beam.smp "$(node_dir "$1")"; }
redis_procs() { pids_with_cwd redis-server "$REDIS_DATA"; }

check_node_arg() {
  case "${1:-}" in
    1 | 2 | 3) ;;
    *) die "node number must be 1, 2 or 3 (got '${1:-}')" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Installation and system services

# Debian's packages start system instances (as users rabbitmq / redis) from their init
# scripts; they would hold 5672/25672/6379. Stop and disable them.
# host_process PID : true when PID runs in this PID namespace, not in a container (whose
# processes the host sees too, possibly under the same user names).
host_process() {
  [ "$(readlink "/proc/$1/ns/pid" 2>/dev/null)" = "$(readlink /proc/self/ns/pid)" ]
}

stop_system_services() {
  local pid user found
  found=0
  for pid in $(pgrep -x beam.smp 2>/dev/null || true); do
    host_process "$pid" || continue
    user="$(ps -o user= -p "$pid" 2>/dev/null | tr -d ' ')" || continue # it may have exited
    [ "$user" = rabbitmq ] || continue
    if [ "$found" -eq 0 ]; then
      warn "a system RabbitMQ node (user rabbitmq) is running; stopping and disabling it"
      if [ -x /etc/init.d/rabbitmq-server ] && have service; then
        service rabbitmq-server stop >/dev/null 2>&1 9>&- || true
      fi
      found=1
    fi
    kill_pid_or_group "$pid"
  done
  if [ "$found" -eq 1 ] && have update-rc.d; then update-rc.d rabbitmq-server disable >/dev/null 2>&1 || true; fi
  found=0
  for pid in $(pgrep -x redis-server 2>/dev/null || true); do
    host_process "$pid" || continue
    user="$(ps -o user= -p "$pid" 2>/dev/null | tr -d ' ')" || continue # it may have exited
    [ "$user" = redis ] || continue
    if [ "$found" -eq 0 ]; then
      warn "a system Redis (user redis) is running; stopping and disabling it"
      if [ -x /etc/init.d/redis-server ] && have service; then
        service redis-server stop >/dev/null 2>&1 9>&- || true
      fi
      found=1
    fi
    kill_pid_or_group "$pid"
  done
  if [ "$found" -eq 1 ] && have update-rc.d; then update-rc.d redis-server disable >/dev/null 2>&1 || true; fi
}

ensure_installed() {
  local fresh=0
  if [ ! -x "$RMQ_BIN/rabbitmq-server" ] || ! have redis-server || ! have redis-cli; then fresh=1; fi
  apt_install rabbitmq-server redis-server redis-tools
  [ -x "$RMQ_BIN/rabbitmq-server" ] || die "$RMQ_BIN/rabbitmq-server not found after installing rabbitmq-server"
  have redis-server || die "redis-server not found after installing it"
  if [ "$fresh" -eq 1 ] && have update-rc.d; then
    update-rc.d rabbitmq-server disable >/dev/null 2>&1 || true
    update-rc.d redis-server disable >/dev/null 2>&1 || true
  fi
  stop_system_services
}

# ---------------------------------------------------------------------------------------------
# Redis

redis_pid() {
  local pid
  pid="$(redis_procs | sed -n 1p)"
  [ -n "$pid" ] || return 1
  printf '%s\n' "$pid"
}

redis_ping() {
  [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

redis_start() {
  local pid i
  if pid="$(redis_pid)"; then
    log "redis already runs (pid $pid)"
  else
    local p
    for p in "$REDIS_PORT" "$REDIS_TLS_PORT"; do
      if port_listening "$p"; then
        printf '[%s] ERROR: port %s is already in use by:\n%s\n' "$(_ts)" "$p" "$(port_holder "$p")" >&2
        die "cannot start redis: stop what holds port $p first"
      fi
    done
    mkdir -p "$REDIS_DATA"
    cat >"$REDIS_DIR/redis.conf" <<EOF
# Generated by scripts/stack.sh
bind 127.0.0.1
port $REDIS_PORT
# TLS beside the plain port, with the dev CA's server certificate (ensure_tls); no client certs.
tls-port $REDIS_TLS_PORT
tls-cert-file $TLS_DIR/server.pem
tls-key-file $TLS_DIR/server.key
tls-ca-cert-file $TLS_DIR/ca.pem
tls-auth-clients no
protected-mode yes
daemonize yes
pidfile $REDIS_DIR/redis.pid
logfile $REDIS_DIR/redis.log
dir $REDIS_DATA
appendonly yes
appendfsync everysec
save 60 1
# The services' ACL users (scripts/stack-access.sh), there from the first connection on.
$(redis_user_directives)
EOF
    chmod 600 "$REDIS_DIR/redis.conf"
    rm -f "$REDIS_DIR/redis.pid"
    (cd "$REDIS_DATA" && setsid redis-server "$REDIS_DIR/redis.conf" </dev/null >>"$REDIS_DIR/redis.log" 2>&1 9>&-)
    log "started redis on 127.0.0.1:$REDIS_PORT (TLS :$REDIS_TLS_PORT)"
  fi
  for ((i = 0; i < START_TIMEOUT * 5; i++)); do
    if redis_ping; then
      ensure_redis_users
      return 0
    fi
    if [ "$i" -gt 10 ] && ! redis_pid >/dev/null; then break; fi
    sleep 0.2
  done
  log_tail "$REDIS_DIR/redis.log" 30
  die "redis did not answer PING on 127.0.0.1:$REDIS_PORT"
}

redis_stop() {
  local pid
  if ! pid="$(redis_pid)"; then
    log "redis is not running"
    return 0
  fi
  log "stopping redis (pid $pid)"
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
  if ! wait_pid_gone "$pid" 30; then
    warn "redis did not stop within 30s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  for pid in $(redis_procs); do kill_pid_or_group "$pid"; done
}

# ---------------------------------------------------------------------------------------------
# Commands

cmd_up() {
  local t0
  t0="$(now_s)"
  ensure_installed
  mkdir -p "$STACK_DIR"
  ensure_tls
  redis_start
  rabbit_up_all
  ensure_rabbit_users
  log "stack is up in $(elapsed "$t0")s: RabbitMQ amqp://guest:guest@127.0.0.1:5672,5673,5674 and amqps://…:5681,5682,5683 (management http://127.0.0.1:15672 guest/guest), Redis redis://127.0.0.1:$REDIS_PORT and rediss://127.0.0.1:$REDIS_TLS_PORT (TLS CA: $TLS_DIR/ca.pem)"
}

cmd_down() {
  local n pids=()
  for n in "${NODES[@]}"; do
    stop_node "$n" &
    pids+=($!)
  done
  for n in "${pids[@]}"; do wait "$n" || true; done
  redis_stop
  stop_epmd_if_unused
  local left pid
  # Leftovers of any kind started from this .stack dir (e.g. after a kill -9 of a VM).
  for pid in $(pids_under_cwd "$STACK_DIR" "${STACK_PROC_NAMES[@]}"); do
    warn "killing leftover process $pid ($(cat "/proc/$pid/comm" 2>/dev/null))"
    kill -KILL "$pid" 2>/dev/null || true
  done
  sleep 0.2
  left="$(pids_under_cwd "$STACK_DIR" "${STACK_PROC_NAMES[@]}" | tr '\n' ' ')"
  [ -z "$left" ] || die "processes still running after down: $left"
  log "stack is down"
}

cmd_status() {
  local n ok=0 pid json running tmp
  tmp="$(mktemp -d)"
  # Ask the nodes in parallel (each rabbitmqctl call starts an Erlang VM).
  for n in "${NODES[@]}"; do
    (
      if pid="$(node_pid "$n")"; then
        json="$(cluster_json "$n")"
        printf '%s\n%s\n' "$pid" "$json" >"$tmp/$n"
        if [ "$n" = 1 ]; then
          rmqctl 1 -q list_feature_flags --formatter json 2>/dev/null | tr -d '\n ' >"$tmp/ff" || true
        fi
      else
        : >"$tmp/$n"
      fi
    ) &
  done
  wait
  for n in "${NODES[@]}"; do
    pid="$(sed -n 1p "$tmp/$n")"
    json="$(sed -n 2p "$tmp/$n")"
    if [ -z "$pid" ]; then
      printf '%-20s down\n' "$(node_name "$n")"
      ok=1
      continue
    fi
    running="$(json_list "$json" running_nodes | sort | tr '\n' ' ')"
    if [ -z "$json" ] || ! grep -qxF "$(node_name "$n")" <<<"$(json_list "$json" running_nodes)"; then
      printf '%-20s starting or stopped app (pid %s, amqp %s)\n' "$(node_name "$n")" "$pid" "$(amqp_port "$n")"
      ok=1
    elif [ "$(json_list "$json" running_nodes | wc -l)" -lt "${#NODES[@]}" ]; then
      printf '%-20s up (pid %s, amqp %s, amqps %s), cluster incomplete: running %s\n' "$(node_name "$n")" "$pid" "$(amqp_port "$n")" "$(amqps_port "$n")" "$running"
      ok=1
    else
      printf '%-20s up (pid %s, amqp %s, amqps %s), cluster: %s\n' "$(node_name "$n")" "$pid" "$(amqp_port "$n")" "$(amqps_port "$n")" "$running"
    fi
  done
  if [ -s "$tmp/ff" ]; then
    local disabled
    disabled="$( (grep -o '"name":"[a-z_]*","state":"disabled"' "$tmp/ff" || true) | cut -d'"' -f4 | tr '\n' ' ')"
    if [ -n "$disabled" ]; then
      printf '%-20s disabled: %s(run scripts/stack.sh up to enable them)\n' "feature flags" "$disabled"
      ok=1
    else
      printf '%-20s all enabled\n' "feature flags"
    fi
  fi
  rm -rf "$tmp"
  if pid="$(redis_pid)" && redis_ping; then
    printf '%-20s up (pid %s, 127.0.0.1:%s, TLS :%s)\n' redis "$pid" "$REDIS_PORT" "$REDIS_TLS_PORT"
  elif pid="$(redis_pid)"; then
    printf '%-20s not answering (pid %s)\n' redis "$pid"
    ok=1
  else
    printf '%-20s down\n' redis
    ok=1
  fi
  return "$ok"
}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

# Serializes the commands that change the stack (tests may call node-stop/node-start from
# several processes). fd 9 is closed for every process that outlives this script.
take_lock() {
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.lock"
  if ! flock -w "${GPUQ_STACK_LOCK_TIMEOUT:-600}" 9; then
    die "another scripts/stack.sh holds $STACK_DIR/.lock (still running?)"
  fi
}

main() {
  local cmd="${1:-}"
  case "$cmd" in
    up | down | node-stop | node-start | redis-stop | redis-start) take_lock ;;
  esac
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    node-stop)
      check_node_arg "${2:-}"
      stop_node "$2"
      ;;
    node-start)
      check_node_arg "${2:-}"
      ensure_installed
      ensure_tls
      node_start "$2"
      ;;
    ctl)
      # rabbitmqctl against one node with its cookie: stack.sh ctl N <rabbitmqctl args…>
      check_node_arg "${2:-}"
      local n="$2"
      shift 2
      rmqctl "$n" "$@"
      ;;
    credentials) cmd_credentials ;;
    redis-stop) redis_stop ;;
    redis-start)
      ensure_installed
      ensure_tls
      redis_start
      ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
  esac
}

main "$@"; exit "$?" # (one line: safe even if this file is edited while it runs)
