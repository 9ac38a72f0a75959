#!/usr/bin/env bash
# Install (Debian, when absent) and start what the tests and a one-box deployment talk to: Redis, RabbitMQ, and
# headless Chromium for the browser tests. Fast when all is there: no apt-get, no restarts.
# CI=true: anything still missing at the end fails with one line saying what to install (tests must not skip).
# PostgreSQL is not started: the tests run their own (the `pgserver` pip package; tests/conftest.py).
set -uo pipefail
log() { echo "[services] $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Debian packages for commands that are absent: one apt-get for all of them, non-interactive
declare -A PKG=([redis-server]=redis-server [rabbitmq-server]=rabbitmq-server [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for cmd in redis-server rabbitmq-server chromium chromedriver; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null; then
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null \
      || log "warning: apt-get install ${missing[*]} failed"
  else
    log "warning: no apt-get; install ${missing[*]} yourself"
  fi
fi
export PATH="$PATH:/usr/sbin:/sbin"  # rabbitmq-server lives in /usr/sbin

# Redis on 6379 (the workers' default broker); the worker tests also start their own redis-server per session
if command -v redis-server >/dev/null && ! port_open 6379; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null && log "started redis"
fi

# RabbitMQ on 5672 (the broker test); it takes seconds to boot: wait for the port, bounded
if command -v rabbitmq-server >/dev/null && ! port_open 5672; then
  { service rabbitmq-server start >/dev/null 2>&1 || rabbitmq-server -detached >/dev/null 2>&1; } && log "starting rabbitmq"
  for _ in $(seq 1 60); do port_open 5672 && break; sleep 1; done
  port_open 5672 && log "rabbitmq is up" || log "warning: rabbitmq did not open port 5672 within 60 s"
fi

# What the tests need and still lack
fail=()
command -v redis-server >/dev/null || fail+=("redis-server (apt-get install redis-server)")
port_open 5672 || fail+=("RabbitMQ on 127.0.0.1:5672 (apt-get install rabbitmq-server; then rabbitmq-server -detached)")
{ command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1 \
  || fail+=("chromium (apt-get install chromium)")
command -v chromedriver >/dev/null || fail+=("chromedriver (apt-get install chromium-driver)")
if [ ${#fail[@]} -gt 0 ]; then
  what=$(printf '%s; ' "${fail[@]}")
  if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
    echo "error: CI=true and the tests need what is missing here: ${what%; }" >&2
    exit 1
  fi
  log "missing ${what%; } (their tests skip)"
fi
exit 0
