#!/usr/bin/env bash
# Runs every test of the repository, on a fresh machine too (CI runs it through .ci/run from a
# clean clone, with CI=true and no stdin):
#   1. installs what is missing (rabbitmq-server, redis-server, prometheus for promtool, sqlite3,
#      docker.io and mmdebstrap;
#      cargo-nextest, cargo-deny; rustfmt and clippy; secantusdb, pinned, with pip: see scripts/lib.sh)
#   2. cargo fmt --check, cargo clippy -D warnings, cargo deny (deny.toml: licenses, bans, sources)
#   3. builds once: cargo build --workspace --bins (the end-to-end tests spawn these from
#      target/debug), then every test binary (cargo nextest run --workspace --no-run). Every
#      cargo call here selects the whole workspace, so all of them resolve the same features and
#      share one build of the dependency graph (see tests/Cargo.toml); later phases compile
#      nothing
#   4. starts the local stack (scripts/stack.sh up) unless it already runs (stopped at the end
#      only when this script started it), then the production shape in the background
#      (scripts/compose.sh up --local-images: docker-compose.yml on stand-in images built here;
#      a Docker engine started when none runs)
#   5. starts secantusd (a MongoDB stand-in) on 127.0.0.1:21017 for the MongoDB store contract,
#      unless GPUQ_TEST_MONGODB_URL names a server already; cargo nextest run --workspace
#      --no-fail-fast (end-to-end suites on SQLite), the pipeline suite once more with the
#      services on MongoDB, then the disruptive suite; stops secantusd
#   6. every scripts/checks/*.sh, in sorted order
#   7. the compose tests against the production shape started in step 4, while the local stack
#      stops; then down -v, the same env file turned to TLS on every connection (compose.sh init
#      --tls), up --local-images again and the compose_tls tests against it; then down -v
#   8. prints the wall time of each phase; exits non-zero when anything failed
# Every phase runs even when an earlier one failed (except the tests when the build failed), so
# that one run shows every problem. Logs: test-artifacts/.
# The phase functions are called indirectly, through run_phase.
# shellcheck disable=SC2317
set -uo pipefail

# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/lib.sh"

ROOT="$GPUQ_REPO_ROOT"
STACK="$ROOT/scripts/stack.sh"
ARTIFACTS="$ROOT/test-artifacts"
cd "$ROOT" || exit 1
mkdir -p "$ARTIFACTS"
rm -f "$ARTIFACTS/nextest.log"
exec 0</dev/null # no stdin (as in CI)

if ! have cargo && [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
  export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

T_START="$(now_s)"
PHASE_NAMES=()
PHASE_RESULTS=()
PHASE_TIMES=()
FAILED=0

# run_phase NAME COMMAND... : runs the command in a subshell (so that `die` or `exit` ends only
# the phase), records its result and wall time.
run_phase() {
  local name="$1" t0 rc
  shift
  printf '\n======== %s ========\n' "$name"
  t0="$(now_s)"
  ("$@")
  rc=$?
  PHASE_NAMES+=("$name")
  PHASE_TIMES+=("$(elapsed "$t0")")
  if [ "$rc" -eq 0 ]; then
    PHASE_RESULTS+=("ok")
  else
    PHASE_RESULTS+=("FAILED ($rc)")
    FAILED=1
    printf '======== %s FAILED (exit code %s) ========\n' "$name" "$rc"
  fi
  return "$rc"
}

skip_phase() { # NAME REASON
  printf '\n======== %s: skipped (%s) ========\n' "$1" "$2"
  PHASE_NAMES+=("$1")
  PHASE_TIMES+=("0.0")
  PHASE_RESULTS+=("skipped: $2")
  FAILED=1
}

# ---------------------------------------------------------------------------------------------
# Phases

phase_install() {
  apt_install rabbitmq-server redis-server redis-tools prometheus chromium sqlite3 curl iproute2 procps \
    docker.io mmdebstrap binutils || return 1
  secantusd_install || return 1
  ensure_job_user || return 1
  tune_job_cgroups
  find_compose || return 1 # Docker Compose v2 (scripts/lib.sh), for compose.sh and its tests
  printf 'docker compose: %s\n' "${COMPOSE[*]}"
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked || return 1
  fi
  if ! cargo deny --version >/dev/null 2>&1; then
    log "installing cargo-deny (the supply_chain phase)"
    cargo install cargo-deny --locked || return 1
  fi
  if ! cargo fmt --version >/dev/null 2>&1; then
    log "adding the rustup component rustfmt"
    rustup component add rustfmt || return 1
  fi
  if ! cargo clippy --version >/dev/null 2>&1; then
    log "adding the rustup component clippy"
    rustup component add clippy || return 1
  fi
  cargo --version && cargo nextest --version | head -n 1
  printf 'secantusdb %s: %s\n' "$SECANTUSDB_VERSION" "$(secantusd_path)"
}

phase_fmt() { cargo fmt --all -- --check; }
phase_clippy() { cargo clippy --workspace --all-targets -- -D warnings; }
# deny.toml: licenses, banned crates and sources, from the lock file alone (no network).
phase_supply_chain() { cargo deny --offline check licenses bans sources; }
phase_build() { cargo build --workspace --bins; }
phase_build_tests() { cargo nextest run --workspace --no-run; }
phase_stack() { bash "$STACK" up; }

# nextest_pass LABEL CARGO_ARGS... : one nextest run, after a "-- nextest pass LABEL" line, its
# output also appended to test-artifacts/nextest.log (the summary prints those lines).
nextest_pass() {
  local label="$1"
  shift
  printf -- '\n-- nextest pass %s\n' "$label" | tee -a "$ARTIFACTS/nextest.log"
  cargo "$@" 2>&1 | tee -a "$ARTIFACTS/nextest.log"
  return "${PIPESTATUS[0]}"
}

# Every suite but `disruptive` runs in parallel, the end-to-end ones on SQLite stores; then the
# pipeline suite again with every service on the MongoDB store (secantusd); `disruptive` stops
# RabbitMQ nodes and Redis of the shared stack, so it runs last, alone, one test at a time.
phase_tests() {
  local -a args=(nextest run --workspace --no-fail-fast)
  # A `ci` nextest profile (retries, timeouts, JUnit), when the repository defines one.
  if [ "${CI:-}" = true ] && [ -f .config/nextest.toml ] && grep -q '^\[profile\.ci\]' .config/nextest.toml; then
    args+=(--profile ci)
  fi
  local rc1 rc2 rc3 rc_mongo=0 mongo
  export GPUQ_TEST_AMQP_URLS="amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f,amqp://guest:guest@127.0.0.1:5674/%2f"
  export GPUQ_TEST_REDIS_URL="redis://127.0.0.1:6379/0"
  # The stack's TLS listeners (scripts/stack.sh): its dev CA, AMQPS 5681-5683, Redis TLS on 6380.
  export GPUQ_TEST_TLS_CA="$ROOT/.stack/tls/ca.pem"
  export GPUQ_TEST_AMQPS_URLS="amqps://guest:guest@127.0.0.1:5681/%2f,amqps://guest:guest@127.0.0.1:5682/%2f,amqps://guest:guest@127.0.0.1:5683/%2f"
  export GPUQ_TEST_REDISS_URL="rediss://127.0.0.1:6380/0"
  export GPUQ_TEST_STACK_SCRIPT="$STACK"
  # Least privilege: the services the suites spawn log in as their own users (the harness reads
  # GPUQ_TEST_AMQP_URLS_<SERVICE>, GPUQ_TEST_REDIS_URL_<SERVICE>, GPUQ_TEST_RABBITMQ_MGMT_URLS_MANAGER).
  # A stack started by an older stack.sh has no such users: the suites then run as the admin and
  # tests/e2e/least_privilege.rs fails, naming what is missing (`scripts/stack.sh up` adds them).
  local line creds
  if creds="$(bash "$STACK" credentials)"; then
    while IFS= read -r line; do
      export "GPUQ_TEST_$line"
    done <<<"$creds"
  else
    log "WARNING: no per-service credentials from scripts/stack.sh credentials: the services run as the admin"
  fi
  export GPUQ_BIN_DIR="$ROOT/target/debug"
  # The MongoDB store contract always runs: without a server it fails, it is never skipped.
  if [ -n "${GPUQ_TEST_MONGODB_URL:-}" ]; then
    mongo="the server GPUQ_TEST_MONGODB_URL names"
    log "GPUQ_TEST_MONGODB_URL is set: MongoDB tests use that server (no secantusd started)"
  else
    mongo="secantusd $SECANTUSDB_VERSION on 127.0.0.1:$TEST_MONGODB_PORT"
    log "starting $mongo, data in $TEST_MONGODB_DIR (log test-artifacts/secantusd.log)"
    if (secantusd_start "$TEST_MONGODB_PORT" "$TEST_MONGODB_DIR/data" "$ARTIFACTS/secantusd.log" "$TEST_MONGODB_DIR/pid"); then
      export GPUQ_TEST_MONGODB_URL="mongodb://127.0.0.1:$TEST_MONGODB_PORT"
    else
      rc_mongo=1
      mongo="no server (secantusd did not start: it fails)"
      log "FAILED: no MongoDB server; the MongoDB store contract will fail for want of GPUQ_TEST_MONGODB_URL"
    fi
  fi
  nextest_pass "1/3: every suite but disruptive; end-to-end on SQLite stores, the MongoDB store contract on $mongo" \
    "${args[@]}" -E 'not (binary(e2e) and test(/^disruptive::/))'
  rc1=$?
  if [ -n "${GPUQ_TEST_MONGODB_URL:-}" ]; then
    GPUQ_TEST_STORE=mongodb nextest_pass "2/3: tests/e2e/pipeline.rs with every service on the MongoDB store ($mongo, a database per test)" \
      "${args[@]}" -E 'binary(e2e) and test(/^pipeline::/)'
    rc2=$?
  else
    printf -- '\n-- nextest pass 2/3: tests/e2e/pipeline.rs on the MongoDB store: NOT RUN (no MongoDB server)\n' | tee -a "$ARTIFACTS/nextest.log"
    rc2=1
  fi
  secantusd_stop "$TEST_MONGODB_DIR/pid"
  nextest_pass "3/3: disruptive, alone, one test at a time (SQLite stores)" \
    "${args[@]}" -E 'binary(e2e) and test(/^disruptive::/)' --test-threads 1
  rc3=$?
  [ "$rc_mongo" -eq 0 ] && [ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ] && [ "$rc3" -eq 0 ]
}

# The production shape: docker-compose.yml on local stand-in images (scripts/compose.sh up
# --local-images, with an env file of its own, never the user's .env). `up` mostly waits for the
# containers' RabbitMQ cluster to form, so it runs in the background while the native suites run;
# its output goes to test-artifacts/compose-up.log. Then tests/e2e/compose.rs against it, one test at
# a time, and `down -v`, which fails if anything of the project is left.
COMPOSE_UP_PID=""
COMPOSE_UP_T0=""
compose_up_start() {
  export GPUQ_COMPOSE_ENV_FILE="$TEST_COMPOSE_DIR/.env"
  rm -f "$GPUQ_COMPOSE_ENV_FILE"
  if ! bash scripts/compose.sh init >/dev/null; then
    log "FAILED: scripts/compose.sh init"
    return 1
  fi
  STARTED_COMPOSE=1
  log "starting the compose stack in the background (log: test-artifacts/compose-up.log)"
  COMPOSE_UP_T0="$(now_s)"
  bash scripts/compose.sh up --local-images >"$ARTIFACTS/compose-up.log" 2>&1 &
  COMPOSE_UP_PID=$!
}

# compose_up_wait : waits for the background `up` and records it as the phase "compose up".
compose_up_wait() {
  local rc=1
  printf '\n======== compose up (started in the background after the build) ========\n'
  if [ -n "$COMPOSE_UP_PID" ]; then
    wait "$COMPOSE_UP_PID"
    rc=$?
    cat "$ARTIFACTS/compose-up.log"
  fi
  PHASE_NAMES+=("compose up (overlapped)")
  PHASE_TIMES+=("$(elapsed "${COMPOSE_UP_T0:-$(now_s)}")")
  if [ "$rc" -eq 0 ]; then
    PHASE_RESULTS+=("ok")
  else
    PHASE_RESULTS+=("FAILED ($rc)")
    FAILED=1
  fi
  return "$rc"
}

phase_compose_tests() {
  nextest_pass "compose: tests/e2e/compose.rs against docker-compose.yml on stand-in images, one at a time" \
    nextest run --workspace --no-fail-fast -E 'binary(e2e) and test(/^compose::/)' --run-ignored only --test-threads 1
}

# The same env file turned to TLS (init --tls keeps it), on fresh volumes: down -v, then up with
# the images already built: 82 s here (down 5 s, up 77 s; a fresh TLS stack is healthy sooner
# than the running one is after restarting every container with TLS, 111 s). The
# certificates go to .tls/, removed at the end when this run made it.
phase_compose_tls_up() {
  bash scripts/compose.sh down -v && bash scripts/compose.sh init --tls >/dev/null &&
    bash scripts/compose.sh up --local-images
}

phase_compose_tls_tests() {
  nextest_pass "compose TLS: tests/e2e/compose_tls.rs against docker-compose.yml + docker-compose.tls.yml" \
    nextest run --workspace --no-fail-fast -E 'binary(e2e) and test(/^compose_tls::/)' --run-ignored only --test-threads 1
}

phase_compose_down() {
  bash scripts/compose.sh down -v
}

# ---------------------------------------------------------------------------------------------

STARTED_STACK=0
STARTED_COMPOSE=0
MADE_TLS_DIR=0
TEST_COMPOSE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpuq-test-compose.XXXXXX")" || exit 1
# The tests phase's secantusd (a MongoDB stand-in): its pid file and data live here, and it must
# not outlive this script. Its port is outside the native stack's, the e2e harness's test ports
# (26000-31999) and 16672-19999 (a compose stack of another developer).
TEST_MONGODB_PORT=21017
TEST_MONGODB_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpuq-test-mongodb.XXXXXX")" || exit 1
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  secantusd_stop "$TEST_MONGODB_DIR/pid"
  rm -rf "$TEST_MONGODB_DIR"
  if [ -n "${COMPOSE_UP_PID:-}" ] && kill -0 "$COMPOSE_UP_PID" 2>/dev/null; then
    kill "$COMPOSE_UP_PID" 2>/dev/null
    wait "$COMPOSE_UP_PID" 2>/dev/null
  fi
  if [ "$STARTED_COMPOSE" -eq 1 ]; then
    printf '\n======== removing the compose stack this run started ========\n'
    bash scripts/compose.sh down -v || true
  fi
  rm -rf "$TEST_COMPOSE_DIR"
  [ "$MADE_TLS_DIR" -eq 0 ] || rm -rf "$ROOT/.tls"
  if [ "$STARTED_STACK" -eq 1 ]; then
    printf '\n======== stopping the stack this run started ========\n'
    bash "$STACK" down || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "gpuq test run in $ROOT (CI=${CI:-})"

run_phase install phase_install
run_phase fmt phase_fmt
run_phase clippy phase_clippy
run_phase "supply chain" phase_supply_chain
BUILD_OK=1
run_phase build phase_build || BUILD_OK=0

if [ "$BUILD_OK" -eq 1 ]; then
  run_phase "build tests" phase_build_tests || BUILD_OK=0
fi

if bash "$STACK" status >/dev/null 2>&1; then
  log "the local stack already runs: using it (and leaving it running)"
else
  STARTED_STACK=1
  run_phase stack phase_stack
fi

# After the local stack is up: six RabbitMQ nodes booting at once on two cores is what makes
# RabbitMQ 3.10's feature-flag sync race likely (see scripts/stack.sh, await_node).
if [ "$BUILD_OK" -eq 1 ]; then
  compose_up_start || true
fi

if [ "$BUILD_OK" -eq 1 ]; then
  run_phase tests phase_tests
else
  skip_phase tests "the build failed"
fi

shopt -s nullglob
CHECKS=("$ROOT"/scripts/checks/*.sh)
shopt -u nullglob
if [ "${#CHECKS[@]}" -gt 0 ]; then
  mapfile -t CHECKS < <(printf '%s\n' "${CHECKS[@]}" | LC_ALL=C sort)
  for check in "${CHECKS[@]}"; do
    run_phase "check $(basename "$check")" bash "$check"
  done
fi

# The local stack stops in the background while the compose tests run.
STACK_DOWN_PID=""
if [ "$STARTED_STACK" -eq 1 ]; then
  log "stopping the local stack in the background (log: test-artifacts/stack-down.log)"
  bash "$STACK" down >"$ARTIFACTS/stack-down.log" 2>&1 &
  STACK_DOWN_PID=$!
  STARTED_STACK=0
fi

if [ "$BUILD_OK" -eq 1 ] && [ -n "$COMPOSE_UP_PID" ]; then
  if compose_up_wait; then
    run_phase "compose tests" phase_compose_tests
    [ -d "$ROOT/.tls" ] || MADE_TLS_DIR=1
    if run_phase "compose TLS up" phase_compose_tls_up; then
      run_phase "compose TLS tests" phase_compose_tls_tests
    else
      skip_phase "compose TLS tests" "compose TLS up failed"
    fi
  else
    skip_phase "compose tests" "compose up failed"
  fi
  run_phase "compose down" phase_compose_down && STARTED_COMPOSE=0
else
  skip_phase compose "the build failed or compose.sh init failed"
fi

if [ -n "$STACK_DOWN_PID" ]; then
  wait "$STACK_DOWN_PID"
  rc=$?
  cat "$ARTIFACTS/stack-down.log"
  PHASE_NAMES+=("stack down (overlapped)")
  PHASE_TIMES+=("-")
  if [ "$rc" -eq 0 ]; then PHASE_RESULTS+=("ok"); else PHASE_RESULTS+=("FAILED ($rc)"); FAILED=1; fi
fi

# ---------------------------------------------------------------------------------------------
# Summary

printf '\n======== summary ========\n'
for i in "${!PHASE_NAMES[@]}"; do
  printf '  %-32s %8ss  %s\n' "${PHASE_NAMES[$i]}" "${PHASE_TIMES[$i]}" "${PHASE_RESULTS[$i]}"
done
printf '  %-32s %8ss  %s\n' "total" "$(elapsed "$T_START")" "$([ "$FAILED" -eq 0 ] && echo ok || echo FAILED)"
# nextest's own closing line last, for whoever reads the end of this output.
if [ -f "$ARTIFACTS/nextest.log" ]; then
  grep -E '^-- nextest pass |^[[:space:]]*Summary \[' "$ARTIFACTS/nextest.log" || true
  # One plain line over every nextest run.
  passed=$(grep -E '^[[:space:]]*Summary \[' "$ARTIFACTS/nextest.log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
  failed=$(grep -E '^[[:space:]]*Summary \[' "$ARTIFACTS/nextest.log" | grep -oE '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
  skipped=$(grep -E '^[[:space:]]*Summary \[' "$ARTIFACTS/nextest.log" | grep -oE '[0-9]+ skipped' | awk '{s+=$1} END {print s+0}')
  # nextest counts as skipped both #[ignore]d tests and those a pass's filter leaves to another
  # pass, so the sum of "skipped" over the passes is not a count of tests that never ran.
  printf 'tests: %s passed, %s failed (skipped, summed over the passes: %s)\n' "$passed" "$failed" "$skipped"
fi
exit "$FAILED"
