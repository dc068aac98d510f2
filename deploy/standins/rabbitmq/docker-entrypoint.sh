#!/bin/sh
# The official rabbitmq image's entrypoint, as far as gpuq uses it: started as root with
# `rabbitmq-server`, it hands the data volume to the rabbitmq user and runs the server as that
# user. Anything else runs as given.
set -eu
if [ "$(id -u)" = 0 ] && [ "${1:-}" = rabbitmq-server ]; then
  find /var/lib/rabbitmq \! -user rabbitmq -exec chown rabbitmq:rabbitmq '{}' +
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$@"
fi
exec "$@"
