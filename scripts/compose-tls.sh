# shellcheck shell=bash
# The certificates of docker-compose.tls.yml, sourced by scripts/compose.sh (`init --tls`):
#
#   .tls/ca.pem, ca.key           a private CA (ca.key stays on this host, mode 600)
#   .tls/SERVICE.pem, SERVICE.key one per compose service, for its compose name, localhost,
#                                 127.0.0.1, and PUBLISH_ADDRESS when that is another address
#   .tls/mongodb-key.pem          mongodb's certificate and key in one file (mongod's form)
#   .tls/prometheus.yml           deploy/prometheus/prometheus.yml, gpuq jobs scraped over HTTPS
#
# Kept when present and valid for 30 more days (run it again to renew; the CA is kept). Service
# keys are mode 644: the containers read them as their own unprivileged users (keep the checkout's
# directory private to the account that runs compose).

TLS_DIR="$ROOT/.tls"
TLS_SERVICES=(rabbitmq1 rabbitmq2 rabbitmq3 redis mongodb gateway manager worker1 worker2 worker3)

# tls_cert NAME [EXTRA_SAN] : NAME.pem and NAME.key signed by the CA, unless valid ones exist.
tls_cert() {
  local name="$1" extra="${2:-}" crt="$TLS_DIR/$1.pem" key="$TLS_DIR/$1.key" ext
  if [ -s "$crt" ] && [ -s "$key" ] && openssl x509 -in "$crt" -noout -checkend 2592000 >/dev/null 2>&1 &&
    openssl verify -CAfile "$TLS_DIR/ca.pem" "$crt" >/dev/null 2>&1; then
    return 0
  fi
  ext="$(mktemp)"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1$extra" >"$ext"
  if ! openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$name" -keyout "$key.tmp" \
    -out "$TLS_DIR/$name.csr" >/dev/null 2>&1 ||
    ! openssl x509 -req -in "$TLS_DIR/$name.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
      -CAcreateserial -days 825 -sha256 -extfile "$ext" -out "$crt.tmp" >/dev/null 2>&1; then
    rm -f "$ext" "$TLS_DIR/$name.csr" "$key.tmp" "$crt.tmp"
    fail "openssl could not make the certificate of $name in $TLS_DIR"
  fi
  rm -f "$ext" "$TLS_DIR/$name.csr"
  chmod 644 "$key.tmp" "$crt.tmp"
  mv "$key.tmp" "$key"
  mv "$crt.tmp" "$crt"
}

# tls_files : the CA, every service's certificate, mongod's key file and Prometheus's config.
tls_files() {
  have openssl || apt_install openssl
  mkdir -p "$TLS_DIR"
  chmod 755 "$TLS_DIR"
  if [ ! -s "$TLS_DIR/ca.pem" ] || [ ! -s "$TLS_DIR/ca.key" ]; then
    rm -f "$TLS_DIR"/*.pem "$TLS_DIR"/*.key
    (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
      -subj "/CN=gpuq compose CA ($(hostname))" -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      >/dev/null 2>&1) || fail "openssl could not make the CA in $TLS_DIR"
    chmod 644 "$TLS_DIR/ca.pem"
  fi
  local addr extra="" name
  addr="$(env_value PUBLISH_ADDRESS)"
  case "${addr:-127.0.0.1}" in
    127.0.0.1 | 0.0.0.0) ;;
    *) extra=",IP:$addr" ;;
  esac
  for name in "${TLS_SERVICES[@]}"; do
    tls_cert "$name" "$extra"
  done
  cat "$TLS_DIR/mongodb.pem" "$TLS_DIR/mongodb.key" >"$TLS_DIR/mongodb-key.pem"
  chmod 644 "$TLS_DIR/mongodb-key.pem"
  awk '{ print } /^  - job_name: gpuq-/ {
    print "    scheme: https"
    print "    tls_config: { ca_file: /etc/gpuq/tls/ca.pem }"
  }' deploy/prometheus/prometheus.yml >"$TLS_DIR/prometheus.yml"
}

# tls_init : the files, and docker-compose.tls.yml turned on in the env file (COMPOSE_FILE, which
# `docker compose` reads from .env; compose.sh adds the file when it sees it).
tls_init() {
  tls_files
  if ! grep -q '^COMPOSE_FILE=.*docker-compose.tls.yml' "$ENV_FILE"; then
    printf '\n# TLS on every connection (scripts/compose.sh init --tls; certificates in .tls/).\nCOMPOSE_FILE=docker-compose.yml:docker-compose.tls.yml\n' >>"$ENV_FILE"
  fi
  log "TLS: CA and certificates in $TLS_DIR; clients trust $TLS_DIR/ca.pem (gpuq --tls-ca-file, curl --cacert)"
}

# tls_on : the env file turns docker-compose.tls.yml on.
tls_on() { grep -q '^COMPOSE_FILE=.*docker-compose.tls.yml' "$ENV_FILE" 2>/dev/null; }
