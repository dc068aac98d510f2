#!/usr/bin/env bash
# Entrypoint of the RabbitMQ containers of docker-compose.yml, in front of the official image's
# docker-entrypoint.sh.
#
# RabbitMQ creates no default user when definitions are imported at boot, and a definitions file
# cannot read the environment, so this script renders the mounted definitions template: it puts
# the salted SHA-256 hash of each password of PASSWORDS (from .env: the admin's and each gpuq
# service's own, least privilege) where the template says @<NAME>_HASH@, writes the result where
# rabbitmq.conf's load_definitions points, and starts the server. The passwords never reach a
# file; a fresh salt is drawn at every start.
#
#   gpuq-entrypoint.sh rabbitmq-server                 (the container's command)
#   gpuq-entrypoint.sh --render TEMPLATE OUTPUT        (render only: scripts/checks/compose.sh)
set -euo pipefail

PASSWORDS=(RABBITMQ_ADMIN_PASSWORD RABBITMQ_GATEWAY_PASSWORD RABBITMQ_WORKER_PASSWORD
  RABBITMQ_MANAGER_PASSWORD)

TEMPLATE=/etc/rabbitmq/gpuq/definitions.json
RENDERED=/etc/rabbitmq/definitions.json

die() {
  printf 'gpuq-entrypoint: ERROR: %s\n' "$*" >&2
  exit 1
}

# hex_to_bin HEX : writes the bytes that HEX spells to stdout (bash's printf handles NUL bytes).
hex_to_bin() {
  # shellcheck disable=SC2059 # the format is the escaped byte string itself
  printf "$(printf '%s' "$1" | sed 's/../\\x&/g')"
}

# rabbit_hash PASSWORD : RabbitMQ's rabbit_password_hashing_sha256 format,
# base64(salt ++ sha256(salt ++ password)) with a 4-byte random salt (rabbit_password.erl).
rabbit_hash() {
  local salt digest
  salt="$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
  digest="$({
    hex_to_bin "$salt"
    printf '%s' "$1"
  } | sha256sum | cut -c1-64)"
  { hex_to_bin "$salt" && hex_to_bin "$digest"; } | base64 | tr -d '\n'
}

# check_password NAME : the variable must be set, at least 12 characters, and URL-safe (the gpuq
# services carry the password inside amqp:// and http:// URLs).
check_password() {
  local name="$1" value="${!1:-}"
  [ -n "$value" ] || die "$name is empty: set it in .env (see .env.example)"
  [ "${#value}" -ge 12 ] || die "$name is shorter than 12 characters"
  case "$value" in
    *[!A-Za-z0-9._~-]*) die "$name may hold only letters, digits and . _ ~ - (it is used inside URLs); e.g. openssl rand -hex 24" ;;
  esac
}

render() {
  local template="$1" out="$2" name
  local -a subst=()
  [ -r "$template" ] || die "definitions template $template is missing (is deploy/rabbitmq mounted?)"
  for name in "${PASSWORDS[@]}"; do
    check_password "$name"
    # Base64 holds '/', hence '|' as the delimiter; it holds no '|', '&' or '\'.
    subst+=(-e "s|@${name}_HASH@|$(rabbit_hash "${!name}")|g")
  done
  (
    umask 077
    sed "${subst[@]}" "$template" >"$out.tmp"
  )
  if grep -q '@[A-Z_]*_HASH@' "$out.tmp"; then
    rm -f "$out.tmp"
    die "$template has a placeholder this script does not fill"
  fi
  mv "$out.tmp" "$out"
}

if [ "${1:-}" = --render ]; then
  [ "$#" -eq 3 ] || die "usage: $0 --render TEMPLATE OUTPUT"
  render "$2" "$3"
  exit 0
fi

[ -n "${RABBITMQ_ERLANG_COOKIE:-}" ] || die "RABBITMQ_ERLANG_COOKIE is empty: set it in .env (the three nodes must share it)"
render "$TEMPLATE" "$RENDERED"
# The image's entrypoint drops to the rabbitmq user, which must read the file.
if [ "$(id -u)" = 0 ]; then
  chown rabbitmq:rabbitmq "$RENDERED"
fi
chmod 0400 "$RENDERED"
# The server needs the hashes only, not the passwords.
unset "${PASSWORDS[@]}"
exec docker-entrypoint.sh "$@"
