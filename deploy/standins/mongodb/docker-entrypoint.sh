#!/bin/bash
# Entrypoint of gpuq's local stand-in for the official mongo image (see README.md beside it): the
# server is SecantusDB (`secantusd-py`, MongoDB wire protocol, SCRAM auth), the shell the real
# mongosh. It does what the official image's entrypoint does for the settings gpuq's compose
# file uses:
#
#   * MONGO_INITDB_ROOT_USERNAME / MONGO_INITDB_ROOT_PASSWORD (or their *_FILE variants): both or
#     neither; with them the server always runs with authentication required (--auth).
#   * On the first start with an uninitialised data directory (no WiredTiger file in it): start
#     the server without auth on 127.0.0.1 only, create the root user (role root, in admin), run
#     each file of /docker-entrypoint-initdb.d in order -- *.js with mongosh as the root user
#     against MONGO_INITDB_DATABASE (default `test`), *.sh sourced, anything else ignored -- then
#     stop that server (SIGTERM, a clean WiredTiger close) and start the real one.
#   * Later starts (the directory holds a database) skip all of that.
#   * The server listens on all addresses (the official --bind_ip_all), port 27017, data in
#     /data/db, and runs as the `mongodb` user (uid 999) when the container starts as root. It is
#     exec'd: PID 1, so `docker stop`'s SIGTERM reaches it and it closes its storage cleanly.
#
# One difference, on purpose: a first-start init that fails (a script throws, the server dies)
# leaves a marker in the data directory, and every later start refuses to run on that
# half-initialised directory and says so. The official image would start on it, without the
# users the scripts were to create.
#
#   * `mongod` with TLS flags (docker-compose.tls.yml's command) runs the server with TLS: the
#     flags are mapped onto SecantusDB's own (mongod_as_server below).
#
# Any other command (`bash`, `mongosh ...`) is run as it is.
set -Eeuo pipefail

readonly SERVER=secantusd-py
readonly INITDB_DIR=/docker-entrypoint-initdb.d
readonly INCOMPLETE_MARKER=.gpuq-standin-initdb-incomplete

log() { echo "docker-entrypoint: $*"; }
die() {
	echo "docker-entrypoint: error: $*" >&2
	exit 1
}

# Server flags, given as `--flag value` or `--flag=value`.
have_arg() {
	local want="$1" arg
	shift
	for arg; do
		case "$arg" in "$want" | "$want"=*) return 0 ;; esac
	done
	return 1
}
arg_value() {
	local want="$1"
	shift
	while [ "$#" -gt 0 ]; do
		case "$1" in
			"$want")
				[ "$#" -ge 2 ] || return 1
				printf '%s\n' "$2"
				return 0
				;;
			"$want"=*)
				printf '%s\n' "${1#"$want"=}"
				return 0
				;;
		esac
		shift
	done
	return 1
}
# without_arg FLAG N ARGS...: prints ARGS without FLAG (and the N=0|1 values after it, or its
# `FLAG=value` form), NUL-separated.
without_arg() {
	local drop="$1" values="$2"
	shift 2
	while [ "$#" -gt 0 ]; do
		case "$1" in
			"$drop") [ "$values" = 0 ] || shift ;;
			"$drop"=*) ;;
			*) printf '%s\0' "$1" ;;
		esac
		[ "$#" -eq 0 ] || shift
	done
}

# VAR from $VAR or from the file named by $VAR_FILE (Docker secrets), as the official image does.
file_env() {
	local var="$1" file_var="${1}_FILE"
	if [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ]; then
		die "both $var and $file_var are set (but are exclusive)"
	fi
	local val="${!var:-}"
	if [ -n "${!file_var:-}" ]; then
		val="$(<"${!file_var}")"
	fi
	export "$var"="$val"
	unset "$file_var"
}

# mongod_as_server ARGS... : SERVER_ARGS, the mongod command of docker-compose.tls.yml as
# SecantusDB's: its TLS flags map onto SecantusDB's own, any other mongod flag is refused by
# name (this stand-in does not pretend to understand it).
#   --tlsMode requireTLS      TLS only on the port: SecantusDB with a certificate serves nothing
#                             else (allowTLS/preferTLS, TLS beside plaintext, it cannot do)
#   --tlsMode disabled        plaintext
#   --tlsCertificateKeyFile F certificate and key in one PEM file: both SecantusDB flags name F
#   --tlsCAFile F             verify client certificates against F when a client offers one
#   --tlsAllowConnectionsWithoutCertificates
#                             SecantusDB's behaviour with a CA file; without this flag a client
#                             certificate is required (--tls-require-client-cert), as in mongod
SERVER_ARGS=()
mongod_as_server() {
	local mode="" pem="" ca="" optional=""
	shift
	while [ "$#" -gt 0 ]; do
		case "$1" in
			--tlsMode | --tlsCertificateKeyFile | --tlsCAFile)
				[ "$#" -ge 2 ] || die "mongod $1 needs a value"
				case "$1" in
					--tlsMode) mode="$2" ;;
					--tlsCertificateKeyFile) pem="$2" ;;
					--tlsCAFile) ca="$2" ;;
				esac
				shift 2
				;;
			--tlsAllowConnectionsWithoutCertificates) optional=1; shift ;;
			*) die "mongod flag $1: this stand-in maps only mongod's TLS flags onto $SERVER (see its README.md)" ;;
		esac
	done
	SERVER_ARGS=("$SERVER")
	case "${mode:-disabled}" in
		disabled) return 0 ;;
		requireTLS) ;;
		*) die "mongod --tlsMode $mode: $SERVER serves TLS only or plaintext only (requireTLS or disabled)" ;;
	esac
	[ -n "$pem" ] || die "mongod --tlsMode requireTLS needs --tlsCertificateKeyFile"
	[ -r "$pem" ] || die "$pem is not readable by $(id -un)"
	SERVER_ARGS+=(--tls-cert-file "$pem" --tls-key-file "$pem")
	if [ -n "$ca" ]; then
		SERVER_ARGS+=(--tls-ca-file "$ca")
		[ -n "$optional" ] || SERVER_ARGS+=(--tls-require-client-cert)
	fi
}

if [ "${1:0:1}" = '-' ]; then
	set -- "$SERVER" "$@"
fi
if [ "$1" = mongod ]; then
	mongod_as_server "$@"
	set -- "${SERVER_ARGS[@]}"
fi
if [ "$1" != "$SERVER" ]; then
	exec "$@"
fi

# The official image's defaults, unless the command names them itself. --standalone: answer
# `hello` as a standalone server, as mongod without --replSet does (without it SecantusDB
# advertises a one-node replica set at its bind address, 0.0.0.0:27017, and drivers that follow
# the advertised hosts would try to connect there).
have_arg --host "$@" || set -- "$@" --host 0.0.0.0
have_arg --port "$@" || set -- "$@" --port 27017
have_arg --storage-path "$@" || set -- "$@" --storage-path /data/db
have_arg --standalone "$@" || set -- "$@" --standalone
db_path="$(arg_value --storage-path "$@")" || die "--storage-path needs a value"
port="$(arg_value --port "$@")" || die "--port needs a value"

# Started as root: own the data directory, then run this script again as mongodb.
if [ "$(id -u)" = 0 ]; then
	mkdir -p "$db_path"
	find "$db_path" \! -user mongodb -exec chown mongodb:mongodb '{}' +
	export HOME=/data/db
	exec setpriv --reuid=mongodb --regid=mongodb --init-groups "${BASH_SOURCE[0]}" "$@"
fi

file_env MONGO_INITDB_ROOT_USERNAME
file_env MONGO_INITDB_ROOT_PASSWORD

should_init=
if [ -n "$MONGO_INITDB_ROOT_USERNAME" ] && [ -n "$MONGO_INITDB_ROOT_PASSWORD" ]; then
	have_arg --auth "$@" || set -- "$@" --auth
	should_init=root-user
elif [ -n "$MONGO_INITDB_ROOT_USERNAME" ] || [ -n "$MONGO_INITDB_ROOT_PASSWORD" ]; then
	die "set both MONGO_INITDB_ROOT_USERNAME and MONGO_INITDB_ROOT_PASSWORD, or neither"
fi
if [ -z "$should_init" ]; then
	for f in "$INITDB_DIR"/*; do
		case "$f" in *.sh | *.js) should_init=scripts; break ;; esac
	done
fi

if [ -e "$db_path/$INCOMPLETE_MARKER" ]; then
	die "$db_path was being initialised on a first start that failed (see that start's log):" \
		"it lacks what $INITDB_DIR was to create. Empty the volume and start again."
fi
if [ -n "$should_init" ] && [ -e "$db_path/WiredTiger" ]; then
	log "$db_path already holds a database: skipping the initialisation"
	should_init=
fi

init_pid=
stop_init_server() {
	[ -n "$init_pid" ] || return 0
	local pid="$init_pid" rc=0
	init_pid=
	kill -TERM "$pid" 2>/dev/null || true
	wait "$pid" || rc=$?
	return "$rc"
}

if [ -n "$should_init" ]; then
	mkdir -p "$db_path"
	[ -w "$db_path" ] || die "$db_path is not writable by $(id -un)"
	touch "$db_path/$INCOMPLETE_MARKER"
	# Whatever ends this script before the init completes also stops the init server cleanly.
	trap 'stop_init_server || true' EXIT
	trap 'exit 143' TERM INT

	mapfile -d '' init_args < <(without_arg --auth 0 "$@")
	mapfile -d '' init_args < <(without_arg --host 1 "${init_args[@]}")
	# The init server is plaintext, on 127.0.0.1 only, for this script's own mongosh (mongod's
	# image keeps TLS on it; SecantusDB cannot serve both, and nothing else can reach it).
	for flag in --tls-cert-file --tls-key-file --tls-ca-file; do
		mapfile -d '' init_args < <(without_arg "$flag" 1 "${init_args[@]}")
	done
	mapfile -d '' init_args < <(without_arg --tls-require-client-cert 0 "${init_args[@]}")
	log "initialising $db_path: starting $SERVER on 127.0.0.1:$port without authentication"
	"${init_args[@]}" --host 127.0.0.1 &
	init_pid=$!

	mongo=(mongosh --host 127.0.0.1 --port "$port" --quiet --norc)
	for ((tries = 30; ; tries--)); do
		kill -0 "$init_pid" 2>/dev/null || die "$SERVER did not stay running (see its log above)"
		if "${mongo[@]}" admin --eval 'quit(0)' >/dev/null 2>&1; then
			break
		fi
		[ "$tries" -gt 1 ] || die "$SERVER did not accept connections within 30 tries"
		sleep 1
	done

	if [ -n "$MONGO_INITDB_ROOT_USERNAME" ]; then
		# The credentials reach the shell in its environment, never in JavaScript source.
		"${mongo[@]}" admin --eval 'db.createUser({
			user: process.env.MONGO_INITDB_ROOT_USERNAME,
			pwd: process.env.MONGO_INITDB_ROOT_PASSWORD,
			roles: [{ role: "root", db: "admin" }],
		}); print("docker-entrypoint: created root user " + process.env.MONGO_INITDB_ROOT_USERNAME)'
		mongo+=(--username "$MONGO_INITDB_ROOT_USERNAME" --password "$MONGO_INITDB_ROOT_PASSWORD"
			--authenticationDatabase admin)
	fi

	export MONGO_INITDB_DATABASE="${MONGO_INITDB_DATABASE:-test}"
	for f in "$INITDB_DIR"/*; do
		case "$f" in
			*.sh)
				log "running $f"
				# shellcheck disable=SC1090
				. "$f"
				;;
			*.js)
				log "running $f"
				"${mongo[@]}" "$MONGO_INITDB_DATABASE" "$f"
				;;
			*) [ ! -e "$f" ] || log "ignoring $f" ;;
		esac
	done

	log "initialisation done: stopping the init server"
	stop_init_server || die "$SERVER did not stop cleanly after the initialisation"
	trap - EXIT TERM INT
	rm -f "$db_path/$INCOMPLETE_MARKER"
	log "MongoDB init process complete; ready for start up."
fi

# The root password stays out of the server's environment, as in the official image.
unset "${!MONGO_INITDB_@}"
exec "$@"
