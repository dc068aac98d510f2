# shellcheck shell=bash
# Access to the native stack (scripts/stack.sh sources this file; its functions use stack.sh's
# variables STACK_DIR, TLS_DIR, REDIS_PORT and its helpers):
#   - TLS: a private dev CA and one server certificate (localhost, 127.0.0.1) that every TLS
#     listener of the stack uses (AMQPS 5681-5683, Redis 6380).

# ensure_tls : writes $TLS_DIR/ca.pem, ca.key, server.pem, server.key when missing (the CA is
# kept; the server certificate is made again when it expires within 30 days or the CA changed).
# Our RabbitMQ and Redis processes run as the user who runs this script: the keys are 0600.
ensure_tls() {
  have openssl || apt_install openssl
  mkdir -p "$TLS_DIR"
  local ca="$TLS_DIR/ca.pem" ca_key="$TLS_DIR/ca.key" crt="$TLS_DIR/server.pem" key="$TLS_DIR/server.key"
  if [ ! -s "$ca" ] || [ ! -s "$ca_key" ]; then
    log "creating the dev CA $ca"
    rm -f "$ca" "$ca_key" "$crt" "$key"
    (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
      -subj "/CN=gpuq dev CA ($(hostname))" -keyout "$ca_key" -out "$ca.tmp" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      >/dev/null 2>&1) || die "openssl could not create the dev CA in $TLS_DIR"
    chmod 644 "$ca.tmp"
    mv "$ca.tmp" "$ca"
  fi
  if [ -s "$crt" ] && [ -s "$key" ] && openssl x509 -in "$crt" -noout -checkend 2592000 >/dev/null 2>&1 &&
    openssl verify -CAfile "$ca" "$crt" >/dev/null 2>&1; then
    return 0
  fi
  log "creating the server certificate $crt (DNS:localhost, IP:127.0.0.1)"
  local ext
  ext="$(mktemp)"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$ext"
  if ! (umask 077 && openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
    -keyout "$key.tmp" -out "$TLS_DIR/server.csr" >/dev/null 2>&1 &&
    openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$ca" -CAkey "$ca_key" -CAcreateserial \
      -days 825 -sha256 -extfile "$ext" -out "$crt.tmp" >/dev/null 2>&1); then
    rm -f "$ext"
    die "openssl could not create the server certificate in $TLS_DIR"
  fi
  rm -f "$ext" "$TLS_DIR/server.csr"
  chmod 644 "$crt.tmp"
  mv "$key.tmp" "$key"
  mv "$crt.tmp" "$crt"
}


# ---------------------------------------------------------------------------------------------
# Per-service users (least privilege). The admin access stays: guest/guest on RabbitMQ and the
# password-less `default` user on Redis are for tests' own checks and for operators of this dev
# stack. The services log in as their own users, which `stack.sh credentials` prints.
#
# Names gpuq's services use under a queue prefix P (crates/common/src/topology.rs, coord/keys.rs):
# exchanges P.jobs and P.dlx, queues P.jobs.<pool> and P.dead, Redis keys and channels P:….
# The users are limited to the prefix `gpuq` and its sub-prefixes `gpuq-<name>` (the e2e
# harness runs each test under gpuq-t<hex>); a sub-prefix holds no dot, so a permission regex
# tells an exchange (P.jobs) from a queue (P.jobs.<pool>). docs/production.md has the table.
SERVICES_WITH_USERS=(gateway worker manager)
RMQ_P='gpuq(-[^.]+)?'

# rmq_permissions SERVICE : "configure write read tags" for the service's RabbitMQ user.
# RabbitMQ checks configure to declare (and delete) an exchange or a queue, write on the
# exchange to publish, write on the queue and read on the exchange to bind, read on the queue
# to consume or get, and, to declare a new queue with a dead-letter exchange (the pool queues),
# read on that queue and write on the exchange. So only the workers create pool queues.
rmq_permissions() {
  local p="$RMQ_P"
  case "$1" in
    # declares exchanges and the dead queue; publishes jobs; cannot read (consume) any queue
    gateway) printf '%s %s %s %s' "^$p\\.(jobs|dlx|dead)\$" "^$p\\.(jobs|dead)\$" "^$p\\.(jobs|dlx)\$" "" ;;
    # also declares and consumes its pools' queues, gives jobs back, dead-letters with a reason
    worker) printf '%s %s %s %s' "^$p\\.(jobs|dlx|dead|jobs\\..+)\$" "^$p\\.(jobs|dlx|dead|jobs\\..+)\$" "^$p\\.(jobs|dlx|jobs\\..+)\$" "" ;;
    # declares exchanges and the dead queue, consumes dead letters; reads the management API
    manager) printf '%s %s %s %s' "^$p\\.(jobs|dlx|dead)\$" "^$p\\.dead\$" "^$p\\.(dlx|dead)\$" monitoring ;;
  esac
}

# Redis commands per service (coord/*.rs, their Lua scripts included: Redis checks the commands
# a script calls against the user too). Every user: its keys and channels under the prefixes
# only, nothing of @dangerous (FLUSHALL, KEYS, CONFIG, …). (redis-rs sends CLIENT SETINFO on
# connect and ignores its refusal; Redis 7.0 does not know it, so it is not named here.)
REDIS_COMMON='+ping +hello +auth +select +eval +evalsha +script|load'
redis_commands() {
  case "$1" in
    # idempotency claims (SET NX, compare-and-set/delete scripts), cancel flags, re-drive
    # (DEL done), pool views (SMEMBERS, MGET), event bells (SUBSCRIBE)
    gateway) printf '%s' '+get +set +del +exists +smembers +mget +subscribe +unsubscribe' ;;
    # leases, done markers, liveness, operator intent, tenant GPU quotas, event bells (PUBLISH)
    worker) printf '%s' '+get +set +setex +del +exists +pexpire +hget +hset +hdel +hgetall +smembers +mget +publish' ;;
    # the engine registry (heartbeats, admin intent, restarts) and dead-letter marks
    manager) printf '%s' '+get +set +del +exists +hget +hset +incr +sadd +srem +sismember +smembers +mget' ;;
  esac
}

# service_password SERVICE : the service's password (made once, kept in .stack/credentials).
service_password() {
  local f="$STACK_DIR/credentials" key
  key="$(printf '%s' "$1" | tr 'a-z' 'A-Z')_PASSWORD"
  if ! grep -q "^$key=" "$f" 2>/dev/null; then
    (umask 077 && printf '%s=%s\n' "$key" "$(od -An -tx1 -N18 /dev/urandom | tr -d ' \n')" >>"$f")
  fi
  sed -n "s/^$key=//p" "$f" | sed -n 1p
}

# ensure_rabbit_users : creates or updates gpuq-<service> on the cluster (management API as
# guest: one HTTP call each, where rabbitmqctl would start an Erlang VM per call).
ensure_rabbit_users() {
  local s conf write rd tags pw api="http://127.0.0.1:$(mgmt_port 1)/api"
  for s in "${SERVICES_WITH_USERS[@]}"; do
    read -r conf write rd tags <<<"$(rmq_permissions "$s")"
    pw="$(service_password "$s")"
    curl -fsS -u guest:guest -X PUT -H 'content-type: application/json' \
      -d "{\"password\":\"$pw\",\"tags\":\"${tags:-}\"}" "$api/users/gpuq-$s" >/dev/null ||
      die "could not create the RabbitMQ user gpuq-$s"
    curl -fsS -u guest:guest -X PUT -H 'content-type: application/json' \
      -d "{\"configure\":\"${conf//\\/\\\\}\",\"write\":\"${write//\\/\\\\}\",\"read\":\"${rd//\\/\\\\}\"}" \
      "$api/permissions/%2f/gpuq-$s" >/dev/null || die "could not set the permissions of gpuq-$s"
  done
  log "RabbitMQ users gpuq-gateway, gpuq-worker, gpuq-manager in place (stack.sh credentials)"
}

# redis_user_rules SERVICE : the ACL rules of user gpuq-SERVICE, one per line (`reset` first, so
# a changed rule set applies).
redis_user_rules() {
  local -a cmds
  read -r -a cmds <<<"$REDIS_COMMON $(redis_commands "$1")"
  printf '%s\n' reset on ">$(service_password "$1")" '~gpuq:*' '~gpuq-*' resetchannels '&gpuq:*' \
    '&gpuq-*' -@all "${cmds[@]}" -@dangerous
}

# redis_user_directives : `user` lines for redis.conf, so that Redis starts with the services'
# users. Defined only after the start, a service reconnecting in between (a Redis restart mid-run)
# failed to authenticate, and redis-rs's ConnectionManager does not retry an authentication
# failure: the worker stayed unable to reach Redis.
redis_user_directives() {
  local s
  for s in "${SERVICES_WITH_USERS[@]}"; do
    printf 'user gpuq-%s %s\n' "$s" "$(redis_user_rules "$s" | tr '\n' ' ')"
  done
}

# ensure_redis_users : (re)defines the ACL user gpuq-<service> of every service on a running
# Redis (one started by an older stack.sh, without them in its redis.conf).
ensure_redis_users() {
  local s
  local -a rules
  for s in "${SERVICES_WITH_USERS[@]}"; do
    mapfile -t rules < <(redis_user_rules "$s")
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ACL SETUSER "gpuq-$s" "${rules[@]}" 2>&1)" = OK ] ||
      die "could not define the Redis user gpuq-$s"
  done
}

# cmd_credentials : the services' URLs with their own users, as KEY=value lines
# (AMQP_URLS_<SERVICE>, REDIS_URL_<SERVICE>, and RABBITMQ_MGMT_URLS_MANAGER).
cmd_credentials() {
  local s S pw n urls
  [ -s "$STACK_DIR/credentials" ] || die "no credentials yet: run scripts/stack.sh up"
  for s in "${SERVICES_WITH_USERS[@]}"; do
    S="$(printf '%s' "$s" | tr 'a-z' 'A-Z')"
    pw="$(service_password "$s")"
    urls=""
    for n in "${NODES[@]}"; do urls="$urls${urls:+,}amqp://gpuq-$s:$pw@127.0.0.1:$(amqp_port "$n")/%2f"; done
    printf 'AMQP_URLS_%s=%s\n' "$S" "$urls"
    printf 'REDIS_URL_%s=redis://gpuq-%s:%s@127.0.0.1:%s/0\n' "$S" "$s" "$pw" "$REDIS_PORT"
    if [ "$s" = manager ]; then
      urls=""
      for n in "${NODES[@]}"; do urls="$urls${urls:+,}http://gpuq-$s:$pw@127.0.0.1:$(mgmt_port "$n")"; done
      printf 'RABBITMQ_MGMT_URLS_%s=%s\n' "$S" "$urls"
    fi
  done
}
