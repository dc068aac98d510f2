#!/usr/bin/env bash
# Runs every test of the repository, on a fresh machine too (CI runs it through .ci/run from a
# clean clone, with CI=true and no stdin):
#   1. installs what is missing (rabbitmq-server, redis-server, prometheus for promtool, sqlite3;
#      cargo-nextest; rustfmt and clippy)
#   2. cargo fmt --check, cargo clippy -D warnings
#   3. cargo build --workspace --bins (the end-to-end tests spawn these from target/debug)
#   4. starts the local stack (scripts/stack.sh up) unless it already runs; stops it at the end
#      only when this script started it
#   5. cargo nextest run --workspace --no-fail-fast
#   6. every scripts/checks/*.sh, in sorted order
#   7. prints the wall time of each phase; exits non-zero when anything failed
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
  apt_install rabbitmq-server redis-server redis-tools prometheus chromium sqlite3 curl iproute2 procps || return 1
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked || return 1
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
}

phase_fmt() { cargo fmt --all -- --check; }
phase_clippy() { cargo clippy --workspace --all-targets -- -D warnings; }
phase_build() { cargo build --workspace --bins; }
phase_stack() { bash "$STACK" up; }

# Every suite but `disruptive` runs in parallel; `disruptive` stops RabbitMQ nodes and Redis of
# the shared stack, so it runs alone, one test at a time, afterwards.
phase_tests() {
  local -a args=(nextest run --workspace --no-fail-fast)
  # A `ci` nextest profile (retries, timeouts, JUnit), when the repository defines one.
  if [ "${CI:-}" = true ] && [ -f .config/nextest.toml ] && grep -q '^\[profile\.ci\]' .config/nextest.toml; then
    args+=(--profile ci)
  fi
  if [ -n "${GPUQ_TEST_MONGODB_URL:-}" ]; then
    args+=(--run-ignored all)
  else
    log "MongoDB store contract: SKIPPED (set GPUQ_TEST_MONGODB_URL to run it; no MongoDB server here)"
  fi
  local rc1 rc2
  export GPUQ_TEST_AMQP_URLS="amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f,amqp://guest:guest@127.0.0.1:5674/%2f"
  export GPUQ_TEST_REDIS_URL="redis://127.0.0.1:6379/0"
  export GPUQ_TEST_STACK_SCRIPT="$STACK"
  export GPUQ_BIN_DIR="$ROOT/target/debug"
  cargo "${args[@]}" -E 'not binary(disruptive)' 2>&1 | tee "$ARTIFACTS/nextest.log"
  rc1="${PIPESTATUS[0]}"
  cargo "${args[@]}" -p gpuq-e2e --test disruptive --test-threads 1 2>&1 | tee -a "$ARTIFACTS/nextest.log"
  rc2="${PIPESTATUS[0]}"
  [ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
}

# ---------------------------------------------------------------------------------------------

STARTED_STACK=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
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
BUILD_OK=1
run_phase build phase_build || BUILD_OK=0

if bash "$STACK" status >/dev/null 2>&1; then
  log "the local stack already runs: using it (and leaving it running)"
else
  STARTED_STACK=1
  run_phase stack phase_stack
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

if [ "$STARTED_STACK" -eq 1 ]; then
  run_phase "stack down" bash "$STACK" down
  STARTED_STACK=0
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
  grep -E '^[[:space:]]*Summary \[' "$ARTIFACTS/nextest.log" || true
  # One plain line over both nextest runs.
  passed=$(grep -E '^[[:space:]]*Summary \[' "$ARTIFACTS/nextest.log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
  failed=$(grep -E '^[[:space:]]*Summary \[' "$ARTIFACTS/nextest.log" | grep -oE '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
  skipped=$(grep -E '^[[:space:]]*Summary \[' "$ARTIFACTS/nextest.log" | grep -oE '[0-9]+ skipped' | awk '{s+=$1} END {print s+0}')
  printf 'tests: %s passed, %s failed, %s skipped\n' "$passed" "$failed" "$skipped"
fi
exit "$FAILED"
