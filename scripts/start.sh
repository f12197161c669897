#!/usr/bin/env bash
# Sets up and starts the gateway on its embedded default: a virtualenv with the project,
# `kzg-gateway init` (SQLite database, master key, dev CA and server certificate,
# log key, first admin printed once) and `kzg-gateway serve` on
# https://127.0.0.1:8443. Any arguments are passed to serve. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DATA_DIR=${KZG_GATEWAY_DATA_DIR:-.kzg-gateway}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Install again when pyproject.toml changed since, or the installed entry point no longer
# runs (a checkout that moved it), or c-kzg-4844 is missing.
STAMP=.venv/.kzg-gateway-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] \
    || ! .venv/bin/kzg-gateway --help >/dev/null 2>&1 \
    || ! .venv/bin/python -c 'import ckzg' >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[ckzg]'
  touch "$STAMP"
fi

.venv/bin/kzg-gateway init --data-dir "$DATA_DIR"
echo "CA certificate for clients: $DATA_DIR/tls/ca.pem (curl --cacert $DATA_DIR/tls/ca.pem ...)"
exec .venv/bin/kzg-gateway serve --data-dir "$DATA_DIR" "$@"
