#!/usr/bin/env bash
# Installs the Debian packages the test suite uses beside Python: the PostgreSQL server
# (tests run against a real one), promtool (from the prometheus package) to check the
# alert rules in deploy/, and Chromium with its driver for the browser tests.
# Idempotent; needs root only when something is missing.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages (${missing[*]}) and not root: install them first" >&2
  exit 1
fi
apt-get update -q
# policy-rc.d keeps the packages from starting services at install; postgres.sh starts its own.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
