# shellcheck shell=bash
# The 3-node RabbitMQ cluster of the native stack (scripts/stack.sh sources this file; its
# functions use stack.sh's variables STACK_DIR, RMQ_BIN, RMQ_TEMPLATE, NODES, START_TIMEOUT,
# STOP_TIMEOUT and its helpers): each node's directory, cookie and configuration, starting one and
# waiting for it, clustering, stopping. The pitfalls each function works around are in its text.

ensure_cookie() {
  mkdir -p "$STACK_DIR"
  if [ ! -s "$STACK_DIR/.erlang.cookie" ]; then
    # 32 upper-case hex characters (no pipe that closes early: this runs under pipefail).
    (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F' >"$STACK_DIR/.erlang.cookie")
    chmod 400 "$STACK_DIR/.erlang.cookie"
  fi
}

# Writes the node's directories and configuration (idempotent; data is never touched).
prepare_node() {
  local n="$1" d
  d="$(node_dir "$n")"
  [ -f "$RMQ_TEMPLATE" ] || die "RabbitMQ config template $RMQ_TEMPLATE is missing"
  ensure_cookie
  mkdir -p "$d/home" "$d/mnesia" "$d/log"
  if ! cmp -s "$STACK_DIR/.erlang.cookie" "$d/home/.erlang.cookie" 2>/dev/null; then
    rm -f "$d/home/.erlang.cookie"
    cp "$STACK_DIR/.erlang.cookie" "$d/home/.erlang.cookie"
  fi
  chmod 400 "$d/home/.erlang.cookie"
  sed -e "s/@MGMT_PORT@/$(mgmt_port "$n")/g" -e "s/@PROM_PORT@/$(prom_port "$n")/g" \
    -e "s/@AMQPS_PORT@/$(amqps_port "$n")/g" -e "s|@TLS_DIR@|$TLS_DIR|g" \
    "$RMQ_TEMPLATE" >"$d/rabbitmq.conf.tmp"
  local peers=""
  if [ "$n" != 1 ]; then
    peers="$(node_name 1)"
  elif [ -z "$(ls -A "$d/mnesia/$(node_name 1)" 2>/dev/null)" ]; then
    # rabbit1 normally seeds the cluster; but a fresh (wiped) rabbit1 while the other nodes run
    # must join them instead of starting a cluster of its own.
    local m
    for m in 2 3; do
      if node_pid "$m" >/dev/null; then peers="$(node_name "$m")"; fi
    done
  fi
  if [ -n "$peers" ]; then
    cat >>"$d/rabbitmq.conf.tmp" <<EOF

# Added by scripts/stack.sh: at its first boot (empty data dir) this node joins $peers's cluster
# by itself (classic peer discovery), retrying for up to 2 minutes while that node boots. This
# saves the stop_app/join_cluster/start_app round (stack.sh still does that as a repair when the
# node ends up outside the cluster). A node with data rejoins its known cluster on restart.
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = $peers
cluster_formation.discovery_retry_limit = 240
cluster_formation.discovery_retry_interval = 500
EOF
  fi
  mv "$d/rabbitmq.conf.tmp" "$d/rabbitmq.conf"
  printf '[rabbitmq_management,rabbitmq_prometheus].\n' >"$d/enabled_plugins"
  # An empty env file so /etc/rabbitmq/rabbitmq-env.conf does not apply to our nodes.
  : >"$d/rabbitmq-env.conf"
}

# Exports node N's environment and enters its directory (call inside a subshell).
enter_node_env() {
  local n="$1" d
  d="$(node_dir "$n")"
  cd "$d" || exit
  export HOME="$d/home"
  export RABBITMQ_NODENAME="rabbit$n@localhost"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$((5671 + n))"
  export RABBITMQ_DIST_PORT="$((25671 + n))"
  export RABBITMQ_MNESIA_BASE="$d/mnesia"
  export RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
  export RABBITMQ_PID_FILE="$d/rabbit$n.pid"
  export RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
  export ERL_CRASH_DUMP="$d/log/erl_crash.dump"
  export ERL_EPMD_ADDRESS=127.0.0.1
  export GPUQ_STACK_MARKER="$d"
}

# Runs a command with node N's environment, from its directory.
with_node_env() {
  local n="$1"
  shift
  (
    enter_node_env "$n"
    exec "$@"
  )
}

rmqctl() {
  local n="$1"
  shift
  with_node_env "$n" "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"
}

# Prints the pid of node N's beam.smp when it runs.
node_pid() {
  local n="$1" d pid
  d="$(node_dir "$n")"
  pid="$(node_procs "$n" | sed -n 1p)"
  if [ -z "$pid" ] && pid="$(pid_from_file "$d/server.pid")"; then
    # Still in the start scripts, before erl execs the VM.
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$d" ] || pid=""
  fi
  [ -n "$pid" ] || return 1
  printf '%s\n' "$pid"
}

node_log() { printf '%s/log/%s.log' "$(node_dir "$1")" "$(node_name "$1")"; }

# The console output of node N's last start.
this_start_log() {
  awk '/^===== .* starting / { s = "" } { s = s $0 "\n" } END { printf "%s", s }' \
    "$(node_dir "$1")/console.log" 2>/dev/null
}

node_failure_logs() {
  local n="$1" d
  d="$(node_dir "$n")"
  log_tail "$d/console.log" 30
  log_tail "$(node_log "$n")" 40
  # The first error of the last start is usually the cause (config errors, ports in use).
  if [ -f "$d/console.log" ]; then
    printf -- '----- first error of this start (%s) -----\n' "$d/console.log" >&2
    awk '/^===== .* starting / { n = 0; f = 0 }
         { a[++n] = $0; if (!f && $0 ~ /\[error\]|^Error|eaddrinuse/) f = n }
         END { if (f) for (i = f; i <= n && i < f + 12; i++) print "  | " a[i] }' "$d/console.log" >&2
    printf -- '-----\n' >&2
  fi
}

check_node_ports_free() {
  local n="$1" p bad=0
  for p in "$(amqp_port "$n")" "$(amqps_port "$n")" "$(mgmt_port "$n")" "$(prom_port "$n")" "$(dist_port "$n")"; do
    if port_listening "$p"; then
      printf '[%s] ERROR: port %s, needed by %s, is already in use by:\n%s\n' "$(_ts)" "$p" "$(node_name "$n")" "$(port_holder "$p")" >&2
      bad=1
    fi
  done
  if port_listening 4369 && ! pgrep -x epmd >/dev/null 2>&1; then
    printf '[%s] ERROR: the epmd port 4369 is held by something that is not epmd:\n%s\n' "$(_ts)" "$(port_holder 4369)" >&2
    bad=1
  fi
  [ "$bad" -eq 0 ] || die "cannot start $(node_name "$n"): stop what holds its ports first"
}

# Starts node N in the background (does not wait for it).
launch_node() {
  local n="$1" d pid
  d="$(node_dir "$n")"
  if pid="$(node_pid "$n")"; then
    log "$(node_name "$n") already runs (pid $pid)"
    return 0
  fi
  check_node_ports_free "$n"
  prepare_node "$n"
  rm -f "$d/rabbit$n.pid"
  {
    printf '\n===== %s starting %s =====\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$(node_name "$n")"
  } >>"$d/console.log"
  # `rabbitmq-server -detached` fails silently here and /usr/sbin/rabbitmq-server drops to the
  # rabbitmq user: run the real script in its own session, in the background.
  # The subshell execs setsid, which execs the script, which execs erl: $! ends up as beam.smp.
  (
    enter_node_env "$n"
    exec setsid "$RMQ_BIN/rabbitmq-server" >>"$d/console.log" 2>&1 </dev/null 9>&-
  ) &
  pid=$!
  printf '%s\n' "$pid" >"$d/server.pid"
  log "started $(node_name "$n") (pid $pid, amqp $(amqp_port "$n"), amqps $(amqps_port "$n"), management $(mgmt_port "$n"))"
}

# listening_all PORT... : true when every port listens (one `ss` call: this is polled).
listening_all() {
  local out p
  if ! have ss; then
    for p in "$@"; do port_listening "$p" || return 1; done
    return 0
  fi
  out="$(ss -Hltn 2>/dev/null)" || return 1
  for p in "$@"; do
    grep -qE "[:.]${p}[[:space:]]" <<<"$out" || return 1
  done
}

# Waits until node N has fully booted; prints its logs and fails when it does not.
await_node() {
  local n="$1" start deadline pid out left relaunched=0
  start=$(date +%s)
  deadline=$((start + START_TIMEOUT))
  pid="$(node_pid "$n")" || pid=""
  while :; do
    # Polled cheaply (kill -0 is a builtin): process spawns are slow in this sandbox and the
    # booting nodes need the CPU.
    if ! pid_alive "$pid"; then
      # RabbitMQ 3.10 can stop a node that restarts while its peers boot too (feature flag
      # sync: `incompatible_feature_flags` … `badmap`), and the peers then wait for it until
      # their own timeout. Starting it again at once lets all three finish booting.
      if [ "$relaunched" -lt 2 ] && this_start_log "$n" | grep -q incompatible_feature_flags; then
        relaunched=$((relaunched + 1))
        printf '[%s] WARNING: %s stopped on the feature-flag sync with booting peers; starting it again\n' "$(_ts)" "$(node_name "$n")" >&2
        sleep 1
        launch_node "$n" >&2
        pid="$(node_pid "$n")" || pid=""
        continue
      fi
      printf '[%s] ERROR: %s exited while starting\n' "$(_ts)" "$(node_name "$n")" >&2
      node_failure_logs "$n"
      return 1
    fi
    left=$((deadline - $(date +%s)))
    if [ "$left" -le 0 ]; then
      printf '[%s] ERROR: %s did not finish booting within %ss\n' "$(_ts)" "$(node_name "$n")" "$START_TIMEOUT" >&2
      node_failure_logs "$n"
      return 1
    fi
    # Each rabbitmqctl call starts an Erlang VM, which costs a CPU-second on this small machine
    # and slows down the booting nodes: wait until the node's AMQP, management and prometheus
    # ports listen (the end of its boot), then let one await_startup call confirm. It fails at
    # once while the node is not reachable, hence the loop.
    if listening_all "$(amqp_port "$n")" "$(amqps_port "$n")" "$(mgmt_port "$n")" "$(prom_port "$n")" ||
      [ $(($(date +%s) - start)) -ge 45 ]; then
      if out="$(rmqctl "$n" -q await_startup --timeout "$left" 2>&1)"; then
        return 0
      fi
      sleep 1
    else
      sleep 0.5
    fi
  done
}

# Runs await_node for several nodes in parallel.
await_nodes() {
  local n pids=() rc=0 i=0
  for n in "$@"; do
    await_node "$n" &
    pids+=($!)
  done
  for n in "$@"; do
    if ! wait "${pids[$i]}"; then rc=1; fi
    i=$((i + 1))
  done
  return "$rc"
}

# cluster_status of node N as JSON (empty when it does not answer).
cluster_json() {
  rmqctl "$1" -q cluster_status --formatter json 2>/dev/null | tr -d '\n ' || true
}

# Same, retried a few times (right after a boot or a join, a call can fail transiently).
cluster_json_retry() {
  local i json
  for i in 1 2 3 4 5; do
    json="$(cluster_json "$1")"
    if [ -n "$json" ]; then
      printf '%s\n' "$json"
      return 0
    fi
    sleep "$i"
  done
  return 0
}

# json_list JSON KEY -> the names in the list "KEY":[...], one per line.
json_list() {
  printf '%s' "$1" | grep -o "\"$2\":\[[^]]*\]" | sed -n 1p | grep -o 'rabbit[0-9]*@[A-Za-z0-9._-]*' || true
}

# Joins node N (2 or 3) to rabbit1 unless it is already a member of that cluster.
ensure_clustered() {
  local n="$1" json leader
  leader="$(node_name 1)"
  json="$(cluster_json "$n")"
  if grep -qxF "$leader" <<<"$(json_list "$json" disk_nodes)"; then
    log "$(node_name "$n") is already clustered with $leader"
    return 0
  fi
  log "joining $(node_name "$n") to $leader"
  rmqctl "$n" -q stop_app >/dev/null
  if ! rmqctl "$n" -q join_cluster "$leader" >"$STACK_DIR/join.out" 2>&1; then
    # Most likely a stale membership (e.g. this node's or rabbit1's data was wiped): make rabbit1
    # forget this node, reset it and try once more.
    warn "join_cluster failed: $(tr '\n' ' ' <"$STACK_DIR/join.out")- resetting $(node_name "$n") and retrying"
    rmqctl 1 -q forget_cluster_node "$(node_name "$n")" >/dev/null 2>&1 || true
    rmqctl "$n" -q reset >/dev/null 2>&1 || true
    if ! rmqctl "$n" -q join_cluster "$leader" >"$STACK_DIR/join.out" 2>&1; then
      cat "$STACK_DIR/join.out" >&2
      rmqctl "$n" -q start_app >/dev/null 2>&1 || true
      die "$(node_name "$n") could not join $leader"
    fi
  fi
  rmqctl "$n" -q start_app >/dev/null
  await_node "$n" || die "$(node_name "$n") did not come back after joining the cluster"
}

stop_node() {
  local n="$1" pid
  if ! pid="$(node_pid "$n")"; then
    log "$(node_name "$n") is not running"
    return 0
  fi
  log "stopping $(node_name "$n") (pid $pid)"
  rmqctl "$n" -q stop >/dev/null 2>&1 || true
  if ! wait_pid_gone "$pid" "$STOP_TIMEOUT"; then
    warn "$(node_name "$n") did not stop within ${STOP_TIMEOUT}s; killing it"
    kill_pid_or_group "$pid"
  fi
  # Anything else left from this node (should be nothing): the VM, then the start script that
  # leads the node's session, then helpers.
  for pid in $(node_procs "$n"); do kill_pid_or_group "$pid"; done
  if pid="$(pid_from_file "$(node_dir "$n")/server.pid")" &&
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$(node_dir "$n")" ]; then
    kill_pid_or_group "$pid"
  fi
  for pid in $(pids_under_cwd "$(node_dir "$n")" "${STACK_PROC_NAMES[@]}"); do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$(node_dir "$n")/server.pid"
}

# Stops epmd when no Erlang node at all is left on the machine.
stop_epmd_if_unused() {
  local pid
  if pgrep -x beam.smp >/dev/null 2>&1; then return 0; fi
  for pid in $(pgrep -x epmd 2>/dev/null || true); do
    kill -TERM "$pid" 2>/dev/null || true
    wait_pid_gone "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true
  done
}

rabbit_up_all() {
  local n json members running
  for n in "${NODES[@]}"; do launch_node "$n"; done
  log "waiting for the RabbitMQ nodes (timeout ${START_TIMEOUT}s each)"
  if ! await_nodes "${NODES[@]}"; then
    # RabbitMQ 3.10 can stop a node that restarts while its peers boot too (feature flag sync:
    # `incompatible_feature_flags` … `badmap`); once the others run, starting it again works.
    # launch_node skips the nodes that run (a node that is still booting is waited on again).
    warn "starting the RabbitMQ nodes that exited once more"
    for n in "${NODES[@]}"; do launch_node "$n"; done
    await_nodes "${NODES[@]}" || die "RabbitMQ did not start (logs above; data in $STACK_DIR)"
  fi
  json="$(cluster_json_retry 1)"
  members="$(json_list "$json" disk_nodes)"
  running="$(json_list "$json" running_nodes)"
  if [ "$(printf '%s\n' "$running" | grep -c .)" -ne "${#NODES[@]}" ]; then
    for n in 2 3; do
      if ! grep -qxF "$(node_name "$n")" <<<"$members"; then
        ensure_clustered "$n"
      fi
    done
  fi
  # rabbit1 may learn about a node that just booted or joined a moment later.
  for n in 1 2 3 4 5 6 7 8 9 10; do
    [ "$(printf '%s\n' "$running" | grep -c .)" -eq "${#NODES[@]}" ] && break
    [ "$n" -eq 10 ] && die "RabbitMQ cluster incomplete: running nodes are: $(printf '%s' "$running" | tr '\n' ' ')"
    sleep 1
    json="$(cluster_json_retry 1)"
    running="$(json_list "$json" running_nodes)"
  done
  # A node enables every feature flag at its first boot only when no other node is connected to
  # it; with the other nodes joining while it boots it leaves them all disabled, and quorum
  # queues (feature flag quorum_queue) could not be declared. Enabling is idempotent.
  local i out=""
  for i in 1 2 3 4 5; do
    if out="$(rmqctl 1 -q enable_feature_flag all 2>&1)"; then break; fi
    [ "$i" -eq 5 ] && die "could not enable RabbitMQ's feature flags: $out"
    warn "enable_feature_flag failed (attempt $i): $out"
    sleep "$i"
  done
  log "RabbitMQ cluster running: $(printf '%s' "$running" | sort | tr '\n' ' ')"
}

node_start() {
  local n="$1" json
  launch_node "$n"
  await_node "$n" || die "$(node_name "$n") did not start"
  if [ "$n" != 1 ]; then
    ensure_clustered "$n"
  fi
  json="$(cluster_json "$n")"
  log "$(node_name "$n") is up; running cluster nodes: $(json_list "$json" running_nodes | tr '\n' ' ')"
}
