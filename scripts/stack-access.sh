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

