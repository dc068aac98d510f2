#!/bin/sh
# The official redis image's entrypoint, as far as gpuq uses it: `redis-server …` started as
# root hands /data to the redis user and runs the server as that user. Anything else runs as given.
set -eu
if [ "$(id -u)" = 0 ] && [ "${1:-}" = redis-server ]; then
  find . \! -user redis -exec chown redis:redis '{}' +
  exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
