#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine, then runs it:
# a virtualenv with the project and its dev extras, a local PostgreSQL 15 with the
# gateway's two roles (migration owner and runtime), promtool for the alert rules; then
# ruff, mypy (strict over kzg, audit and auth, as pyproject.toml says) and pytest over
# the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

bash scripts/system-deps.sh
bash scripts/postgres.sh
# shellcheck disable=SC1091
source .pg-test-env

.venv/bin/ruff check .
.venv/bin/mypy  # the packages and strictness in pyproject.toml [tool.mypy]
exec .venv/bin/python -m pytest -q -ra "$@"
