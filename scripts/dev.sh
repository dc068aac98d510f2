#!/usr/bin/env bash
# The native gpuq dev stack: RabbitMQ cluster + Redis (scripts/stack.sh), then gateway, manager
# and three workers with simulated GPUs, each under a restart loop.
#
#   scripts/dev.sh up [--release] [--with-prometheus] [--store sqlite|mongodb]
#                                                       build, (re)start, wait until healthy
#   scripts/dev.sh down                                 stop the gpuq services, then the stack
#   scripts/dev.sh status                               show each service's state
#
# --store mongodb runs the services on MongoDB: a secantusd server (PyPI secantusdb, a
# MongoDB-wire-compatible stand-in, installed with pip when missing) on 127.0.0.1:20017, which
# `down` stops. The default is the embedded SQLite store.
#
# Environment:
#   GPUQ_BIN_DIR              where the binaries are (default target/debug or target/release);
#                             when set, dev.sh does not build them
#   GPUQ_SKIP_BUILD=1         do not run cargo build
#   GPUQ_DEV_HEALTH_TIMEOUT   seconds to wait for every /healthz (default 30)
#
# Files: .dev/logs/<name>.log, .dev/pids/<name>.pid (restart loop = process group),
# .dev/secrets (API key, admin token, read token and the workers' fleet secret, reused by later
# runs), .dev/env (URLs and the client secrets as KEY=value lines), .dev/gpuq.db (SQLite store), .dev/prometheus (with --with-prometheus),
# .dev/store (the store of the last `up`), .dev/mongodb and .dev/pids/secantusd.pid and
# .dev/logs/secantusd.log (with --store mongodb).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/lib.sh"

ROOT="$GPUQ_REPO_ROOT"
SELF="$ROOT/scripts/dev.sh"
DEV_DIR="$ROOT/.dev"
LOG_DIR="$DEV_DIR/logs"
PID_DIR="$DEV_DIR/pids"
STACK="$ROOT/scripts/stack.sh"
PROM_CONFIG="$ROOT/deploy/prometheus/prometheus.local.yml"
HEALTH_TIMEOUT="${GPUQ_DEV_HEALTH_TIMEOUT:-30}"

AMQP_URLS="amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f,amqp://guest:guest@127.0.0.1:5674/%2f"
REDIS_URL="redis://127.0.0.1:6379/0"
GATEWAY_URL="http://127.0.0.1:8080"
MANAGER_URL="http://127.0.0.1:8090"
WORKER_URLS="http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003"
PROM_URL="http://127.0.0.1:9090"
# secantusd for --store mongodb: outside the ports of the native stack, of the e2e harness
# (26000-31999) and of scripts/test.sh's own secantusd (21017).
MONGODB_PORT=20017
MONGODB_URL="mongodb://127.0.0.1:$MONGODB_PORT/gpuq"
MONGODB_PIDFILE="$PID_DIR/secantusd.pid"
# The services' GPUQ_STORE_URL (cmd_up sets it from --store).
STORE_URL="sqlite://$DEV_DIR/gpuq.db"

# name  binary  port  health-path
SERVICES=(
  "gateway gpuq-gateway 8080 /healthz"
  "manager gpuq-manager 8090 /healthz"
  "worker-1 gpuq-worker 9001 /healthz"
  "worker-2 gpuq-worker 9002 /healthz"
  "worker-3 gpuq-worker 9003 /healthz"
)
PROM_SERVICE="prometheus prometheus 9090 /-/ready"
BINARIES=(gpuq-gateway gpuq-manager gpuq-worker)

svc_field() { # "LINE" INDEX
  local -a f
  read -r -a f <<<"$1"
  printf '%s' "${f[$2]}"
}

# ---------------------------------------------------------------------------------------------
# Restart loop (runs as `dev.sh __supervise NAME PROGRAM ARGS...` in its own session; the
# environment for the program is already set). Restarts the program when it exits non-zero or
# is killed by a signal; ends when its process group gets SIGTERM (dev.sh down) or when the
# program exits 0.

supervise() {
  local name="$1" child="" rc n=0 stopping=0
  shift
  # shellcheck disable=SC2317  # called by the trap below
  on_term() {
    stopping=1
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
  }
  trap on_term TERM INT HUP
  # The truth about our pid (and process group): dev.sh recorded $! already, which is the same
  # unless setsid had to fork.
  printf '%s\n' "$$" >"$PID_DIR/$name.pid"
  printf '[%s] supervisor: starting %s (%s)\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$name" "$*"
  while :; do
    "$@" &
    child=$!
    printf '%s\n' "$child" >"$PID_DIR/$name.child"
    rc=0
    wait "$child" || rc=$?
    # `wait` returns early when a trapped signal arrives: wait for the program itself.
    while pid_alive "$child"; do
      wait "$child" || rc=$?
    done
    if [ "$stopping" -eq 1 ]; then
      printf '[%s] supervisor: %s stopped (exit code %s)\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$name" "$rc"
      exit 0
    fi
    if [ "$rc" -eq 0 ]; then
      printf '[%s] supervisor: %s exited with code 0; not restarting it\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$name"
      exit 0
    fi
    n=$((n + 1))
    local how="exit code $rc"
    [ "$rc" -gt 128 ] && how="killed by signal $((rc - 128))"
    local delay=$((n < 5 ? n : 5))
    printf '[%s] restart %s of %s (%s; restarting in %ss)\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$n" "$name" "$how" "$delay"
    sleep "$delay" &
    wait $! || true
    if [ "$stopping" -eq 1 ]; then exit 0; fi
  done
}

# ---------------------------------------------------------------------------------------------
# Services

loop_pid() { # NAME -> pid of the service's restart loop when it runs
  local pid
  pid="$(pid_from_file "$PID_DIR/$1.pid")" || return 1
  # It must still be our loop (pids get reused).
  grep -qxF "GPUQDEV_SERVICE=$1" <<<"$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null)" || return 1
  printf '%s\n' "$pid"
}

# stop_services NAME... : SIGTERM to each service's process group (restart loop and program),
# all at once, then wait for them; SIGKILL what is left after 15 s.
stop_services() {
  local name pid child i
  local -a names=() loops=() children=()
  for name in "$@"; do
    if pid="$(loop_pid "$name")"; then
      child="$(pid_from_file "$PID_DIR/$name.child" || true)"
      log "stopping $name (restart loop pid $pid${child:+, process $child})"
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      names+=("$name")
      loops+=("$pid")
      children+=("${child:-}")
    fi
  done
  for i in "${!names[@]}"; do
    if ! wait_pid_gone "${loops[$i]}" 15 || { [ -n "${children[$i]}" ] && ! wait_pid_gone "${children[$i]}" 5; }; then
      warn "${names[$i]} did not stop within 15s; killing it"
      kill -KILL -- "-${loops[$i]}" 2>/dev/null || true
      if [ -n "${children[$i]}" ]; then kill -KILL "${children[$i]}" 2>/dev/null || true; fi
      wait_pid_gone "${loops[$i]}" 5 || true
    fi
  done
  for name in "$@"; do rm -f "$PID_DIR/$name.pid" "$PID_DIR/$name.child"; done
}

all_service_names() {
  local line
  for line in "${SERVICES[@]}"; do svc_field "$line" 0; printf '\n'; done
}

# Kills whatever is left of our services (e.g. a program whose loop was killed with -9).
sweep_leftovers() {
  local pid name
  for name in "${BINARIES[@]}" prometheus; do
    for pid in $(pids_matching "$name" "GPUQDEV_MARKER=$DEV_DIR"); do
      warn "killing leftover $name (pid $pid)"
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
}

# credential KEY : a line of `scripts/stack.sh credentials` (read once, by cmd_up, into CREDENTIALS).
CREDENTIALS=""
credential() {
  local v
  v="$(sed -n "s/^$1=//p" <<<"$CREDENTIALS")"
  [ -n "$v" ] || die "scripts/stack.sh credentials printed no $1"
  printf '%s' "$v"
}

start_service() { # "LINE" BIN_DIR
  local line="$1" bin_dir="$2" name prog port pid
  name="$(svc_field "$line" 0)"
  prog="$(svc_field "$line" 1)"
  port="$(svc_field "$line" 2)"
  if port_listening "$port"; then
    printf '[%s] ERROR: port %s, needed by %s, is already in use by:\n%s\n' "$(_ts)" "$port" "$name" "$(port_holder "$port")" >&2
    die "cannot start $name"
  fi
  local -a argv
  case "$name" in
    prometheus)
      argv=(prometheus "--config.file=$PROM_CONFIG" "--storage.tsdb.path=$DEV_DIR/prometheus"
        "--web.listen-address=127.0.0.1:9090")
      ;;
    *) argv=("$bin_dir/$prog") ;;
  esac
  rm -f "$PID_DIR/$name.pid" "$PID_DIR/$name.child"
  printf '\n===== %s dev.sh up: %s =====\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$name" >>"$LOG_DIR/$name.log"
  (
    cd "$ROOT"
    # This script's own knobs are not configuration for the services (a strict config loader
    # could reject unknown GPUQ_* variables); the markers below use another prefix for that.
    unset GPUQ_BIN_DIR GPUQ_SKIP_BUILD GPUQ_DEV_HEALTH_TIMEOUT GPUQ_STACK_START_TIMEOUT
    export GPUQ_AMQP_URLS="$AMQP_URLS"
    export GPUQ_REDIS_URL="$REDIS_URL"
    export GPUQ_STORE_URL="$STORE_URL"
    # Two tenants: `dev` (an admin key: every tenant's jobs) and `team-b` (a submit key: its own).
    export GPUQ_API_KEYS="dev:admin:$API_KEY,team-b:submit:$API_KEY_2"
    export GPUQ_ADMIN_TOKEN="$ADMIN_TOKEN"
    export GPUQ_MANAGER_URL="$MANAGER_URL"
    unset GPUQ_READ_TOKEN GPUQ_WORKER_SECRET GPUQ_WORKER_TOKEN
    export GPUQ_LOG_FORMAT=json
    export GPUQDEV_MARKER="$DEV_DIR"
    export GPUQDEV_SERVICE="$name"
    # Least privilege: each service logs in to RabbitMQ and Redis as its own user
    # (scripts/stack.sh credentials).
    local svc="${name%%-*}"
    case "$svc" in
      gateway | manager | worker)
        svc="$(printf '%s' "$svc" | tr 'a-z' 'A-Z')"
        GPUQ_AMQP_URLS="$(credential "AMQP_URLS_$svc")"
        GPUQ_REDIS_URL="$(credential "REDIS_URL_$svc")"
        ;;
    esac
    case "$name" in
      gateway) export GPUQ_GATEWAY_BIND="127.0.0.1:$port" ;;
      manager)
        GPUQ_RABBITMQ_MGMT_URLS="$(credential RABBITMQ_MGMT_URLS_MANAGER)"
        export GPUQ_RABBITMQ_MGMT_URLS
        export GPUQ_MANAGER_BIND="127.0.0.1:$port"
        # Only the manager holds the fleet secret; each worker gets its own credential.
        export GPUQ_READ_TOKEN="$READ_TOKEN"
        export GPUQ_WORKER_SECRET="$WORKER_SECRET"
        ;;
      worker-*)
        export GPUQ_WORKER_ID="$name"
        GPUQ_WORKER_TOKEN="$(worker_token "$WORKER_SECRET" "$name")"
        export GPUQ_WORKER_TOKEN
        export GPUQ_WORKER_BIND="127.0.0.1:$port"
        export GPUQ_GPUS=sim:2
        export GPUQ_FAULT_INJECTION=true
        # The README's `command` examples run sh and python3 — the system's, which the job user
        # (GPUQ_JOB_USER) can run; a python3 first on root's PATH may live under /root.
        local py=/usr/bin/python3
        [ -x "$py" ] || py="$(command -v python3 || echo /usr/bin/python3)"
        export GPUQ_PROGRAMS="sh=/bin/sh,python3=$py"
        ;;
    esac
    exec setsid bash "$SELF" __supervise "$name" "${argv[@]}" >>"$LOG_DIR/$name.log" 2>&1 </dev/null
  ) &
  pid=$!
  # The restart loop writes its own pid file (its pid is $pid unless setsid had to fork).
  local i
  for ((i = 0; i < 50; i++)); do
    [ -s "$PID_DIR/$name.pid" ] && break
    sleep 0.1
  done
  [ -s "$PID_DIR/$name.pid" ] || die "the restart loop of $name did not start (see $LOG_DIR/$name.log)"
  pid="$(cat "$PID_DIR/$name.pid")"
  log "started $name (restart loop pid $pid, port $port, log .dev/logs/$name.log)"
}

# Waits until every given service answers its health URL.
wait_healthy() {
  local deadline line name port path pending
  deadline=$(($(date +%s) + HEALTH_TIMEOUT))
  while :; do
    pending=()
    for line in "$@"; do
      name="$(svc_field "$line" 0)"
      port="$(svc_field "$line" 2)"
      path="$(svc_field "$line" 3)"
      http_ok "http://127.0.0.1:$port$path" || pending+=("$line")
    done
    [ "${#pending[@]}" -eq 0 ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      for line in "${pending[@]}"; do
        name="$(svc_field "$line" 0)"
        port="$(svc_field "$line" 2)"
        path="$(svc_field "$line" 3)"
        printf '[%s] ERROR: %s does not answer http://127.0.0.1:%s%s after %ss\n' "$(_ts)" "$name" "$port" "$path" "$HEALTH_TIMEOUT" >&2
        log_tail "$LOG_DIR/$name.log" 40
      done
      die "some services are not healthy (they keep running under their restart loops; 'scripts/dev.sh down' stops them)"
    fi
    sleep 0.5
  done
}

load_or_make_secrets() {
  if [ -s "$DEV_DIR/secrets" ]; then
    API_KEY="$(sed -n 's/^GPUQ_API_KEY=//p' "$DEV_DIR/secrets")"
    API_KEY_2="$(sed -n 's/^GPUQ_API_KEY_2=//p' "$DEV_DIR/secrets")"
    ADMIN_TOKEN="$(sed -n 's/^GPUQ_ADMIN_TOKEN=//p' "$DEV_DIR/secrets")"
    READ_TOKEN="$(sed -n 's/^GPUQ_READ_TOKEN=//p' "$DEV_DIR/secrets")"
    WORKER_SECRET="$(sed -n 's/^GPUQ_WORKER_SECRET=//p' "$DEV_DIR/secrets")"
  fi
  # Each missing one is made (a .dev/secrets of an older dev.sh keeps the ones it has).
  local made=()
  [ -n "${API_KEY:-}" ] || { API_KEY="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"; made+=("API key"); }
  [ -n "${API_KEY_2:-}" ] || { API_KEY_2="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"; made+=("API key of tenant team-b"); }
  [ -n "${ADMIN_TOKEN:-}" ] || { ADMIN_TOKEN="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"; made+=("admin token"); }
  [ -n "${READ_TOKEN:-}" ] || { READ_TOKEN="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"; made+=("read token"); }
  [ -n "${WORKER_SECRET:-}" ] || { WORKER_SECRET="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"; made+=("worker secret"); }
  if [ "${#made[@]}" -gt 0 ]; then
    (
      umask 077
      printf 'GPUQ_API_KEY=%s\nGPUQ_API_KEY_2=%s\nGPUQ_ADMIN_TOKEN=%s\nGPUQ_READ_TOKEN=%s\nGPUQ_WORKER_SECRET=%s\n' \
        "$API_KEY" "$API_KEY_2" "$ADMIN_TOKEN" "$READ_TOKEN" "$WORKER_SECRET" >"$DEV_DIR/secrets"
    )
    local list
    list="$(printf '%s, ' "${made[@]}")"
    log "generated in .dev/secrets: ${list%, }"
  fi
}

write_env_file() {
  (
    umask 077
    cat >"$DEV_DIR/env.tmp" <<EOF
GPUQ_GATEWAY_URL=$GATEWAY_URL
GPUQ_MANAGER_URL=$MANAGER_URL
GPUQ_API_KEY=$API_KEY
GPUQ_API_KEY_2=$API_KEY_2
GPUQ_ADMIN_TOKEN=$ADMIN_TOKEN
GPUQ_READ_TOKEN=$READ_TOKEN
GPUQ_WORKER_URLS=$WORKER_URLS
EOF
    mv "$DEV_DIR/env.tmp" "$DEV_DIR/env"
  )
}

# Debian's prometheus package starts a system instance (user prometheus) on :9090.
stop_system_prometheus() {
  local pid user
  for pid in $(pgrep -x prometheus 2>/dev/null || true); do
    user="$(ps -o user= -p "$pid" 2>/dev/null | tr -d ' ')"
    [ "$user" = prometheus ] || continue
    warn "a system Prometheus (user prometheus) is running; stopping and disabling it"
    if [ -x /etc/init.d/prometheus ] && have service; then service prometheus stop >/dev/null 2>&1 || true; fi
    have update-rc.d && update-rc.d prometheus disable >/dev/null 2>&1
    kill_pid_or_group "$pid"
  done
}

# The store of the last `up`: sqlite or mongodb.
last_store() {
  local s
  s="$(cat "$DEV_DIR/store" 2>/dev/null)" || s=sqlite
  printf '%s\n' "${s:-sqlite}"
}

# Starts the dev secantusd unless it runs already (its data stays in .dev/mongodb between runs).
start_mongodb() {
  local pid
  if pid="$(pid_from_file "$MONGODB_PIDFILE")"; then
    log "secantusd keeps running (pid $pid, port $MONGODB_PORT)"
    return 0
  fi
  secantusd_install
  secantusd_start "$MONGODB_PORT" "$DEV_DIR/mongodb" "$LOG_DIR/secantusd.log" "$MONGODB_PIDFILE"
  log "started secantusd $SECANTUSDB_VERSION (pid $(cat "$MONGODB_PIDFILE"), port $MONGODB_PORT, log .dev/logs/secantusd.log)"
}

stop_mongodb() {
  local pid
  if pid="$(pid_from_file "$MONGODB_PIDFILE")"; then
    log "stopping secantusd (pid $pid)"
  fi
  secantusd_stop "$MONGODB_PIDFILE"
}

# ---------------------------------------------------------------------------------------------
# Commands

cmd_up() {
  local release=0 with_prom=0 store=sqlite arg profile bin_dir line t0
  while [ $# -gt 0 ]; do
    arg="$1"
    shift
    case "$arg" in
      --release) release=1 ;;
      --with-prometheus) with_prom=1 ;;
      --store=*) store="${arg#--store=}" ;;
      --store)
        [ $# -gt 0 ] || die "--store needs a value: sqlite or mongodb"
        store="$1"
        shift
        ;;
      *) die "unknown option for up: $arg (use --release, --with-prometheus, --store sqlite|mongodb)" ;;
    esac
  done
  case "$store" in
    sqlite) STORE_URL="sqlite://$DEV_DIR/gpuq.db" ;;
    mongodb) STORE_URL="$MONGODB_URL" ;;
    *) die "unknown store: $store (use sqlite or mongodb)" ;;
  esac
  t0="$(now_s)"
  if [ "$with_prom" -eq 1 ] && [ ! -f "$PROM_CONFIG" ]; then
    die "--with-prometheus needs $PROM_CONFIG, which does not exist (yet)"
  fi
  have curl || apt_install curl
  ensure_job_user
  tune_job_cgroups
  mkdir -p "$LOG_DIR" "$PID_DIR"

  bash "$STACK" up
  CREDENTIALS="$(bash "$STACK" credentials)"

  profile=debug
  [ "$release" -eq 1 ] && profile=release
  if [ -n "${GPUQ_BIN_DIR:-}" ]; then
    bin_dir="$GPUQ_BIN_DIR"
    log "GPUQ_BIN_DIR is set: using the binaries in $bin_dir (not building)"
  else
    bin_dir="$ROOT/target/$profile"
    if [ "${GPUQ_SKIP_BUILD:-0}" = 1 ]; then
      log "GPUQ_SKIP_BUILD=1: not building"
    else
      log "building the binaries ($profile)"
      local -a cargo_args=(build --workspace --bins)
      [ "$release" -eq 1 ] && cargo_args+=(--release)
      (cd "$ROOT" && cargo "${cargo_args[@]}") || die "cargo build failed"
    fi
  fi
  [ -d "$bin_dir" ] || die "binary directory $bin_dir does not exist (build first, or set GPUQ_BIN_DIR)"
  bin_dir="$(cd "$bin_dir" && pwd -P)"
  for arg in "${BINARIES[@]}"; do
    [ -x "$bin_dir/$arg" ] || die "$bin_dir/$arg does not exist or is not executable (build it, or set GPUQ_BIN_DIR)"
  done

  load_or_make_secrets
  write_env_file

  # A second `up` restarts the services with the fresh binaries.
  # shellcheck disable=SC2046
  stop_services $(all_service_names)
  sweep_leftovers
  if [ "$store" = mongodb ]; then
    start_mongodb
  else
    stop_mongodb # left by an earlier `up --store mongodb`; its data stays in .dev/mongodb
  fi
  printf '%s\n' "$store" >"$DEV_DIR/store"

  local -a started=("${SERVICES[@]}")
  for line in "${SERVICES[@]}"; do start_service "$line" "$bin_dir"; done
  if [ "$with_prom" -eq 1 ]; then
    have prometheus || apt_install prometheus
    stop_system_prometheus
    stop_services prometheus
    mkdir -p "$DEV_DIR/prometheus"
    start_service "$PROM_SERVICE" "$bin_dir"
    started+=("$PROM_SERVICE")
  elif loop_pid prometheus >/dev/null; then
    log "prometheus keeps running (started by an earlier 'up --with-prometheus')"
  fi

  log "waiting for the services to answer their health checks (timeout ${HEALTH_TIMEOUT}s)"
  wait_healthy "${started[@]}"
  log "dev stack is up in $(elapsed "$t0")s"
  cat <<EOF

  gateway      $GATEWAY_URL        (API keys in .dev/env: GPUQ_API_KEY, tenant dev, admin; GPUQ_API_KEY_2, tenant team-b)
  manager UI   $MANAGER_URL/ui   (token in .dev/env: GPUQ_READ_TOKEN, or GPUQ_ADMIN_TOKEN to act)
  workers      http://127.0.0.1:9001  http://127.0.0.1:9002  http://127.0.0.1:9003
  RabbitMQ     http://127.0.0.1:15672  (guest / guest; the services log in as their own users:
               scripts/stack.sh credentials)
  Redis        $REDIS_URL
  store        $STORE_URL
EOF
  if loop_pid prometheus >/dev/null; then
    printf '  Prometheus   %s\n' "$PROM_URL"
  fi
  cat <<EOF

  URLs and secrets: .dev/env   logs: .dev/logs/   state: scripts/dev.sh status

  Try:
    set -a; . .dev/env; set +a
    curl -s -X POST "\$GPUQ_GATEWAY_URL/v1/jobs" -H "Authorization: Bearer \$GPUQ_API_KEY" \\
      -H 'Content-Type: application/json' -d '{"kind":"simulate","params":{"duration_ms":2000}}'
    curl -s "\$GPUQ_GATEWAY_URL/v1/jobs/<id>" -H "Authorization: Bearer \$GPUQ_API_KEY"

EOF
}

cmd_down() {
  # shellcheck disable=SC2046
  stop_services $(all_service_names) prometheus
  sweep_leftovers
  stop_mongodb
  bash "$STACK" down
}

cmd_status() {
  local ok=0 line name port path pid child restarts state
  for line in "${SERVICES[@]}" "$PROM_SERVICE"; do
    name="$(svc_field "$line" 0)"
    port="$(svc_field "$line" 2)"
    path="$(svc_field "$line" 3)"
    restarts=0
    if [ -f "$LOG_DIR/$name.log" ]; then
      # Restarts since the last `up`.
      restarts="$(awk '/^===== .* dev.sh up: / { n = 0 } / restart [0-9]+ of / { n++ } END { print n + 0 }' "$LOG_DIR/$name.log")"
    fi
    if pid="$(loop_pid "$name")"; then
      child="$(pid_from_file "$PID_DIR/$name.child" || true)"
      if http_ok "http://127.0.0.1:$port$path"; then
        state="up (healthy)"
      elif [ -n "$child" ]; then
        state="running, NOT healthy"
        ok=1
      else
        state="restarting"
        ok=1
      fi
      printf '%-12s %-22s loop %s, process %s, port %s, restarts %s\n' "$name" "$state" "$pid" "${child:--}" "$port" "$restarts"
    else
      [ "$name" = prometheus ] && continue
      printf '%-12s %s\n' "$name" "down"
      ok=1
    fi
  done
  if pid="$(pid_from_file "$MONGODB_PIDFILE")"; then
    if port_listening "$MONGODB_PORT"; then state="up"; else state="running, NOT listening"; ok=1; fi
    printf '%-12s %-22s pid %s, port %s, data .dev/mongodb (secantusd %s)\n' mongodb "$state" "$pid" "$MONGODB_PORT" "$SECANTUSDB_VERSION"
  elif [ "$(last_store)" = mongodb ]; then
    printf '%-12s %s\n' mongodb "down"
    ok=1
  fi
  if [ "$(last_store)" = mongodb ]; then
    printf '%-12s %s\n' store "$MONGODB_URL"
  else
    printf '%-12s %s\n' store "sqlite://$DEV_DIR/gpuq.db"
  fi
  echo
  bash "$STACK" status || ok=1
  return "$ok"
}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

main() {
  local cmd="${1:-}"
  [ $# -gt 0 ] && shift
  case "$cmd" in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    __supervise) supervise "$@" ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
  esac
}

main "$@"; exit "$?" # (one line: safe even if this file is edited while it runs)
