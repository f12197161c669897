#!/usr/bin/env bash
# Operator health check of one gateway instance over HTTPS: liveness (/healthz), readiness
# (/readyz) and a sanity check of /metrics (served, Prometheus text, the gateway's own
# series present). Prints one line per check; exits 0 when all pass, 1 when one fails,
# 2 on a usage error.
#
#   scripts/health-check.sh [--url https://host:8443] [--cacert FILE] [--timeout SECONDS]
#
# --cacert defaults to the dev CA that `kzg-gateway init` writes (./.kzg-gateway/tls/ca.pem);
# KZG_GATEWAY_URL and KZG_GATEWAY_CACERT set the defaults too.
set -uo pipefail

url=${KZG_GATEWAY_URL:-https://127.0.0.1:8443}
cacert=${KZG_GATEWAY_CACERT:-.kzg-gateway/tls/ca.pem}
timeout=5
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url=${2:?--url needs a value}; shift 2 ;;
    --cacert) cacert=${2:?--cacert needs a value}; shift 2 ;;
    --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ ! -r "$cacert" ]; then
  echo "CA certificate not readable: $cacert (use --cacert)" >&2
  exit 2
fi

failed=0
body=$(mktemp)
trap 'rm -f "$body"' EXIT

# fetch PATH: sets $status (HTTP status, 000 when the connection or TLS failed).
fetch() {
  status=$(curl --silent --show-error --tlsv1.3 --cacert "$cacert" --max-time "$timeout" \
    --output "$body" --write-out '%{http_code}' "$url$1" 2>"$body.err")
  [ -n "$status" ] || status=000
}

check() {  # check NAME OK DETAIL
  if [ "$2" = 1 ]; then
    echo "ok   $1 $3"
  else
    echo "FAIL $1 $3"
    failed=1
  fi
}

fetch /healthz
check healthz "$([ "$status" = 200 ] && echo 1)" "(HTTP $status$([ "$status" = 000 ] && echo ": $(head -c 200 "$body.err")"))"

fetch /readyz
check readyz "$([ "$status" = 200 ] && echo 1)" "(HTTP $status: $(head -c 300 "$body" | tr -d '\n'))"

fetch /metrics
metrics_ok=0
if [ "$status" = 200 ] && grep -q '^# TYPE kzg_operations_total counter' "$body" \
  && grep -q '^kzg_audit_queue_depth ' "$body" && grep -q '^process_resident_memory_bytes ' "$body"; then
  metrics_ok=1
fi
queue=$(awk '/^kzg_audit_queue_depth /{print $2}' "$body")
check metrics "$metrics_ok" "(HTTP $status, audit queue depth ${queue:-?})"

rm -f "$body.err"
exit "$failed"
