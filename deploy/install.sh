#!/usr/bin/env bash
# Installs everything the platform and its tests need into ./.venv, pinned by
# constraints.txt (one pin set for the whole workspace). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8
PYTHON=${PYTHON:-python3}
if ! command -v uv >/dev/null 2>&1 || [ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" \
    || "$PYTHON" -m pip install --quiet --break-system-packages "uv==$UV_VERSION"
fi
UV="$PYTHON -m uv"
command -v uv >/dev/null 2>&1 && UV=uv
[ -x .venv/bin/python ] || $UV venv --quiet --python "$PYTHON" .venv
# Every service that has been built (a pyproject.toml); planned ones are only a README.
services=()
for project in services/*/pyproject.toml; do services+=(-e "$(dirname "$project")"); done
$UV pip install --quiet --python .venv/bin/python -c constraints.txt \
  -e common "${services[@]}" -e deploy -e frontends --group dev
# The consoles' browser tests drive the distribution's Chromium (no browser download).
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if [ "${1:-}" = "--with-node-tools" ]; then
  # buf (protobuf lint / breaking-change checks) and the AsyncAPI specification's
  # JSON Schema (tests/test_asyncapi.py) ship as npm packages.
  if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
  fi
  # `npm install` honours package-lock.json; `npm ci` would insist on the
  # lock listing buf's binaries for every platform, which this lock leaves out.
  [ -x node_modules/.bin/buf ] && [ -f node_modules/@asyncapi/specs/package.json ] ||
    npm install --silent --no-audit --no-fund
fi
