#!/usr/bin/env bash
# Start the local services the tests talk to (Redis, PostgreSQL) when they are installed but not running.
# Tests that need a service that is absent skip with the reason; nothing here is required for the core suite.
set -uo pipefail
if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null && echo "[services] started redis"
  fi
fi
if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start && echo "[services] started postgresql"
  fi
fi
exit 0
