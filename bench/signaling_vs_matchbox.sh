#!/usr/bin/env bash
# Signaling, turnkey (memory backend) beside matchbox_server, under the
# same open-loop load from two load clients of different designs:
# `turnkey-sigload` (bench/sigload.rs) and `turnkey-sigload-twin`
# (bench/sigload_twin.rs), so the figures do not hang on one client.
# PEERS peers in rooms of two, RATE signals/s of SIZE bytes for SECS
# seconds. Each server is started fresh for each (client, server) run;
# the order alternates between rounds, for servers and for clients, so
# each comes first as often as the other. Every run reports:
#   sent / received / lost, latency p50 / p99 / p999 (ms);
#   server CPU ticks (utime + stime from /proc/PID/stat) per 10,000
#     received messages, over the send phase: from the first signal until
#     the last one arrived (or 2 s after the last send); connects excluded;
#   RSS per idle peer: VmRSS with every peer connected, joined and idle
#     for IDLE_MS, minus VmRSS of the fresh process, divided by PEERS.
# Runs go to $WORK/runs.tsv (or OUT=path); the table is the median of
# each column per (client, server), with turnkey / matchbox per client.
#
# Usage: bench/signaling_vs_matchbox.sh
# Knobs: PEERS=8000 RATE=2000 SECS=10 SIZE=200 REPS=3 IDLE_MS=1000
#        SERVERS="turnkey matchbox" CLIENTS="sigload twin" SKIP_BUILD=1
#        OUT=path
#        TURNKEY=PATH SIGLOAD=PATH SIGLOAD_TWIN=PATH (default: this
#          tree's release builds)
#        server `turnkey-b`, for before/after runs: B_TURNKEY=PATH (another
#          build) and B_HTTP='threads = 2' (lines for its [http])
#        MATCHBOX=PATH (default: matchbox_server on PATH; install it with
#          cargo install matchbox_server --version '^0.15' --root DIR)
# Sends traffic only to 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-8000}
RATE=${RATE:-2000}
SECS=${SECS:-10}
SIZE=${SIZE:-200}
REPS=${REPS:-3}
IDLE_MS=${IDLE_MS:-1000}
SERVERS=${SERVERS:-turnkey matchbox}
CLIENTS=${CLIENTS:-sigload twin}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TURNKEY=${TURNKEY:-$TARGET/release/turnkey}
SIGLOAD=${SIGLOAD:-$TARGET/release/turnkey-sigload}
SIGLOAD_TWIN=${SIGLOAD_TWIN:-$TARGET/release/turnkey-sigload-twin}
B_TURNKEY=${B_TURNKEY:-$TURNKEY}
B_HTTP=${B_HTTP:-}
case " $SERVERS " in
  *" matchbox "*)
    MATCHBOX=${MATCHBOX:-$(command -v matchbox_server || true)}
    if [ -z "$MATCHBOX" ] || [ ! -x "$MATCHBOX" ]; then
      echo "matchbox_server not found: set MATCHBOX=path or install it with" >&2
      echo "  cargo install matchbox_server --version '^0.15' --root DIR" >&2
      echo "(or SERVERS=turnkey to run turnkey's half only)" >&2
      exit 1
    fi ;;
esac
if [ -z "${SKIP_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet --workspace --bin turnkey --bin turnkey-sigload --bin turnkey-sigload-twin)
fi
# 8,000 sockets on each side of one machine.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d /tmp/turnkey-sigvs.XXXXXX)
OUT=${OUT:-$WORK/runs.tsv}
PORT=${PORT:-18390}
PID=""
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true; }
trap cleanup EXIT

# turnkey with its budgets raised, since every peer comes from one address.
# shellcheck source=bench/signaling_config.sh
. "$ROOT/bench/signaling_config.sh"
config() { signaling_config memory "$PORT"; }

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server did not listen on $PORT" >&2
  return 1
}

start() { # server
  case "$1" in
    turnkey)
      config >"$WORK/turnkey.toml"
      "$TURNKEY" --config "$WORK/turnkey.toml" >"$WORK/turnkey.log" 2>&1 &
      PID=$!
      URL="ws://127.0.0.1:$PORT/ws"; PROTO=turnkey ;;
    turnkey-b)
      config | awk -v extra="$B_HTTP" '{ print } /^\[http\]$/ && extra != "" { print extra }' \
        >"$WORK/turnkey-b.toml"
      "$B_TURNKEY" --config "$WORK/turnkey-b.toml" >"$WORK/turnkey-b.log" 2>&1 &
      PID=$!
      URL="ws://127.0.0.1:$PORT/ws"; PROTO=turnkey ;;
    matchbox)
      "$MATCHBOX" "127.0.0.1:$PORT" >"$WORK/matchbox.log" 2>&1 &
      PID=$!
      URL="ws://127.0.0.1:$PORT"; PROTO=matchbox ;;
    *) echo "unknown server $1" >&2; exit 1 ;;
  esac
  wait_port
  # Let the fresh process settle before its empty RSS is read.
  sleep 0.3
}

reverse() { echo "$1" | tr ' ' '\n' | grep . | tac | tr '\n' ' '; }

printf 'client\tserver\tround\tload\tsent\treceived\tlost\tp50_ms\tp99_ms\tp999_ms\tticks\tticks_per_10k\trss_per_peer_kib\n' >"$OUT"
for round in $(seq "$REPS"); do
  # Clients swap every round, and servers snake within a round (the
  # second client's block runs them backwards): over two rounds each
  # server comes first once under each client.
  clients=$CLIENTS
  if [ $((round % 2)) = 0 ]; then clients=$(reverse "$CLIENTS"); fi
  block=0
  for c in $clients; do
    case "$c" in
      sigload) client=$SIGLOAD ;;
      twin) client=$SIGLOAD_TWIN ;;
      *) echo "unknown client $c" >&2; exit 1 ;;
    esac
    servers=$SERVERS
    if [ $((block % 2)) = 1 ]; then servers=$(reverse "$SERVERS"); fi
    block=$((block + 1))
    for s in $servers; do
      start "$s"
      load=$(cut -d' ' -f1 /proc/loadavg)
      out=$("$client" --protocol "$PROTO" --url "$URL" --server-pid "$PID" \
        --peers "$PEERS" --rate "$RATE" --secs "$SECS" --size "$SIZE" --idle-ms "$IDLE_MS")
      kill -9 "$PID" 2>/dev/null || true
      wait "$PID" 2>/dev/null || true
      PID=""
      echo "$out" >>"$WORK/$c-$s.json"
      echo "$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
c, s, rnd, load = sys.argv[1:5]
f = lambda v, d=2: "-" if v is None else ("%.*f" % (d, v))
print("\t".join(str(x) for x in [c, s, rnd, load, r["sent"], r["received"], r["lost"],
    f(r["p50_ms"], 3), f(r["p99_ms"], 3), f(r["p999_ms"], 3), r["server_cpu_ticks"],
    f(r["ticks_per_10k"], 1), f(r["rss_per_peer_kib"], 1)]))
' "$c" "$s" "$round" "$load" >>"$OUT"
      tail -1 "$OUT" >&2
    done
  done
done

python3 - "$OUT" "$SERVERS" "$CLIENTS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cols = ["sent", "received", "lost", "p50_ms", "p99_ms", "p999_ms", "ticks_per_10k", "rss_per_peer_kib"]
ratio_cols = ["p50_ms", "p99_ms", "p999_ms", "ticks_per_10k", "rss_per_peer_kib"]
def med(vals):
    vals = [float(v) for v in vals if v not in ("-", "None")]
    return statistics.median(vals) if vals else float("nan")
def cell(c, v):
    if c in ("sent", "received", "lost"):
        return "%d" % v
    return "%.3f" % v if c.endswith("ms") else "%.1f" % v
print("| client | server | runs | load avg | " + " | ".join(cols) + " |")
print("| --- " * (len(cols) + 4) + "|")
ratios = []
for c in sys.argv[3].split():
    meds = {}
    for s in sys.argv[2].split():
        rs = [r for r in rows if r["server"] == s and r["client"] == c]
        if not rs:
            continue
        m = {k: med(r[k] for r in rs) for k in cols}
        meds[s] = m
        loads = "/".join(r["load"] for r in rs)
        print("| %s | %s | %d | %s | " % (c, s, len(rs), loads)
              + " | ".join(cell(k, m[k]) for k in cols) + " |")
    for a, b in [("turnkey", "matchbox"), ("turnkey-b", "matchbox"), ("turnkey-b", "turnkey")]:
        if a in meds and b in meds:
            ratios.append("%s, %s / %s: " % (c, a, b) + ", ".join(
                "%s %.2f" % (k, meds[a][k] / meds[b][k]) for k in ratio_cols if meds[b][k]))
if ratios:
    print()
    print("\n".join(ratios))
PY
echo "runs: $OUT" >&2
