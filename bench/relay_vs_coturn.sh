#!/usr/bin/env bash
# Relay throughput and CPU cost of turnkey against coturn, on loopback only.
#
# Both servers get the same load from coturn's own client,
# turnutils_uclient, one after the other (alternating, REPS rounds), each
# started fresh for its run. For every run we record uclient's summary
# (messages sent, received, lost), the run's wall time, the server's CPU
# time during the run (/proc/PID/stat utime+stime), its peak RSS (VmHWM),
# where the kernel dropped datagrams (per-socket counters in
# /proc/net/udp), and print the medians as a markdown table.
#
# The load: PARALLEL uclient processes side by side, each
#   turnutils_uclient -y -z INTERVAL -m CLIENTS -n MESSAGES -l LENGTH -u … -w … -p PORT 127.0.0.1
#   -y  client-to-client: sessions pair up and send to each other's relayed
#       address, so every message crosses the server twice (client → relay
#       → other relay → other client), over ChannelData (uclient binds
#       channels unless -c);
#   -z  the pause between a session's packets in ms (0 = no pause);
#   -m  sessions per process, each with an RTCP companion allocation
#       (EVEN-PORT with a reservation, then RESERVATION-TOKEN);
#   -n  messages per session; -l  bytes per message.
#
# MODE=peer measures the other path real calls take: a client relayed to
# a peer that is not a client of the server (the other browser's own
# address, another TURN server). uclient then runs without -y and sends
# to coturn's echo peer, turnutils_peer, on PEER_ADDR:PEER_PORT (another
# loopback address than the servers'), which sends every message back:
# client → relay → peer → relay → client, every message through a relay
# socket both ways (the relay-to-relay handover never applies).
#
# Usage: bench/relay_vs_coturn.sh            (from anywhere)
#        A=turnkey B=uncounted bench/relay_vs_coturn.sh
#                 the cost of turnkey's metrics: the same turnkey with its
#                 relay counters compiled away (cargo feature `uncounted`)
#        A=turnkey B=webhooked bench/relay_vs_coturn.sh
#                 what a webhook sink that never answers costs the relay:
#                 the same turnkey with [webhooks] url pointing at a TCP
#                 listener on loopback that accepts and never answers
#        A=turnkey B=kernelpath bench/relay_vs_coturn.sh
#                 what the relay-to-relay handover saves: the same turnkey
#                 sending relay to relay through its sockets (cargo
#                 feature `kernel-relay`)
# Knobs (environment):
#   A=turnkey B=coturn  the two servers compared (turnkey, uncounted,
#                  kernelpath, baseline, unlimited (max_bps = 0), webhooked
#                  (a webhook sink that never answers), coturn)
#   TURNKEY=PATH   the turnkey binary (default: this tree's release build)
#   BASELINE=PATH  another turnkey binary, named `baseline` (an older commit)
#   SCRAPE=1       scrape turnkey's /metrics once a second during its runs
#   THREADS=0      relay threads of both servers; 0 = their defaults (turnkey:
#                  one per two cores; coturn: one per core)
#   REPS=3         rounds; each round runs both servers once
#   PARALLEL=4     uclient processes run side by side (one alone cannot load a server)
#   CLIENTS=20     uclient -m: client sessions per process (each with an RTCP companion)
#   MESSAGES=4000  uclient -n: messages per session
#   LENGTH=1000    uclient -l: message length in bytes
#   INTERVAL=0     uclient -z: milliseconds between a session's packets (0 = flat out)
#   RUN_TIMEOUT=90 seconds before one uclient run is cut off
#   SKIP_BUILD=1   use the existing target/release/turnkey
#   MODE=client    client: uclient -y, client to client; peer: client to an
#                  outside echo peer (turnutils_peer), see above
#   PEER_ADDR=127.0.0.2 PEER_PORT=13480  the echo peer (MODE=peer)
#   TURNSERVER, UCLIENT, PEER  coturn's binaries (default: the ones on PATH,
#                  Debian's; e.g. a coturn built from a release tarball)
#   COTURN_ARGS    extra turnserver options (coturn 4.17's server with an
#                  older uclient needs --rfc5766-channel-numbers)
#
# Needs: cargo, coturn (turnserver, turnutils_uclient, turnutils_stunclient).
# Sends traffic only to 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
THREADS=${THREADS:-0}
REPS=${REPS:-3}
PARALLEL=${PARALLEL:-4}
CLIENTS=${CLIENTS:-20}
MESSAGES=${MESSAGES:-4000}
LENGTH=${LENGTH:-1000}
INTERVAL=${INTERVAL:-0}
RUN_TIMEOUT=${RUN_TIMEOUT:-90}
A=${A:-turnkey}
B=${B:-coturn}
MODE=${MODE:-client}
PEER_ADDR=${PEER_ADDR:-127.0.0.2}
PEER_PORT=${PEER_PORT:-13480}
TURNSERVER=${TURNSERVER:-turnserver}
UCLIENT=${UCLIENT:-turnutils_uclient}
PEER=${PEER:-turnutils_peer}
read -r -a COTURN_EXTRA <<<"${COTURN_ARGS:-}"
case $MODE in
  client) TARGET_ARGS=(-y) ;;
  peer) TARGET_ARGS=(-e "$PEER_ADDR" -r "$PEER_PORT") ;;
  *) echo "MODE is client or peer, not $MODE" >&2; exit 2 ;;
esac
SCRAPE=${SCRAPE:-1}

TK_PORT=13578
CT_PORT=13579
HTTP=127.0.0.1:18180
# /metrics lives on its own listener (never the public one).
METRICS=127.0.0.1:18181
USER_NAME=bench
PASSWORD=bench-password-123
TICKS=$(getconf CLK_TCK)
# Both servers relay from the same range, one at a time. It lies above
# Linux's default ephemeral range (32768-60999): uclient's own sockets
# take ephemeral ports, and one of them sitting on a port a server has
# reserved for EVEN-PORT makes that server fail the RTCP Allocate.
RELAY_MIN=61000
RELAY_MAX=65000
read -r EPH_LO EPH_HI </proc/sys/net/ipv4/ip_local_port_range
if [ "$EPH_HI" -ge "$RELAY_MIN" ] && [ "$EPH_LO" -le "$RELAY_MAX" ]; then
  echo "warning: relay ports $RELAY_MIN-$RELAY_MAX overlap the ephemeral range $EPH_LO-$EPH_HI" >&2
fi

for tool in "$TURNSERVER" "$UCLIENT" "$PEER" turnutils_stunclient timeout; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install coturn)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/turnkey-bench.XXXXXX)
SERVER_PID=""
SAMPLER_PID=""
SCRAPER_PID=""
PEER_PID=""
SILENT_PID=""
UCLIENT_PIDS=()

stop_sampler() {
  if [ -n "$SAMPLER_PID" ]; then
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
  fi
  SAMPLER_PID=""
}
stop_scraper() {
  if [ -n "$SCRAPER_PID" ]; then
    kill "$SCRAPER_PID" 2>/dev/null || true
    wait "$SCRAPER_PID" 2>/dev/null || true
  fi
  SCRAPER_PID=""
}
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
cleanup() {
  local p
  for p in "${UCLIENT_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  stop_sampler
  stop_scraper
  stop_server
  if [ -n "$PEER_PID" ]; then kill "$PEER_PID" 2>/dev/null || true; fi
  if [ -n "$SILENT_PID" ]; then kill "$SILENT_PID" 2>/dev/null || true; fi
  echo "logs and raw results: $WORK" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "building turnkey (release)…" >&2
  (cd "$ROOT" && cargo build --release --quiet)
fi
TURNKEY=${TURNKEY:-"${CARGO_TARGET_DIR:-$ROOT/target}/release/turnkey"}
BASELINE=${BASELINE:-}
UNCOUNTED="$ROOT/target/uncounted/release/turnkey"
if [ "$A" = uncounted ] || [ "$B" = uncounted ]; then
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "building turnkey without relay counters (feature uncounted)…" >&2
    (cd "$ROOT" && cargo build --release --quiet --features uncounted --target-dir "$ROOT/target/uncounted")
  fi
fi
KERNELPATH="$ROOT/target/kernelpath/release/turnkey"
if [ "$A" = kernelpath ] || [ "$B" = kernelpath ]; then
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "building turnkey without the relay-to-relay handover (feature kernel-relay)…" >&2
    (cd "$ROOT" && cargo build --release --quiet --features kernel-relay --target-dir "$ROOT/target/kernelpath")
  fi
fi

cat >"$WORK/turnkey.toml" <<EOF
[log]
level = "info"

[http]
listen = "$HTTP"

[metrics]
listen = "$METRICS"

[turn]
listen = ["127.0.0.1:$TK_PORT"]
relay_port_min = $RELAY_MIN
relay_port_max = $RELAY_MAX
threads = $THREADS
# uclient -y opens two allocations per client under one user, all from
# one loopback address, and coturn has no per-user or per-address cap nor
# request rate limit: neither does this run. max_bps keeps its default.
user_quota = 0
ip_quota = 100000
unauth_requests_per_sec = 100000
binding_requests_per_sec = 100000
# MODE=peer: the echo peer sits on a loopback address, which the peer
# policy refuses unless allowed (coturn: --allow-loopback-peers).
allowed_peer_ranges = ["$PEER_ADDR/32"]

[auth.users]
$USER_NAME = "$PASSWORD"
EOF

start_turnkey() {
  "$TURNKEY" --config "$WORK/turnkey.toml" >>"$WORK/turnkey.log" 2>&1 &
  SERVER_PID=$!
}

start_baseline() {
  # The same file when the baseline knows every key; an older turnkey that
  # predates the per-address limits refuses them, and gets the file
  # without those keys (it has no such limits to lift).
  if "$BASELINE" check-config "$WORK/turnkey.toml" >/dev/null 2>&1; then
    cp "$WORK/turnkey.toml" "$WORK/baseline.toml"
  else
    grep -v -E '^(ip_quota|unauth_requests_per_sec|binding_requests_per_sec) =' \
      "$WORK/turnkey.toml" >"$WORK/baseline.toml"
  fi
  "$BASELINE" --config "$WORK/baseline.toml" >>"$WORK/baseline.log" 2>&1 &
  SERVER_PID=$!
}

# `unlimited`: the same turnkey with the per-allocation bandwidth budget
# off (max_bps = 0), to measure what the budget costs on the relay path.
start_unlimited() {
  sed 's/^binding_requests_per_sec = .*/&\nmax_bps = 0/' "$WORK/turnkey.toml" >"$WORK/unlimited.toml"
  "$TURNKEY" --config "$WORK/unlimited.toml" >>"$WORK/unlimited.log" 2>&1 &
  SERVER_PID=$!
}

# `webhooked`: the same turnkey sending every allocation's start and end
# to a webhook sink that accepts connections and never answers (a python3
# listener on loopback, started once), so every POST waits out its
# timeout and the queue fills: what that costs the relay.
SILENT=127.0.0.1:18182
start_webhooked() {
  if [ -z "$SILENT_PID" ]; then
    python3 -c '
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
host, port = sys.argv[1].split(":")
s.bind((host, int(port)))
s.listen(1024)
held = []
while True:
    c, _ = s.accept()
    held.append(c)  # never read, never answered, never closed
' "$SILENT" >"$WORK/silent.log" 2>&1 &
    SILENT_PID=$!
  fi
  { cat "$WORK/turnkey.toml"; printf '\n[webhooks]\nurl = "http://%s/hook"\nsecret = "bench-webhook-secret-0123"\n' "$SILENT"; } \
    >"$WORK/webhooked.toml"
  "$TURNKEY" --config "$WORK/webhooked.toml" >>"$WORK/webhooked.log" 2>&1 &
  SERVER_PID=$!
}

start_kernelpath() {
  "$KERNELPATH" --config "$WORK/turnkey.toml" >>"$WORK/kernelpath.log" 2>&1 &
  SERVER_PID=$!
}

start_uncounted() {
  "$UNCOUNTED" --config "$WORK/turnkey.toml" >>"$WORK/uncounted.log" 2>&1 &
  SERVER_PID=$!
}

port_of() {
  case $1 in
    coturn) echo "$CT_PORT" ;;
    *) echo "$TK_PORT" ;;
  esac
}

start_coturn() {
  local threads=()
  # coturn's default is one relay thread per core; -m 0 would mean
  # "relay in the listener thread", so pass it only when asked.
  if [ "$THREADS" -gt 0 ]; then threads=(--relay-threads="$THREADS"); fi
  # coturn refuses loopback peers unless told; turnkey always allows its
  # own relay addresses (uclient -y relays client to client through them).
  "$TURNSERVER" -n --no-cli --no-tls --no-dtls \
    -L 127.0.0.1 -p "$CT_PORT" --relay-ip=127.0.0.1 \
    --min-port="$RELAY_MIN" --max-port="$RELAY_MAX" \
    -r turnkey -a -u "$USER_NAME:$PASSWORD" \
    --allow-loopback-peers "${threads[@]}" "${COTURN_EXTRA[@]}" \
    --log-file="$WORK/coturn.log" --simple-log --no-stdout-log \
    >>"$WORK/coturn.out" 2>&1 &
  SERVER_PID=$!
}

# Ready when a STUN Binding on the port gets an answer (10 s at most).
wait_ready() {
  local port=$1
  for _ in $(seq 50); do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited at start" >&2; return 1; }
    case $(timeout 1 turnutils_stunclient -p "$port" 127.0.0.1 2>&1 || true) in
      *"UDP reflexive addr"*) return 0 ;;
    esac
    sleep 0.2
  done
  echo "server on port $port not ready" >&2
  return 1
}

cpu_ticks() { # utime + stime of the whole process (all threads)
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
peak_rss_kb() {
  awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

# Where datagrams were dropped: every 0.2 s, the kernel's per-socket drop
# counters of loopback UDP sockets (relay sockets close when uclient ends,
# taking their counters with them, hence sampling).
sample_drops() {
  while :; do
    cat /proc/net/udp
    sleep 0.2
  done >"$1"
}
# Sums the last drop count seen per socket into: the server's listener,
# its relay sockets, and everything else on loopback (uclient's sockets).
drops_by_place() {
  local listen=$1 lo=$2 hi=$3 file=$4
  awk -v listen="$listen" -v lo="$lo" -v hi="$hi" '
    function hex(s,   i, n) {
      n = 0
      for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789ABCDEF", substr(s, i, 1)) - 1
      return n
    }
    $2 ~ /^0100007F:/ { split($2, a, ":"); port = hex(a[2]); d[port " " $10] = $NF }
    END {
      for (k in d) {
        split(k, b, " "); p = b[1] + 0
        if (p == listen) l += d[k]; else if (p >= lo && p <= hi) r += d[k]; else c += d[k]
      }
      printf "%d\t%d\t%d", l, r, c
    }' "$file"
}

# Messages received per second of actual relaying: from the last
# one-second report before uclient sent anything to the first one where
# everything that would arrive had arrived (uclient reports whole seconds).
transmit_rate() {
  awk '
    /start_mclient: msz=/ {
      t = $1 + 0
      match($0, /tot_send_msgs=[0-9]+/); s = substr($0, RSTART + 14, RLENGTH - 14) + 0
      match($0, /tot_recv_msgs=[0-9]+/); r = substr($0, RSTART + 14, RLENGTH - 14) + 0
      if (s == 0) t0 = t
      n++; ts[n] = t; rs[n] = r
    }
    END {
      final = rs[n]
      for (i = 1; i <= n; i++) if (rs[i] == final) { t1 = ts[i]; break }
      printf "%.0f", (t1 > t0 ? final / (t1 - t0) : 0)
    }' "$1"
}

# Runs one measurement; appends a TSV line to $WORK/runs.tsv.
measure() {
  local name=$1 port=$2
  "start_$name"
  wait_ready "$port"
  sample_drops "$WORK/udp-$name-$RUN.txt" &
  SAMPLER_PID=$!
  # A Prometheus-like scraper, so "metrics on" includes the scrapes.
  if [ "$SCRAPE" = 1 ] && [ "$name" != coturn ]; then
    while :; do curl -s -o /dev/null "http://$METRICS/metrics"; sleep 1; done &
    SCRAPER_PID=$!
  fi
  local t0 t1 c0 c1 rss i
  c0=$(cpu_ticks "$SERVER_PID")
  t0=$(date +%s.%N)
  for i in $(seq "$PARALLEL"); do
    /usr/bin/time -o "$WORK/time-$name-$RUN-$i.txt" -f "%U %S" \
      timeout "$RUN_TIMEOUT" "$UCLIENT" "${TARGET_ARGS[@]}" -z "$INTERVAL" -m "$CLIENTS" -n "$MESSAGES" \
      -l "$LENGTH" -u "$USER_NAME" -w "$PASSWORD" -p "$port" 127.0.0.1 \
      >"$WORK/uclient-$name-$RUN-$i.txt" 2>&1 &
    UCLIENT_PIDS+=($!)
  done
  for i in "${UCLIENT_PIDS[@]}"; do wait "$i" || true; done
  UCLIENT_PIDS=()
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "$SERVER_PID")
  stop_sampler
  stop_scraper
  rss=$(peak_rss_kb "$SERVER_PID")
  if [ "$name" = turnkey ]; then
    curl -s "http://$METRICS/metrics" | grep '^turnkey_turn_relayed' >"$WORK/metrics-$RUN.txt" || true
  fi
  # The webhook run's proof that the sink held it up: nothing delivered,
  # attempts failed (timed out), events queued or dropped.
  if [ "$name" = webhooked ]; then
    curl -s "http://$METRICS/metrics" | grep '^turnkey_webhooks' >"$WORK/webhooks-$RUN.txt" || true
    tr '\n' ' ' <"$WORK/webhooks-$RUN.txt" >&2; echo >&2
  fi
  stop_server
  local sent=0 recv=0 lost=0 rate=0 failed=0 out s r l
  for i in $(seq "$PARALLEL"); do
    out="$WORK/uclient-$name-$RUN-$i.txt"
    s=$(grep -o 'tot_send_msgs=[0-9]*' "$out" | tail -1 | cut -d= -f2 || true)
    r=$(grep -o 'tot_recv_msgs=[0-9]*' "$out" | tail -1 | cut -d= -f2 || true)
    l=$(grep -o 'Total lost packets [0-9]*' "$out" | tail -1 | awk '{ print $4 }' || true)
    if [ -z "$s" ] || [ -z "$r" ] || [ -z "$l" ]; then
      echo "uclient gave no summary against $name (see $out)" >&2
      failed=$((failed + 1))
    fi
    sent=$((sent + ${s:-0})) recv=$((recv + ${r:-0})) lost=$((lost + ${l:-0}))
    # The processes run side by side, so their rates add up.
    rate=$((rate + $(transmit_rate "$out")))
  done
  local client_cpu
  client_cpu=$(cat "$WORK"/time-"$name"-"$RUN"-*.txt |
    awk '$1 ~ /^[0-9.]+$/ { s += $1 + $2 } END { printf "%.2f", s }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$RUN" "$sent" "$recv" "$lost" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" \
    "$(awk -v a="$c0" -v b="$c1" -v t="$TICKS" 'BEGIN { printf "%.2f", (b - a) / t }')" \
    "$rss" "$rate" \
    "$(drops_by_place "$port" "$RELAY_MIN" "$RELAY_MAX" "$WORK/udp-$name-$RUN.txt")" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$failed" "$client_cpu" >>"$WORK/runs.tsv"
  tail -1 "$WORK/runs.tsv" >&2
}

echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) before the first run" >&2
if [ "$MODE" = peer ]; then
  "$PEER" -L "$PEER_ADDR" -p "$PEER_PORT" >"$WORK/peer.log" 2>&1 &
  PEER_PID=$!
fi
echo "mode $MODE: $PARALLEL × uclient ${TARGET_ARGS[*]} -z $INTERVAL -m $CLIENTS -n $MESSAGES -l $LENGTH; threads=$THREADS; $REPS rounds" >&2
printf 'server\trun\tsent\treceived\tlost\twall_s\tcpu_s\tpeak_rss_kb\tmsgs_per_s_transmit\tdrops_listener\tdrops_relays\tdrops_client\tloadavg_1m\tfailed_uclients\tuclient_cpu_s\n' >"$WORK/runs.tsv"
for RUN in $(seq "$REPS"); do
  if [ $((RUN % 2)) -eq 1 ]; then
    measure "$A" "$(port_of "$A")"; measure "$B" "$(port_of "$B")"
  else
    measure "$B" "$(port_of "$B")"; measure "$A" "$(port_of "$A")"
  fi
done

# Medians per server, then the table.
awk -F'\t' -v len="$LENGTH" -v A="$A" -v B="$B" '
function median(list,   n, a, i, j, t) {
  n = split(list, a, " ")
  for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
  return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function put(key, s, x) { v[key, s] = v[key, s] " " x }
NR > 1 {
  s = $1
  put("sent", s, $3); put("recv", s, $4)
  put("loss", s, $3 > 0 ? 100 * $5 / $3 : 0)
  put("wall", s, $6); put("cpu", s, $7); put("rss", s, $8 / 1024)
  put("rate", s, $4 / $6); put("mbs", s, $4 * len / $6 / 1e6)
  put("trate", s, $9); put("tmbs", s, $9 * len / 1e6)
  put("per100k", s, $4 > 0 ? $7 / ($4 / 1e5) : 0)
  put("dl", s, $10); put("dr", s, $11); put("dc", s, $12)
  put("ucpu", s, $15); put("load", s, $13)
}
END {
  n = split("sent recv loss wall rate mbs trate tmbs cpu per100k rss dl dr dc ucpu load", keys, " ")
  label["sent"] = "messages sent"; fmt["sent"] = "%.0f"
  label["recv"] = "messages received"; fmt["recv"] = "%.0f"
  label["loss"] = "lost (%)"; fmt["loss"] = "%.2f"
  label["wall"] = "wall time of the uclient run (s)"; fmt["wall"] = "%.2f"
  label["rate"] = "received msgs/s over the whole run"; fmt["rate"] = "%.0f"
  label["mbs"] = "received MB/s over the whole run"; fmt["mbs"] = "%.2f"
  label["trate"] = "received msgs/s while transmitting"; fmt["trate"] = "%.0f"
  label["tmbs"] = "received MB/s while transmitting"; fmt["tmbs"] = "%.2f"
  label["cpu"] = "server CPU time (s)"; fmt["cpu"] = "%.2f"
  label["per100k"] = "server CPU-s per 100k received msgs"; fmt["per100k"] = "%.3f"
  label["rss"] = "server peak RSS (MiB)"; fmt["rss"] = "%.1f"
  label["dl"] = "drops: server listener socket"; fmt["dl"] = "%.0f"
  label["dr"] = "drops: server relay sockets"; fmt["dr"] = "%.0f"
  label["dc"] = "drops: uclient sockets"; fmt["dc"] = "%.0f"
  label["ucpu"] = "uclient CPU time (s)"; fmt["ucpu"] = "%.2f"
  label["load"] = "load average (1 min) after the run"; fmt["load"] = "%.2f"
  print "| median of runs | " A " | " B " | " A "/" B " |"
  print "| --- | ---: | ---: | ---: |"
  for (k = 1; k <= n; k++) {
    key = keys[k]
    a = median(v[key, A]); b = median(v[key, B])
    printf "| %s | " fmt[key] " | " fmt[key] " | %s |\n", label[key], a, b, (b != 0 ? sprintf("%.2f", a / b) : "–")
  }
}' "$WORK/runs.tsv"
echo
echo "runs:"
sed 's/\t/  /g' "$WORK/runs.tsv"
