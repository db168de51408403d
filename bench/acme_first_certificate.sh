#!/usr/bin/env bash
# How long from `turnkey` starting with an empty ACME cache until its TLS
# port serves a certificate issued by the ACME server (issue 23: "within
# 30 s"), and how long a restart with the certificate cached takes to serve
# it. The ACME server is Pebble (Let's Encrypt's test server) on loopback,
# validating for real over TLS-ALPN-01 on turnkey's TLS port, its DNS
# answered by pebble-challtestsrv (every name is 127.0.0.1).
#
# Each run: a fresh Pebble and cache, turnkey started, then a TLS handshake
# every 50 ms that trusts Pebble's root alone, until one verifies; then
# turnkey is stopped and started again on the same cache and timed the
# same way (and Pebble's count of orders must not move).
#
# Usage: bench/acme_first_certificate.sh
# Knobs: RUNS=5 SKIP_BUILD=1 TURNKEY=PATH (default: this tree's release build)
# Needs: cargo, pebble (pebble-challtestsrv), openssl, curl. Sends traffic
# only to 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-5}
TURNKEY=${TURNKEY:-$ROOT/target/release/turnkey}
DOMAIN=turn.turnkey.test
if [ -z "${SKIP_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet --bin turnkey)
fi
for tool in pebble pebble-challtestsrv openssl curl; do
  command -v "$tool" >/dev/null || { echo "$tool is required (Debian: pebble, openssl, curl)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/turnkey-acmebench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

port() { # a free loopback TCP port
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
now_ms() { date +%s%3N; }

# Pebble's own HTTPS certificate, for localhost.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$WORK/pebble-key.pem" -out "$WORK/pebble-cert.pem" -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" 2>/dev/null

# Milliseconds until a handshake with SNI $DOMAIN on $1 verifies against $2.
until_verified() {
  local start=$1 tls=$2 root=$3
  for _ in $(seq 1 1200); do
    if echo | timeout 5 openssl s_client -connect "127.0.0.1:$tls" -servername "$DOMAIN" \
      -CAfile "$root" -verify_return_error -verify_hostname "$DOMAIN" >/dev/null 2>&1; then
      echo $(($(now_ms) - start))
      return
    fi
    sleep 0.05
  done
  echo "never"
}

start_turnkey() { # tls_port cache log; sets TK to its pid
  local cfg="$WORK/turnkey-$1.toml"
  cat >"$cfg" <<CFG
[log]
level = "info"
[http]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[turn]
listen = ["127.0.0.1:0"]
tcp_listen = ["127.0.0.1:0"]
threads = 1
[tls]
listen = ["127.0.0.1:$1"]
acme_domains = ["$DOMAIN"]
acme_directory = "https://localhost:$API/dir"
acme_ca_file = "$WORK/pebble-cert.pem"
acme_cache_dir = "$2"
CFG
  "$TURNKEY" --config "$cfg" >/dev/null 2>"$3" &
  TK=$!
  PIDS+=("$TK")
}

printf '%-4s %-18s %-18s %s\n' run first_cert_ms cached_restart_ms orders_after_restart
for run in $(seq 1 "$RUNS"); do
  TLS=$(port) API=$(port) MGMT=$(port) DNS=$(port)
  pebble-challtestsrv -dns01 "127.0.0.1:$DNS" -http01 "" -https01 "" -tlsalpn01 "" \
    -management "127.0.0.1:$(port)" -defaultIPv4 127.0.0.1 -defaultIPv6 "" \
    >"$WORK/dns-$run.log" 2>&1 &
  DNS_PID=$!
  PIDS+=("$DNS_PID")
  cat >"$WORK/pebble-$run.json" <<CFG
{"pebble": {"listenAddress": "127.0.0.1:$API", "managementListenAddress": "127.0.0.1:$MGMT",
 "certificate": "$WORK/pebble-cert.pem", "privateKey": "$WORK/pebble-key.pem",
 "httpPort": $(port), "tlsPort": $TLS, "ocspResponderURL": "", "externalAccountBindingRequired": false}}
CFG
  PEBBLE_VA_NOSLEEP=1 pebble -config "$WORK/pebble-$run.json" -dnsserver "127.0.0.1:$DNS" \
    >"$WORK/pebble-$run.log" 2>&1 &
  PEBBLE_PID=$!
  PIDS+=("$PEBBLE_PID")
  for _ in $(seq 100); do
    curl -fsS --cacert "$WORK/pebble-cert.pem" "https://localhost:$MGMT/roots/0" \
      >"$WORK/root-$run.pem" 2>/dev/null && break || sleep 0.1
  done

  CACHE="$WORK/cache-$run"
  t0=$(now_ms)
  start_turnkey "$TLS" "$CACHE" "$WORK/turnkey-$run.log"
  first=$(until_verified "$t0" "$TLS" "$WORK/root-$run.pem")
  kill -INT "$TK"; wait "$TK" 2>/dev/null || true
  orders=$(grep -c "POST /order-plz" "$WORK/pebble-$run.log" || true)

  t0=$(now_ms)
  start_turnkey "$TLS" "$CACHE" "$WORK/turnkey-$run-again.log"
  again=$(until_verified "$t0" "$TLS" "$WORK/root-$run.pem")
  kill -INT "$TK"; wait "$TK" 2>/dev/null || true
  orders_after=$(grep -c "POST /order-plz" "$WORK/pebble-$run.log" || true)
  printf '%-4s %-18s %-18s %s\n' "$run" "$first" "$again" "$((orders_after - orders))"
  kill -9 "$PEBBLE_PID" "$DNS_PID" 2>/dev/null || true
  wait "$PEBBLE_PID" "$DNS_PID" 2>/dev/null || true
done
