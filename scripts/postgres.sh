#!/usr/bin/env bash
# Installs and starts a local PostgreSQL for the tests and benchmarks, creates the
# migration-owner role (kzg_owner), the runtime role (kzg_app) and the read-only auditor
# role (kzg_auditor), and writes the connection settings to .pg-test-env. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v pg_ctlcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL is not installed and this script is not root: install postgresql" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
fi

version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | grep -q "^$version main"; then
  pg_createcluster "$version" main >/dev/null
fi
if ! pg_lsclusters -h | grep -q "^$version main .* online"; then
  pg_ctlcluster "$version" main start
fi

as_pg() { runuser -u postgres -- "$@"; }
for _ in $(seq 1 30); do
  as_pg psql -qtAc 'select 1' >/dev/null 2>&1 && break
  sleep 1
done

owner_pw=kzg_owner_test_pw
app_pw=kzg_app_test_pw
auditor_pw=kzg_auditor_test_pw
as_pg psql -q -v ON_ERROR_STOP=1 <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kzg_owner') THEN
    CREATE ROLE kzg_owner LOGIN CREATEDB PASSWORD '$owner_pw';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kzg_app') THEN
    CREATE ROLE kzg_app LOGIN PASSWORD '$app_pw';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kzg_auditor') THEN
    CREATE ROLE kzg_auditor LOGIN PASSWORD '$auditor_pw';
  END IF;
END
\$\$;
GRANT kzg_app TO kzg_owner;
SQL

port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
cat > .pg-test-env <<ENV
export KZG_TEST_PG_HOST=127.0.0.1
export KZG_TEST_PG_PORT=$port
export KZG_TEST_PG_OWNER=kzg_owner
export KZG_TEST_PG_OWNER_PASSWORD=$owner_pw
export KZG_TEST_PG_APP=kzg_app
export KZG_TEST_PG_APP_PASSWORD=$app_pw
export KZG_TEST_PG_AUDITOR=kzg_auditor
export KZG_TEST_PG_AUDITOR_PASSWORD=$auditor_pw
ENV
echo "PostgreSQL $version ready on port $port"
