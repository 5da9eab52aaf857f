#!/usr/bin/env bash
# Stop the dockerd that docker/start-dockerd.sh started (and only that one: by its recorded pid). Images stay cached
# in /var/lib/docker for the next start.
set -euo pipefail
PIDFILE=/var/run/minedraft-dockerd.pid
[ -f "$PIDFILE" ] || { echo "no dockerd started by docker/start-dockerd.sh"; exit 0; }
pid=$(cat "$PIDFILE")
if kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  echo "stopped dockerd (pid $pid)"
fi
rm -f "$PIDFILE"
