#!/usr/bin/env bash
# Operator health check of one gateway instance over HTTPS: liveness (/healthz), readiness
# (/readyz) and a sanity check of /metrics (served, Prometheus text, the gateway's own
# series present). Prints one line per check; exits 0 when all pass, 1 when one fails,
# 2 on a usage error.
#
#   scripts/health-check.sh [--url https://host:8443] [--cacert FILE] [--timeout SECONDS]
#                           [--token-file FILE]
#
# --cacert defaults to the dev CA that `kzg-gateway init` writes (./.kzg-gateway/tls/ca.pem);
# --token-file holds an API key of the monitor role (metrics:read), sent as a bearer token
# as Prometheus does; without it /metrics must be public ([metrics] public = true).
# KZG_GATEWAY_URL, KZG_GATEWAY_CACERT and KZG_GATEWAY_TOKEN_FILE set the defaults too.
set -uo pipefail

url=${KZG_GATEWAY_URL:-https://127.0.0.1:8443}
cacert=${KZG_GATEWAY_CACERT:-.kzg-gateway/tls/ca.pem}
token_file=${KZG_GATEWAY_TOKEN_FILE:-}
timeout=5
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url=${2:?--url needs a value}; shift 2 ;;
    --cacert) cacert=${2:?--cacert needs a value}; shift 2 ;;
    --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
    --token-file) token_file=${2:?--token-file needs a value}; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ ! -r "$cacert" ]; then
  echo "CA certificate not readable: $cacert (use --cacert)" >&2
  exit 2
fi

if [ -n "$token_file" ] && [ ! -r "$token_file" ]; then
  echo "token file not readable: $token_file (use --token-file)" >&2
  exit 2
fi

failed=0
body=$(mktemp)
headers=$(mktemp)
chmod 600 "$headers"
trap 'rm -f "$body" "$headers"' EXIT
# The token goes through a header file, never the command line (visible in ps).
[ -n "$token_file" ] && printf 'Authorization: Bearer %s\n' "$(tr -d '[:space:]' <"$token_file")" >"$headers"

# fetch PATH: sets $status (HTTP status, 000 when the connection or TLS failed).
fetch() {
  status=$(curl --silent --show-error --tlsv1.3 --cacert "$cacert" --max-time "$timeout" \
    --header "@$headers" --output "$body" --write-out '%{http_code}' "$url$1" 2>"$body.err")
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
