#!/usr/bin/env bash
# Open-loop relay load from our own generator (bench/loadgen.rs) against
# turnkey, coturn and the bare forwarder (bench/forwarder.rs, this
# machine's ceiling), side by side in one run, on loopback only.
#
# Each round runs every server once, fresh, in an order that rotates from
# round to round. For every run: the generator's line (packets sent and
# received, loss, delivered packets/s, one-way latency percentiles through
# the relay) and the server's CPU time during the run (/proc/PID/stat
# utime+stime, all threads), as CPU ticks per 10,000 delivered packets.
#
# The load: PAIRS pairs of allocations (2 × PAIRS allocations), each
# allocation sending SIZE-byte ChannelData at RATE packets/s to its
# partner's relayed address for SECS seconds: every packet crosses the
# server twice. `PAIRS="25 50 100"` runs each load in turn (a sweep).
#
# Usage: bench/loadgen_vs_coturn.sh
#        PAIRS="50 100 150 200" RATE=500 bench/loadgen_vs_coturn.sh
# Knobs (environment):
#   SERVERS="turnkey coturn bare"  which servers (also: baseline = $BASELINE;
#                      direct = the forwarder with --direct, client to client
#                      without relay sockets, as turnkey's relay-to-relay
#                      handover)
#   PAIRS=50 RATE=500 SIZE=200 SECS=5 REPS=3
#   BURST=1            packets per allocation sent back to back at each tick
#                      (the rate stays packets/s): BURST=8 SIZE=1200 RATE=240
#                      is a video sender's frames (30 frames/s of 8 packets)
#   THREADS=0          relay threads of turnkey and coturn (0 = their defaults:
#                      turnkey one per two cores, coturn one per core)
#   SKIP_BUILD=1       use the binaries as they are
#   TURNSERVER, COTURN_ARGS  coturn's server binary (default: Debian's, on
#                      PATH; e.g. one built from a release tarball) and extra
#                      options for it
#   TURNKEY, BASELINE, LOADGEN, FORWARDER  paths of the binaries
#                      (default: the release builds of this tree)
#   OUT=FILE           also write the runs as TSV to FILE
#   PEERS=127.0.0.2    client to outside peer instead: PAIRS allocations, each
#                      with a plain UDP peer of the generator's on this address
#                      (ChannelData out, plain datagrams back: every packet
#                      crosses one relay socket); turnkey, coturn, baseline only
# Needs: cargo, coturn (turnserver, turnutils_stunclient).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SERVERS=${SERVERS:-turnkey coturn bare}
PEERS=${PEERS:-}
TURNSERVER=${TURNSERVER:-turnserver}
read -r -a COTURN_EXTRA <<<"${COTURN_ARGS:-}"
PAIRS=${PAIRS:-50}
RATE=${RATE:-500}
SIZE=${SIZE:-200}
BURST=${BURST:-1}
SECS=${SECS:-5}
REPS=${REPS:-3}
THREADS=${THREADS:-0}
TK_PORT=13578
CT_PORT=13579
FW_PORT=13577
HTTP=127.0.0.1:18180
USER_NAME=bench
PASSWORD=bench-password-123
RELAY_MIN=61000
RELAY_MAX=65000
TICKS=$(getconf CLK_TCK)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"
TURNKEY=${TURNKEY:-$TARGET/turnkey}
BASELINE=${BASELINE:-}
LOADGEN=${LOADGEN:-$TARGET/turnkey-loadgen}
FORWARDER=${FORWARDER:-$TARGET/turnkey-forwarder}

for tool in "$TURNSERVER" turnutils_stunclient timeout; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install coturn)" >&2; exit 1; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "building turnkey, turnkey-loadgen, turnkey-forwarder (release)…" >&2
  (cd "$ROOT" && cargo build --release --quiet --workspace --bins)
fi

WORK=$(mktemp -d /tmp/turnkey-loadgen.XXXXXX)
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    # turnkey drains for minutes on SIGTERM while allocations remain.
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap 'stop_server; echo "logs and raw results: $WORK" >&2' EXIT
trap 'exit 130' INT TERM

# A benchmark from one loopback address: turnkey's per-address quota and
# request rates are raised (coturn has none); max_bps stays at its default.
cat >"$WORK/turnkey.toml" <<EOF
[log]
level = "warn"

[http]
listen = "$HTTP"

[turn]
listen = ["127.0.0.1:$TK_PORT"]
relay_port_min = $RELAY_MIN
relay_port_max = $RELAY_MAX
threads = $THREADS
user_quota = 0
ip_quota = 100000
unauth_requests_per_sec = 100000
binding_requests_per_sec = 100000
# PEERS: the generator's peers sit on a loopback address, which the peer
# policy refuses unless allowed (coturn: --allow-loopback-peers).
allowed_peer_ranges = ["${PEERS:-127.0.0.2}/32"]

[auth.users]
$USER_NAME = "$PASSWORD"
EOF

start() {
  case $1 in
    turnkey) "$TURNKEY" --config "$WORK/turnkey.toml" >>"$WORK/turnkey.log" 2>&1 & ;;
    baseline) "$BASELINE" --config "$WORK/turnkey.toml" >>"$WORK/baseline.log" 2>&1 & ;;
    bare) "$FORWARDER" --listen "127.0.0.1:$FW_PORT" >>"$WORK/bare.log" 2>&1 & ;;
    direct) "$FORWARDER" --direct --listen "127.0.0.1:$FW_PORT" >>"$WORK/direct.log" 2>&1 & ;;
    coturn)
      local threads=()
      if [ "$THREADS" -gt 0 ]; then threads=(--relay-threads="$THREADS"); fi
      "$TURNSERVER" -n --no-cli --no-tls --no-dtls \
        -L 127.0.0.1 -p "$CT_PORT" --relay-ip=127.0.0.1 \
        --min-port="$RELAY_MIN" --max-port="$RELAY_MAX" \
        -r turnkey -a -u "$USER_NAME:$PASSWORD" \
        --allow-loopback-peers "${threads[@]}" "${COTURN_EXTRA[@]}" \
        --log-file="$WORK/coturn.log" --simple-log --no-stdout-log \
        >>"$WORK/coturn.out" 2>&1 &
      ;;
    *) echo "unknown server $1" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
}

port_of() {
  case $1 in
    coturn) echo "$CT_PORT" ;;
    bare | direct) echo "$FW_PORT" ;;
    *) echo "$TK_PORT" ;;
  esac
}

# Ready when a STUN Binding gets an answer; the forwarder when it says so.
wait_ready() {
  local name=$1 port=$2
  for _ in $(seq 50); do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "$name exited at start" >&2; return 1; }
    if [ "$name" = bare ] || [ "$name" = direct ]; then
      grep -q "listening on" "$WORK/$name.log" 2>/dev/null && return 0
    else
      case $(timeout 1 turnutils_stunclient -p "$port" 127.0.0.1 2>&1 || true) in
        *"UDP reflexive addr"*) return 0 ;;
      esac
    fi
    sleep 0.2
  done
  echo "$name on port $port not ready" >&2
  return 1
}

cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }

measure() {
  local name=$1 pairs=$2 port line c0 c1 bare=()
  port=$(port_of "$name")
  : >"$WORK/$name.log"
  start "$name"
  wait_ready "$name" "$port"
  case $name in bare | direct) bare=(--bare) ;; esac
  if [ -n "$PEERS" ]; then
    [ ${#bare[@]} -eq 0 ] || { echo "PEERS: the forwarder ($name) relays client to client only" >&2; exit 2; }
    bare=(--peers "$PEERS")
  fi
  c0=$(cpu_ticks "$SERVER_PID")
  line=$("$LOADGEN" "${bare[@]}" --server "127.0.0.1:$port" --user "$USER_NAME" --password "$PASSWORD" \
    --pairs "$pairs" --rate "$RATE" --size "$SIZE" --burst "$BURST" --secs "$SECS")
  c1=$(cpu_ticks "$SERVER_PID")
  stop_server
  local recv ticks
  recv=$(field "$line" received)
  ticks=$((c1 - c0))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$RUN" "$pairs" \
    "$(field "$line" sent)" "$recv" "$(field "$line" loss_pct)" "$(field "$line" delivered_pps)" \
    "$(field "$line" p50_us)" "$(field "$line" p99_us)" "$(field "$line" p999_us)" \
    "$(awk -v t="$ticks" -v k="$TICKS" 'BEGIN { printf "%.2f", t / k }')" \
    "$(awk -v t="$ticks" -v r="$recv" 'BEGIN { printf "%.2f", (r > 0 ? t * 10000 / r : 0) }')" \
    "$(cut -d' ' -f1 /proc/loadavg)" >>"$WORK/runs.tsv"
  tail -1 "$WORK/runs.tsv" >&2
}

read -r -a servers <<<"$SERVERS"
echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); pairs {$PAIRS} × $RATE pkt/s (bursts of $BURST) × $SIZE B for $SECS s; $REPS rounds" >&2
printf 'server\trun\tpairs\tsent\treceived\tloss_pct\tdelivered_pps\tp50_us\tp99_us\tp999_us\tcpu_s\tticks_per_10k\tloadavg\n' >"$WORK/runs.tsv"
for RUN in $(seq "$REPS"); do
  for pairs in $PAIRS; do
    n=${#servers[@]}
    for k in $(seq 0 $((n - 1))); do
      measure "${servers[$(((k + RUN - 1) % n))]}" "$pairs"
    done
  done
done

# Medians per server and load, with each figure's ratio to the first server.
awk -F'\t' -v first="${servers[0]}" '
function median(list,   n, a, i, j, t) {
  n = split(list, a, " ")
  for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
  return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
NR > 1 {
  k = $1 SUBSEP $3
  if (!(k in seen)) { seen[k] = 1; order[++n] = k }
  for (c = 4; c <= 12; c++) v[k, c] = v[k, c] " " $c
}
END {
  print "| server | pairs | loss % | delivered pkt/s | p50 µs | p99 µs | p999 µs | CPU s | CPU ticks / 10k pkts | pkts/s vs " first " | ticks vs " first " |"
  print "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for (i = 1; i <= n; i++) {
    k = order[i]; split(k, p, SUBSEP); f = first SUBSEP p[2]
    rp = median(v[f, 7]) > 0 ? median(v[k, 7]) / median(v[f, 7]) : 0
    rt = median(v[f, 12]) > 0 ? median(v[k, 12]) / median(v[f, 12]) : 0
    printf "| %s | %s | %.4f | %.0f | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f | %.2f |\n", p[1], p[2],
      median(v[k, 6]), median(v[k, 7]), median(v[k, 8]), median(v[k, 9]), median(v[k, 10]),
      median(v[k, 11]), median(v[k, 12]), rp, rt
  }
}' "$WORK/runs.tsv"
echo
echo "runs:"
sed 's/\t/  /g' "$WORK/runs.tsv"
[ -z "${OUT:-}" ] || cp "$WORK/runs.tsv" "$OUT"
